"""The STATIC peer: its catalogue index and constrained decode over our benchmark catalogue.

STATIC (youtube/static-constraint-decoding) is the JAX constrained-decoding library that
launch/bench/bench_decode.py's catalogue table is set beside. It is not on the package index, so
it is never a dependency: point `--static_path` at a checkout of it (the folder holding
`static_decoding/`). Its JAX code needs only jax and numpy, so the project's own Python runs
it; launch/bench/bench_all.py does so with `--static_path DIR`, right after bench_decode:

  git clone https://github.com/youtube/static-constraint-decoding /tmp/static
  .venv/bin/python -m launch.bench.peers.bench_static --static_path /tmp/static

For each catalogue size it takes exactly the sequences bench_decode builds its trie from
(`bench_decode.catalogue_sequences`: SIDs + CIDs, each a behaviour token, 4 codes of 256
and EOS) and measures:
- build: sorting the sequences (STATIC's builder needs them lexicographically sorted; ours
  sorts inside build_trie, so both figures include the sort) plus `build_static_index`
  with its default two dense levels;
- device bytes: every array its decode takes (CSR transitions, row pointers, start mask,
  dense mask and dense state tables), per sequence;
- the same build and bytes on STATIC's own setting (`bench_decode.native_identifiers`: n
  identifiers of 4 codes in [0, 256), no behaviour token or EOS, vocabulary 256), where its
  build and bytes were first set beside ours; bench_decode builds ours from them too;
- a whole decode: `sparse_transition_jax` at bench_decode's serving shape (batch 2 x 70
  beams, every level) with precomputed random logits, as bench_decode feeds ours, so only
  the index, the normaliser and the top-k are timed. STATIC keeps `--tokens_per_beam`
  (30, its benchmark's setting) candidates per beam at its dense levels; ours ranks every
  valid child.
The dense tables are vocab x vocab, so the vocabulary is bench_decode's second one (2,048,
STATIC's benchmark default); at our 8,320-token vocabulary they alone would be 346 MB.

Prints one JSON object (the last line of stdout); `--json_out PATH` also writes it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from launch.bench import bench_decode  # the catalogue both sides are built from


def precomputed_logits_model(logits: jax.Array):
  """A STATIC `model(input_ids, key) -> (logits [rows, 1, vocab], key)` that returns step
  `key`'s slice of `logits` [steps, rows, vocab]; `key` is an int32 step counter."""

  def model(input_ids, key):
    rows = input_ids.shape[0]
    step_logits = jax.lax.dynamic_index_in_dim(logits, key, axis=0, keepdims=False)
    return step_logits[:rows, None, :], key + 1

  return model


def static_commit(path: str) -> str:
  try:
    return subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def bench_size(args, n: int, csr_utils, decoding_jax) -> dict:
  sequences = bench_decode.catalogue_sequences(n)                   # [sequences, length]
  length = sequences.shape[1]
  if int(sequences.max()) >= args.vocab_size:
    raise SystemExit(f"bench_static: token {int(sequences.max())} does not fit vocab "
                     f"{args.vocab_size}")
  start = time.perf_counter()
  ordered = sequences[np.lexsort(sequences.T[::-1])]
  sorted_s = time.perf_counter()
  packed_csr, indptr, branches, start_mask, dense_mask, dense_states = (
      csr_utils.build_static_index(ordered, args.vocab_size, dense_lookup_layers=2))
  build_s = time.perf_counter() - start
  index_s = time.perf_counter() - sorted_s
  arrays = [jax.device_put(a) for a in (packed_csr, indptr, start_mask, dense_mask,
                                         dense_states)]
  jax.block_until_ready(arrays)
  device_bytes = sum(int(a.nbytes) for a in arrays)
  rows = args.batch * args.beams
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(length, rows, args.vocab_size)), jnp.float32)
  model = precomputed_logits_model(logits)
  packed_csr, indptr, start_mask, dense_mask, dense_states = arrays

  def decode():
    return decoding_jax.sparse_transition_jax(
        model, jnp.int32(0), args.batch, args.beams, args.tokens_per_beam, 0, length,
        args.vocab_size, tuple(int(b) for b in branches), packed_csr, indptr, start_mask,
        dense_mask, dense_states, d_dense=2)

  decode_ms = bench_decode.best_us(decode, repeats=1, trials=args.trials) / 1e3
  native = bench_decode.native_identifiers(n)  # [ids, 4] codes in [0, 256)
  start = time.perf_counter()
  native_index = csr_utils.build_static_index(native[np.lexsort(native.T[::-1])], 256,
                                              dense_lookup_layers=2)
  native_build_s = time.perf_counter() - start
  native_bytes = sum(int(np.asarray(a).nbytes) for i, a in enumerate(native_index) if i != 2)
  return {"sequences": int(len(sequences)), "build_s": build_s, "index_only_s": index_s,
          "device_bytes": device_bytes,
          "bytes_per_identifier": device_bytes / len(sequences), "decode_ms": decode_ms,
          "layer_max_branches": [int(b) for b in branches],
          "native_identifiers": int(len(native)), "native_build_s": native_build_s,
          "native_bytes_per_identifier": native_bytes / len(native)}


def load_file(path: str):
  """The module of one file of the STATIC checkout, loaded by its path (nothing is added to
  sys.path); csr_utils and decoding_jax import nothing of their own package."""
  name = "static_decoding." + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--static_path", required=True,
                      help="a checkout of youtube/static-constraint-decoding")
  parser.add_argument("--catalogue_sizes", type=int, nargs="+", default=[100_000, 1_000_000],
                      help="identifiers per space, as bench_decode's --catalogue_sizes")
  parser.add_argument("--vocab_size", type=int, default=2048)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--beams", type=int, default=70)
  parser.add_argument("--tokens_per_beam", type=int, default=30)
  parser.add_argument("--trials", type=int, default=5, help="timed decodes; the best is kept")
  parser.add_argument("--json_out", default=None)
  args = parser.parse_args(argv)
  package = os.path.join(args.static_path, "static_decoding")
  if not os.path.isfile(os.path.join(package, "decoding_jax.py")):
    raise SystemExit(f"bench_static: no static_decoding/decoding_jax.py under "
                     f"{args.static_path!r}; clone youtube/static-constraint-decoding there")
  csr_utils, decoding_jax = (load_file(os.path.join(package, f"{name}.py"))
                             for name in ("csr_utils", "decoding_jax"))

  rows = [bench_size(args, n, csr_utils, decoding_jax) for n in args.catalogue_sizes]
  for row in rows:
    print(f"{row['sequences']:>9,} sequences: build {row['build_s']:.2f} s ("
          f"{row['index_only_s']:.2f} s after the sort), "
          f"{row['bytes_per_identifier']:.1f} B/id, decode {row['decode_ms']:.2f} ms "
          f"(max branches {row['layer_max_branches']}); native {row['native_identifiers']:,} "
          f"ids of 4 x 256 codes at vocab 256: build {row['native_build_s']:.2f} s, "
          f"{row['native_bytes_per_identifier']:.1f} B/id")
  result = {"peer": "STATIC", "static_commit": static_commit(args.static_path),
            "jax": jax.__version__, "platform": jax.default_backend(),
            "vocab_size": args.vocab_size, "batch": args.batch, "beams": args.beams,
            "tokens_per_beam": args.tokens_per_beam, "catalogue": rows}
  text = json.dumps(result)
  if args.json_out:
    tmp = args.json_out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text + "\n")
    os.replace(tmp, args.json_out)
  print(text)


if __name__ == "__main__":
  main()
