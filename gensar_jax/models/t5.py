"""The T5 encoder-decoder network (Flax linen): T5.1.1 by default, T5 v1.0 by config.

Pre-norm residual blocks (RMSNorm -> sublayer -> dropout -> add), gated-GELU MLPs (ReLU
for T5 v1.0, `T5Config.mlp_activations`), one relative position bias table per stack
computed once and shared by its layers, a token embedding shared by encoder and decoder
inputs, and a separate (untied) output layer `logits_dense` (T5 v1.0 instead projects on
the embedding, `T5Config.logits_via_embedding`). No biases anywhere. The decoder supports
incremental decoding with a KV cache (`decode=True`, 'cache' collection); see
`MultiHeadAttention`. Its cross-attention keys/values depend only on the encoder output,
so a decode loop computes them once (`Transformer.cross_attention_kv`) and passes them in
place of `encoded` at every step.

Packed rows (several examples per row, SeqIO's `EncDecFeatureConverter(pack=True)`) are
honoured through the segment ids alone: attention is masked to the query's own segment,
and the relative position bias needs no per-segment positions, because it depends only on
key position - query position, which is the same whether positions restart at each
segment or run along the row. A row without segment ids is one example (padding = id 0).

Layers are a plain Python loop (`layers_0`, `layers_1`, ...), not `nn.scan`: a handful of
layers compiles fast enough and keeps parameter paths readable.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from gensar_jax.models.layers import (Dense, Dropout, Embed, KeyValue, MlpBlock,
                                      MultiHeadAttention, RelativePositionBias, RMSNorm,
                                      causal_mask, constrain, key_padding_mask,
                                      segment_mask)
from gensar_jax.models.t5_config import T5Config

Array = jax.Array
# One KeyValue per decoder layer: the projected encoder output its cross-attention reads.
CrossAttentionKV = Tuple[KeyValue, ...]
# What the decoder reads of the input: the encoder output [batch, input_length, embed], or
# its CrossAttentionKV, which spares re-projecting it in every layer at every decode step.
Encoded = Union[Array, CrossAttentionKV]


def _norm(config: T5Config, name: str) -> RMSNorm:
  return RMSNorm(epsilon=config.layer_norm_epsilon, dtype=config.compute_dtype,
                 param_dtype=config.parameter_dtype, name=name)


def _attention(config: T5Config, name: Optional[str]) -> MultiHeadAttention:
  return MultiHeadAttention(num_heads=config.num_heads, head_dim=config.head_dim,
                            dropout_rate=config.dropout_rate, dtype=config.compute_dtype,
                            param_dtype=config.parameter_dtype, name=name)


def _mlp(config: T5Config) -> MlpBlock:
  return MlpBlock(mlp_dim=config.mlp_dim, activations=config.mlp_activations,
                  dropout_rate=config.dropout_rate, dtype=config.compute_dtype,
                  param_dtype=config.parameter_dtype, name="mlp")


def _residual_dropout(config: T5Config, x: Array, deterministic: bool) -> Array:
  # Broadcast over the length axis, as T5 does for its residual dropout.
  return Dropout(config.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)


class EncoderLayer(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, mask: Array, bias: Array, deterministic: bool) -> Array:
    cfg = self.config
    # [batch, length, embed]
    h = _norm(cfg, "pre_attention_norm")(x)
    h = _attention(cfg, "attention")(h, h, mask=mask, bias=bias, deterministic=deterministic)
    x = x + _residual_dropout(cfg, h, deterministic)
    h = _norm(cfg, "pre_mlp_norm")(x)
    h = _mlp(cfg)(h, deterministic=deterministic)
    x = x + _residual_dropout(cfg, h, deterministic)
    return constrain(x, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
  """Self-attention, cross-attention to the encoder output, MLP.

  The cross-attention is a `setup` attribute (named as before, so parameter paths do not
  change) rather than inline, so `cross_attention_kv` can reach it outside `__call__`.
  """
  config: T5Config

  def setup(self):
    self.encoder_decoder_attention = _attention(self.config, None)

  def cross_attention_kv(self, encoded: Array) -> KeyValue:
    """encoded [batch, input_length, embed] -> keys/values [batch, heads, input_length, kv]."""
    return self.encoder_decoder_attention.project_kv(encoded)

  @nn.compact
  def __call__(self, x: Array, encoded: Union[Array, KeyValue], self_mask: Optional[Array],
               cross_mask: Array, bias: Array, decode: bool, deterministic: bool) -> Array:
    """`encoded` is the encoder output or this layer's `cross_attention_kv` of it."""
    cfg = self.config
    # [batch, target_length, embed]
    h = _norm(cfg, "pre_self_attention_norm")(x)
    h = _attention(cfg, "self_attention")(h, h, mask=self_mask, bias=bias, decode=decode,
                                          deterministic=deterministic)
    x = x + _residual_dropout(cfg, h, deterministic)
    h = _norm(cfg, "pre_cross_attention_norm")(x)
    h = self.encoder_decoder_attention(h, encoded, mask=cross_mask,
                                       deterministic=deterministic)
    x = x + _residual_dropout(cfg, h, deterministic)
    h = _norm(cfg, "pre_mlp_norm")(x)
    h = _mlp(cfg)(h, deterministic=deterministic)
    x = x + _residual_dropout(cfg, h, deterministic)
    return constrain(x, ("batch", "length", "embed"))


