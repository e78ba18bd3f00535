"""Stage 1: raw logs -> the prepared search-and-recommendation dataset.

  python -m gensar_jax.prepare --gin_file=gin/runs/prepare.gin \
      --gin.PREPARED_DIR="'runs/ml100k/data'"

Loads the log with the loader bound in gin, adds semi-synthetic search sessions when the
log has none, builds samples and the leave-one-out split, draws evaluation candidates, and
writes the TFDS dataset plus item/query/user tables and the statistics (gensar_jax.data).
Everything is written to a temporary sibling directory and renamed at the end.
"""
from __future__ import annotations

if __name__ == "__main__":  # one gin registration: run as the importable module
  import gensar_jax.gin_utils as _gin_utils
  _gin_utils.run_module("gensar_jax.prepare")

import os
from typing import Callable, Dict, List, Sequence

import gin
import numpy as np
import pandas as pd

from gensar_jax.data import candidates as candidates_lib
from gensar_jax.data import holdout as holdout_lib
from gensar_jax.data import loaders  # noqa: F401  registers loaders with gin
from gensar_jax.data import queries as queries_lib
from gensar_jax.data import records
from gensar_jax.data import sequences as sequences_lib
from gensar_jax.data.samples import SPLITS, Samples, build_samples
from gensar_jax.data import item_text as item_text_lib
from gensar_jax.data.schema import DataError, KINDS, REC, SEARCH, SearchRecLog
from gensar_jax.data.stats import format_stats_table
from gensar_jax.io_utils import atomic_output_dir, write_json, write_jsonl


class _Examples:
  """The examples of some samples, built one at a time as they are iterated.

  A sized, lazily built sequence for `records.write_split_shards`: holding every example
  dict (with its numpy arrays) of a split at once cost ~3 kB per example, ~9 GB for the
  2.9M examples of an Amazon-Electronics-size log. Per-event columns are computed once,
  as arrays, so an example is a few fancy-indexing reads of its history rows.
  """

  def __init__(self, samples: Samples, order: np.ndarray, columns: Dict[str, np.ndarray],
               candidates: Dict[int, np.ndarray], item_ids: np.ndarray):
    self.samples, self.order, self.columns = samples, order, columns
    self.candidates = candidates
    self.item_id_bytes = _encoded(item_ids)

  def __len__(self) -> int:
    return len(self.order)

  def __iter__(self):
    for s in self.order:
      yield self.example(int(s))

  def example(self, s: int) -> Dict:
    c = self.columns
    target, history = self.samples.target[s], self.samples.history[s]
    kind = self.samples.kind[s]
    cands = self.candidates.get(s)
    return {
        "user_id": c["user"][target],
        "kind": kind,
        "timestamp": int(c["time"][target]),
        "target_item": c["item"][target],
        "target_index": int(c["item_index"][target]),
        "query": c["query"][target],
        "query_id": int(c["query_id"][target]),
        "history_kind": c["kind_bytes"][history],         # [h] object (bytes)
        "history_item": c["item_bytes"][history],         # [h] object (bytes)
        "history_item_index": c["item_index"][history],   # [h] int64
        "history_query": c["query_bytes"][history],       # [h] object (bytes)
        "history_query_id": c["query_id"][history],       # [h] int64
        "history_timestamp": c["time"][history],          # [h] int64
        "candidates": (np.zeros(0, dtype=object) if cands is None
                       else self.item_id_bytes[cands]),  # [c] object (bytes)
        "candidate_indices": np.zeros(0, np.int64) if cands is None else cands,
    }


def _event_columns(events, item_ids: np.ndarray) -> Dict[str, np.ndarray]:
  """Per event row of `events` ([n] each): what an example reads, computed once in bulk.

  `query` is the normalised query of search events ("" for rec ones). `query_id` (its row
  in queries.jsonl) is added by `_add_query_ids` once the kept users' queries are known.
  """
  kind = events["kind"].to_numpy()
  is_search = kind == SEARCH
  query = np.full(len(events), "", dtype=object)
  codes, unique = pd.factorize(events["query"].to_numpy()[is_search], use_na_sentinel=False)
  normalised = np.array([queries_lib.normalise_query(str(q)) for q in unique], dtype=object)
  query[is_search] = normalised[codes]
  index = item_indices(item_ids, events["item_id"])
  return {
      "user": events["user_id"].to_numpy(), "time": events["timestamp"].to_numpy(np.int64),
      "kind": kind, "item": events["item_id"].to_numpy(), "item_index": index,
      "query": query,
      # The list features as UTF-8 bytes, each distinct string encoded once.
      "kind_bytes": _encoded(kind), "item_bytes": _encoded(item_ids)[index],
      "query_bytes": _encoded(query),
  }


