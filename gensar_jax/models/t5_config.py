"""Sizes and numerics of the T5 encoder-decoder, bound from gin (gin/models/*.gin).

The defaults are T5.1.1 (gated GELU, untied output layer); two fields express T5 v1.0
(`mlp_activations=("relu",)`, `logits_via_embedding=True`) so that its pretrained weights
load unchanged (gensar_jax/pretrained/).

The vocabulary size is the one field gin does not know: it belongs to the SentencePiece
model built for a dataset, so it is filled in at runtime with `with_vocabulary`, padded
up to a multiple of 128 (`vocab_size_for`). Padding keeps the embedding and logits
matrices evenly divisible over a `model` mesh axis and MXU-friendly on TPU; the padded ids
are never produced by the tokenizer and the model learns to give them no mass.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple, Union

import gin
import jax.numpy as jnp

VOCAB_PAD_MULTIPLE = 128
_DTYPES = ("float32", "bfloat16")
# MLP activation names (gensar_jax/models/layers.py MlpBlock). "gelu" is the tanh
# approximation (T5X's nn.gelu, Hugging Face's "gelu_new"); "gelu_exact" the erf form
# (Hugging Face's "gelu"); "linear" the identity (the ungated half of a gated MLP).
MLP_ACTIVATIONS = ("relu", "gelu", "gelu_exact", "silu", "linear")


def vocab_size_for(vocabulary: Any, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
  """The model's vocabulary size: the SeqIO vocabulary's size rounded up to `multiple`.

  Accepts a `seqio.Vocabulary` (its `vocab_size`, extra ids included) or a plain int.
  """
  size = vocabulary if isinstance(vocabulary, int) else getattr(vocabulary, "vocab_size", None)
  if not isinstance(size, int) or size < 1:
    raise ValueError(f"vocab_size_for: expected a seqio.Vocabulary or a positive int, got "
                     f"{vocabulary!r} (size {size!r})")
  if multiple < 1:
    raise ValueError(f"vocab_size_for: multiple must be positive, got {multiple}")
  return -(-size // multiple) * multiple


@gin.configurable
@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyper-parameters of the T5 network (pre-norm RMSNorm, no biases; T5.1.1 by default).

  Attributes:
    vocab_size: rows of the shared input embedding and columns of the (untied) output
      layer; None until `with_vocabulary` fills it from the SeqIO vocabulary.
    emb_dim: width of the residual stream (d_model).
    num_heads: attention heads per attention block.
    head_dim: width of one head (d_kv); num_heads * head_dim need not equal emb_dim.
    mlp_dim: hidden width of the gated-GELU MLP (d_ff).
    num_encoder_layers: encoder blocks.
    num_decoder_layers: decoder blocks.
    dropout_rate: dropout on the residual branches, attention weights and MLP hidden
      units; 0.0 for fine-tuning, as T5.1.1 recommends.
    dtype: compute dtype of activations ("float32" or "bfloat16"); attention softmax, the
      norms' statistics and the output logits are always float32.
    param_dtype: storage dtype of the parameters (float32; the optimizer wants it).
    relative_attention_num_buckets: buckets of the relative position bias.
    relative_attention_max_distance: distance beyond which all positions share a bucket.
    layer_norm_epsilon: RMSNorm epsilon.
    mlp_activations: one input projection per entry, multiplied together: ("gelu",
      "linear") is T5.1.1's gated GELU (kernels wi_0, wi_1); ("relu",) is T5 v1.0's
      ReLU MLP (one kernel, wi), the naming T5X uses.
    logits_via_embedding: T5 v1.0's tied output layer: logits = (decoder output *
      emb_dim**-0.5) @ embedding.T, and no `logits_dense` parameter.
    embedding_init_stddev: standard deviation of the token embedding's N(0, stddev^2)
      initialisation. 1.0 is T5X's, made for Adafactor, whose steps are relative to the
      parameter's scale. AdamW's steps are about the learning rate per coordinate
      whatever the scale: a row of width d initialised N(0, 1) has norm ~sqrt(d) and moves
      at most ~lr*sqrt(d) per step, a relative lr, while a kernel initialised at
      1/sqrt(fan_in) moves ~lr*sqrt(fan_in) relative to itself. At lr 3e-3 the identifier
      tokens' input rows, each updated only when its token occurs, moved a median 5% over
      the 450-step demo against 67% for their output columns. A smaller stddev (e.g.
      0.05, about 1/sqrt(emb_dim)) lets AdamW move the rows as far, relatively, as the
      kernels (see also create_optimizer.embedding_lr_multiplier). Pretrained weights
      replace the table, so it matters only from scratch.
  """
  vocab_size: Optional[int] = None
  emb_dim: int = 512
  num_heads: int = 8
  head_dim: int = 64
  mlp_dim: int = 1024
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  dropout_rate: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  mlp_activations: Tuple[str, ...] = ("gelu", "linear")
  logits_via_embedding: bool = False
  embedding_init_stddev: float = 1.0

  def __post_init__(self):
    # gin binds lists; a frozen dataclass hashes its fields, so keep a tuple.
    activations = self.mlp_activations
    activations = (activations,) if isinstance(activations, str) else tuple(activations)
    unknown = [a for a in activations if a not in MLP_ACTIVATIONS]
    if not activations or unknown:
      raise ValueError(f"T5Config.mlp_activations must be a non-empty sequence of "
                       f"{MLP_ACTIVATIONS}, got {self.mlp_activations!r}")
    object.__setattr__(self, "mlp_activations", activations)
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      canonical = jnp.dtype(value).name if not isinstance(value, str) else value
      if canonical not in _DTYPES:
        raise ValueError(f"T5Config.{name} must be one of {_DTYPES}, got {value!r}")
      object.__setattr__(self, name, canonical)
    for name in ("emb_dim", "num_heads", "head_dim", "mlp_dim",
                 "relative_attention_num_buckets", "relative_attention_max_distance"):
      if getattr(self, name) < 1:
        raise ValueError(f"T5Config.{name} must be positive, got {getattr(self, name)}")
    for name in ("num_encoder_layers", "num_decoder_layers"):
      if getattr(self, name) < 0:
        raise ValueError(f"T5Config.{name} must be >= 0, got {getattr(self, name)}")
    if self.vocab_size is not None and self.vocab_size < 1:
      raise ValueError(f"T5Config.vocab_size must be positive, got {self.vocab_size}")
    if not self.embedding_init_stddev > 0:
      raise ValueError("T5Config.embedding_init_stddev must be positive, got "
                       f"{self.embedding_init_stddev}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate}")
    if self.relative_attention_num_buckets < 4:
      # Bidirectional buckets are halved, and half of those are exact distances.
      raise ValueError("T5Config.relative_attention_num_buckets must be >= 4, got "
                       f"{self.relative_attention_num_buckets}")

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def parameter_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  def with_vocabulary(self, vocabulary: Union[Any, int]) -> "T5Config":
    """A copy whose vocab_size is the vocabulary's size padded to a multiple of 128."""
    return dataclasses.replace(self, vocab_size=vocab_size_for(vocabulary))

  def require_vocab_size(self) -> int:
    if self.vocab_size is None:
      raise ValueError("T5Config.vocab_size is not set: build the config with "
                       "`T5Config().with_vocabulary(vocabulary)` (or use "
                       "gensar_jax.models.build_model) before creating the network")
    return self.vocab_size
