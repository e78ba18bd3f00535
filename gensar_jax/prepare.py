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
from typing import Callable, Dict, List

import gin
import numpy as np

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


def _examples(samples: Samples, item_index: Dict[str, int], query_id: Dict[str, int],
              candidates: Dict[int, np.ndarray], item_ids: np.ndarray):
  """Examples per split as (key "user/row", features), in (user, time) order.

  `prepare` shuffles the train split before writing it (see `shuffled_train`).
  """
  events = samples.events
  ev_user = events["user_id"].to_numpy()
  ev_time = events["timestamp"].to_numpy()
  ev_kind = events["kind"].to_numpy()
  ev_item = events["item_id"].to_numpy()
  ev_query = [queries_lib.normalise_query(q) if k == SEARCH else ""
              for q, k in zip(events["query"], ev_kind)]
  out = {split: [] for split in SPLITS}
  for s, (kind, target, history, split) in enumerate(
      zip(samples.kind, samples.target, samples.history, samples.split)):
    cands = candidates.get(s)
    out[split].append((f"{ev_user[target]}/{target}", {
        "user_id": ev_user[target],
        "kind": kind,
        "timestamp": int(ev_time[target]),
        "target_item": ev_item[target],
        "target_index": item_index[ev_item[target]],
        "query": ev_query[target],
        "query_id": query_id.get(ev_query[target], -1) if kind == SEARCH else -1,
        "history_kind": np.array([ev_kind[h] for h in history], dtype=object),
        "history_item": np.array([ev_item[h] for h in history], dtype=object),
        "history_item_index": np.array([item_index[ev_item[h]] for h in history], np.int64),
        "history_query": np.array([ev_query[h] for h in history], dtype=object),
        "history_query_id": np.array([query_id[ev_query[h]] if ev_kind[h] == SEARCH else -1
                                      for h in history], np.int64),
        "history_timestamp": ev_time[history].astype(np.int64),
        "candidates": (np.zeros(0, dtype=object) if cands is None
                       else item_ids[cands].astype(object)),
        "candidate_indices": np.zeros(0, np.int64) if cands is None else cands,
    }))
  return out


def _candidate_specs(samples: Samples, item_index: Dict[str, int], item_ids_of_user):
  specs, owners = [], []
  events = samples.events
  for split in ("validation", "test"):
    for kind in KINDS:
      for number, s in enumerate(samples.select(split, kind)):
        target = samples.target[s]
        user = events["user_id"].iat[target]
        specs.append(candidates_lib.CandidateSpec(
            split=split, kind=kind, number=number,
            target=item_index[events["item_id"].iat[target]],
            user_items=item_ids_of_user[user],
            query=(queries_lib.normalise_query(events["query"].iat[target])
                   if kind == SEARCH else None)))
        owners.append(s)
  return specs, owners


def shuffled_train(examples: List, seed: int) -> List:
  """The train examples in a seeded uniformly random order.

  Written in (user, time) order, consecutive train records would come from a handful of
  users, and a streaming shuffle buffer (SeqIO's default holds 1,000 examples) cannot undo
  that: the first thousand examples a trainer saw held about 21 of ML-100K's 943 users.
  Shuffling the whole split once here makes any window of the stream a uniform sample;
  evaluation splits keep their (user, time) order, which nothing depends on but reads well.
  """
  order = np.random.default_rng([seed, 0x5EED]).permutation(len(examples))
  return [examples[i] for i in order]


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

  item_ids = log.items["item_id"].to_numpy()
  item_index = {item: i for i, item in enumerate(item_ids)}
  events = samples.events
  kept_users = sorted(set(events["user_id"].to_numpy()[samples.target]))
  kept_events = events[events["user_id"].isin(set(kept_users))]
  search_events = kept_events[kept_events["kind"] == SEARCH]
  query_texts = search_events["query"].map(queries_lib.normalise_query)
  query_counts = query_texts.value_counts()
  query_list: List[str] = sorted(query_counts.index)
  query_id = {q: i for i, q in enumerate(query_list)}

  popularity = np.bincount(
      kept_events.loc[kept_events["kind"] == REC, "item_id"].map(item_index).to_numpy(),
      minlength=len(item_ids))
  item_ids_of_user = {
      user: np.unique(group.map(item_index).to_numpy())
      for user, group in kept_events.groupby("user_id")["item_id"]}
  specs, owners = _candidate_specs(samples, item_index, item_ids_of_user)
  texts, text_counts = item_text_lib.build_item_texts(log.items)
  ranker = candidates_lib.BM25Ranker(texts)
  cand = candidates_lib.make_candidates(specs, popularity, ranker, seed=seed)
  candidates = dict(zip(owners, cand))

  stats = {
      "name": name,
      "users": len(kept_users),
      "items": len(item_ids),
      "items_with_interactions": int(kept_events["item_id"].nunique()),
      "queries": len(query_list),
      "rec_interactions": int((kept_events["kind"] == REC).sum()),
      "search_interactions": int(len(search_events)),
      "rows": {kind: {split: int(len(samples.select(split, kind))) for split in SPLITS}
               for kind in KINDS},
      "filtered": samples.counts,
      "num_negatives": int(cand.shape[1] - 1),
      "item_text": text_counts,
      "held_out_items": len(held_out),
      "seed": seed,
  }
  item_queries = queries_lib.item_queries(log.items["categories"])
  examples = _examples(samples, item_index, query_id, candidates, item_ids)
  split_examples = {s: [e for _, e in examples[s]] for s in SPLITS}
  split_examples["train"] = shuffled_train(split_examples["train"], seed)

  with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
    records.write_split_shards(tmp, split_examples)
    write_jsonl(os.path.join(tmp, sequences_lib.FILE_NAME),
                sequences_lib.build_rec_sequences(samples, item_index))
    write_jsonl(os.path.join(tmp, "items.jsonl"), (
        {"index": i, "item_id": item, "title": title, "description": desc,
         "categories": cats, "queries": qs, "text": text}
        for i, (item, title, desc, cats, qs, text) in enumerate(zip(
            item_ids, log.items["title"], log.items["description"],
            log.items["categories"], item_queries, texts))))
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

