#!/usr/bin/env python3
"""Run a grid of gin bindings as one training run per point, then tabulate and plot them.

  python launch/sweep.py --spec=gin/sweeps/example_lr_x_rates.json \
      --sweep_dir=runs/sweeps/lr_x_rates --evaluate \
      --gin.PREPARED_DIR="'runs/ml100k/data'" ...        # gin flags given to every point

The spec (JSON) names the gin files and bindings every point shares, and the points: the
product of a `grid` ({binding: [values]}) and/or an explicit list `points`
([{binding: value}]), both combined when given (each listed point crossed with the grid).
A value is a gin binding: a JSON string is gin text as on the command line (so strings
carry inner quotes, "'all'", and "@name()" references work); numbers, booleans, null,
lists and objects become the gin literal of that value.

Each point gets a readable name built from its values (`lr-0.001_search_rows-1000`), its
own MODEL_DIR (`<model_root>/<name>`, model_root defaults to sweep_dir) and a directory
`<sweep_dir>/<name>/` holding `sweep_point.gin` (its bindings) and `sweep_point.json`
(bindings and commands). Then, with --launcher=local (default), the points run one after
another as `python -m gensar_jax.train ...` (and `python -m gensar_jax.evaluate ...` with
--evaluate), each logged to `<name>/sweep.log`; a point that finished with the same
commands has a `sweep_done.json` and is skipped, so running the sweep again resumes it
(an interrupted point resumes from its own checkpoints). With --launcher=tpu nothing runs:
one `launch/tpu_pod.py` command line per unfinished point is printed and written to
`tpu_commands.sh`.

At the end (or alone with --summary_only) each point's evaluation lines are read from
MODEL_DIR/metrics.jsonl, the last one or the best by --metric, plus any results JSON of
gensar_jax.evaluate, into `summary.md`, `summary.csv` and `summary.png` (the metric per
point). Files go through gensar_jax.io_utils, which reads a gs:// MODEL_DIR as it reads a
local one; matplotlib (the plot) is imported only when needed.

This file is the command line and the run loop; the spec and its points are
launch/sweep_spec.py, the summary launch/sweep_summary.py, and the gin-flag handling shared
with tpu_pod.py launch/gin_flags.py.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

# The helper modules sit next to this file: `python launch/sweep.py` puts launch/ on
# sys.path by itself, loading this file by its path (tests/test_sweep.py) does not.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)

from gin_flags import quote_gin_string, split_gin_flags  # noqa: E402
from gensar_jax import io_utils  # noqa: E402
from sweep_spec import Point, SweepError, expand_points, load_spec  # noqa: E402
from sweep_summary import summary_rows, write_summary  # noqa: E402

REPO_ROOT = os.path.dirname(_HERE)
POINT_GIN, POINT_JSON, DONE_JSON, LOG_NAME = ("sweep_point.gin", "sweep_point.json",
                                              "sweep_done.json", "sweep.log")
# `python -m gensar_jax.evaluate` registers its configurables under __main__, which
# gin/runs/evaluate.gin's `import gensar_jax.evaluate` makes ambiguous, and it does not
# import the `train` configurable that gin/runs/train.gin binds; calling the module's main
# by its package name avoids both and reads the same flags.
EVALUATE_ENTRY = ("from gensar_jax import gin_utils, evaluate, train; "
                  "gin_utils.run(evaluate.main)")


# ----------------------------------------------------------------------------- commands


def point_flags(spec: Mapping[str, Any], point: Point, model_dir: str,
                extra_flags: Sequence[str], evaluate: bool = False) -> List[str]:
  """The gin flags of one point; later bindings win, so the point's own come last."""
  files = list(spec["gin_files"]) + (list(spec["evaluate_gin_files"]) if evaluate else [])
  bindings = dict(spec["bindings"])
  if evaluate:
    bindings.update(spec["evaluate_bindings"])
  flags = [f"--gin_file={f}" for f in files]
  flags += [f"--gin.{k}={v}" for k, v in bindings.items()]
  flags += list(extra_flags)
  flags += [f"--gin.{k}={v}" for k, v in point.bindings.items()]
  flags.append(f"--gin.MODEL_DIR={quote_gin_string(model_dir)}")
  return flags


