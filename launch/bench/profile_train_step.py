"""Where the benchmarked train step spends its time: a jax.profiler trace, summed per part.

  .venv/bin/python -m launch.bench.profile_train_step                # t5-small step, CPU
  .venv/bin/python -m launch.bench.profile_train_step --steps 3 --gin.DROPOUT_RATE=0.0

The step is launch/bench/bench_train.py's (same flags, same Trainer, jit, shardings and donation).
After warm-up, `--steps` steps run under `jax.profiler.trace` with a Perfetto trace; every
complete event whose name is an instruction of the compiled step (XLA CPU runs one thunk
per fusion, named after it) is matched to that instruction's `op_name` metadata, i.e. the
Flax module path and JAX primitive that produced it, and its time is added to one of the
parts below. Written to `--out` (default runs/profile/<time>/): profile.json, profile.md
(the parts and the top instructions) and profile.png (the parts as bars); the raw trace
stays in trace/ for Perfetto or TensorBoard.

Thunks can run concurrently (XLA's CPU runtime executes independent thunks on its thread
pool), so the summed time can exceed the step's wall time; compare shares between
profiles, and confirm a change with the wall time of launch/bench/bench_train.py.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import re
import sys
import time
from typing import Dict, List, Tuple

import jax

from launch.bench import bench_train
from launch.bench.bench_all import write_atomic

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (part, test on the op_name metadata), first match wins. Forward and backward fall in the
# same part; XLA's op_name says which (`transpose(jvp(...))` is the backward pass).
PARTS: Tuple[Tuple[str, str], ...] = (
    ("dropout", r"Dropout"),
    ("relative-position bias", r"relpos_bias"),
    ("attention core (QK^T, softmax, AV)", r"_attend_"),
    ("output logits matmul", r"logits_dense/dot_general|Embed\.attend"),
    ("dense matmuls (q, k, v, out, MLP)", r"dot_general"),
    ("embedding lookup and its gradient", r"token_embedder"),
    ("rest of the network (norms, activations, residuals)", r"Transformer"),
    ("loss (softmax cross entropy)", r"jvp\(\)|transpose\(jvp\(\)\)"),
)
OPTIMIZER_PART = "optimizer, clipping, step bookkeeping"

_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) [\w\-]+\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def instruction_metadata(hlo_text: str) -> Dict[str, Tuple[str, str]]:
  """{instruction name: (result shape, op_name)} from an optimised HLO module's text."""
  table = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      op_name = _OP_NAME.search(line)
      table[m.group(1)] = (m.group(2), op_name.group(1) if op_name else "")
  return table


def part_of(op_name: str) -> str:
  for part, pattern in PARTS:
    if re.search(pattern, op_name):
      return part
  return OPTIMIZER_PART