def _add_query_ids(columns: Dict[str, np.ndarray], query_id: Dict[str, int]) -> None:
  """columns["query_id"]: each search event's row in queries.jsonl, -1 for rec events and
  for queries only users without samples made."""
  ids = pd.Series(columns["query"]).map(query_id).fillna(-1).to_numpy(np.int64)
  ids[columns["kind"] != SEARCH] = -1
  columns["query_id"] = ids


def _encoded(values: np.ndarray) -> np.ndarray:
  """[n] object array of the UTF-8 bytes of `values`, encoding each distinct value once.

  A hash factorisation, not `np.unique(values.astype(str))`: the fixed-width unicode copy
  of a query column costs 4 bytes per character of the longest query for every event
  (~0.8 GB at Amazon-Electronics size), which was prepare's peak.
  """
  codes, unique = pd.factorize(np.asarray(values, dtype=object), use_na_sentinel=False)
  encoded = np.empty(len(unique), dtype=object)
  encoded[:] = [str(u).encode("utf-8") for u in unique]
  return encoded[codes]


def item_indices(item_ids: np.ndarray, values) -> np.ndarray:
  """[len(values)] rows of `values` in the catalogue `item_ids`, in one hash-join.

  Why not `Series.map(dict)` per user: pandas turns the 62k-entry dict into a new lookup
  Series on every call (~33 ms), which made prepare ~1h45m at 192k users.
  """
  index = pd.Index(item_ids).get_indexer(pd.Index(values))
  if (index < 0).any():
    raise DataError(f"unknown item id {np.asarray(values)[np.argmax(index < 0)]!r}")
  return index.astype(np.int64)


def items_of_users(users: np.ndarray, items: np.ndarray) -> Dict[str, np.ndarray]:
  """{user: sorted distinct item indices}, from [n] user ids and [n] item indices.

  One lexsort of the (user, item) pairs and a split at user boundaries: linear in the log
  (up to the sort), no per-user lookups over the catalogue.
  """
  codes, names = pd.factorize(users)                   # [n] int, [users]
  order = np.lexsort((items, codes))                    # [n] by (user, item)
  codes, items = codes[order], items[order]
  keep = np.r_[True, (codes[1:] != codes[:-1]) | (items[1:] != items[:-1])]
  codes, items = codes[keep], items[keep]               # [distinct pairs]
  bounds = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
  return dict(zip(names[codes[bounds]], np.split(items.astype(np.int64), bounds[1:])))


def _candidate_specs(samples: Samples, columns: Dict[str, np.ndarray], item_ids_of_user):
  specs, owners = [], []
  for split in ("validation", "test"):
    for kind in KINDS:
      for number, s in enumerate(samples.select(split, kind)):
        target = samples.target[s]
        specs.append(candidates_lib.CandidateSpec(
            split=split, kind=kind, number=number,
            target=int(columns["item_index"][target]),
            user_items=item_ids_of_user[columns["user"][target]],
            query=columns["query"][target] if kind == SEARCH else None))
        owners.append(s)
  return specs, owners


def shuffled_train(examples: Sequence, seed: int) -> np.ndarray:
  """The train examples in a seeded uniformly random order.

  Written in (user, time) order, consecutive train records would come from a handful of
  users, and a streaming shuffle buffer (SeqIO's default holds 1,000 examples) cannot undo
  that: the first thousand examples a trainer saw held about 21 of ML-100K's 943 users.
  Shuffling the whole split once here makes any window of the stream a uniform sample;
  evaluation splits keep their (user, time) order, which nothing depends on but reads well.
  """
  order = np.random.default_rng([seed, 0x5EED]).permutation(len(examples))
  return np.asarray(examples)[order]