class Encoder(nn.Module):
  config: T5Config
  token_embedder: nn.Module

  @nn.compact
  def __call__(self, encoder_input_tokens: Array, deterministic: bool = True,
               encoder_segment_ids: Optional[Array] = None) -> Array:
    cfg = self.config
    length = encoder_input_tokens.shape[1]
    x = self.token_embedder(encoder_input_tokens)  # [batch, length, embed]
    x = constrain(x, ("batch", "length", "embed"))
    x = _residual_dropout(cfg, x, deterministic)
    if encoder_segment_ids is None:
      mask = key_padding_mask(encoder_input_tokens)  # [batch, 1, 1, length]
    else:  # packed: each token sees its own example only
      mask = segment_mask(encoder_segment_ids, encoder_segment_ids)  # [batch, 1, len, len]
    positions = jnp.arange(length)
    bias = RelativePositionBias(
        num_heads=cfg.num_heads, bidirectional=True,
        num_buckets=cfg.relative_attention_num_buckets,
        max_distance=cfg.relative_attention_max_distance,
        param_dtype=cfg.parameter_dtype, name="relpos_bias")(positions, positions)
    for i in range(cfg.num_encoder_layers):
      x = EncoderLayer(cfg, name=f"layers_{i}")(x, mask, bias, deterministic)
    x = _norm(cfg, "encoder_norm")(x)
    return _residual_dropout(cfg, x, deterministic)