def _write_point_files(point_dir: str, point: Point, model_dir: str,
                       commands: Mapping[str, List[str]]) -> None:
  os.makedirs(point_dir, exist_ok=True)
  lines = [f"# Sweep point {point.index}: {point.name}"]
  lines += [f"{k} = {v}" for k, v in point.bindings.items()]
  lines.append(f"MODEL_DIR = {quote_gin_string(model_dir)}")
  io_utils.write_text(os.path.join(point_dir, POINT_GIN), "\n".join(lines) + "\n")
  io_utils.write_text(os.path.join(point_dir, POINT_JSON), json.dumps(
      {"index": point.index, "name": point.name, "bindings": point.bindings,
       "model_dir": model_dir, "commands": commands}, indent=2) + "\n")


def is_done(point_dir: str, commands: Mapping[str, List[str]]) -> bool:
  """Finished with these very commands (a changed TRAIN_STEPS, say, runs the point again)."""
  done = io_utils.read_json_if_valid(os.path.join(point_dir, DONE_JSON))
  return bool(done) and done.get("commands") == commands


def train_finished(model_dir: str, flags: Sequence[str]) -> bool:
  """A launched run is finished when it logged training at its TRAIN_STEPS (read from the
  flags; a TRAIN_STEPS set only inside a gin file is not seen, and the point is relaunched,
  where the trainer itself finds nothing left to do)."""
  steps = None
  for flag in flags:
    match = re.fullmatch(r"--gin\.TRAIN_STEPS=\s*(\d+)\s*", flag)
    if match:
      steps = int(match.group(1))
  if steps is None:
    return False
  path = io_utils.join(model_dir, "metrics.jsonl")
  try:
    text = io_utils.read_text_if_exists(path) or ""
  except Exception as e:  # pylint: disable=broad-except  # any gfile/network failure
    print(f"# cannot read {path} ({type(e).__name__}); launching the point", file=sys.stderr)
    return False
  records = [json.loads(line) for line in text.splitlines() if line.strip()]
  return any(r.get("split") == "train" and r.get("step", 0) >= steps for r in records)


def run_point(point_dir: str, commands: Mapping[str, List[str]], python: str,
              env: Optional[Mapping[str, str]] = None) -> Tuple[bool, float]:
  """Runs train (then evaluate) in sequence, output appended to the point's log."""
  start = time.time()
  with open(os.path.join(point_dir, LOG_NAME), "a", encoding="utf-8") as log:
    for stage, argv in commands.items():
      full = [python, *argv]
      log.write(f"\n$ {shlex.join(full)}\n")
      log.flush()
      code = subprocess.run(full, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(env) if env is not None else None).returncode
      if code != 0:
        log.write(f"# {stage} exited with {code}\n")
        return False, time.time() - start
  seconds = time.time() - start
  io_utils.write_text(os.path.join(point_dir, DONE_JSON), json.dumps(
      {"commands": commands, "seconds": round(seconds, 1)}, indent=2) + "\n")
  return True, seconds


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str]):
  gin_flags, own = split_gin_flags(argv, error=SweepError)
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0] + " Gin flags "
                              "(--gin_file=..., --gin.NAME=VALUE) go to every point.")
  p.add_argument("--spec", required=True, help="JSON grid spec (gin/sweeps/*.json)")
  p.add_argument("--sweep_dir", required=True, help="local: point files and the summary")
  p.add_argument("--model_root", default=None,
                 help="where MODEL_DIRs go (default: sweep_dir); may be gs:// for --launcher=tpu")
  p.add_argument("--launcher", choices=("local", "tpu"), default="local")
  p.add_argument("--evaluate", action="store_true",
                 help="local: also run gensar_jax.evaluate on each point after training")
  p.add_argument("--dry_run", action="store_true", help="local: print the commands only")
  p.add_argument("--summary_only", action="store_true", help="only (re)write the summary")
  p.add_argument("--metric", default=None, help="eval metric to select and plot (spec: metric)")
  p.add_argument("--mode", choices=("min", "max"), default=None)
  p.add_argument("--select", choices=("best", "last"), default=None)
  p.add_argument("--python", default=sys.executable, help="interpreter for local runs")
  p.add_argument("--tpu_name", default="gensar-sweep",
                 help="tpu: slice name prefix; point i uses <tpu_name>-<i>")
  p.add_argument("--tpu_args", default="",
                 help="tpu: launch/tpu_pod.py flags, e.g. \"--zone=Z --accelerator_type=v5p-64\"")
  p.add_argument("--tpu_dry_run", action="store_true", help="tpu: add --dry_run to each line")
  return p.parse_args(own), gin_flags


