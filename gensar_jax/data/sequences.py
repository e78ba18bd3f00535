"""Per-user recommendation sequences from the whole ordered log (`rec_sequences.jsonl`).

The train split holds *samples* in a shuffled order, each with at most 10 history events,
so it cannot give back a user's full, ordered rec sequence (the events before the first
sample beyond its 5-item rec history, for one, appear in no sample at all). SASRec, whose
item table becomes the collaborative embeddings and which is also the rec baseline, needs
exactly that sequence. `prepare` therefore writes it beside the shards, one line per user:

  {"user_id": "...", "items": [item index, ...],          every rec event, oldest first
   "train_end": n,                                         items[:n] are the training part
   "heldout": {"validation": k, "test": m}}                items[:k] is the history of the
                                                           rec validation target, items[k]
                                                           the target itself

`train_end` cuts the sequence at the user's first held-out interaction of either kind (the
same cut `drop_train_after_heldout` applies to train samples), so SASRec never trains on a
validation or test target, nor on the rec half of a held-out search interaction.
"""
from __future__ import annotations

import collections
import os
from typing import Dict, List, Mapping, Tuple

import numpy as np

from gensar_jax.data.schema import DataError, REC
from gensar_jax.io_utils import read_jsonl

FILE_NAME = "rec_sequences.jsonl"
HELDOUT_SPLITS = ("validation", "test")


def _interaction_start(row: int, user_start: int, interactions: np.ndarray) -> int:
  """First row of the interaction `row` belongs to (rows of one interaction are adjacent)."""
  while row > user_start and interactions[row - 1] == interactions[row]:
    row -= 1
  return row


def build_rec_sequences(samples, item_index: Mapping[str, int]) -> List[Dict]:
  """One row per user with samples (see the module docstring), in user order.

  `samples` is a gensar_jax.data.samples.Samples; its events are sorted by user and time.
  """
  events = samples.events
  users = events["user_id"].to_numpy()
  is_rec = (events["kind"] == REC).to_numpy()
  items = events["item_id"].to_numpy()
  interactions = events["interaction"].to_numpy()
  starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
  ends = np.r_[starts[1:], len(events)]
  block_of_user = {users[s]: (int(s), int(e)) for s, e in zip(starts, ends)}

  heldout_by_user: Dict[str, List[Tuple[int, str, str]]] = collections.defaultdict(list)
  for target, split, kind in zip(samples.target, samples.split, samples.kind):
    if split in HELDOUT_SPLITS:
      heldout_by_user[users[target]].append((int(target), split, kind))

  rows = []
  for user in dict.fromkeys(users[samples.target]):
    start, end = block_of_user[user]
    rec_rows = start + np.flatnonzero(is_rec[start:end])  # [rec events of the user]
    held = heldout_by_user.get(user, [])
    if held:
      cut = _interaction_start(min(t for t, _, _ in held), start, interactions)
    else:
      cut = end
    row = {"user_id": str(user), "items": [int(item_index[items[r]]) for r in rec_rows],
           "train_end": int(np.searchsorted(rec_rows, cut)), "heldout": {}}
    for target, split, kind in held:
      if kind == REC:
        # Rec events of earlier interactions only: the history the target is predicted from.
        before = _interaction_start(target, start, interactions)
        row["heldout"][split] = int(np.searchsorted(rec_rows, before))
    rows.append(row)
  return rows


def load_rec_sequences(prepared_dir: str) -> List[Dict]:
  """The rows of `rec_sequences.jsonl`, checked; a clear error for older prepared data."""
  path = os.path.join(prepared_dir, FILE_NAME)
  if not os.path.exists(path):
    raise DataError(f"{path} does not exist: this prepared dataset predates per-user rec "
                    "sequences; rebuild it with `python -m gensar_jax.prepare` "
                    "(--gin.prepare.overwrite=True)")
  rows = read_jsonl(path)
  for number, row in enumerate(rows, 1):
    n = len(row.get("items", ()))
    positions = [row.get("train_end", -1), *row.get("heldout", {}).values()]
    if not all(isinstance(p, int) and 0 <= p <= n for p in positions):
      raise DataError(f"{path}:{number}: positions {positions} must lie in 0..{n}")
  return rows