@gin.configurable
def prepare(output_dir: str = gin.REQUIRED, name: str = "dataset",
            loader: Callable[[], SearchRecLog] = gin.REQUIRED,
            synthesize_search: bool = True, seed: int = 0,
            hold_out_newest_items: float = 0.0, overwrite: bool = False) -> Dict:
  """Runs the whole data stage; returns the statistics dict (also written as stats.json).

  `hold_out_newest_items` > 0 removes that share of the items, the newest by first
  interaction, with their events (gensar_jax/data/holdout.py); their ids are written to
  held_out_items.json. Only the new-items experiment uses it.
  """
  if os.path.exists(output_dir) and not overwrite:
    raise DataError(f"{output_dir}: output exists; bind prepare.overwrite=True to rebuild")
  log = loader()
  held_out = []
  if hold_out_newest_items:
    held_out = holdout_lib.newest_items(log, hold_out_newest_items)
    log = holdout_lib.without_items(log, held_out)
  if synthesize_search and not (log.events["kind"] == SEARCH).any():
    log = queries_lib.add_semi_synthetic_search(log, seed=seed)
  if not (log.events["kind"] == SEARCH).any():
    raise DataError(f"{log.events_path}: the log has no search events (and no item carries "
                    "a query from a category path of two or more levels)")
  samples = build_samples(log)
  if len(samples.target) == 0:
    raise DataError(f"{log.events_path}: no user has enough history to make a sample "
                    f"(filters: {samples.counts})")

  items = log.items
  del log  # the loader's event table: only the time-sorted copy in `samples` is read below
  item_ids = items["item_id"].to_numpy()
  item_index = {item: i for i, item in enumerate(item_ids)}
  events = samples.events
  columns = _event_columns(events, item_ids)
  kept_users = sorted(set(columns["user"][samples.target]))
  kept = events["user_id"].isin(set(kept_users)).to_numpy()   # [events]
  kept_search = kept & (columns["kind"] == SEARCH)             # [events]
  query_counts = pd.Series(columns["query"][kept_search]).value_counts()
  query_list: List[str] = sorted(query_counts.index)
  query_id = {q: i for i, q in enumerate(query_list)}
  _add_query_ids(columns, query_id)
  kept_rec = kept & (columns["kind"] == REC)
  popularity = np.bincount(columns["item_index"][kept_rec], minlength=len(item_ids))
  item_ids_of_user = items_of_users(columns["user"][kept], columns["item_index"][kept])
  specs, owners = _candidate_specs(samples, columns, item_ids_of_user)
  texts, text_counts = item_text_lib.build_item_texts(items)
  ranker = candidates_lib.BM25Ranker(texts)
  cand = candidates_lib.make_candidates(specs, popularity, ranker, seed=seed)
  candidates = dict(zip(owners, cand))

  stats = {
      "name": name,
      "users": len(kept_users),
      "items": len(item_ids),
      "items_with_interactions": int(len(np.unique(columns["item_index"][kept]))),
      "queries": len(query_list),
      "rec_interactions": int(kept_rec.sum()),
      "search_interactions": int(kept_search.sum()),
      "rows": {kind: {split: int(len(samples.select(split, kind))) for split in SPLITS}
               for kind in KINDS},
      "filtered": samples.counts,
      "num_negatives": int(cand.shape[1] - 1),
      "item_text": text_counts,
      "held_out_items": len(held_out),
      "seed": seed,
  }
  item_queries = queries_lib.item_queries(items["categories"])
  # Examples in (user, time) order per split, the train split shuffled; built lazily.
  split_examples = {s: _Examples(samples, np.flatnonzero(samples.split == s), columns,
                                 candidates, item_ids) for s in SPLITS}
  split_examples["train"].order = shuffled_train(split_examples["train"].order, seed)

  with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
    records.write_split_shards(tmp, split_examples)
    write_jsonl(os.path.join(tmp, sequences_lib.FILE_NAME),
                sequences_lib.build_rec_sequences(samples, item_index))
    write_jsonl(os.path.join(tmp, "items.jsonl"), (
        {"index": i, "item_id": item, "title": title, "description": desc,
         "categories": cats, "queries": qs, "text": text}
        for i, (item, title, desc, cats, qs, text) in enumerate(zip(
            item_ids, items["title"], items["description"],
            items["categories"], item_queries, texts))))
    write_jsonl(os.path.join(tmp, "queries.jsonl"), (
        {"query_id": i, "text": q, "search_events": int(query_counts[q])}
        for i, q in enumerate(query_list)))
    write_jsonl(os.path.join(tmp, "users.jsonl"),
                ({"index": i, "user_id": u} for i, u in enumerate(kept_users)))
    write_json(os.path.join(tmp, "stats.json"), stats)
    if held_out:
      write_json(os.path.join(tmp, holdout_lib.FILE_NAME), held_out)
    with open(os.path.join(tmp, "config.gin"), "w", encoding="utf-8") as f:
      f.write(gin.operative_config_str())
  return stats


def main() -> None:
  stats = prepare()
  print(format_stats_table(stats))

