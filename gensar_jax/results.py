"""One result file per evaluated system, the common currency of baselines and GenSAR runs.

Every evaluator (popularity, SASRec, BM25, dense retrieval, the generative model) writes the
same small JSON so that `gensar_jax.comparison` can put them side by side without knowing
how any of them was produced:

  {"system": "BM25", "family": "baseline" | "generative", "seed": null | int,
   "split": "test", "dataset": "<prepared dir name>",
   "rec": null | {"HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "num_examples"},
   "search": null | {...the same...},
   "wall_seconds": float}

`rec` / `search` is null when the system does not do that task.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Dict, List, Optional

from gensar_jax import io_utils
from gensar_jax import metrics as metrics_lib
from gensar_jax.errors import GensarError

FAMILIES = ("baseline", "generative")
TASKS = ("rec", "search")
METRIC_NAMES = tuple([f"HR@{k}" for k in metrics_lib.HIT_CUTOFFS] +
                     [f"NDCG@{k}" for k in metrics_lib.NDCG_CUTOFFS])
FIELDS = ("system", "family", "seed", "split", "dataset", "rec", "search", "wall_seconds")


class ResultError(GensarError):
  """A result file (or a result about to be written) breaks the schema."""


@dataclasses.dataclass
class SystemResult:
  system: str
  family: str
  seed: Optional[int]
  split: str
  dataset: str
  rec: Optional[Dict[str, float]]
  search: Optional[Dict[str, float]]
  wall_seconds: float

  def to_json(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)


def task_metrics(metrics: Dict[str, float], num_examples: int) -> Dict[str, Any]:
  """The per-task block of a result: ranking_metrics' output plus how many rows it averaged."""
  block: Dict[str, Any] = {name: float(metrics[name]) for name in METRIC_NAMES}
  block["num_examples"] = int(num_examples)
  return block


def _check_task_block(block: Any, where: str) -> None:
  if block is None:
    return
  if not isinstance(block, dict):
    raise ResultError(f"{where}: expected an object of metrics or null; got {block!r}")
  missing = [k for k in METRIC_NAMES + ("num_examples",) if k not in block]
  if missing:
    raise ResultError(f"{where}: missing metric(s) {missing}")
  for name in METRIC_NAMES:
    value = block[name]
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)
        or not 0.0 <= value <= 1.0):
      raise ResultError(f"{where}.{name}: expected a number in [0, 1]; got {value!r}")
  count = block["num_examples"]
  if isinstance(count, bool) or not isinstance(count, int) or count < 1:
    raise ResultError(f"{where}.num_examples: expected a positive integer; got {count!r}")


def validate_result(obj: Any, where: str) -> SystemResult:
  """Checks one decoded result object; `where` names it in errors (a path, usually)."""
  if not isinstance(obj, dict):
    raise ResultError(f"{where}: expected a JSON object; got {type(obj).__name__}")
  missing = [f for f in FIELDS if f not in obj]
  if missing:
    raise ResultError(f"{where}: missing field(s) {missing}")
  unknown = sorted(set(obj) - set(FIELDS))
  if unknown:
    raise ResultError(f"{where}: unknown field(s) {unknown}; expected {list(FIELDS)}")
  for name in ("system", "split", "dataset"):
    if not isinstance(obj[name], str) or not obj[name].strip():
      raise ResultError(f"{where}.{name}: expected a non-empty string; got {obj[name]!r}")
  if obj["family"] not in FAMILIES:
    raise ResultError(f"{where}.family: expected one of {FAMILIES}; got {obj['family']!r}")
  seed = obj["seed"]
  if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
    raise ResultError(f"{where}.seed: expected null or an integer; got {seed!r}")
  for task in TASKS:
    _check_task_block(obj[task], f"{where}.{task}")
  if obj["rec"] is None and obj["search"] is None:
    raise ResultError(f"{where}: both rec and search are null; a result needs one task")
  wall = obj["wall_seconds"]
  if isinstance(wall, bool) or not isinstance(wall, (int, float)) or wall < 0:
    raise ResultError(f"{where}.wall_seconds: expected a non-negative number; got {wall!r}")
  return SystemResult(**{f: obj[f] for f in FIELDS})


def result_filename(system: str, seed: Optional[int] = None) -> str:
  """A file-system-safe name: "BM25" -> bm25.json, ("GenSAR", 2) -> gensar_seed2.json."""
  slug = re.sub(r"[^a-z0-9]+", "_", system.lower()).strip("_") or "system"
  return f"{slug}.json" if seed is None else f"{slug}_seed{seed}.json"


def write_result(path: str, result: SystemResult) -> str:
  """Validates and writes one result; readers never see a half-written file."""
  obj = result.to_json()
  validate_result(obj, f"result for {result.system!r} (about to be written to {path})")
  io_utils.write_json(path, obj)
  return path


def read_result(path: str) -> SystemResult:
  try:
    obj = io_utils.read_json(path)
  except json.JSONDecodeError as e:
    raise ResultError(f"{path}: not valid JSON ({e})") from None
  return validate_result(obj, path)


def result_files(results_dir: str) -> List[str]:
  """Paths of every *.json directly inside `results_dir`, in name order (at least one)."""
  if not io_utils.isdir(results_dir):
    raise ResultError(f"{results_dir}: results directory not found")
  names = [n for n in io_utils.listdir(results_dir)
           if n.endswith(".json") and not n.startswith(".")]
  if not names:
    raise ResultError(f"{results_dir}: no result files (*.json)")
  return [io_utils.join(results_dir, n) for n in names]


def read_results(results_dir: str) -> List[SystemResult]:
  """Every *.json result directly inside `results_dir`, in file-name order, validated."""
  return [read_result(path) for path in result_files(results_dir)]