class Decoder(nn.Module):
  config: T5Config
  token_embedder: nn.Module

  def setup(self):
    # A list attribute names its modules layers_0, layers_1, ... as the inline loop did.
    self.layers = [DecoderLayer(self.config) for _ in range(self.config.num_decoder_layers)]

  def cross_attention_kv(self, encoded: Array) -> CrossAttentionKV:
    """encoded [batch, input_length, embed] -> one KeyValue per layer, each
    [batch, heads, input_length, kv] in the compute dtype."""
    encoded = jnp.asarray(encoded, self.config.compute_dtype)
    return tuple(layer.cross_attention_kv(encoded) for layer in self.layers)

  @nn.compact
  def __call__(self, encoded: Encoded, encoder_input_tokens: Array,
               decoder_input_tokens: Array, decode: bool = False,
               max_decode_length: Optional[int] = None, deterministic: bool = True,
               encoder_segment_ids: Optional[Array] = None,
               decoder_segment_ids: Optional[Array] = None) -> Array:
    """-> logits [batch, target_length, vocab] in float32.

    `encoded` is the encoder output [batch, input_length, embed] or its
    `cross_attention_kv`; the latter skips re-projecting it at every decoding step.
    With segment ids (packed rows, teacher forcing only) each target token attends to the
    earlier tokens of its own example and to that example's input tokens.
    In decode mode the decoder keeps its own scalar step counter (`decode_position`) to
    place the single new query for the relative position bias; `max_decode_length` is the
    length of the KV cache (the bias row covers every cache slot).
    """
    cfg = self.config
    target_length = decoder_input_tokens.shape[1]
    self_mask = None
    if decode:
      is_initialized = self.has_variable("cache", "decode_position")
      step = self.variable("cache", "decode_position", lambda: jnp.array(0, jnp.int32))
      if is_initialized:
        if max_decode_length is None:
          raise ValueError("Decoder: incremental decoding needs max_decode_length (the KV "
                           "cache length)")
        query_positions = step.value + jnp.arange(target_length)
        key_positions = jnp.arange(max_decode_length)
        step.value = step.value + target_length
      else:
        # Cache-creating call: a full-length pass whose outputs are discarded.
        query_positions = key_positions = jnp.arange(target_length)
        self_mask = causal_mask(target_length)
    else:
      query_positions = key_positions = jnp.arange(target_length)
      # Causal only: padded target positions carry zero loss weight, and real queries
      # never see the padding after them, so no padding mask is needed here.
      self_mask = causal_mask(target_length)

    if isinstance(encoded, (tuple, list)):
      if len(encoded) != cfg.num_decoder_layers:
        raise ValueError(f"Decoder: {len(encoded)} precomputed cross-attention keys/values "
                         f"for {cfg.num_decoder_layers} layers")
      memory = [KeyValue(*kv) for kv in encoded]
      encoded_shape = memory[0].key.shape if memory else encoder_input_tokens.shape
    else:
      memory = [jnp.asarray(encoded, cfg.compute_dtype)] * cfg.num_decoder_layers
      encoded_shape = encoded.shape
    packed = encoder_segment_ids is not None or decoder_segment_ids is not None
    if packed:
      if decode or encoder_segment_ids is None or decoder_segment_ids is None:
        raise ValueError("Decoder: packed rows need both encoder and decoder segment ids, "
                         "and are for teacher forcing, not incremental decoding")
      # [batch, 1, target_length, target_length]
      self_mask = jnp.logical_and(self_mask, segment_mask(decoder_segment_ids,
                                                          decoder_segment_ids))
      # [batch, 1, target_length, input_length]
      cross_mask = segment_mask(decoder_segment_ids, encoder_segment_ids)
    else:
      cross_mask = key_padding_mask(encoder_input_tokens)  # [batch, 1, 1, input_length]
    # The decoder batch may be a multiple of the encoder batch (beams or samples per
    # example, beam-major within each example); cross-attention groups them.
    if (encoded_shape[0] != cross_mask.shape[0]
        or decoder_input_tokens.shape[0] % encoded_shape[0]):
      raise ValueError(f"Decoder: batch sizes differ: decoder tokens "
                       f"{decoder_input_tokens.shape}, encoded {encoded_shape}, encoder "
                       f"tokens {encoder_input_tokens.shape} (the decoder batch must be a "
                       "multiple of the encoder batch)")
    bias = RelativePositionBias(
        num_heads=cfg.num_heads, bidirectional=False,
        num_buckets=cfg.relative_attention_num_buckets,
        max_distance=cfg.relative_attention_max_distance,
        param_dtype=cfg.parameter_dtype, name="relpos_bias")(query_positions, key_positions)

    x = self.token_embedder(decoder_input_tokens)  # [batch, target_length, embed]
    x = constrain(x, ("batch", "length", "embed"))
    x = _residual_dropout(cfg, x, deterministic)
    for layer, layer_memory in zip(self.layers, memory):
      x = layer(x, layer_memory, self_mask, cross_mask, bias, decode, deterministic)
    x = _norm(cfg, "decoder_norm")(x)
    x = _residual_dropout(cfg, x, deterministic)
    if cfg.logits_via_embedding:
      # T5 v1.0: the tied embedding, after rescaling by d_model**-0.5 (T5X, Hugging Face).
      logits = self.token_embedder.attend(x * (cfg.emb_dim ** -0.5))  # [batch, len, vocab]
    else:
      # Untied output layer (T5.1.1); logits in float32 for the softmax and the loss.
      logits = Dense(cfg.require_vocab_size(), ("embed", "vocab"), dtype=jnp.float32,
                     param_dtype=cfg.parameter_dtype, name="logits_dense")(x)
    return constrain(logits, ("batch", "length", "vocab"))


