"""Most-popular baseline: rank candidates by how often they were used in the training period.

Rec negatives are themselves drawn in proportion to popularity, so this baseline measures how
much a system knows beyond "popular items are likely"; on search it shows how much of a BM25
hard-negative list can be sorted out by popularity alone.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from gensar_jax.data.columns import read_columns
from gensar_jax.data.schema import KINDS, DataError

_EVENT_COLUMNS = ["user_id", "kind", "target_index", "timestamp", "history_kind",
                  "history_item_index", "history_timestamp"]


def _kind_codes(values: np.ndarray) -> np.ndarray:
  """[n] index in KINDS of each kind (str or bytes), -1 for anything else."""
  values = np.asarray(values, dtype=object)
  codes = np.full(len(values), -1, np.int64)
  for code, kind in enumerate(KINDS):
    codes[(values == kind) | (values == kind.encode("utf-8"))] = code
  return codes


def train_events(prepared_dir: str, num_items: int) -> np.ndarray:
  """[events, 4] distinct training-period events as (user code, kind code, item, timestamp).

  The train split has no event table, only samples; an event shows up as the target of one
  sample and again in the histories of the next few. Events are therefore identified by
  (user, kind, item, timestamp) and kept once. Only the train split is read, so no
  validation or test target leaks in. Kind codes follow `KINDS` (rec 0, search 1).
  """
  cols = read_columns(prepared_dir, "train", _EVENT_COLUMNS)
  user_codes = {u: i for i, u in enumerate(dict.fromkeys(cols["user_id"]))}
  target_users = np.asarray([user_codes[u] for u in cols["user_id"]], np.int64)  # [rows]
  history_lengths = np.asarray([len(h) for h in cols["history_item_index"]], np.int64)

  def flat(column, dtype):  # the history lists of every row, end to end
    parts = list(cols[column])
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

  users = np.concatenate([target_users, np.repeat(target_users, history_lengths)])
  kinds = np.concatenate([_kind_codes(cols["kind"]),
                          _kind_codes(flat("history_kind", object))])
  items = np.concatenate([cols["target_index"].astype(np.int64),
                          flat("history_item_index", np.int64)])
  times = np.concatenate([cols["timestamp"].astype(np.int64),
                          flat("history_timestamp", np.int64)])
  events = np.stack([users, kinds, items, times], axis=1)  # [targets + history events, 4]
  if len(events) and (events[:, 1].min() < 0):
    raise DataError(f"{prepared_dir}: train split has an event kind outside {KINDS}")
  bad = (events[:, 2] < 0) | (events[:, 2] >= num_items)
  if bad.any():
    raise DataError(f"{prepared_dir}: train split names item index {int(events[bad][0, 2])}, "
                    f"outside the catalogue of {num_items} items")
  # np.unique(axis=0) sorts rows as opaque records (~10x slower at 2M rows); lexsort + diff.
  events = events[np.lexsort(events.T[::-1])]  # [n, 4] sorted by user, kind, item, time
  first = np.ones(len(events), bool)  # [n]
  first[1:] = np.any(events[1:] != events[:-1], axis=1)
  return events[first]  # [distinct events, 4]


def interaction_counts(events: np.ndarray, num_items: int,
                       kinds: Sequence[str] = KINDS) -> np.ndarray:
  """[num_items] number of events of `kinds` per item, from `train_events`' output."""
  unknown = [k for k in kinds if k not in KINDS]
  if unknown or not kinds:
    raise ValueError(f"kinds must be a non-empty subset of {KINDS}; got {kinds}")
  kind_code = {k: i for i, k in enumerate(KINDS)}
  wanted = np.isin(events[:, 1], [kind_code[k] for k in kinds])
  return np.bincount(events[wanted, 2], minlength=num_items).astype(np.int64)


def popularity_scores(counts: np.ndarray, candidates: np.ndarray) -> np.ndarray:
  """[n, c] candidate scores = their training counts (ties are left as ties)."""
  counts = np.asarray(counts)
  candidates = np.asarray(candidates, np.int64)  # [n, c]
  return counts[candidates].astype(np.float64)
