"""Evaluates the non-generative baselines on a prepared split; one result JSON per system.

  python -m gensar_jax.baselines.run --gin_file=gin/runs/baselines.gin \
      --gin.PREPARED_DIR="'runs/ml100k/data'" --gin.IDENTIFIERS_DIR="'runs/ml100k/ids'" \
      --gin.BASELINES_DIR="'runs/ml100k/results'"

Systems (all rank exactly the stored candidates, target in column 0, with the shared
metrics, so they sit in one table with GenSAR):
  popularity    rec + search  training-period interaction counts (gensar_jax.baselines.popularity)
  sasrec        rec           metrics the identifiers stage computed (sasrec_metrics.json)
  bm25          search        bm25s over item text (gensar_jax.baselines.bm25)
  dense         search        MiniLM query vs item text cosine (gensar_jax.baselines.dense)
  dense_history search        the same with the user's recent items added to the query

Result files are written one by one, atomically, into `output_dir`, which may also hold the
generative runs' results (see gensar_jax.results for the schema).
"""
from __future__ import annotations

if __name__ == "__main__":  # one gin registration: run as the importable module
  import gensar_jax.gin_utils as _gin_utils
  _gin_utils.run_module("gensar_jax.baselines.run")

import dataclasses
import json
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import gin
import numpy as np

from gensar_jax import metrics as metrics_lib
from gensar_jax import results as results_lib
from gensar_jax.baselines import bm25 as bm25_lib
from gensar_jax.baselines import dense as dense_lib
from gensar_jax.baselines import popularity as popularity_lib
from gensar_jax.data.columns import read_columns
from gensar_jax.data.prepared import load_prepared
from gensar_jax.data.schema import KINDS, REC, SEARCH, DataError
from gensar_jax.identifiers import rqvae_store
from gensar_jax.identifiers.text_encoder import SentenceEncoder

SYSTEMS = ("popularity", "sasrec", "bm25", "dense", "dense_history")
SYSTEM_NAMES = {"popularity": "Popularity", "sasrec": "SASRec", "bm25": "BM25",
                "dense": "Dense (MiniLM)", "dense_history": "Dense (MiniLM) + history"}
SASREC_METRICS_FILE = "sasrec_metrics.json"
SEMANTIC_FILE = "semantic_embeddings.npy"  # written by gensar_jax/identify.py


@dataclasses.dataclass
class HeldOut:
  """The held-out samples of one task kind in one split, row-aligned."""
  user_ids: np.ndarray  # [n] str
  queries: List[str]  # [n] ("" for rec)
  candidates: np.ndarray  # [n, c] item indices, target in column 0
  histories: List[np.ndarray]  # [n] item indices of the history, oldest first

  def __len__(self) -> int:
    return len(self.user_ids)


def read_heldout(prepared_dir: str, split: str, num_items: int) -> Dict[str, HeldOut]:
  """{kind: HeldOut} for `split`, checking the candidate layout every baseline relies on."""
  if split == "train":
    raise ValueError("baselines are evaluated on validation or test; train has no candidates")
  cols = read_columns(prepared_dir, split, ["user_id", "kind", "target_index", "query",
                                            "candidate_indices", "history_item_index"])
  out = {}
  for kind in KINDS:
    rows = np.flatnonzero(cols["kind"] == kind)
    if not len(rows):
      continue
    lengths = {len(cols["candidate_indices"][r]) for r in rows}
    if len(lengths) != 1 or 0 in lengths:
      raise DataError(f"{prepared_dir}: {split} {kind} samples have candidate lists of "
                      f"lengths {sorted(lengths)}; expected one non-zero length")
    candidates = np.stack([cols["candidate_indices"][r] for r in rows]).astype(np.int64)
    targets = cols["target_index"][rows].astype(np.int64)
    wrong = np.flatnonzero(candidates[:, 0] != targets)
    if len(wrong):
      raise DataError(f"{prepared_dir}: {split} {kind} sample {int(rows[wrong[0]])} "
                      "(0-based, file order): candidate_indices[0] is not the target")
    if candidates.min() < 0 or candidates.max() >= num_items:
      raise DataError(f"{prepared_dir}: {split} {kind} candidates name item indices outside "
                      f"[0, {num_items})")
    out[kind] = HeldOut(
        user_ids=cols["user_id"][rows],
        queries=[str(cols["query"][r]) for r in rows],
        candidates=candidates,
        histories=[np.asarray(cols["history_item_index"][r], np.int64) for r in rows])
  return out