def main(argv: Optional[Sequence[str]] = None) -> int:
  try:
    args, extra_flags = parse_args(sys.argv[1:] if argv is None else argv)
    spec = load_spec(args.spec)
    for field in ("metric", "mode", "select"):
      if getattr(args, field) is not None:
        spec[field] = getattr(args, field)
    if "://" in args.sweep_dir:
      raise SweepError(f"--sweep_dir={args.sweep_dir}: must be local; put MODEL_DIRs on a "
                       "bucket with --model_root")
    model_root = args.model_root or args.sweep_dir
    if args.launcher == "local" and "://" in model_root:
      raise SweepError(f"--model_root={model_root}: local runs need a local path")
    points = expand_points(spec)
  except SweepError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  os.makedirs(args.sweep_dir, exist_ok=True)
  model_dirs = {p.name: io_utils.join(model_root, p.name) for p in points}
  status: Dict[str, str] = {}
  tpu_lines = []
  for point in points:
    point_dir = os.path.join(args.sweep_dir, point.name)
    model_dir = model_dirs[point.name]
    commands = {"train": ["-m", "gensar_jax.train",
                          *point_flags(spec, point, model_dir, extra_flags)]}
    if args.evaluate:
      commands["evaluate"] = ["-c", EVALUATE_ENTRY, *point_flags(
          spec, point, model_dir, extra_flags, evaluate=True)]
    if args.summary_only:
      finished = (is_done(point_dir, commands) if args.launcher == "local"
                  else train_finished(model_dir, commands["train"]))
      status[point.name] = "done" if finished else "not finished"
      continue
    _write_point_files(point_dir, point, model_dir, commands)
    if args.launcher == "tpu":
      if train_finished(model_dir, commands["train"]):
        print(f"# {point.name}: finished (metrics.jsonl reached TRAIN_STEPS), no launch",
              file=sys.stderr)
        status[point.name] = "done"
        continue
      line = ["python", "launch/tpu_pod.py", *shlex.split(args.tpu_args),
              f"--name={args.tpu_name}-{point.index:02d}", *commands["train"][2:]]
      tpu_lines.append(shlex.join(line + (["--dry_run"] if args.tpu_dry_run else [])))
      status[point.name] = "launch command"
      continue
    if is_done(point_dir, commands):
      print(f"[{point.index + 1}/{len(points)}] {point.name}: finished, skipped", flush=True)
      status[point.name] = "done"
      continue
    if args.dry_run:
      for argv_ in commands.values():
        print(shlex.join([args.python, *argv_]))
      status[point.name] = "dry run"
      continue
    print(f"[{point.index + 1}/{len(points)}] {point.name}: running (log "
          f"{os.path.join(point_dir, LOG_NAME)})", flush=True)
    ok, seconds = run_point(point_dir, commands, args.python)
    status[point.name] = "done" if ok else "failed"
    print(f"[{point.index + 1}/{len(points)}] {point.name}: {status[point.name]} in "
          f"{seconds:.0f}s", flush=True)
  if tpu_lines:
    script = os.path.join(args.sweep_dir, "tpu_commands.sh")
    io_utils.write_text(script, "#!/bin/sh\n# One launch per sweep point (run from the "
                          "repository root).\n" + "\n".join(tpu_lines) + "\n")
    print("\n".join(tpu_lines))
    print(f"# written to {script}", file=sys.stderr)
    return 0
  if args.dry_run:
    return 0
  columns, rows = summary_rows(spec, points, model_dirs, status)
  paths = write_summary(args.sweep_dir, spec, columns, rows)
  with open(paths["md"], encoding="utf-8") as f:
    print(f.read(), end="")
  print("# summary: " + ", ".join(paths.values()), file=sys.stderr)
  return 1 if "failed" in status.values() else 0


if __name__ == "__main__":
  sys.exit(main())
