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
point). Standard library only, except matplotlib for the plot and TensorFlow's gfile to
read a gs:// MODEL_DIR; both are imported only when needed.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import hashlib
import io
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_FLAG_PREFIXES = ("--gin_file", "--gin_bindings", "--gin.")
BINDING_KEY = re.compile(r"[A-Za-z_][\w./]*")
SPEC_KEYS = {"name", "gin_files", "bindings", "grid", "points", "short_names", "evaluate",
             "metric", "mode", "select"}
POINT_GIN, POINT_JSON, DONE_JSON, LOG_NAME = ("sweep_point.gin", "sweep_point.json",
                                              "sweep_done.json", "sweep.log")
MAX_NAME = 80
# `python -m gensar_jax.evaluate` registers its configurables under __main__, which
# gin/runs/evaluate.gin's `import gensar_jax.evaluate` makes ambiguous, and it does not
# import the `train` configurable that gin/runs/train.gin binds; calling the module's main
# by its package name avoids both and reads the same flags.
EVALUATE_ENTRY = ("from gensar_jax import gin_utils, evaluate, train; "
                  "gin_utils.run(evaluate.main)")


class SweepError(Exception):
  """A bad spec or flag; printed as one line, exit code 2."""


# ----------------------------------------------------------------------------- spec


def gin_literal(value: Any, where: str) -> str:
  """A JSON value as gin text; strings are taken as gin text already."""
  if isinstance(value, str):
    if not value.strip():
      raise SweepError(f"{where}: empty binding value")
    return value
  if value is None or isinstance(value, bool):
    return repr(value)
  if isinstance(value, (int, float)):
    if isinstance(value, float) and not math.isfinite(value):
      raise SweepError(f"{where}: {value} is not a gin number")
    return repr(value)
  if isinstance(value, list):
    return "[" + ", ".join(gin_literal(v, where) for v in value) + "]"
  if isinstance(value, dict):
    return "{" + ", ".join(f"{gin_literal(k, where)}: {gin_literal(v, where)}"
                           for k, v in value.items()) + "}"
  raise SweepError(f"{where}: unsupported value {value!r}")


def _bindings(obj: Any, where: str) -> Dict[str, str]:
  if not isinstance(obj, dict):
    raise SweepError(f"{where}: expected an object {{binding: value}}, got {obj!r}")
  out = {}
  for key, value in obj.items():
    if not BINDING_KEY.fullmatch(key):
      raise SweepError(f"{where}: {key!r} is not a gin binding name (NAME, fn.param, "
                       "scope/fn.param)")
    out[key] = gin_literal(value, f"{where}.{key}")
  return out


def load_spec(path: str) -> Dict[str, Any]:
  """The spec with defaults filled in and every field checked (errors name the field)."""
  try:
    with open(path, encoding="utf-8") as f:
      spec = json.load(f)
  except FileNotFoundError:
    raise SweepError(f"--spec={path}: file not found") from None
  except json.JSONDecodeError as e:
    raise SweepError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(spec, dict):
    raise SweepError(f"{path}: expected a JSON object")
  unknown = sorted(set(spec) - SPEC_KEYS)
  if unknown:
    raise SweepError(f"{path}: unknown field(s) {unknown}; known: {sorted(SPEC_KEYS)}")
  files = spec.get("gin_files")
  if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
    raise SweepError(f"{path}: gin_files must be a non-empty list of gin file paths")
  grid = spec.get("grid", {})
  if not isinstance(grid, dict):
    raise SweepError(f"{path}: grid must be an object {{binding: [values]}}")
  for key, values in grid.items():
    if not isinstance(values, list) or not values:
      raise SweepError(f"{path}: grid.{key} must be a non-empty list of values")
  points = spec.get("points", [{}])
  if not isinstance(points, list) or not points:
    raise SweepError(f"{path}: points must be a non-empty list of {{binding: value}}")
  evaluate = spec.get("evaluate", {})
  if not isinstance(evaluate, dict) or set(evaluate) - {"gin_files", "bindings"}:
    raise SweepError(f"{path}: evaluate must be an object with gin_files and bindings")
  mode = spec.get("mode", "min")
  if mode not in ("min", "max"):
    raise SweepError(f"{path}: mode must be 'min' or 'max', got {mode!r}")
  select = spec.get("select", "best")
  if select not in ("best", "last"):
    raise SweepError(f"{path}: select must be 'best' or 'last', got {select!r}")
  short_names = spec.get("short_names", {})
  if not isinstance(short_names, dict):
    raise SweepError(f"{path}: short_names must be an object {{binding: short name}}")
  return {
      "name": spec.get("name", os.path.splitext(os.path.basename(path))[0]),
      "gin_files": files,
      "bindings": _bindings(spec.get("bindings", {}), f"{path}: bindings"),
      "grid": {k: [gin_literal(v, f"{path}: grid.{k}[{i}]") for i, v in enumerate(vs)]
               for k, vs in _check_keys(grid, f"{path}: grid").items()},
      "points": [_bindings(p, f"{path}: points[{i}]") for i, p in enumerate(points)],
      "short_names": {str(k): str(v) for k, v in short_names.items()},
      "evaluate_gin_files": list(evaluate.get("gin_files", ["gin/runs/evaluate.gin"])),
      "evaluate_bindings": _bindings(evaluate.get("bindings", {}), f"{path}: evaluate"),
      "metric": str(spec.get("metric", "loss")), "mode": mode, "select": select,
  }