def _metrics_block(scores: np.ndarray) -> Dict[str, float]:
  ranks = metrics_lib.ranks_from_scores(scores, target_column=0)  # [n]
  return results_lib.task_metrics(metrics_lib.ranking_metrics(ranks), len(ranks))


def _check_sasrec_data(identifiers_dir: str, prepared_dir: str) -> Optional[str]:
  """A warning if the identifiers may come from other data; an error if they surely do."""
  stats_path = os.path.join(identifiers_dir, "identifier_stats.json")
  if not os.path.exists(stats_path):
    return f"{stats_path} not found: cannot check SASRec was trained on {prepared_dir}"
  with open(stats_path, encoding="utf-8") as f:
    recorded = json.load(f).get("prepared_dir")
  if not recorded or os.path.abspath(recorded) == os.path.abspath(prepared_dir):
    return None
  ours, theirs = (os.path.join(d, "stats.json") for d in (prepared_dir, recorded))
  if not os.path.exists(theirs):
    return (f"SASRec was trained on {recorded} (now gone), not {prepared_dir}; its metrics "
            "are reported assuming the same data")
  with open(ours, encoding="utf-8") as a, open(theirs, encoding="utf-8") as b:
    if json.load(a) != json.load(b):
      raise DataError(f"{identifiers_dir}: SASRec was trained on {recorded}, whose stats.json "
                      f"differs from {ours}; its metrics are not comparable")
  return None


def read_sasrec_result(identifiers_dir: Optional[str], prepared_dir: str, split: str,
                       heldout_rec: Optional[HeldOut], train_rec_users: set
                       ) -> Tuple[Optional[Dict], List[str]]:
  """(the rec block of SASRec's result or None, notes on what is missing or doubtful).

  `identify` scores the rec samples of users with training rec rows; num_examples is that
  count, recomputed here from the same split.
  """
  if not identifiers_dir:
    return None, ["SASRec: no identifiers_dir given; run `python -m gensar_jax.identify` and "
                  "bind run_baselines.identifiers_dir to its output"]
  path = os.path.join(identifiers_dir, SASREC_METRICS_FILE)
  if not os.path.exists(path):
    return None, [f"SASRec: {path} not found; run `python -m gensar_jax.identify` (mode "
                  "dual, dual_no_shared or cid_only trains SASRec) into that directory"]
  with open(path, encoding="utf-8") as f:
    by_split = json.load(f)
  if split not in by_split:
    return None, [f"SASRec: {path} has no {split!r} metrics (it has {sorted(by_split)}); "
                  "the identifiers stage was run without scoring that split"]
  if heldout_rec is None:
    return None, [f"SASRec: {prepared_dir} has no rec samples in {split}"]
  notes = []
  warning = _check_sasrec_data(identifiers_dir, prepared_dir)
  if warning:
    notes.append(f"SASRec: {warning}")
  count = int(sum(u in train_rec_users for u in heldout_rec.user_ids))
  try:
    block = results_lib.task_metrics(by_split[split], count)
  except KeyError as e:
    raise DataError(f"{path}: {split!r} lacks metric {e}") from None
  notes.append("SASRec: wall_seconds is 0 here; its training time belongs to the "
               "identifiers stage")
  return block, notes


def stored_item_embeddings(identifiers_dir: Optional[str], encoder, num_items: int
                           ) -> Optional[np.ndarray]:
  """The identifiers stage's semantic table ([items, d]) when the same encoder made it.

  Only when rqvae.json names the same checkpoint, length and pooling as `encoder` and the
  table has one row per item; otherwise None (the catalogue is encoded here).
  """
  if not identifiers_dir:
    return None
  path = os.path.join(identifiers_dir, SEMANTIC_FILE)
  meta_path = os.path.join(identifiers_dir, rqvae_store.META_FILE)
  if not (os.path.exists(path) and os.path.exists(meta_path)):
    return None
  with open(meta_path, encoding="utf-8") as f:
    made_by = json.load(f).get("semantic_encoder")
  if made_by != rqvae_store.encoder_settings(encoder):
    return None
  table = np.load(path)
  return table if table.shape == (num_items, encoder.dim) else None


