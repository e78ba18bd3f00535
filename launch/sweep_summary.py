"""The summary of a sweep: one row per point, as summary.md, summary.csv and summary.png.

A point's row holds its bindings, one of its evaluation lines from MODEL_DIR/metrics.jsonl
(the trainer's eval records: the best by the spec's metric, or the last) and any results
JSON of gensar_jax.evaluate. Rows are built from what is on disk, not from what this
invocation ran, so `--summary_only` (and a sweep whose points ran on TPU) tabulates the
same way. Files go through gensar_jax.io_utils (local or gs://); matplotlib draws the plot.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from gensar_jax import io_utils
from sweep_spec import Point


def eval_lines(model_dir: str) -> List[Dict[str, Any]]:
  """The eval records of MODEL_DIR/metrics.jsonl (gensar_jax/train_logging.py's format)."""
  text = io_utils.read_text_if_exists(io_utils.join(model_dir, "metrics.jsonl"))
  records = [json.loads(line) for line in (text or "").splitlines() if line.strip()]
  return [r for r in records if r.get("split") == "eval"]


def select_eval(lines: Sequence[Mapping[str, Any]], metric: str, mode: str,
                select: str) -> Optional[Mapping[str, Any]]:
  """The last line, or the best by `metric` (the last when no line has the metric)."""
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
  if not io_utils.isdir(model_dir):
    return out
  paths = [io_utils.join(model_dir, d, name)
           for d in io_utils.listdir(model_dir) if d.startswith("eval_")
           and io_utils.isdir(io_utils.join(model_dir, d))
           for name in io_utils.listdir(io_utils.join(model_dir, d)) if name.endswith(".json")]
  for path in sorted(paths):
    result = io_utils.read_json_if_valid(path) or {}
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
  io_utils.write_text(paths["md"], "\n".join(lines) + "\n")
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore",
                          lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})
  io_utils.write_text(paths["csv"], buffer.getvalue())
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
