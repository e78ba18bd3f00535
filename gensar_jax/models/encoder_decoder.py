"""`EncoderDecoderModel`: the T5X-style wrapper the trainer, evaluator and decoder use.

It owns everything that is about *using* the network rather than computing it: the loss
(cross entropy with label smoothing and z-loss, returned as sums so a trainer can add
microbatches and devices up exactly), per-example scores, and the decoding building blocks
(`encode`, `cross_attention_kv`, `init_decoder_cache`, `decode_step`) that beam search
drives. Every method that takes `params` expects *unboxed* arrays (`flax.core.meta.unbox`),
is free of Python side effects and can be wrapped in `jax.jit` with shardings.

A decode loop passes `decode_step` the encoder output's `cross_attention_kv` rather than
the encoder output itself: the cross-attention keys/values are then projected once per
example instead of once per step in every decoder layer (for t5-small with 128 input
tokens, about 1 GFLOP per example per step).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import gin
import jax
import jax.numpy as jnp
import seqio

from gensar_jax.models.t5 import CrossAttentionKV, Encoded, Transformer
from gensar_jax.models.t5_config import T5Config

Array = jax.Array
Params = Any
Cache = Any
Batch = Mapping[str, Array]

# T5 starts decoding from PAD: the first decoder input token is 0.
DECODER_START_TOKEN = 0
TRAIN_FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                  "decoder_loss_weights")


def _require(batch: Batch, keys, where: str) -> None:
  missing = [k for k in keys if k not in batch]
  if missing:
    raise KeyError(f"EncoderDecoderModel.{where}: batch lacks {missing}; it has "
                   f"{sorted(batch)} (expected seqio.EncDecFeatureConverter output)")


def token_cross_entropy(logits: Array, targets: Array, weights: Array, label_smoothing: float,
                        z_loss: float) -> Dict[str, Array]:
  """Weighted token losses as sums over the batch (T5X's convention).

  logits [batch, length, vocab] float32, targets/weights [batch, length].
  Cross entropy against the smoothed target distribution (1 - label_smoothing on the
  target, the rest spread evenly over the other ids), minus that distribution's entropy
  so a perfect prediction costs zero; plus z_loss * log(Z)^2, which keeps the softmax
  normaliser near 1 and bfloat16 logits well scaled.
  """
  vocab = logits.shape[-1]
  logits = jnp.asarray(logits, jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)
  confidence = 1.0 - label_smoothing
  off_value = label_smoothing / (vocab - 1)
  # Entropy of the smoothed targets (0 without smoothing); 1e-20 guards log(0).
  target_entropy = -(confidence * jnp.log(confidence + 1e-20)
                     + (vocab - 1) * off_value * jnp.log(off_value + 1e-20))
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [batch, length]
  log_probs = logits - log_z[..., None]  # [batch, length, vocab]
  soft_targets = (jax.nn.one_hot(targets, vocab, dtype=jnp.float32) * (confidence - off_value)
                  + off_value)
  cross_entropy = -jnp.sum(soft_targets * log_probs, axis=-1) - target_entropy  # [batch, length]
  z_term = z_loss * jnp.square(log_z)  # [batch, length]
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {
      "loss_sum": jnp.sum((cross_entropy + z_term) * weights),
      "z_loss_sum": jnp.sum(z_term * weights),
      "weight_sum": jnp.sum(weights),
      "correct_sum": jnp.sum(correct * weights),
  }


def _cache_length(cache: Cache) -> int:
  """Length of the KV cache: axis 2 of any `cached_key` leaf (static; the cache is
  heads-major, [batch, heads, max_length, head_dim])."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]:
    if getattr(path[-1], "key", None) == "cached_key":
      return int(leaf.shape[2])
  raise ValueError("decode_step: the cache has no 'cached_key' leaf; build it with "
                   "init_decoder_cache (a model with 0 decoder layers cannot decode)")


class EncoderDecoderModel:
  """T5.1.1 network + vocabulary + loss: the object other stages code against."""

  FEATURE_CONVERTER_CLS = seqio.EncDecFeatureConverter

  def __init__(self, module: Transformer, vocabulary: seqio.Vocabulary,
               label_smoothing: float = 0.0, z_loss: float = 1e-4):
    vocab_size = module.config.require_vocab_size()
    if vocabulary.vocab_size > vocab_size:
      raise ValueError(f"EncoderDecoderModel: the vocabulary has {vocabulary.vocab_size} ids "
                       f"but the network's vocab_size is {vocab_size}; use "
                       "T5Config.with_vocabulary(vocabulary)")
    if not 0.0 <= label_smoothing < 1.0:
      raise ValueError(f"EncoderDecoderModel: label_smoothing must be in [0, 1), got "
                       f"{label_smoothing}")
    if z_loss < 0.0:
      raise ValueError(f"EncoderDecoderModel: z_loss must be >= 0, got {z_loss}")
    self.module = module
    self.vocabulary = vocabulary
    self.label_smoothing = float(label_smoothing)
    self.z_loss = float(z_loss)
    self._greedy = jax.jit(self._greedy_decode, static_argnames=("max_decode_length",))
    self._jitted_encode = jax.jit(self.encode)

  @property
  def eos_id(self) -> int:
    eos = self.vocabulary.eos_id
    return 1 if eos is None else int(eos)

  # --- initialisation -------------------------------------------------------------------
  def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, Tuple[int, ...]],
                            input_types: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Fresh variables {'params': ...}; params stay boxed (nn.LogicallyPartitioned)."""
    _require(input_shapes, ("encoder_input_tokens", "decoder_input_tokens"),
             "get_initial_variables")
    input_types = input_types or {}
    encoder_tokens = jnp.ones(input_shapes["encoder_input_tokens"],
                              input_types.get("encoder_input_tokens", jnp.int32))
    decoder_tokens = jnp.ones(input_shapes["decoder_input_tokens"],
                              input_types.get("decoder_input_tokens", jnp.int32))
    params_rng, dropout_rng = jax.random.split(rng)
    variables = self.module.init({"params": params_rng, "dropout": dropout_rng},
                                 encoder_tokens, decoder_tokens, enable_dropout=False)
    return {"params": variables["params"]}

  # --- training and scoring -------------------------------------------------------------
  def _logits(self, params: Params, batch: Batch, dropout_rng: Optional[Array]) -> Array:
    """Teacher-forced logits; a packed batch (segment ids present) is masked per example."""
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    return self.module.apply({"params": params}, batch["encoder_input_tokens"],
                             batch["decoder_input_tokens"],
                             enable_dropout=dropout_rng is not None, rngs=rngs,
                             encoder_segment_ids=batch.get("encoder_segment_ids"),
                             decoder_segment_ids=batch.get("decoder_segment_ids"))

  def loss_fn(self, params: Params, batch: Batch,
              dropout_rng: Optional[Array]) -> Tuple[Array, Dict[str, Array]]:
    """(loss_sum / weight_sum, {'loss_sum', 'z_loss_sum', 'weight_sum', 'correct_sum'})."""
    _require(batch, TRAIN_FEATURES, "loss_fn")
    logits = self._logits(params, batch, dropout_rng)  # [batch, length, vocab]
    sums = token_cross_entropy(logits, batch["decoder_target_tokens"],
                               batch["decoder_loss_weights"], self.label_smoothing, self.z_loss)
    loss = sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1e-8)
    return loss, sums

  def token_scores(self, params: Params, batch: Batch) -> Array:
    """[batch, length] float32: weight * log p(target) at every target position (a packed
    row's positions belong to the examples its decoder_segment_ids name)."""
    _require(batch, TRAIN_FEATURES, "token_scores")
    logits = self._logits(params, batch, None)  # [batch, length, vocab]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    target_log_probs = jnp.take_along_axis(
        log_probs, batch["decoder_target_tokens"][..., None], axis=-1)[..., 0]  # [batch, length]
    return target_log_probs * jnp.asarray(batch["decoder_loss_weights"], jnp.float32)

  def score_batch(self, params: Params, batch: Batch) -> Array:
    """[batch] float32: sum over target positions of weight * log p(target) (unpacked)."""
    return jnp.sum(self.token_scores(params, batch), axis=-1)

  # --- decoding building blocks ---------------------------------------------------------
  def encode(self, params: Params, encoder_input_tokens: Array) -> Array:
    """[batch, input_length] -> [batch, input_length, embed]."""
    return self.module.apply({"params": params}, encoder_input_tokens,
                             method=Transformer.encode)

  def cross_attention_kv(self, params: Params, encoded: Array) -> CrossAttentionKV:
    """encoded [batch, input_length, embed] -> one KeyValue per decoder layer, each
    [batch, heads, input_length, head_dim]; pass it to decode_step in place of `encoded`."""
    return self.module.apply({"params": params}, encoded,
                             method=Transformer.cross_attention_kv)

  def init_decoder_cache(self, params: Params, batch_size: int, max_decode_length: int) -> Cache:
    """A zero 'cache' for `batch_size` sequences (beams included) of up to
    `max_decode_length` tokens. Only shapes are traced, nothing is computed."""
    if batch_size < 1 or max_decode_length < 1:
      raise ValueError(f"init_decoder_cache: batch_size and max_decode_length must be "
                       f"positive, got {batch_size}, {max_decode_length}")
    emb_dim = self.module.config.emb_dim
    dtype = self.module.config.compute_dtype

    def create(params):
      encoded = jnp.zeros((batch_size, 1, emb_dim), dtype)
      encoder_tokens = jnp.ones((batch_size, 1), jnp.int32)
      decoder_tokens = jnp.zeros((batch_size, max_decode_length), jnp.int32)
      _, variables = self.module.apply({"params": params}, encoded, encoder_tokens,
                                       decoder_tokens, decode=True, mutable=["cache"],
                                       method=Transformer.decode)
      return variables["cache"]

    shapes = jax.eval_shape(create, params)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def decode_step(self, params: Params, cache: Cache, encoded: Encoded,
                  encoder_input_tokens: Array, decoder_tokens: Array) -> Tuple[Array, Cache]:
    """One incremental step: decoder_tokens [batch, 1] (the previous token; PAD at step 0)
    -> (logits [batch, vocab] float32, the updated cache).

    `encoded` is the encoder output or, to skip re-projecting it in every layer at every
    step, `cross_attention_kv(params, encoded)` computed once before the loop.
    """
    if decoder_tokens.ndim != 2 or decoder_tokens.shape[1] != 1:
      raise ValueError(f"decode_step: decoder_tokens must be [batch, 1], got "
                       f"{decoder_tokens.shape}")
    logits, variables = self.module.apply(
        {"params": params, "cache": cache}, encoded, encoder_input_tokens, decoder_tokens,
        decode=True, max_decode_length=_cache_length(cache), mutable=["cache"],
        method=Transformer.decode)
    return logits[:, 0, :], variables["cache"]  # [batch, vocab]

  def _greedy_decode(self, params: Params, encoder_input_tokens: Array,
                     max_decode_length: int) -> Array:
    batch_size = encoder_input_tokens.shape[0]
    encoded = self.encode(params, encoder_input_tokens)
    cross_kv = self.cross_attention_kv(params, encoded)  # once, not per step
    cache = self.init_decoder_cache(params, batch_size, max_decode_length)
    eos = self.eos_id
    real_vocab = self.vocabulary.vocab_size

    def step(i, state):
      cache, previous, output, finished = state
      logits, cache = self.decode_step(params, cache, cross_kv, encoder_input_tokens,
                                       previous[:, None])
      # Ids past the vocabulary (the padding up to a multiple of 128) cannot be detokenised.
      logits = jnp.where(jnp.arange(logits.shape[-1]) < real_vocab, logits, -jnp.inf)
      token = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [batch]
      token = jnp.where(finished, 0, token)  # PAD after EOS
      output = output.at[:, i].set(token)
      return cache, token, output, finished | (token == eos)

    state = (cache, jnp.full((batch_size,), DECODER_START_TOKEN, jnp.int32),
             jnp.zeros((batch_size, max_decode_length), jnp.int32),
             jnp.zeros((batch_size,), bool))
    return jax.lax.fori_loop(0, max_decode_length, step, state)[2]

  def predict_batch(self, params: Params, batch: Batch,
                    decode_fn: Optional[Callable[..., Array]] = None,
                    max_decode_length: Optional[int] = None, **decode_kwargs) -> Array:
    """Generated token ids [batch, length]; EOS kept, PAD after it.

    Greedy decoding with the KV cache in one jitted loop unless `decode_fn` (e.g. the
    constrained beam search) is given, which is then called as
    decode_fn(model=self, params=..., encoded=..., encoder_input_tokens=..., **kwargs).
    """
    _require(batch, ("encoder_input_tokens",), "predict_batch")
    encoder_input_tokens = jnp.asarray(batch["encoder_input_tokens"])
    if decode_fn is not None:
      encoded = self._jitted_encode(params, encoder_input_tokens)
      if max_decode_length is not None:
        decode_kwargs["max_decode_length"] = max_decode_length
      return decode_fn(model=self, params=params, encoded=encoded,
                       encoder_input_tokens=encoder_input_tokens, **decode_kwargs)
    if decode_kwargs:
      raise TypeError(f"predict_batch: greedy decoding takes no extra arguments, got "
                      f"{sorted(decode_kwargs)}")
    if max_decode_length is None:
      target = batch.get("decoder_input_tokens", batch.get("decoder_target_tokens"))
      if target is None:
        raise ValueError("predict_batch: pass max_decode_length or a batch with "
                         "decoder_input_tokens / decoder_target_tokens")
      max_decode_length = int(target.shape[1])
    return self._greedy(params, encoder_input_tokens, max_decode_length=int(max_decode_length))


@gin.configurable
def build_model(vocabulary: seqio.Vocabulary, config: Optional[T5Config] = None,
                label_smoothing: float = 0.0, z_loss: float = 1e-4) -> EncoderDecoderModel:
  """The model for a vocabulary: gin-bound T5Config sizes + the vocabulary's padded size."""
  config = (config or T5Config()).with_vocabulary(vocabulary)
  return EncoderDecoderModel(Transformer(config), vocabulary, label_smoothing=label_smoothing,
                             z_loss=z_loss)