def _check_keys(grid: Mapping[str, Any], where: str) -> Mapping[str, Any]:
  for key in grid:
    if not BINDING_KEY.fullmatch(key):
      raise SweepError(f"{where}: {key!r} is not a gin binding name")
  return grid


@dataclasses.dataclass(frozen=True)
class Point:
  index: int
  name: str
  bindings: Dict[str, str]  # binding -> gin text, what this point sets


def _name_part(key: str, value: str, short_names: Mapping[str, str]) -> str:
  short = short_names.get(key) or key.split("/")[-1].split(".")[-1].lower()
  text = re.sub(r"[^A-Za-z0-9.+-]+", "-", value).strip("-") or "x"
  return f"{short}-{text}"


def expand_points(spec: Mapping[str, Any]) -> List[Point]:
  """Each listed point crossed with the grid, named by the values that vary."""
  grid_keys = list(spec["grid"])
  combos = [dict(zip(grid_keys, values))
            for values in itertools.product(*(spec["grid"][k] for k in grid_keys))]
  raw = [{**listed, **combo} for listed in spec["points"] for combo in combos]
  varying = [k for k in dict.fromkeys(k for b in raw for k in b)
             if len({b.get(k) for b in raw}) > 1]
  names = []
  for bindings in raw:
    name = "_".join(_name_part(k, bindings[k], spec["short_names"])
                    for k in varying if k in bindings) or "base"
    if len(name) > MAX_NAME:
      name = name[:MAX_NAME].rstrip("_-")
    names.append(name)
  points = []
  for i, (name, bindings) in enumerate(zip(names, raw)):
    if names.count(name) > 1 or len(name) == MAX_NAME:
      digest = hashlib.sha1(json.dumps(bindings, sort_keys=True).encode()).hexdigest()[:6]
      name = f"{name}-{digest}"
    points.append(Point(index=i, name=name, bindings=bindings))
  if len({p.name for p in points}) != len(points):
    raise SweepError("two points have the same bindings; the grid lists a value twice")
  return points


# ----------------------------------------------------------------------------- commands


def _gin_string(text: str) -> str:
  return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


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
  flags.append(f"--gin.MODEL_DIR={_gin_string(model_dir)}")
  return flags


