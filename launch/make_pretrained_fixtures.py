"""Writes small random pretrained-T5 checkpoints in the formats gensar_jax/pretrained reads.

Why: the pretrained loaders must be tested without downloading weights. This script makes
checkpoints of the same *layout* as the published ones, at toy sizes and with random
values: a Hugging Face folder (config.json, model.safetensors, spiece.model) for T5 v1.0
(ReLU MLP, tied output) and T5.1.1 (gated GELU, untied `lm_head`), and a legacy T5X
checkpoint (`checkpoint_<step>/checkpoint`, a msgpack of {'version', 'optimizer':
{'target': params, 'state': ...}} in which some arrays are tensorstore zarr arrays the
msgpack points to by their spec) made from the same values (and, on request, the newer
Orbax layout, `checkpoint_<step>/state/`). The Hugging Face tensor names
are the ground truth; the T5X names are derived from them here (independently of the
loaders), so one reference forward pass over the Hugging Face names checks both readers.

  .venv/bin/python launch/make_pretrained_fixtures.py /tmp/fixtures   # writes hf_t5_1_1/,
      hf_t5/, t5x_t5_1_1/checkpoint_1000/, t5x_t5/checkpoint_1000/, spiece.model

tests/test_pretrained.py imports it to write into tmp_path.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict

import numpy as np

# Tiny shapes: every test runs in seconds on a CPU.
TINY = dict(d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2, num_decoder_layers=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=20,
            layer_norm_epsilon=1e-6)
VARIANTS = {
    "t5": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "t5_1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}
# The spiece's pieces plus T5's 100 sentinel ids, padded as T5 pads (32100 -> 32128).
EXTRA_IDS = 100
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a film about a toy cowboy and a space ranger",
    "released in 1995 genres animation children comedy",
    "search for an action movie with a spy",
    "recommend the next movie this user will watch",
    "thriller horror mystery drama romance musical",
] * 20


def write_spiece_model(path: str, vocab_size: int = 80) -> str:
  """A tiny unigram SentencePiece model with T5's conventions (pad 0, eos 1, unk 2, no bos,
  a dummy prefix), trained in-process on a few sentences."""
  import io

  import sentencepiece as spm

  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(SENTENCES), model_writer=model, model_type="unigram",
      vocab_size=vocab_size, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2,
      bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
      character_coverage=1.0, num_threads=1, minloglevel=2)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    f.write(model.getvalue())
  return path


def piece_count(spiece_path: str) -> int:
  import sentencepiece as spm
  return spm.SentencePieceProcessor(model_file=spiece_path).get_piece_size()


def hf_config(variant: str, pieces: int) -> Dict:
  vocab = -(-(pieces + EXTRA_IDS) // 128) * 128
  return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
          "vocab_size": vocab, "dropout_rate": 0.1, "decoder_start_token_id": 0,
          "pad_token_id": 0, "eos_token_id": 1, **TINY, **VARIANTS[variant]}


def random_hf_weights(config: Dict, seed: int = 0) -> Dict[str, np.ndarray]:
  """Hugging Face T5 tensors (Linear weights [out, in]) with random float32 values.

  Scales keep activations O(1) through the layers (norm weights near 1, projections
  ~1/sqrt(fan_in)), so logits differences measure mapping errors, not overflow.
  """
  rng = np.random.default_rng(seed)
  d, inner, ff = config["d_model"], config["num_heads"] * config["d_kv"], config["d_ff"]
  gated = config["feed_forward_proj"].startswith("gated-")
  w: Dict[str, np.ndarray] = {}

  def dense(name, out_dim, in_dim):
    w[name] = rng.normal(0.0, in_dim ** -0.5, (out_dim, in_dim)).astype(np.float32)

  def norm(name):
    w[name] = (1.0 + 0.1 * rng.normal(size=(d,))).astype(np.float32)

  def attention(prefix, relative_bias):
    for p in "qkv":
      dense(f"{prefix}.{p}.weight", inner, d)
    dense(f"{prefix}.o.weight", d, inner)
    if relative_bias:
      w[f"{prefix}.relative_attention_bias.weight"] = rng.normal(
          0.0, 0.5, (config["relative_attention_num_buckets"], config["num_heads"])
      ).astype(np.float32)

  def ffn(prefix):
    for name in (("wi_0", "wi_1") if gated else ("wi",)):
      dense(f"{prefix}.{name}.weight", ff, d)
    dense(f"{prefix}.wo.weight", d, ff)

  w["shared.weight"] = rng.normal(0.0, 1.0, (config["vocab_size"], d)).astype(np.float32)
  for i in range(config["num_layers"]):
    p = f"encoder.block.{i}"
    attention(f"{p}.layer.0.SelfAttention", i == 0)
    norm(f"{p}.layer.0.layer_norm.weight")
    ffn(f"{p}.layer.1.DenseReluDense")
    norm(f"{p}.layer.1.layer_norm.weight")
  norm("encoder.final_layer_norm.weight")
  for i in range(config["num_decoder_layers"]):
    p = f"decoder.block.{i}"
    attention(f"{p}.layer.0.SelfAttention", i == 0)
    norm(f"{p}.layer.0.layer_norm.weight")
    attention(f"{p}.layer.1.EncDecAttention", False)
    norm(f"{p}.layer.1.layer_norm.weight")
    ffn(f"{p}.layer.2.DenseReluDense")
    norm(f"{p}.layer.2.layer_norm.weight")
  norm("decoder.final_layer_norm.weight")
  if not config["tie_word_embeddings"]:
    dense("lm_head.weight", config["vocab_size"], d)
  return w


def write_hf_folder(folder: str, variant: str, spiece_path: str, seed: int = 0) -> Dict:
  """config.json + model.safetensors + spiece.model; returns the tensors written."""
  import shutil

  from safetensors.numpy import save_file

  os.makedirs(folder, exist_ok=True)
  config = hf_config(variant, piece_count(spiece_path))
  weights = random_hf_weights(config, seed)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  save_file(weights, os.path.join(folder, "model.safetensors"))
  shutil.copyfile(spiece_path, os.path.join(folder, "spiece.model"))
  return weights


def hf_to_t5x_names(weights: Dict[str, np.ndarray], config: Dict) -> Dict[str, np.ndarray]:
  """The same values under T5X's parameter names ('/'-joined) and layouts: kernels
  [in, out], relative position tables [heads, buckets]."""
  gated = config["feed_forward_proj"].startswith("gated-")
  t: Dict[str, np.ndarray] = {"token_embedder/embedding": weights["shared.weight"]}
  attention = {"q": "query", "k": "key", "v": "value", "o": "out"}
  mlp = {n: n for n in (("wi_0", "wi_1", "wo") if gated else ("wi", "wo"))}
  # Per stack: (Hugging Face module of sub-layer k, T5X module, T5X norm before it).
  sublayers = {
      "encoder": [("SelfAttention", "attention", "pre_attention_layer_norm"),
                  ("DenseReluDense", "mlp", "pre_mlp_layer_norm")],
      "decoder": [("SelfAttention", "self_attention", "pre_self_attention_layer_norm"),
                  ("EncDecAttention", "encoder_decoder_attention",
                   "pre_cross_attention_layer_norm"),
                  ("DenseReluDense", "mlp", "pre_mlp_layer_norm")]}
  layers = {"encoder": config["num_layers"], "decoder": config["num_decoder_layers"]}
  for stack, modules in sublayers.items():
    for i in range(layers[stack]):
      for k, (hf_module, module, norm) in enumerate(modules):
        src, dst = f"{stack}.block.{i}.layer.{k}", f"{stack}/layers_{i}"
        t[f"{dst}/{norm}/scale"] = weights[f"{src}.layer_norm.weight"]
        leaves = mlp if hf_module == "DenseReluDense" else attention
        for a, b in leaves.items():  # [out, in] -> [in, out]
          t[f"{dst}/{module}/{b}/kernel"] = weights[f"{src}.{hf_module}.{a}.weight"].T
  for stack in ("encoder", "decoder"):
    table = weights[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    t[f"{stack}/relpos_bias/rel_embedding"] = table.T  # [heads, buckets]
  t["encoder/encoder_norm/scale"] = weights["encoder.final_layer_norm.weight"]
  t["decoder/decoder_norm/scale"] = weights["decoder.final_layer_norm.weight"]
  if not config["tie_word_embeddings"]:
    t["decoder/logits_dense/kernel"] = weights["lm_head.weight"].T
  return {k: np.ascontiguousarray(v) for k, v in t.items()}


def _write_zarr(directory: str, name: str, array: np.ndarray) -> Dict:
  """Writes `array` as a zarr array under directory/name; returns the msgpack placeholder:
  the tensorstore spec with a path relative to the checkpoint directory (T5X's layout)."""
  import tensorstore as ts

  spec = {"driver": "zarr", "dtype": array.dtype.name,
          "kvstore": {"driver": "file", "path": name},
          "metadata": {"shape": list(array.shape), "chunks": list(array.shape),
                       "compressor": {"id": "gzip"}}}
  absolute = {**spec, "kvstore": {"driver": "file", "path": os.path.join(directory, name)}}
  store = ts.open(absolute, create=True, delete_existing=True).result()
  store.write(array).result()
  return spec


def write_t5x_checkpoint(model_dir: str, t5x_params: Dict[str, np.ndarray], step: int = 1000,
                         zarr_min_size: int = 1024, legacy_optimizer: bool = True,
                         orbax: bool = False) -> str:
  """Writes model_dir/checkpoint_<step>/checkpoint (+ zarr arrays); returns the step dir.

  Arrays of at least `zarr_min_size` elements go to tensorstore (as T5X writes partitioned
  parameters) and the rest into the msgpack itself; the tree is wrapped as T5X's
  `{'version': 3, 'optimizer': {'target': ..., 'state': {'step': ...}}}`
  (legacy_optimizer=False: `{'target': ..., 'state': ...}` at the top).
  orbax=True: T5X's newer format instead, the `{'target', 'state'}` dict saved with
  Orbax's PyTree handler to checkpoint_<step>/state/.
  """
  from flax import serialization, traverse_util

  directory = os.path.join(model_dir, f"checkpoint_{step}")
  if orbax:
    import orbax.checkpoint as ocp

    target = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in t5x_params.items()})
    state = {"target": target, "state": {"step": np.asarray(step, np.int32)}}
    ocp.PyTreeCheckpointer().save(os.path.join(os.path.abspath(directory), "state"), state)
    return directory
  os.makedirs(directory, exist_ok=True)
  leaves = {}
  for name, array in t5x_params.items():
    full = f"target/{name}"
    if array.size >= zarr_min_size:
      leaves[tuple(full.split("/"))] = _write_zarr(directory, full.replace("/", "."), array)
    else:
      leaves[tuple(full.split("/"))] = array
  tree = traverse_util.unflatten_dict(leaves)
  tree["state"] = {"step": np.asarray(step, np.int32), "param_states": {}}
  state = {"version": 3, "optimizer": tree} if legacy_optimizer else tree
  with open(os.path.join(directory, "checkpoint"), "wb") as f:
    f.write(serialization.msgpack_serialize(state))
  return directory


def write_all(out_dir: str, seed: int = 0) -> Dict[str, str]:
  """Every fixture under out_dir; returns {name: path}."""
  spiece = write_spiece_model(os.path.join(out_dir, "spiece.model"))
  paths = {"spiece": spiece}
  for variant in VARIANTS:
    folder = os.path.join(out_dir, f"hf_{variant}")
    weights = write_hf_folder(folder, variant, spiece, seed)
    config = hf_config(variant, piece_count(spiece))
    paths[f"hf_{variant}"] = folder
    paths[f"t5x_{variant}"] = write_t5x_checkpoint(os.path.join(out_dir, f"t5x_{variant}"),
                                                   hf_to_t5x_names(weights, config))
  return paths


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("out_dir")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  for name, path in write_all(args.out_dir, args.seed).items():
    print(f"{name:<12} {path}")


if __name__ == "__main__":
  main()
