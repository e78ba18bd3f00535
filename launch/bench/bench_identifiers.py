"""Benchmark of the identifier stage: RQ-VAE epochs and ID assignment at 10k / 100k / 1M items.

Each size runs in its own process so that peak memory (ru_maxrss) belongs to that size
alone. Data are synthetic and clustered (L2-normalised, like sentence embeddings): a
semantic table (default 768-d, BGE-base width) and a collaborative one (default 64-d).

  python -m launch.bench.bench_identifiers                 # 10k, 100k, 1M
  python -m launch.bench.bench_identifiers --sizes 10000   # quick

Targets on a 2-core CPU: 1M items assigned in under 5 minutes; one epoch at 1M items in
under a minute.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

# The workers run as `python -m launch.bench.bench_identifiers` from here.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def synthetic_tables(n: int, semantic_dim: int, collaborative_dim: int, seed: int = 0):
  """Clustered, L2-normalised float32 tables, generated in chunks (1M x 768 is 3 GB)."""
  rng = np.random.default_rng(seed)
  clusters = max(16, n // 100)
  centres = rng.standard_normal((clusters, semantic_dim), dtype=np.float32)
  projection = rng.standard_normal((semantic_dim, collaborative_dim), dtype=np.float32)
  projection /= np.sqrt(semantic_dim)
  sem = np.empty((n, semantic_dim), np.float32)
  col = np.empty((n, collaborative_dim), np.float32)
  for lo in range(0, n, 65536):
    hi = min(n, lo + 65536)
    labels = rng.integers(0, clusters, hi - lo)
    s = centres[labels] + 0.5 * rng.standard_normal((hi - lo, semantic_dim), dtype=np.float32)
    c = centres[labels] @ projection
    c += 0.5 * rng.standard_normal(c.shape, dtype=np.float32)
    sem[lo:hi] = s / np.linalg.norm(s, axis=1, keepdims=True)
    col[lo:hi] = c / np.linalg.norm(c, axis=1, keepdims=True)
  return sem, col


def run_one(n: int, args) -> dict:
  """Everything for one catalogue size, in this process."""
  from gensar_jax.identifiers import assignment as assignment_lib
  from gensar_jax.identifiers import rqvae

  sem, col = synthetic_tables(n, args.semantic_dim, args.collaborative_dim)
  config = rqvae.RQVAEConfig(epochs=args.epochs, eval_every=max(1, args.epochs),
                             codebook_size=args.codebook_size, batch_size=args.batch_size,
                             progress=False)
  # Warm-up on one batch: compiles the train step and the encoder for this config, so
  # the timed epochs below measure steady-state training, not XLA compilation.
  t0 = time.perf_counter()
  warm = min(n, args.batch_size)
  rqvae.train_rqvae(sem[:warm], col[:warm], dataclass_replace(config, epochs=1))
  compile_s = time.perf_counter() - t0

  t0 = time.perf_counter()
  trained = rqvae.train_rqvae(sem, col, config)
  train_s = time.perf_counter() - t0
  epoch_s = float(np.mean([h["seconds"] for h in trained.history]))

  t0 = time.perf_counter()
  a = assignment_lib.assign_identifiers(trained, sem, col, config)
  assign_s = time.perf_counter() - t0
  coll = a.stats["collisions"]
  return {
      "items": n, "epochs": args.epochs, "compile_s": compile_s, "epoch_s": epoch_s,
      "train_items_per_s": n / epoch_s, "train_total_s": train_s, "assign_s": assign_s,
      "assign_items_per_s": n / assign_s, "assign_phases_s": a.stats["timings_s"],
      "sid_collisions": {k: v["collision_rate"] for k, v in coll["sid"].items()},
      "cid_collisions": {k: v["collision_rate"] for k, v in coll["cid"].items()},
      "moved": a.stats["dedup_moved_items"]["total"],
      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
  }


def dataclass_replace(config, **kw):
  import dataclasses
  return dataclasses.replace(config, **kw)


def print_table(rows) -> None:
  head = (f"{'items':>9} {'epoch s':>8} {'train it/s':>11} {'assign s':>9} "
          f"{'assign it/s':>12} {'enc/sk/dedup s':>16} {'SID coll a/sk/final':>21} "
          f"{'moved':>7} {'peak GB':>8}")
  print(head)
  print("-" * len(head))
  for r in rows:
    ph = r["assign_phases_s"]
    sc = r["sid_collisions"]
    print(f"{r['items']:>9} {r['epoch_s']:>8.1f} {r['train_items_per_s']:>11.0f} "
          f"{r['assign_s']:>9.1f} {r['assign_items_per_s']:>12.0f} "
          f"{ph['encode_s']:>5.1f}/{ph['sinkhorn_s']:>4.1f}/{ph['dedup_s']:>4.1f} "
          f"{sc['argmin']:>7.3f}/{sc['sinkhorn']:.3f}/{sc['final']:.1f} "
          f"{r['moved']:>7} {r['peak_rss_gb']:>8.2f}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="10000,100000,1000000",
                      help="comma-separated catalogue sizes")
  parser.add_argument("--semantic-dim", type=int, default=768)
  parser.add_argument("--collaborative-dim", type=int, default=64)
  parser.add_argument("--epochs", type=int, default=1, help="timed RQ-VAE epochs per size")
  parser.add_argument("--codebook-size", type=int, default=256)
  parser.add_argument("--batch-size", type=int, default=1024)
  parser.add_argument("--json", "--json_out", dest="json",
                      help="also write the rows to this file")
  parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.worker:
    print("RESULT " + json.dumps(run_one(args.worker, args)), flush=True)
    return
  rows = []
  for n in (int(s) for s in args.sizes.split(",")):
    cmd = [sys.executable, "-m", "launch.bench.bench_identifiers", "--worker", str(n),
           "--semantic-dim", str(args.semantic_dim),
           "--collaborative-dim", str(args.collaborative_dim), "--epochs", str(args.epochs),
           "--codebook-size", str(args.codebook_size), "--batch-size", str(args.batch_size)]
    print(f"# {n} items ({args.semantic_dim}-d semantic, {args.collaborative_dim}-d "
          f"collaborative) ...", flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
    row = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
    print(f"#   compile {row['compile_s']:.1f}s, epoch {row['epoch_s']:.1f}s, "
          f"assign {row['assign_s']:.1f}s", flush=True)
    rows.append(row)
  print_table(rows)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
