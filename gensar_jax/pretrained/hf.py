"""Hugging Face T5 folders: config.json + model.safetensors (or its sharded index).

Reads the tensors by their Hugging Face names with `safetensors` (no torch, no
transformers) and says, for every parameter of our network, which tensor fills it:
torch Linear weights are [out, in] and ours [in, out], so kernels are transposed; the
relative attention bias lives in block 0 of each stack as [buckets, heads] (ours [heads,
buckets]); T5 attention has no 1/sqrt(d) scaling and neither does our forward pass (the
scaling is folded into our *initialiser* only), so the query weight is copied unscaled.

config.json decides the architecture: `hf_config_fields` turns it into T5Config fields,
and refuses, naming the field, what our network cannot compute (e.g. umT5's per-layer
position bias).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from gensar_jax.checkpoints import CheckpointError
from gensar_jax.pretrained.params import Path, Source, same, transposed

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SPIECE_FILE = "spiece.model"
# Hugging Face activation names -> ours (gensar_jax/models/t5_config.py MLP_ACTIVATIONS).
_ACTIVATIONS = {"relu": "relu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu",
                "gelu": "gelu_exact", "silu": "silu", "swish": "silu"}
_MODEL_TYPES = ("t5", "mt5")
# Copies of the shared embedding some exports write beside shared.weight.
TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def read_config(folder: str) -> Dict[str, Any]:
  path = os.path.join(folder, CONFIG_FILE)
  if not os.path.isfile(path):
    raise CheckpointError(f"{folder}: no {CONFIG_FILE}; a Hugging Face T5 folder holds "
                          f"{CONFIG_FILE} and {WEIGHTS_FILE}")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not JSON ({e})") from None


def hf_config_fields(config: Mapping[str, Any], file: str = CONFIG_FILE) -> Dict[str, Any]:
  """The T5Config fields config.json describes (all but dtype, dropout and vocab_size)."""
  model_type = config.get("model_type", "t5")
  if model_type not in _MODEL_TYPES:
    raise CheckpointError(f"{file}: model_type {model_type!r} is not T5 (supported: "
                          f"{', '.join(_MODEL_TYPES)})")
  proj = config.get("feed_forward_proj", "relu")
  gated = proj.startswith("gated-")
  # Hugging Face's reading of feed_forward_proj: "gated-gelu" means the tanh GELU.
  act = "gelu_new" if proj == "gated-gelu" else proj.split("-")[-1]
  if act not in _ACTIVATIONS or proj.count("-") > 1 or (proj.count("-") and not gated):
    raise CheckpointError(f"{file}: feed_forward_proj {proj!r} cannot be expressed by "
                          f"T5Config.mlp_activations (activations: {sorted(_ACTIVATIONS)})")
  try:
    layers = int(config["num_layers"])
    return {
        "emb_dim": int(config["d_model"]),
        "num_heads": int(config["num_heads"]),
        "head_dim": int(config["d_kv"]),
        "mlp_dim": int(config["d_ff"]),
        "num_encoder_layers": layers,
        "num_decoder_layers": int(config.get("num_decoder_layers") or layers),
        "relative_attention_num_buckets": int(config.get("relative_attention_num_buckets", 32)),
        "relative_attention_max_distance": int(config.get("relative_attention_max_distance",
                                                          128)),
        "layer_norm_epsilon": float(config.get("layer_norm_epsilon", 1e-6)),
        "mlp_activations": ((_ACTIVATIONS[act], "linear") if gated else (_ACTIVATIONS[act],)),
        "logits_via_embedding": bool(config.get("tie_word_embeddings", True)),
    }
  except KeyError as e:
    raise CheckpointError(f"{file}: no field {e.args[0]!r}") from None


def read_tensors(folder: str) -> Tuple[Dict[str, np.ndarray], str]:
  """({name: array}, the file named in errors) of model.safetensors or its shards."""
  from safetensors import safe_open

  index = os.path.join(folder, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    where = index
  elif os.path.isfile(os.path.join(folder, WEIGHTS_FILE)):
    files, where = [WEIGHTS_FILE], os.path.join(folder, WEIGHTS_FILE)
  else:
    raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} (nor {INDEX_FILE}); save the model "
                          "with safe_serialization=True (PyTorch .bin files are not read)")
  tensors: Dict[str, np.ndarray] = {}
  for name in files:
    path = os.path.join(folder, name)
    try:
      with safe_open(path, framework="numpy") as f:
        for key in f.keys():
          tensors[key] = f.get_tensor(key)
    except (OSError, ValueError, TypeError) as e:
      raise CheckpointError(f"{path}: cannot read safetensors ({e})") from None
  return tensors, where


_ATTENTION = {"query": "q", "key": "k", "value": "v", "out": "o"}
# Our block module -> (Hugging Face sub-layer index, its module name), per stack.
_SUBLAYERS = {
    "encoder": {"pre_attention_norm": (0, "layer_norm"), "attention": (0, "SelfAttention"),
                "pre_mlp_norm": (1, "layer_norm"), "mlp": (1, "DenseReluDense")},
    "decoder": {"pre_self_attention_norm": (0, "layer_norm"),
                "self_attention": (0, "SelfAttention"),
                "pre_cross_attention_norm": (1, "layer_norm"),
                "encoder_decoder_attention": (1, "EncDecAttention"),
                "pre_mlp_norm": (2, "layer_norm"), "mlp": (2, "DenseReluDense")},
}


def source(path: Path, tensors: Mapping[str, np.ndarray]) -> Source:
  """The Hugging Face tensor (and its layout) that fills our parameter `path`."""
  stack = path[0]
  if path == ("token_embedder", "embedding"):
    if "shared.weight" not in tensors and TIED_COPIES[0] in tensors:
      return TIED_COPIES[0], same
    return "shared.weight", same
  if path[1] == "relpos_bias":  # [buckets, heads] -> [heads, buckets]
    return f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", transposed
  if path[1] in ("encoder_norm", "decoder_norm"):
    return f"{stack}.final_layer_norm.weight", same
  if path[1] == "logits_dense":
    return "lm_head.weight", transposed
  block = int(path[1].split("_")[1])
  index, module = _SUBLAYERS[stack][path[2]]
  prefix = f"{stack}.block.{block}.layer.{index}"
  if module == "layer_norm":
    return f"{prefix}.layer_norm.weight", same
  return f"{prefix}.{module}.{_ATTENTION.get(path[3], path[3])}.weight", transposed


def ignorable(tensors: Mapping[str, np.ndarray], tied: bool) -> Tuple[str, ...]:
  """Checkpoint names that may stay unread: the embedding's copies, and lm_head when it
  is only a copy of the tied embedding (some exports write it)."""
  names = list(TIED_COPIES)
  if tied and "lm_head.weight" in tensors and "shared.weight" in tensors:
    if np.array_equal(tensors["lm_head.weight"], tensors["shared.weight"]):
      names.append("lm_head.weight")
  return tuple(names)
