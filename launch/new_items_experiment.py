"""Items added after training, measured: are they ranked as well as if they had been there?

  python launch/new_items_experiment.py        # about 20 minutes on 2 CPU cores

1. the full run: `make demo`'s quickstart (reused when its test predictions exist);
2. the held-out run: the same quickstart without the newest 5% of items and their ratings
   (gin/experiments/ml100k_new_items.gin, `prepare.hold_out_newest_items`);
3. `gensar_jax.add_items` gives the held-out items identifiers from the held-out run's
   saved RQ-VAE, with the full catalogue as it is now; nothing is retrained;
4. the held-out run's model is evaluated on the full run's test split with that table;
5. per task, HR@10 / NDCG@10 / HR@30 over the 100 candidates (the model ranks its 30 beams)
   and HR@10 over the catalogue, on test examples whose target is a held-out item and on
   the others, for both runs; plus the share of ranked candidate slots, over all test
   examples, that hold a held-out item.

Writes <run_dir>/new_items/{new_items.json, new_items.md, new_items.png}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List

import numpy as np

QUICKSTART_GIN = "gin/experiments/ml100k_quickstart.gin"
HELD_OUT_GIN = "gin/experiments/ml100k_new_items.gin"
TASKS = ("rec", "search")


def _run(args: List[str]) -> None:
  print("+", " ".join(args), flush=True)
  subprocess.run([sys.executable, *args], check=True)


def _predictions(eval_dir: str, task: str) -> List[Dict]:
  with open(os.path.join(eval_dir, f"predictions_{task}.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def subset_metrics(rows: List[Dict], new_items: set) -> Dict[str, Dict[str, float]]:
  """HR@10 / NDCG@10 (candidates) and catalogue HR@10 on new-item targets and the rest,
  and the share of catalogue top-10 slots that hold new items."""
  out = {}
  for name, keep in (("new_items", lambda t: t in new_items),
                     ("other_items", lambda t: t not in new_items)):
    chosen = [r for r in rows if keep(str(r["target"]))]
    ranks = np.asarray([r["candidates"].index(r["target"]) if r["target"] in r["candidates"]
                        else 10 ** 6 for r in chosen])
    out[name] = {
        "examples": len(chosen),
        "HR@10": float(np.mean(ranks < 10)) if len(chosen) else float("nan"),
        "NDCG@10": float(np.mean(np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0)))
                   if len(chosen) else float("nan"),
        "HR@30": float(np.mean(ranks < 30)) if len(chosen) else float("nan"),
        "catalogue_HR@10": float(np.mean([r["target"] in r["catalogue"][:10] for r in chosen]))
                           if len(chosen) else float("nan"),
    }
  # How often the model puts a new item among the candidates it ranks (30 beams), whatever
  # the target: what an item added later can hope for if it is decodable at all.
  slots = [item for r in rows for item in r["candidates"]]
  out["ranked_slots_new_share"] = float(np.mean([s in new_items for s in slots]))
  return out


def format_table(result: Dict) -> str:
  lines = [f"Held-out items: {result['held_out_items']} of {result['catalogue_items']} "
           "(the newest by first rating)", "",
           "| task | targets | run | examples | HR@10 | NDCG@10 | HR@30 | catalogue HR@10 | "
           "ranked slots holding a new item |", "|---" * 9 + "|"]
  for task in TASKS:
    for subset in ("new_items", "other_items"):
      for run in ("present_from_start", "added_after_training"):
        m = result[task][run]
        s = m[subset]
        lines.append(f"| {task} | {subset.replace('_', ' ')} | {run.replace('_', ' ')} | "
                     f"{s['examples']} | {s['HR@10']:.4f} | {s['NDCG@10']:.4f} | "
                     f"{s['HR@30']:.4f} | {s['catalogue_HR@10']:.4f} | "
                     f"{m['ranked_slots_new_share']:.3%} |")
  return "\n".join(lines)


def plot(result: Dict, path: str) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(8, 3.2))
  FigureCanvasAgg(fig)
  for k, task in enumerate(TASKS):
    ax = fig.add_subplot(1, 2, k + 1)
    for j, run in enumerate(("present_from_start", "added_after_training")):
      values = [result[task][run][s]["HR@30"] for s in ("new_items", "other_items")]
      ax.bar(np.arange(2) + 0.38 * j, values, 0.38, label=run.replace("_", " "))
    ax.set_xticks(np.arange(2) + 0.19, ["held-out targets", "other targets"])
    ax.set_title(f"{task}: test HR@30 (target among the ranked beams)")
  fig.axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--full_run_dir", default="runs/ml100k_quickstart",
                      help="a quickstart run directory (run first if it has no test results)")
  parser.add_argument("--full_run_gin", default=QUICKSTART_GIN)
  parser.add_argument("--run_dir", default="runs/ml100k_new_items")
  parser.add_argument("--held_out_gin", default=HELD_OUT_GIN)
  args = parser.parse_args()
  # A run whose test predictions exist is reused as is (rerunning its pipeline after a code
  # change that touches a stage's configuration would retrain it).
  full_eval = os.path.join(args.full_run_dir, "results", "gensar")
  held_out_eval = os.path.join(args.run_dir, "results", "gensar")
  for gin_file, eval_dir in ((args.full_run_gin, full_eval), (args.held_out_gin, held_out_eval)):
    if not os.path.isfile(os.path.join(eval_dir, "predictions_rec.jsonl")):
      _run(["-m", "gensar_jax.pipeline", f"--gin_file={gin_file}"])
  full_data = os.path.join(args.full_run_dir, "data")
  added_ids = os.path.join(args.run_dir, "identifiers_added")
  _run(["-m", "gensar_jax.add_items", "--gin_file=gin/runs/add_items.gin",
        f"--gin.IDENTIFIERS_DIR='{os.path.join(args.run_dir, 'identifiers')}'",
        f"--gin.PREPARED_DIR='{full_data}'", f"--gin.OUTPUT_DIR='{added_ids}'",
        "--gin.add_items.overwrite=True"])
  added_eval = os.path.join(args.run_dir, "results", "gensar_added_items")
  _run(["-m", "gensar_jax.evaluate", f"--gin_file={args.held_out_gin}",
        f"--gin.PREPARED_DIR='{full_data}'", f"--gin.IDENTIFIERS_DIR='{added_ids}'",
        "--gin.PSEUDO_QUERIES_PATH=None", f"--gin.evaluate.output_dir='{added_eval}'"])

  with open(os.path.join(args.run_dir, "data", "held_out_items.json"), encoding="utf-8") as f:
    held_out = set(json.load(f))
  with open(os.path.join(added_ids, "added_items.json"), encoding="utf-8") as f:
    added = json.load(f)
  result = {"held_out_items": len(held_out),
            "catalogue_items": added["items_added"] + added["items_kept"],
            "add_items": {k: v for k, v in added.items() if k != "new_item_ids"}}
  for task in TASKS:
    result[task] = {
        "present_from_start": subset_metrics(_predictions(full_eval, task), held_out),
        "added_after_training": subset_metrics(_predictions(added_eval, task), held_out)}
  out_dir = os.path.join(args.run_dir, "new_items")
  os.makedirs(out_dir, exist_ok=True)
  table = format_table(result)
  for name, text in (("new_items.json", json.dumps(result, indent=2)),
                     ("new_items.md", table + "\n")):
    tmp = os.path.join(out_dir, name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, os.path.join(out_dir, name))
  plot(result, os.path.join(out_dir, "new_items.png"))
  print(table)


if __name__ == "__main__":
  main()
