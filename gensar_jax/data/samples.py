"""Samples, histories and the leave-one-out split (docs/evaluation.md, "Samples and the split").

A sample is (user, target event, the history before it). The history is the user's last
`rec_history` recommendation items and last `search_history` search sessions, merged back
into time order. Order is (timestamp, interaction, kind): `interaction` is the row order of
the source file, so equal timestamps (half of MovieLens' consecutive ratings share a second)
keep file order, and the rec and search halves of one semi-synthetic interaction sit side by
side. "Before the target" means from an earlier interaction: a search target never sees the
rec event of its own review.

Filtering and split, per user and per task kind (rec, search):
  * a sample needs at least one earlier rec item and one earlier search session;
  * a user with fewer than `min_samples` samples of a kind contributes none of that kind;
  * leave-one-out: the last sample -> test, the second-to-last -> validation, rest -> train;
  * `drop_train_after_heldout`: a train sample whose target is not from an interaction
    strictly before every held-out target of the same user (either kind) is dropped, so no
    training history contains a validation or test target, and no training target is the
    other half of a held-out target's own interaction (the same item after the same history:
    the held-out label itself). With semi-synthetic search both kinds usually end on the same
    interactions and nothing is dropped; when a user's last items carry no query, or with
    real logs, it prevents a cross-task leak.
Users left with no samples are skipped and counted, not an error.
"""
from __future__ import annotations

import array
import dataclasses
from typing import Dict, List

import gin
import numpy as np
import pandas as pd
from tqdm import tqdm

from gensar_jax.data.schema import REC, SEARCH, SearchRecLog

SPLITS = ("train", "validation", "test")


class RaggedRows:
  """Rows of int64 of different lengths in two flat arrays: `rows[i]` is a view.

  Why not a list of arrays: a numpy array costs ~110 bytes before its data, and a log of
  Amazon-Electronics size has 2.9M samples of ~8 history rows: ~0.5 GB of headers.
  """

  def __init__(self, values: np.ndarray, offsets: np.ndarray):
    self.values = values    # [total] int64
    self.offsets = offsets  # [rows + 1] int64, row i is values[offsets[i]:offsets[i + 1]]

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> np.ndarray:
    return self.values[self.offsets[i]:self.offsets[i + 1]]

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]


@dataclasses.dataclass
class Samples:
  """Samples over a time-ordered event table.

  Attributes:
    events: the log's events sorted by (user_id, timestamp, interaction, kind), index 0..n-1;
      `target` and `history` index its rows.
    kind: [num_samples] "rec" or "search", the target's kind.
    target: [num_samples] row of the target event.
    history: per sample, rows of the history events, time-ordered (at most 10 by default);
      a RaggedRows (indexing and iteration give one int64 array per sample).
    split: [num_samples] "train", "validation" or "test".
    counts: what the filters removed, for the statistics table.
  """
  events: pd.DataFrame
  kind: np.ndarray
  target: np.ndarray
  history: RaggedRows
  split: np.ndarray
  counts: Dict[str, int]

  def select(self, split: str, kind: str) -> np.ndarray:
    """Indices of the samples of one split and kind, in (user, time) order."""
    return np.flatnonzero((self.split == split) & (self.kind == kind))


def order_events(events: pd.DataFrame) -> pd.DataFrame:
  """Time order with the documented tie-break: (user, timestamp, interaction, rec<search)."""
  kind_rank = (events["kind"] == SEARCH).astype(np.int8)
  ordered = events.assign(_kind_rank=kind_rank).sort_values(
      ["user_id", "timestamp", "interaction", "_kind_rank"], kind="stable")
  return ordered.drop(columns="_kind_rank").reset_index(drop=True)


@gin.configurable
def build_samples(log: SearchRecLog, rec_history: int = 5, search_history: int = 5,
                  min_samples: int = 3, drop_train_after_heldout: bool = True) -> Samples:
  """Builds every sample with its history, filters it, and splits leave-one-out."""
  events = order_events(log.events)
  users = events["user_id"].to_numpy()
  interactions = events["interaction"].to_numpy()
  is_search = (events["kind"] == SEARCH).to_numpy()
  # Start of each user's block of rows.
  starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
  ends = np.r_[starts[1:], len(events)]

  kinds, targets, splits = [], [], []
  history_values, history_offsets = array.array("q"), array.array("q", [0])
  counts = dict(users_in_log=len(starts), samples_without_history=0,
                samples_user_below_min=0, train_samples_after_heldout=0,
                users_skipped=0)
  for start, end in tqdm(zip(starts, ends), total=len(starts), desc="samples", unit=" users",
                         mininterval=2.0, leave=False):
    recent_rec: List[int] = []
    recent_search: List[int] = []
    # Per kind: (target row, history rows, first row of the target's interaction).
    user_samples: Dict[bool, List[tuple]] = {False: [], True: []}
    row = start
    while row < end:
      group_end = row + 1  # rows of the same interaction are adjacent
      while group_end < end and interactions[group_end] == interactions[row]:
        group_end += 1
      for target in range(row, group_end):
        if recent_rec and recent_search:
          # Slicing from len - n, not -n: `[-0:]` would be the whole list.
          history = sorted(
              recent_rec[max(0, len(recent_rec) - rec_history):]
              + recent_search[max(0, len(recent_search) - search_history):])
          user_samples[bool(is_search[target])].append((target, history, row))
        else:
          counts["samples_without_history"] += 1
      for r in range(row, group_end):
        (recent_search if is_search[r] else recent_rec).append(r)
      row = group_end

    kept = []
    for search_kind, samples in user_samples.items():
      if len(samples) < min_samples:
        counts["samples_user_below_min"] += len(samples)
        continue
      # The last labels, so a kind with one sample (min_samples=1) puts it in test.
      labels = (["train"] * max(0, len(samples) - 2) + ["validation", "test"])[-len(samples):]
      kept.extend((search_kind, t, h, s, g) for (t, h, g), s in zip(samples, labels))
    if drop_train_after_heldout and kept:
      # First row of the earliest held-out target's interaction: a train target from that
      # interaction (its other half) or later is dropped.
      first_heldout = min((g for _, _, _, s, g in kept if s != "train"), default=end)
      before = len(kept)
      kept = [k for k in kept if k[3] != "train" or k[1] < first_heldout]
      counts["train_samples_after_heldout"] += before - len(kept)
    if not kept:
      counts["users_skipped"] += 1
      continue
    kept.sort(key=lambda k: k[1])
    for search_kind, target, history, split, _ in kept:
      kinds.append(SEARCH if search_kind else REC)
      targets.append(target)
      history_values.extend(history)
      history_offsets.append(len(history_values))
      splits.append(split)

  return Samples(events=events, kind=np.array(kinds, dtype=object),
                 target=np.array(targets, dtype=np.int64),
                 history=RaggedRows(np.frombuffer(history_values, np.int64).copy(),
                                    np.frombuffer(history_offsets, np.int64).copy()),
                 split=np.array(splits, dtype=object), counts=counts)
