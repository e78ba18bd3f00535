"""The comparison table and the search/recommendation trade-off plot, from result files.

  python -m gensar_jax.comparison --results_dir=runs/ml100k/results \
      [--results_dir=runs/ml100k/gensar_results] --output_dir=runs/ml100k/comparison

Reads every result JSON (schema in gensar_jax/results.py), groups them by system, and
writes into output_dir:
  comparison.md    rows = systems, columns = search and rec HR@1/5/10, NDCG@5/10;
                   "mean ± std" for systems run with several seeds, "—" for a task a system
                   does not do
  comparison.json  the same numbers, machine-readable (mean, std, seeds per system)
  tradeoff.png     x = rec NDCG@10, y = search NDCG@10, one point per system, error bars for
                   multi-seed systems; single-task systems sit at 0 on the other axis

GenSAR's claim is "no trade-off": a point up and to the right of every single-task system.
The std is the sample standard deviation over seeds (ddof = 1), the usual convention for
reporting run-to-run spread.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
from typing import BinaryIO, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from gensar_jax import io_utils
from gensar_jax import results as results_lib

MD_FILE = "comparison.md"
JSON_FILE = "comparison.json"
PLOT_FILE = "tradeoff.png"
PLOT_METRIC = "NDCG@10"
MISSING = "—"


@dataclasses.dataclass
class SystemSummary:
  """One row of the table: a system's metrics aggregated over its seeds."""
  system: str
  family: str
  seeds: List[Optional[int]]
  sources: List[str]
  # task -> metric -> (mean, std); std is None with a single run. None: task not done.
  tasks: Dict[str, Optional[Dict[str, Tuple[float, Optional[float]]]]]
  num_examples: Dict[str, Optional[int]]
  wall_seconds: float  # mean over runs

  @property
  def num_runs(self) -> int:
    return len(self.sources)


def load_results(results_dirs: Sequence[str]) -> List[Tuple[str, results_lib.SystemResult]]:
  """(path, result) for every result file in the given directories."""
  if not results_dirs:
    raise results_lib.ResultError("no results directory given")
  loaded = []
  for results_dir in results_dirs:
    for path in results_lib.result_files(results_dir):
      loaded.append((path, results_lib.read_result(path)))
  return loaded


def _single_value(loaded, field: str) -> str:
  values: Dict[str, List[str]] = {}
  for path, result in loaded:
    values.setdefault(getattr(result, field), []).append(path)
  if len(values) > 1:
    detail = "; ".join(f"{v!r}: {', '.join(paths)}" for v, paths in values.items())
    raise results_lib.ResultError(f"results mix several {field}s, which are not comparable: "
                                  f"{detail}")
  return next(iter(values))


def summarise(loaded: Sequence[Tuple[str, results_lib.SystemResult]]) -> List[SystemSummary]:
  """Groups results by system and aggregates seeds; inconsistent groups are errors."""
  groups: Dict[str, List[Tuple[str, results_lib.SystemResult]]] = {}
  for path, result in loaded:
    groups.setdefault(result.system, []).append((path, result))
  summaries = []
  for system, members in groups.items():
    paths = [p for p, _ in members]
    families = {r.family for _, r in members}
    if len(families) > 1:
      raise results_lib.ResultError(f"system {system!r} has several families {families} "
                                    f"across {paths}")
    seeds = [r.seed for _, r in members]
    if len(members) > 1 and (None in seeds or len(set(seeds)) != len(seeds)):
      raise results_lib.ResultError(
          f"system {system!r} has {len(members)} results ({paths}) with seeds {seeds}; "
          "several runs of one system need distinct integer seeds")
    tasks, counts = {}, {}
    for task in results_lib.TASKS:
      blocks = [getattr(r, task) for _, r in members]
      present = [b is not None for b in blocks]
      if any(present) and not all(present):
        raise results_lib.ResultError(
            f"system {system!r}: {task} metrics are present in some runs and null in others "
            f"({dict(zip(paths, present))})")
      if not all(present):
        tasks[task], counts[task] = None, None
        continue
      stats = {}
      for name in results_lib.METRIC_NAMES:
        values = np.array([b[name] for b in blocks], np.float64)  # [runs]
        std = float(np.std(values, ddof=1)) if len(values) > 1 else None
        stats[name] = (float(values.mean()), std)
      tasks[task] = stats
      sizes = {b["num_examples"] for b in blocks}
      if len(sizes) > 1:
        raise results_lib.ResultError(f"system {system!r}: runs scored different numbers of "
                                      f"{task} examples {sorted(sizes)} ({paths})")
      counts[task] = sizes.pop()
    order = np.argsort([s if s is not None else -1 for s in seeds], kind="stable")
    summaries.append(SystemSummary(
        system=system, family=families.pop(), seeds=[seeds[i] for i in order],
        sources=[paths[i] for i in order], tasks=tasks, num_examples=counts,
        wall_seconds=float(np.mean([r.wall_seconds for _, r in members]))))
  # Baselines first, then the generative systems; alphabetical within each family.
  family_rank = {f: i for i, f in enumerate(results_lib.FAMILIES)}
  return sorted(summaries, key=lambda s: (family_rank[s.family], s.system.lower()))