def split_gin_flags(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
  """(gin flags for every point, verbatim; the sweep's own flags)."""
  gin_flags, own = [], []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if arg.startswith(GIN_FLAG_PREFIXES):
      if arg in ("--gin_file", "--gin_bindings"):
        if i + 1 >= len(args):
          raise SweepError(f"{arg} needs a value")
        arg, i = f"{arg}={args[i + 1]}", i + 1
      elif "=" not in arg:
        raise SweepError(f"{arg!r}: gin flags take a value (--gin.NAME=VALUE)")
      gin_flags.append(arg)
    else:
      own.append(arg)
    i += 1
  return gin_flags, own


def _join(path: str, name: str) -> str:
  return f"{path.rstrip('/')}/{name}" if "://" in path else os.path.join(path, name)


def _write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def _write_point_files(point_dir: str, point: Point, model_dir: str,
                       commands: Mapping[str, List[str]]) -> None:
  os.makedirs(point_dir, exist_ok=True)
  lines = [f"# Sweep point {point.index}: {point.name}"]
  lines += [f"{k} = {v}" for k, v in point.bindings.items()]
  lines.append(f"MODEL_DIR = {_gin_string(model_dir)}")
  _write_atomic(os.path.join(point_dir, POINT_GIN), "\n".join(lines) + "\n")
  _write_atomic(os.path.join(point_dir, POINT_JSON), json.dumps(
      {"index": point.index, "name": point.name, "bindings": point.bindings,
       "model_dir": model_dir, "commands": commands}, indent=2) + "\n")


def _read_json(path: str) -> Optional[Dict]:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def is_done(point_dir: str, commands: Mapping[str, List[str]]) -> bool:
  """Finished with these very commands (a changed TRAIN_STEPS, say, runs the point again)."""
  done = _read_json(os.path.join(point_dir, DONE_JSON))
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
  path = _join(model_dir, "metrics.jsonl")
  try:
    text = _read_text(path) or ""
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
  _write_atomic(os.path.join(point_dir, DONE_JSON), json.dumps(
      {"commands": commands, "seconds": round(seconds, 1)}, indent=2) + "\n")
  return True, seconds


# ----------------------------------------------------------------------------- summary


def _read_text(path: str) -> Optional[str]:
  if "://" in path:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  # only for gs:// runs
    if not tf.io.gfile.exists(path):
      return None
    with tf.io.gfile.GFile(path) as f:
      return f.read()
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return f.read()


def eval_lines(model_dir: str) -> List[Dict[str, Any]]:
  """The eval records of MODEL_DIR/metrics.jsonl (gensar_jax/train_logging.py's format)."""
  text = _read_text(_join(model_dir, "metrics.jsonl"))
  records = [json.loads(line) for line in (text or "").splitlines() if line.strip()]
  return [r for r in records if r.get("split") == "eval"]


def select_eval(lines: Sequence[Mapping[str, Any]], metric: str, mode: str,
                select: str) -> Optional[Mapping[str, Any]]:
  if not lines:
    return None
  if select == "last":
    return lines[-1]
  scored = [r for r in lines if isinstance(r.get(metric), (int, float))]
  if not scored:
    return lines[-1]
  pick = min if mode == "min" else max
  return pick(scored, key=lambda r: r[metric])


def result_metrics(model_dir: str) -> Dict[str, float]:
  """Metrics of gensar_jax.evaluate result files (MODEL_DIR/eval_<split>/*.json)."""
  out = {}
  if "://" in model_dir:
    return out
  for path in sorted(glob.glob(os.path.join(model_dir, "eval_*", "*.json"))):
    result = _read_json(path) or {}
    for task in ("rec", "search"):
      block = result.get(task)
      for name, value in (block or {}).items():
        if name != "num_examples" and isinstance(value, (int, float)):
          out[f"{result.get('split', 'eval')}/{task}/{name}"] = float(value)
  return out


def summary_rows(spec: Mapping[str, Any], points: Sequence[Point],
                 model_dirs: Mapping[str, str],
                 status: Mapping[str, str]) -> Tuple[List[str], List[Dict[str, Any]]]:
  """(columns, one row per point): bindings, the selected eval line, evaluate results."""
  keys = list(dict.fromkeys(k for p in points for k in p.bindings))
  metric = spec["metric"]
  rows, metric_names = [], set()
  for point in points:
    chosen = select_eval(eval_lines(model_dirs[point.name]), metric, spec["mode"],
                         spec["select"])
    row: Dict[str, Any] = {"point": point.name, "status": status.get(point.name, "")}
    row.update({k: point.bindings.get(k, "") for k in keys})
    row["eval_step"] = chosen["step"] if chosen else None
    values = {k: v for k, v in (chosen or {}).items() if k not in ("step", "split")}
    values.update(result_metrics(model_dirs[point.name]))
    metric_names.update(values)
    row.update(values)
    rows.append(row)
  others = sorted(metric_names - {metric})
  columns = ["point", "status", *keys, "eval_step", metric, *others]
  return columns, rows


def _cell(value: Any) -> str:
  if value is None or value == "":
    return ""
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def write_summary(sweep_dir: str, spec: Mapping[str, Any], columns: Sequence[str],
                  rows: Sequence[Mapping[str, Any]]) -> Dict[str, str]:
  """summary.md, summary.csv and (if matplotlib is there) summary.png; returns their paths."""
  metric = spec["metric"]
  title = (f"Sweep {spec['name']}: eval `{metric}` ({spec['select']}"
           f"{', ' + spec['mode'] if spec['select'] == 'best' else ''}) per point")
  lines = [title, "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
  for row in rows:
    lines.append("| " + " | ".join(_cell(row.get(c)).replace("|", "\\|")
                                   for c in columns) + " |")
  paths = {"md": os.path.join(sweep_dir, "summary.md"),
           "csv": os.path.join(sweep_dir, "summary.csv")}
  _write_atomic(paths["md"], "\n".join(lines) + "\n")
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore",
                          lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})
  _write_atomic(paths["csv"], buffer.getvalue())
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("note: matplotlib is not installed; no summary.png", file=sys.stderr)
    return paths
  names = [r["point"] for r in rows]
  values = [r.get(metric) if isinstance(r.get(metric), (int, float)) else math.nan
            for r in rows]
  fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 2), 4.0))
  ax.bar(range(len(rows)), values, color="tab:blue")
  ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
  ax.set_ylabel(metric)
  ax.set_title(f"{spec['name']}: eval {metric} ({spec['select']}) per point")
  fig.tight_layout()
  paths["png"] = os.path.join(sweep_dir, "summary.png")
  tmp = f"{paths['png']}.tmp-{os.getpid()}.png"
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, paths["png"])
  return paths


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str]):
  gin_flags, own = split_gin_flags(argv)
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
  model_dirs = {p.name: _join(model_root, p.name) for p in points}
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
    _write_atomic(script, "#!/bin/sh\n# One launch per sweep point (run from the repository "
                  "root).\n" + "\n".join(tpu_lines) + "\n")
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