class Transformer(nn.Module):
  """Encoder + decoder with a shared token embedding (`token_embedder`)."""
  config: T5Config

  def setup(self):
    cfg = self.config
    # N(0, stddev^2) rows; T5Config.embedding_init_stddev says why it is configurable.
    init = nn.initializers.normal(stddev=cfg.embedding_init_stddev)
    self.token_embedder = Embed(num_embeddings=cfg.require_vocab_size(), features=cfg.emb_dim,
                                dtype=cfg.compute_dtype, param_dtype=cfg.parameter_dtype,
                                embedding_init=init)
    self.encoder = Encoder(cfg, token_embedder=self.token_embedder)
    self.decoder = Decoder(cfg, token_embedder=self.token_embedder)

  def encode(self, encoder_input_tokens: Array, enable_dropout: bool = False,
             encoder_segment_ids: Optional[Array] = None) -> Array:
    """[batch, input_length] -> [batch, input_length, embed]."""
    _check_tokens("encoder_input_tokens", encoder_input_tokens)
    return self.encoder(encoder_input_tokens, deterministic=not enable_dropout,
                        encoder_segment_ids=encoder_segment_ids)

  def cross_attention_kv(self, encoded: Array) -> CrossAttentionKV:
    """The decoder's per-layer cross-attention keys/values of `encoded` (see Decoder)."""
    return self.decoder.cross_attention_kv(encoded)

  def decode(self, encoded: Encoded, encoder_input_tokens: Array,
             decoder_input_tokens: Array, decode: bool = False,
             max_decode_length: Optional[int] = None, enable_dropout: bool = False,
             encoder_segment_ids: Optional[Array] = None,
             decoder_segment_ids: Optional[Array] = None) -> Array:
    """-> logits [batch, target_length, vocab] (float32); `encoded` may be the output of
    `cross_attention_kv`."""
    _check_tokens("decoder_input_tokens", decoder_input_tokens)
    return self.decoder(encoded, encoder_input_tokens, decoder_input_tokens, decode=decode,
                        max_decode_length=max_decode_length,
                        deterministic=not enable_dropout,
                        encoder_segment_ids=encoder_segment_ids,
                        decoder_segment_ids=decoder_segment_ids)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               enable_dropout: bool = False, encoder_segment_ids: Optional[Array] = None,
               decoder_segment_ids: Optional[Array] = None) -> Array:
    """Teacher-forced forward pass -> logits [batch, target_length, vocab] (float32).

    Segment ids [batch, length] (both or neither) mark the examples of packed rows.
    """
    encoded = self.encode(encoder_input_tokens, enable_dropout=enable_dropout,
                          encoder_segment_ids=encoder_segment_ids)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       enable_dropout=enable_dropout, encoder_segment_ids=encoder_segment_ids,
                       decoder_segment_ids=decoder_segment_ids)


def _check_tokens(name: str, tokens: Array) -> None:
  if tokens.ndim != 2:
    raise ValueError(f"Transformer: {name} must be [batch, length], got shape {tokens.shape}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise TypeError(f"Transformer: {name} must hold integer token ids, got {tokens.dtype}")