def format_cell(stat: Optional[Tuple[float, Optional[float]]]) -> str:
  if stat is None:
    return MISSING
  mean, std = stat
  return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def markdown_table(summaries: Sequence[SystemSummary], split: str, dataset: str) -> str:
  columns = [(task, name) for task in ("search", "rec") for name in results_lib.METRIC_NAMES]
  header = ["system", "family", "runs"] + [f"{task} {name}" for task, name in columns]
  lines = [f"# {dataset}, {split} split", "",
           "| " + " | ".join(header) + " |",
           "|" + "|".join(["---"] * 3 + ["---:"] * len(columns)) + "|"]
  for s in summaries:
    cells = [s.system, s.family, str(s.num_runs)]
    for task, name in columns:
      block = s.tasks[task]
      cells.append(format_cell(None if block is None else block[name]))
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", f"Values are means ± sample std over seeds where runs > 1; {MISSING} = the "
            "system does not do that task. Every system ranks the same candidates (target + "
            "99 negatives)."]
  counts = sorted({(t, n) for s in summaries for t, n in s.num_examples.items() if n})
  if counts:
    lines.append("Examples scored: " + ", ".join(f"{t} {n:,}" for t, n in counts) + ".")
  return "\n".join(lines) + "\n"


def comparison_json(summaries: Sequence[SystemSummary], split: str, dataset: str) -> Dict:
  systems = []
  for s in summaries:
    tasks = {}
    for task, block in s.tasks.items():
      tasks[task] = None if block is None else {
          name: {"mean": mean, "std": std} for name, (mean, std) in block.items()}
      if block is not None:
        tasks[task]["num_examples"] = s.num_examples[task]
    systems.append({"system": s.system, "family": s.family, "seeds": s.seeds,
                    "num_runs": s.num_runs, "sources": s.sources,
                    "wall_seconds_mean": s.wall_seconds, **tasks})
  return {"split": split, "dataset": dataset, "std": "sample (ddof=1) over seeds",
          "systems": systems}


def plot_tradeoff(summaries: Sequence[SystemSummary], path: Union[str, BinaryIO],
                  title: str) -> None:
  """Rec NDCG@10 against search NDCG@10; single-task systems at 0 on the missing axis."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 5.5))
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  one_task = False
  top = 0.0
  for i, s in enumerate(summaries):
    rec, search = s.tasks["rec"], s.tasks["search"]
    x, xerr = rec[PLOT_METRIC] if rec else (0.0, None)
    y, yerr = search[PLOT_METRIC] if search else (0.0, None)
    top = max(top, x + (xerr or 0), y + (yerr or 0))
    both = rec is not None and search is not None
    one_task |= not both
    colour = colours[i % len(colours)]
    marker = "o" if s.family == "generative" else "s"
    ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=marker, markersize=8, capsize=4,
                color=colour, markerfacecolor=colour if both else "white",
                label=s.system + ("" if s.num_runs == 1 else f" ({s.num_runs} seeds)"))
    ax.annotate(s.system, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
  limit = max(0.05, top * 1.1)
  ax.set_xlim(-0.02 * limit, limit)
  ax.set_ylim(-0.02 * limit, limit)
  ax.set_xlabel(f"recommendation {PLOT_METRIC}")
  ax.set_ylabel(f"search {PLOT_METRIC}")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="best")
  if one_task:
    fig.text(0.01, 0.01, "Open markers: the system does only one task and is drawn at 0 on "
             "the other axis. Squares: baselines; circles: generative.", fontsize=7)
  fig.tight_layout(rect=(0, 0.03, 1, 1))
  fig.savefig(path, dpi=120, format="png")
  plt.close(fig)


def _same_dir(a: str, b: str) -> bool:
  if io_utils.is_remote(a) or io_utils.is_remote(b):
    return a.rstrip("/") == b.rstrip("/")
  return os.path.abspath(a) == os.path.abspath(b)


def compare(results_dirs: Sequence[str], output_dir: str) -> List[SystemSummary]:
  """Reads, aggregates, and writes comparison.md, comparison.json and tradeoff.png."""
  if any(_same_dir(d, output_dir) for d in results_dirs):
    raise results_lib.ResultError(f"{output_dir}: output_dir must differ from the results "
                                  "directories (comparison.json would be read as a result)")
  loaded = load_results(results_dirs)
  split = _single_value(loaded, "split")
  dataset = _single_value(loaded, "dataset")
  summaries = summarise(loaded)
  io_utils.makedirs(output_dir)
  io_utils.write_text(io_utils.join(output_dir, MD_FILE),
                      markdown_table(summaries, split, dataset))
  io_utils.write_text(io_utils.join(output_dir, JSON_FILE), json.dumps(
      comparison_json(summaries, split, dataset), indent=2, ensure_ascii=False) + "\n")
  png = io.BytesIO()
  plot_tradeoff(summaries, png, f"search vs recommendation, {dataset} {split}")
  io_utils.write_bytes(io_utils.join(output_dir, PLOT_FILE), png.getvalue())
  return summaries


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--results_dir", action="append", required=True,
                      help="directory of result JSON files; repeat for several")
  parser.add_argument("--output_dir", required=True)
  args = parser.parse_args(argv)
  try:
    compare(args.results_dir, args.output_dir)
  except results_lib.ResultError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  print(io_utils.read_text(io_utils.join(args.output_dir, MD_FILE)))


if __name__ == "__main__":
  main()
