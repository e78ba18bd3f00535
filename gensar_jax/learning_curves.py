"""Learning curves: validation NDCG@10 of both tasks against examples seen, per system.

What a comparison at one budget cannot say is whether a system has stopped learning.
Every training run logs its ranking evaluations in `metrics.jsonl` (`examples_seen`,
`rec_ndcg@10`, `search_ndcg@10` from RankingEvalHook); this module puts the runs of several
systems side by side:

  curves.png   two panels (rec, search): validation NDCG@10 against training examples seen
  curves.md    per system: each evaluation's examples seen and NDCG@10 of both tasks, and
               where each task's best was reached (last evaluation = still rising)
  curves.json  the same numbers

Written to a temporary directory and renamed into place, so a reader never sees half.
"""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Sequence, Tuple

from gensar_jax import io_utils
from gensar_jax.errors import GensarError
from gensar_jax.io_utils import atomic_output_dir, write_json
from gensar_jax.results import TASKS
from gensar_jax.train_logging import JSONL_NAME, read_jsonl_metrics

PNG_FILE, MD_FILE, JSON_FILE = "curves.png", "curves.md", "curves.json"


class CurveError(GensarError):
  """A run named for the curves has no metrics to draw."""


def read_curve(model_dir: str) -> List[Dict[str, float]]:
  """[{step, examples_seen, rec, search}] of one run's evaluations (a task it does not do
  is absent from its points)."""
  if not io_utils.exists(io_utils.join(model_dir, JSONL_NAME)):
    raise CurveError(f"{model_dir}: no {JSONL_NAME}; has this run trained?")
  points = []
  for record in read_jsonl_metrics(model_dir, "eval"):
    point = {"step": int(record["step"]),
             "examples_seen": float(record.get("examples_seen", float("nan")))}
    for task in TASKS:
      if f"{task}_ndcg@10" in record:
        point[task] = float(record[f"{task}_ndcg@10"])
    if any(task in point for task in TASKS):
      points.append(point)
  return points


def _best(points: Sequence[Mapping[str, float]], task: str) -> Tuple[float, float, bool]:
  """(best value, examples seen there, whether it was the last evaluation)."""
  scored = [(p[task], p["examples_seen"], i) for i, p in enumerate(points) if task in p]
  value, examples, index = max(scored, key=lambda x: (x[0], -x[2]))
  return value, examples, index == len(points) - 1


def format_curves(curves: Mapping[str, Sequence[Mapping[str, float]]]) -> str:
  lines = ["| system | best rec NDCG@10 (at examples) | best search NDCG@10 (at examples) |"
           " evaluations |", "|---|---|---|---:|"]
  for system, points in curves.items():
    cells = []
    for task in TASKS:
      if not any(task in p for p in points):
        cells.append("—")
        continue
      value, examples, last = _best(points, task)
      cells.append(f"{value:.4f} ({examples:,.0f}{', still rising' if last else ''})")
    lines.append(f"| {system} | {cells[0]} | {cells[1]} | {len(points)} |")
  lines += ["", "| system | step | examples seen | rec NDCG@10 | search NDCG@10 |",
            "|---|---:|---:|---:|---:|"]
  for system, points in curves.items():
    for p in points:
      cells = [f"{p[t]:.4f}" if t in p else "—" for t in TASKS]
      lines.append(f"| {system} | {p['step']} | {p['examples_seen']:,.0f} | {cells[0]} | "
                   f"{cells[1]} |")
  return "\n".join(lines) + "\n"


def _plot(curves: Mapping[str, Sequence[Mapping[str, float]]], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
  for ax, task in zip(axes, TASKS):
    for system, points in curves.items():
      xs = [p["examples_seen"] for p in points if task in p]
      ys = [p[task] for p in points if task in p]
      if xs:
        ax.plot(xs, ys, marker="o", markersize=3, label=system)
    ax.set_title(f"{task}: validation NDCG@10")
    ax.set_xlabel("training examples seen")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("NDCG@10 (100 candidates)")
  axes[1].legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_curves(runs: Mapping[str, str], output_dir: str) -> Dict[str, List[Dict]]:
  """{system name: model_dir} -> curves.{png,md,json} in `output_dir`; returns the points."""
  curves = {system: read_curve(model_dir) for system, model_dir in runs.items()}
  empty = [s for s, points in curves.items() if not points]
  if empty:
    raise CurveError(f"no ranking evaluations logged for {empty}: train with the ranking "
                     "eval hook (gin/runs/train.gin) and EVAL_PERIOD > 0")
  with atomic_output_dir(output_dir, overwrite=True) as tmp:
    _plot(curves, os.path.join(tmp, PNG_FILE))
    with open(os.path.join(tmp, MD_FILE), "w", encoding="utf-8") as f:
      f.write(format_curves(curves))
    write_json(os.path.join(tmp, JSON_FILE), curves)
  return curves
