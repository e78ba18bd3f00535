"""Evaluate a trained GenSAR run on the test (or validation) split.

  python -m gensar_jax.evaluate --gin_file=gin/runs/train.gin --gin_file=gin/models/tiny.gin \
      --gin_file=gin/runs/evaluate.gin --gin.MODEL_DIR="'runs/tiny'" ... (task macros)

The paper's protocol (docs/evaluation.md) on both ranking tasks: constrained beam
search (beam 30) over each example's 100 candidates, HR@{1,5,10} and NDCG@{5,10}; plus
HR/NDCG@10 over the whole catalogue (`catalogue_*` in the task blocks). Writes to
`output_dir`:
  <system>[_seed<n>].json    one result in the schema every baseline uses (results.py)
  results.md                 the same as a markdown table
  predictions_<task>.jsonl   per example: target, ranked candidates, catalogue top beams
"""
from __future__ import annotations

if __name__ == "__main__":  # one gin registration: run as the importable module
  import gensar_jax.gin_utils as _gin_utils
  _gin_utils.run_module("gensar_jax.evaluate")

import json
import os
import time
from typing import Dict, Mapping, Optional, Union

import gin

from gensar_jax import distributed
from gensar_jax import ranking
from gensar_jax import restore
from gensar_jax import results as results_lib
from gensar_jax.io_utils import atomic_output_dir


def format_table(result: results_lib.SystemResult, step: int) -> str:
  names = list(results_lib.METRIC_NAMES) + ["catalogue_HR@10", "catalogue_NDCG@10"]
  lines = [f"{result.system} on {result.dataset}/{result.split} (checkpoint step {step})", "",
           "| task | " + " | ".join(names) + " | examples |",
           "|---" * (len(names) + 2) + "|"]
  for task in ("search", "rec"):
    block = getattr(result, task)
    if block is None:
      continue
    cells = [f"{block[n]:.4f}" if n in block else "—" for n in names]
    lines.append(f"| {task} | " + " | ".join(cells) + f" | {block['num_examples']} |")
  return "\n".join(lines)


@gin.configurable
def evaluate(model_dir: str = gin.REQUIRED, output_dir: Optional[str] = None,
             split: str = "test", checkpoint: Union[str, int] = "best",
             task_feature_lengths: Mapping[str, int] = gin.REQUIRED, system: str = "GenSAR",
             family: str = "generative", seed: Optional[int] = None, num_beams: int = 30,
             batch_size: int = 16, catalogue: bool = True,
             max_examples: Optional[int] = None, overwrite: bool = True) -> Dict:
  """Evaluates the run's chosen checkpoint; returns the result object as JSON."""
  output_dir = output_dir or os.path.join(model_dir, f"eval_{split}")
  start = time.time()
  run = restore.load_run(model_dir, checkpoint, "evaluate")
  setup, model, params, step = run.setup, run.model, run.params, run.step
  ranked = ranking.evaluate_model(model, params, setup.task_names, setup.indices, split,
                                     int(task_feature_lengths["inputs"]),
                                     batch_size=batch_size,
                                     num_beams=num_beams, catalogue=catalogue,
                                     max_examples=max_examples)
  blocks = {}
  for task, r in ranked.items():
    block = results_lib.task_metrics(r.candidates, r.num_examples)
    for name, value in (r.catalogue or {}).items():
      block[f"catalogue_{name}"] = float(value)
    blocks[task] = block
  result = results_lib.SystemResult(
      system=system, family=family, seed=seed, split=split, dataset=setup.dataset,
      rec=blocks.get("rec"), search=blocks.get("search"),
      wall_seconds=round(time.time() - start, 1))
  table = format_table(result, step)

  def write() -> None:
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
      results_lib.write_result(os.path.join(tmp, results_lib.result_filename(system, seed)),
                               result)
      with open(os.path.join(tmp, "results.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
      for task, r in ranked.items():
        with open(os.path.join(tmp, f"predictions_{task}.jsonl"), "w", encoding="utf-8") as f:
          for row in r.predictions:
            f.write(json.dumps(row) + "\n")

  # Every process holds the same rankings (ranking.decode_batch); one copy is written.
  distributed.write_once(f"evaluate results to {output_dir}", write)
  return {**result.to_json(), "checkpoint_step": step, "output_dir": output_dir,
          "table": table}


def main() -> None:
  print(evaluate()["table"])

