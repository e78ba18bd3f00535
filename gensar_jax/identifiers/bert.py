"""A BERT encoder in Flax that reads Hugging Face BERT checkpoints without PyTorch.

The identifiers stage needs frozen sentence embeddings (MiniLM here, BGE-base or E5 for
users who have them). All of these share the original BERT layout, so one small
inference-only module plus a key-mapping function covers them; there is no dropout and
no pooler because nothing here is trained and sentence encoders pool the token states.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# The HF config fields the network needs; the rest (dropout, architectures...) is ignored.
_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "intermediate_size", "max_position_embeddings", "type_vocab_size", "layer_norm_eps")

# A key every BERT checkpoint has; whatever precedes it is the checkpoint's prefix.
_ANCHOR_KEY = "embeddings.word_embeddings.weight"


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Sizes of a BERT checkpoint, named as in its Hugging Face `config.json`."""
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int
  layer_norm_eps: float

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_dict(cls, raw: Mapping[str, Any], source: str = "config") -> "BertConfig":
    """Builds a config, refusing checkpoints this module would silently compute wrong.

    Args:
      raw: the parsed `config.json`.
      source: where `raw` came from, for error messages.
    """
    missing = [name for name in _CONFIG_FIELDS if name not in raw]
    if missing:
      raise ValueError(f"{source} lacks BERT fields {missing}")
    act = raw.get("hidden_act", "gelu")
    if act != "gelu":
      raise ValueError(
          f"{source}: hidden_act={act!r} is not supported; this encoder implements the "
          "exact-erf 'gelu' of BERT, BGE, E5 and MiniLM")
    position_type = raw.get("position_embedding_type", "absolute")
    if position_type != "absolute":
      raise ValueError(
          f"{source}: position_embedding_type={position_type!r} is not supported "
          "(only 'absolute')")
    config = cls(**{name: raw[name] for name in _CONFIG_FIELDS})
    if config.hidden_size % config.num_attention_heads:
      raise ValueError(
          f"{source}: hidden_size {config.hidden_size} is not divisible by "
          f"num_attention_heads {config.num_attention_heads}")
    return config

  @classmethod
  def from_json_file(cls, path: str) -> "BertConfig":
    with open(path, encoding="utf-8") as f:
      return cls.from_dict(json.load(f), source=path)


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, then LayerNorm."""
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    cfg = self.config
    length = input_ids.shape[1]
    words = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="word_embeddings")(
        input_ids)  # [batch, length, hidden]
    positions = nn.Embed(
        cfg.max_position_embeddings, cfg.hidden_size, name="position_embeddings")(
            jnp.arange(length)[None, :])  # [1, length, hidden]
    types = nn.Embed(cfg.type_vocab_size, cfg.hidden_size, name="token_type_embeddings")(
        token_type_ids)  # [batch, length, hidden]
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="LayerNorm")(
        words + positions + types)  # [batch, length, hidden]


class BertLayer(nn.Module):
  """One post-LN transformer layer: attention, add & norm, GELU MLP, add & norm."""
  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
    cfg = self.config
    batch, length, _ = x.shape
    heads = (batch, length, cfg.num_attention_heads, cfg.head_dim)
    q = nn.Dense(cfg.hidden_size, name="query")(x).reshape(heads)  # [batch, q_len, heads, head_dim]
    k = nn.Dense(cfg.hidden_size, name="key")(x).reshape(heads)  # [batch, k_len, heads, head_dim]
    v = nn.Dense(cfg.hidden_size, name="value")(x).reshape(heads)  # [batch, k_len, heads, head_dim]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)  # [batch, heads, q_len, k_len]
    scores = scores / np.sqrt(cfg.head_dim)
    keep = attention_mask[:, None, None, :].astype(bool)  # [batch, 1, 1, k_len]
    scores = jnp.where(keep, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)  # [batch, heads, q_len, k_len]
    context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(
        batch, length, cfg.hidden_size)  # [batch, length, hidden]
    attended = nn.Dense(cfg.hidden_size, name="attention_output")(context)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="attention_LayerNorm")(
        x + attended)  # [batch, length, hidden]
    h = nn.Dense(cfg.intermediate_size, name="intermediate")(x)  # [batch, length, intermediate]
    h = nn.gelu(h, approximate=False)
    h = nn.Dense(cfg.hidden_size, name="output")(h)  # [batch, length, hidden]
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="output_LayerNorm")(
        x + h)  # [batch, length, hidden]


class BertEncoder(nn.Module):
  """Token states of the last layer (no pooler: sentence encoders pool these)."""
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array | None = None) -> jax.Array:
    """Returns [batch, length, hidden] from [batch, length] ids and 0/1 mask."""
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)  # [batch, length]
    x = BertEmbeddings(self.config, name="embeddings")(input_ids, token_type_ids)
    for i in range(self.config.num_hidden_layers):
      x = BertLayer(self.config, name=f"layer_{i}")(x, attention_mask)  # [batch, length, hidden]
    return x


# Flax path inside one layer -> HF key suffix inside `encoder.layer.N.`.
_LAYER_KEYS: Dict[Tuple[str, str], str] = {
    ("query", "kernel"): "attention.self.query.weight",
    ("query", "bias"): "attention.self.query.bias",
    ("key", "kernel"): "attention.self.key.weight",
    ("key", "bias"): "attention.self.key.bias",
    ("value", "kernel"): "attention.self.value.weight",
    ("value", "bias"): "attention.self.value.bias",
    ("attention_output", "kernel"): "attention.output.dense.weight",
    ("attention_output", "bias"): "attention.output.dense.bias",
    ("attention_LayerNorm", "scale"): "attention.output.LayerNorm.weight",
    ("attention_LayerNorm", "bias"): "attention.output.LayerNorm.bias",
    ("intermediate", "kernel"): "intermediate.dense.weight",
    ("intermediate", "bias"): "intermediate.dense.bias",
    ("output", "kernel"): "output.dense.weight",
    ("output", "bias"): "output.dense.bias",
    ("output_LayerNorm", "scale"): "output.LayerNorm.weight",
    ("output_LayerNorm", "bias"): "output.LayerNorm.bias",
}

_EMBEDDING_KEYS: Dict[Tuple[str, str], str] = {
    ("word_embeddings", "embedding"): "embeddings.word_embeddings.weight",
    ("position_embeddings", "embedding"): "embeddings.position_embeddings.weight",
    ("token_type_embeddings", "embedding"): "embeddings.token_type_embeddings.weight",
    ("LayerNorm", "scale"): "embeddings.LayerNorm.weight",
    ("LayerNorm", "bias"): "embeddings.LayerNorm.bias",
}


def _key_prefix(state_dict: Mapping[str, np.ndarray]) -> str:
  """'' for plain BertModel checkpoints, 'bert.' (or similar) for wrapped ones."""
  prefixes = sorted(k[:-len(_ANCHOR_KEY)] for k in state_dict if k.endswith(_ANCHOR_KEY))
  if not prefixes:
    raise ValueError(
        f"not a BERT checkpoint: no key ends with {_ANCHOR_KEY!r} "
        f"(first keys: {sorted(state_dict)[:5]})")
  return prefixes[0]  # the shortest prefix is the encoder itself


def expected_param_shapes(config: BertConfig) -> Dict[str, Any]:
  """Parameter shapes of `BertEncoder(config)`, computed without allocating weights."""
  ids = jnp.zeros((1, 1), jnp.int32)
  variables = jax.eval_shape(BertEncoder(config).init, jax.random.PRNGKey(0), ids, ids)
  return jax.tree_util.tree_map(lambda s: s.shape, variables["params"])


def params_from_state_dict(state_dict: Mapping[str, np.ndarray],
                           config: BertConfig) -> Dict[str, Any]:
  """Maps a HF BERT state dict onto `BertEncoder` params (float32, kernels transposed).

  Every key is checked before any is used, so a wrong or truncated checkpoint fails with
  the full list of what is missing or misshapen instead of an error deep inside jit.
  Pooler, `position_ids` and head weights (e.g. `cls.*`) are ignored.
  """
  prefix = _key_prefix(state_dict)
  wanted: Dict[Tuple[str, ...], str] = {
      ("embeddings",) + path: prefix + key for path, key in _EMBEDDING_KEYS.items()}
  for i in range(config.num_hidden_layers):
    for path, key in _LAYER_KEYS.items():
      wanted[(f"layer_{i}",) + path] = f"{prefix}encoder.layer.{i}.{key}"
  missing = [key for key in wanted.values() if key not in state_dict]
  if missing:
    shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
    raise ValueError(f"checkpoint lacks {len(missing)} BERT weight(s): {shown}")

  shapes = expected_param_shapes(config)
  params: Dict[str, Any] = {}
  mismatched = []
  for path, key in wanted.items():
    value = np.asarray(state_dict[key], dtype=np.float32)
    if path[-1] == "kernel":
      value = value.T  # torch Linear stores [out, in]; Flax Dense wants [in, out]
    expected = shapes
    for name in path:
      expected = expected[name]
    if value.shape != tuple(expected):
      mismatched.append(f"{key}: {value.shape} vs config {tuple(expected)}")
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  if mismatched:
    raise ValueError("checkpoint weights do not match config.json: " + "; ".join(mismatched[:8]))
  return params