def trace_events(trace_dir: str) -> List[dict]:
  paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise SystemExit(f"profile_train_step: no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    trace = json.load(f)
  return trace["traceEvents"] if isinstance(trace, dict) else trace


def summarise(events: List[dict], metadata: Dict[str, Tuple[str, str]], steps: int):
  """(per-part ms per step, top instructions [(ms per step, name, shape, op_name)])."""
  per_instruction: Dict[str, float] = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in metadata:
      per_instruction[e["name"]] += e.get("dur", 0) / 1e3 / steps  # us -> ms per step
  parts: Dict[str, float] = collections.Counter()
  for name, ms in per_instruction.items():
    parts[part_of(metadata[name][1])] += ms
  top = sorted(((ms, name) + metadata[name] for name, ms in per_instruction.items()),
               reverse=True)
  return dict(parts.most_common()), top


def write_outputs(out_dir: str, report: dict, top: list, top_n: int) -> None:
  total = sum(report["parts_ms_per_step"].values())
  lines = [f"Train step profile, {report['created_utc']} UTC: {report['shape']}; "
           f"{report['steps']} traced steps, wall {report['wall_ms_per_step']:.0f} ms per "
           f"step untraced, {total:.0f} ms of thunk time per step.", "",
           "| part | ms per step | share |", "|---|---:|---:|"]
  lines += [f"| {part} | {ms:.1f} | {100 * ms / total:.1f}% |"
            for part, ms in report["parts_ms_per_step"].items()]
  lines += ["", f"Top {top_n} instructions:", "", "| ms per step | instruction | shape | op |",
            "|---:|---|---|---|"]
  lines += [f"| {ms:.2f} | {name} | `{shape}` | `{op[-90:]}` |"
            for ms, name, shape, op in top[:top_n]]
  paths = {"profile.json": json.dumps(report, indent=1) + "\n",
           "profile.md": "\n".join(lines) + "\n"}
  for name, text in paths.items():
    write_atomic(os.path.join(out_dir, name), text)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  parts = list(report["parts_ms_per_step"].items())[::-1]
  fig, ax = plt.subplots(figsize=(8, 0.45 * len(parts) + 1.2))
  ax.barh([p for p, _ in parts], [ms for _, ms in parts])
  ax.set_xlabel("thunk ms per step")
  ax.set_title(f"Train step profile ({report['wall_ms_per_step']:.0f} ms per step)")
  fig.tight_layout()
  tmp = os.path.join(out_dir, "profile.tmp.png")
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, os.path.join(out_dir, "profile.png"))
  print("\n".join(lines[:len(report["parts_ms_per_step"]) + 4]))


def main(argv) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  bench_train.add_shape_flags(parser)
  parser.add_argument("--warmup_steps", type=int, default=3)
  parser.add_argument("--steps", type=int, default=5, help="traced steps")
  parser.add_argument("--top", type=int, default=25, help="instructions listed in profile.md")
  parser.add_argument("--out", default=None, help="default runs/profile/<time>/")
  args, gin_args = parser.parse_known_args(argv)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
  out_dir = os.path.abspath(args.out or os.path.join(REPO, "runs", "profile", stamp))
  os.makedirs(out_dir, exist_ok=True)
  trainer, state, batches, config, _ = bench_train.build_step(args, gin_args)

  for i in range(args.warmup_steps):
    state, metrics = trainer.train_step(state, batches[i % len(batches)])
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for i in range(args.steps):
    state, metrics = trainer.train_step(state, batches[i % len(batches)])
  jax.block_until_ready(metrics)
  wall_ms = (time.perf_counter() - start) / args.steps * 1e3

  (step_fn,) = trainer._train_steps.values()
  hlo_text = step_fn.lower(state, batches[0]).compile().as_text()
  trace_dir = os.path.join(out_dir, "trace")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for i in range(args.steps):
      state, metrics = trainer.train_step(state, batches[i % len(batches)])
    jax.block_until_ready(metrics)

  parts, top = summarise(trace_events(trace_dir), instruction_metadata(hlo_text), args.steps)
  if not parts:
    raise SystemExit("profile_train_step: no trace event matched an instruction of the "
                     "compiled step (does this backend name its thunks after them?)")
  device = jax.devices()[0]
  report = {
      "created_utc": stamp, "device": f"{len(jax.devices())} x {device.device_kind}",
      "shape": (f"{config.emb_dim}-wide {config.num_encoder_layers}+"
                f"{config.num_decoder_layers} layers, vocab {config.vocab_size}, batch "
                f"{args.batch_size}, input {args.input_length}, target {args.target_length}, "
                f"{config.dtype}"),
      "steps": args.steps, "wall_ms_per_step": wall_ms, "parts_ms_per_step": parts,
      "top": [{"ms_per_step": ms, "instruction": n, "shape": s, "op_name": o}
              for ms, n, s, o in top[:args.top]],
      "jax": jax.__version__, "argv": list(argv)}
  write_outputs(out_dir, report, top, args.top)
  print(f"[profile_train_step] wrote {out_dir}/profile.md, profile.json, profile.png")


if __name__ == "__main__":
  main(sys.argv[1:])
