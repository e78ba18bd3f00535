"""Training throughput on the real GenSAR mixture: padded rows against packed rows.

  .venv/bin/python -m launch.bench.bench_train_mixture                # quickstart, mini
  .venv/bin/python -m launch.bench.bench_train_mixture --gin_file=gin/models/small.gin
  .venv/bin/python -m launch.bench.bench_train_mixture --configs "144,32,none,32" "144,32,432,40,32"

Unlike launch/bench/bench_train.py (random tokens), this reads the mixture a training run reads:
the prepared data, identifier table and vocabulary of the quickstart (run `make demo`, or
at least its prepare/identify/vocab/doc2query stages, first), through the same SeqIO
pipeline, feature converter, Trainer and shardings as `python -m gensar_jax.train`. Each
configuration is timed over the same number of steps after a warm-up (compilation
excluded), the input pipeline included, since on a small model it competes with the step
for the same CPU cores.

A configuration is "inputs,targets,pack_inputs|none[,pack_targets],batch[,b8]": the
per-example lengths (TASK_FEATURE_LENGTHS), the row lengths of packing (or none), rows
per batch, and optionally target-length buckets ("b8" or "b8-16": TARGET_BUCKETS).
The first configuration is the reference of the ratio column. Printed per configuration:
rows/s, examples/s, real (non-padding) input and target tokens per row slot, and the
examples/s ratio to the reference.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional

import gin
import jax

from gensar_jax import gin_utils
from gensar_jax import optimizers
from gensar_jax import partitioning
from gensar_jax import train_inputs
from gensar_jax import trainer as trainer_lib
from gensar_jax.models import encoder_decoder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_GIN = ["--gin_file=gin/experiments/ml100k_quickstart.gin"]
# The quickstart's rows before target buckets (padded 144 + 32, batch 32), with target
# buckets (the default now), and packed rows holding about 3.7 and 2 examples.
DEFAULT_CONFIGS = ("144,32,none,32", "144,32,none,32,b8", "144,32,480,32,32",
                   "144,32,288,32,64")


def parse_config(text: str) -> Dict:
  parts = text.split(",")
  buckets = None
  if parts[-1].startswith("b"):
    buckets = [int(b) for b in parts.pop()[1:].split("-")]
  try:
    if parts[2] == "none":
      if len(parts) != 4:
        raise ValueError
      pack = None
      batch = int(parts[3])
    else:
      if len(parts) != 5:
        raise ValueError
      pack = {"inputs": int(parts[2]), "targets": int(parts[3])}
      batch = int(parts[4])
    lengths = {"inputs": int(parts[0]), "targets": int(parts[1])}
  except (ValueError, IndexError):
    raise SystemExit(f"bench_train_mixture: bad --configs entry {text!r}; expected "
                     "'inputs,targets,none,batch' or 'inputs,targets,pack_in,pack_tgt,batch'")
  return {"lengths": lengths, "pack": pack, "batch": batch, "name": text,
          "buckets": buckets}


def measure(mixture: str, config: Dict, warmup: int, steps: int, seed: int) -> Dict:
  vocabulary = train_inputs.get_provider(mixture).output_features["targets"].vocabulary
  model = encoder_decoder.build_model(vocabulary)
  trainer = trainer_lib.Trainer(model, partitioning.Partitioner(),
                                optimizers.create_optimizer())
  rows = config["pack"] or config["lengths"]
  batch = config["batch"]
  state = trainer.init_state({"encoder_input_tokens": (batch, rows["inputs"]),
                              "decoder_input_tokens": (batch, rows["targets"])})
  host_rows = trainer.partitioner.per_host_batch_slice(batch)
  batches = train_inputs.train_batches(mixture, config["lengths"], batch, host_rows, seed,
                                       pack_lengths=config["pack"],
                                       target_buckets=config["buckets"])
  for _ in range(warmup):
    state, metrics = trainer.train_step(state, next(batches))
  jax.block_until_ready(metrics)
  examples = input_tokens = target_tokens = target_slots = 0
  start = time.perf_counter()
  for _ in range(steps):
    host_batch = next(batches)
    examples += train_inputs.examples_in(host_batch)
    input_tokens += int((host_batch["encoder_input_tokens"] > 0).sum())
    target_tokens += int((host_batch["decoder_loss_weights"] > 0).sum())
    target_slots += host_batch["decoder_loss_weights"].size
    state, metrics = trainer.train_step(state, host_batch)
  jax.block_until_ready((state, metrics))
  elapsed = time.perf_counter() - start
  slots = steps * (host_rows.stop - (host_rows.start or 0))
  return {
      "config": config["name"], "steps": steps, "seconds": elapsed,
      "rows_per_s": slots / elapsed, "examples_per_s": examples / elapsed,
      "examples_per_row": examples / slots,
      "input_fill": input_tokens / (slots * rows["inputs"]),
      "target_fill": target_tokens / target_slots,
      "final_loss": float(metrics["loss"]),
  }


def input_pipeline_rate(mixture: str, config: Dict, batches: int, seed: int) -> float:
  """Examples/s of the input stream alone (no training step competing for the cores)."""
  stream = train_inputs.train_batches(mixture, config["lengths"], config["batch"],
                                      slice(0, config["batch"]), seed,
                                      pack_lengths=config["pack"],
                                      target_buckets=config["buckets"])
  next(stream)  # pipeline start-up (tables, shuffle buffers) is not throughput
  start, examples = time.perf_counter(), 0
  for _ in range(batches):
    examples += train_inputs.examples_in(next(stream))
  return examples / (time.perf_counter() - start)


def format_table(results: List[Dict]) -> str:
  reference = results[0]["examples_per_s"]
  lines = ["| config (in,tgt,pack,batch) | rows/s | examples/s | examples/row | input fill | "
           "target fill | input stream alone, examples/s | ratio |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    lines.append(f"| {r['config']} | {r['rows_per_s']:.1f} | {r['examples_per_s']:.1f} | "
                 f"{r['examples_per_row']:.2f} | {r['input_fill']:.0%} | "
                 f"{r['target_fill']:.0%} | {r['input_stream_examples_per_s']:.0f} | "
                 f"{r['examples_per_s'] / reference:.2f}x |")
  return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
  parser.add_argument("--warmup_steps", type=int, default=3)
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output", "--json_out", dest="output", default=None,
                      help="also write the results as JSON here")
  args, gin_args = parser.parse_known_args(argv)
  if not any(a.startswith("--gin_file") for a in gin_args):
    gin_args = DEFAULT_GIN + gin_args
  os.chdir(REPO)
  gin_utils.parse_gin(gin_args)
  import gensar_tasks  # noqa: F401  registers gensar_mixture with gin (before parsing is fine)
  with gin.unlock_config():
    mixture = gensar_tasks.gensar_mixture()
  configs = [parse_config(c) for c in args.configs]
  devices = jax.devices()
  print(f"mixture {mixture} on {len(devices)} x {devices[0].device_kind}; "
        f"{args.steps} timed steps per configuration after {args.warmup_steps} warm-up")
  results = []
  for config in configs:
    results.append(measure(mixture, config, args.warmup_steps, args.steps, args.seed))
    r = results[-1]
    r["input_stream_examples_per_s"] = input_pipeline_rate(mixture, config, args.steps,
                                                           args.seed)
    print(f"  {r['config']}: {r['examples_per_s']:.1f} examples/s "
          f"({r['examples_per_row']:.2f} per row)", flush=True)
  print(format_table(results))
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1:])
