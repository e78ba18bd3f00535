"""Items held out of a dataset to measure how items added after training are served.

The protocol of the new-items experiment (docs/results.md#items-added-after-training): the
newest items of the catalogue, by their first interaction, are removed with all their
events before anything is trained; they come back through `gensar_jax.add_items` once the
model exists, and are then ranked against the same items in a run that had them from the
start. Newest-first mirrors what happens in production: the items a catalogue gains next
week are the ones nobody trained on.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List

from gensar_jax.data.schema import DataError, SearchRecLog

FILE_NAME = "held_out_items.json"


def newest_items(log: SearchRecLog, fraction: float) -> List[str]:
  """The ceil(fraction x interacted items) items whose first event is the latest (ties by
  item id), newest first."""
  if not 0.0 < fraction < 1.0:
    raise DataError(f"hold_out_newest_items must be in (0, 1), got {fraction}")
  first = log.events.groupby("item_id")["timestamp"].min()
  order = sorted(first.items(), key=lambda kv: (-int(kv[1]), str(kv[0])))
  count = math.ceil(fraction * len(order))
  if count >= len(order):
    raise DataError(f"hold_out_newest_items={fraction} would hold out every interacted item")
  return [str(item) for item, _ in order[:count]]


def without_items(log: SearchRecLog, items: List[str]) -> SearchRecLog:
  """The log with `items` gone from the catalogue and every event on them dropped."""
  gone = set(items)
  return dataclasses.replace(
      log, items=log.items[~log.items["item_id"].isin(gone)].reset_index(drop=True),
      events=log.events[~log.events["item_id"].isin(gone)].reset_index(drop=True))