@gin.configurable
def run_baselines(prepared_dir: str = gin.REQUIRED, identifiers_dir: Optional[str] = None,
                  output_dir: str = gin.REQUIRED, split: str = "test",
                  systems: Sequence[str] = SYSTEMS,
                  dense_history_weight: float = 0.5,
                  show_progress: bool = False
                  ) -> Tuple[Dict[str, results_lib.SystemResult], List[str]]:
  """Evaluates `systems` on `split`; returns ({system key: result}, notes).

  Each result is also written to `output_dir/<system>.json`. `wall_seconds` is the system's
  own time (fitting its counts/index/embeddings and scoring), not the shared data read.
  Notes say what could not be evaluated and why (e.g. SASRec metrics not produced yet).
  """
  unknown = [s for s in systems if s not in SYSTEMS]
  if unknown:
    raise ValueError(f"unknown baseline(s) {unknown}; choose from {SYSTEMS}")
  prepared = load_prepared(prepared_dir)
  num_items = len(prepared.items)
  dataset = str(prepared.stats.get("name") or os.path.basename(os.path.abspath(prepared_dir)))
  heldout = read_heldout(prepared_dir, split, num_items)
  texts = (prepared.item_texts()
           if {"bm25", "dense", "dense_history"} & set(systems) else None)

  results: Dict[str, results_lib.SystemResult] = {}
  notes: List[str] = []

  def record(key: str, start: float, rec=None, search=None) -> None:
    results[key] = results_lib.SystemResult(
        system=SYSTEM_NAMES[key], family="baseline", seed=None, split=split, dataset=dataset,
        rec=rec, search=search, wall_seconds=float(time.perf_counter() - start))

  if "popularity" in systems:
    start = time.perf_counter()
    events = popularity_lib.train_events(prepared_dir, num_items)  # [events, 4]
    blocks = {}
    for kind, held in heldout.items():
      counts = popularity_lib.interaction_counts(events, num_items, (kind,))  # [items]
      blocks[kind] = _metrics_block(popularity_lib.popularity_scores(counts, held.candidates))
    record("popularity", start, rec=blocks.get(REC), search=blocks.get(SEARCH))

  if "sasrec" in systems:
    train = read_columns(prepared_dir, "train", ["user_id", "kind"])
    train_rec_users = set(train["user_id"][train["kind"] == REC].tolist())
    block, sasrec_notes = read_sasrec_result(identifiers_dir, prepared_dir, split,
                                             heldout.get(REC), train_rec_users)
    notes += sasrec_notes
    if block is not None:
      results["sasrec"] = results_lib.SystemResult(
          system=SYSTEM_NAMES["sasrec"], family="baseline", seed=None, split=split,
          dataset=dataset, rec=block, search=None, wall_seconds=0.0)

  search = heldout.get(SEARCH)
  search_systems = [s for s in ("bm25", "dense", "dense_history") if s in systems]
  if search_systems and search is None:
    notes.append(f"{', '.join(search_systems)}: {prepared_dir} has no search samples in "
                 f"{split}; not evaluated")
    search_systems = []
  if "bm25" in search_systems:
    start = time.perf_counter()
    scorer = bm25_lib.BM25Scorer(texts)
    record("bm25", start, search=_metrics_block(scorer.score(search.queries,
                                                             search.candidates)))
  dense_scorer = None
  for key in ("dense", "dense_history"):
    if key not in search_systems:
      continue
    start = time.perf_counter()
    if dense_scorer is None:
      encoder = SentenceEncoder()
      dense_scorer = dense_lib.DenseScorer(
          texts, encoder, show_progress=show_progress,
          item_embeddings=stored_item_embeddings(identifiers_dir, encoder, len(texts)))
      embed_seconds = time.perf_counter() - start
    else:
      start -= embed_seconds  # both variants pay for the catalogue embedding once
    weight = dense_history_weight if key == "dense_history" else 0.0
    scores = dense_scorer.score(search.queries, search.candidates, search.histories, weight)
    record(key, start, search=_metrics_block(scores))

  os.makedirs(output_dir, exist_ok=True)
  for result in results.values():
    results_lib.write_result(
        os.path.join(output_dir, results_lib.result_filename(result.system)), result)
  return results, notes


def format_results(results: Dict[str, results_lib.SystemResult], notes: Sequence[str]) -> str:
  """A terminal table: one line per system and task."""
  names = results_lib.METRIC_NAMES
  lines = [f"{'system':<26} {'task':<7}" + "".join(f"{n:>9}" for n in names) +
           f"{'n':>7}{'seconds':>9}", "-" * (42 + 9 * len(names) + 9)]
  for result in results.values():
    for task in results_lib.TASKS:
      block = getattr(result, task)
      if block is None:
        continue
      lines.append(f"{result.system:<26} {task:<7}" +
                   "".join(f"{block[n]:>9.4f}" for n in names) +
                   f"{block['num_examples']:>7}{result.wall_seconds:>9.1f}")
  lines += [f"note: {n}" for n in notes]
  return "\n".join(lines)


def main() -> None:
  results, notes = run_baselines()
  print(format_results(results, notes))

