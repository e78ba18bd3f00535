"""The canonical schema every loader produces and every later stage reads.

Items
  item_id      str, unique, non-empty
  title        str (may be empty)
  description  str (may be empty)
  categories   list of category paths, each a list of strings, general -> specific
               (Amazon's `categories`; MovieLens genres). Semi-synthetic queries come from these.
  brand        str, optional column (Amazon metadata, a generic table's `brand`)
The text an item is known by is built from these (gensar_jax/data/item_text.py).

Events (one row per user action)
  user_id      str
  timestamp    int64, seconds since the epoch
  kind         "rec" (item consumed from a recommendation feed) or
               "search" (a search session: `query` plus the item clicked after it)
  item_id      str, must name an item of the catalogue
  query        str, non-empty for "search", empty for "rec"
  interaction  int64, the source interaction the event comes from. The semi-synthetic
               convention turns one review into a rec event AND a search event; both
               share this number, so a history never contains the other half of its own
               target. It is also the stable tie-break for equal timestamps (file order).
  line         int64, the 1-based line/row in the source file, for error messages.

Users are the distinct `user_id`s of the events.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import numpy as np
import pandas as pd

from gensar_jax.errors import DataError  # noqa: F401  re-exported: data errors live here by name

REC = "rec"
SEARCH = "search"
KINDS = (REC, SEARCH)

ITEM_COLUMNS = ("item_id", "title", "description", "categories")
EVENT_COLUMNS = ("user_id", "timestamp", "kind", "item_id", "query", "interaction", "line")


def where(path: str, line: int | None = None, field: str | None = None) -> str:
  """`path:line: field 'x'` prefix shared by every data error message."""
  text = str(path)
  if line is not None:
    text += f":{line}"
  if field is not None:
    text += f": field '{field}'"
  return text


@dataclasses.dataclass
class SearchRecLog:
  """A catalogue plus a mixed search/recommendation event log, validated.

  Attributes:
    items: DataFrame with ITEM_COLUMNS.
    events: DataFrame with EVENT_COLUMNS.
    items_path: where the items came from (named in error messages).
    events_path: where the events came from (named in error messages).
  """
  items: pd.DataFrame
  events: pd.DataFrame
  items_path: str
  events_path: str

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    """Checks the invariants later stages rely on; raises DataError naming where."""
    for name, frame, columns, path in (("items", self.items, ITEM_COLUMNS, self.items_path),
                                       ("events", self.events, EVENT_COLUMNS,
                                        self.events_path)):
      missing = [c for c in columns if c not in frame.columns]
      if missing:
        raise DataError(f"{path}: {name} table lacks column(s) {missing}")
    if len(self.items) == 0:
      raise DataError(f"{self.items_path}: the item catalogue is empty")
    ids = self.items["item_id"].astype(str)
    empty = ids.str.len() == 0
    if empty.any():
      raise DataError(f"{where(self.items_path, int(np.argmax(empty.values)) + 1, 'item_id')}: "
                      "empty item id")
    dup = ids.duplicated(keep="first")
    if dup.any():
      row = int(np.argmax(dup.values))
      first = int(np.argmax((ids == ids.iloc[row]).values))
      raise DataError(f"{self.items_path}: field 'item_id': duplicate item id "
                      f"{ids.iloc[row]!r} (entries {first + 1} and {row + 1})")
    events = self.events
    if len(events) == 0:
      raise DataError(f"{self.events_path}: no events")
    no_user = events["user_id"].astype(str).str.strip() == ""
    if no_user.any():
      row = events[no_user].iloc[0]
      raise DataError(f"{where(self.events_path, int(row['line']), 'user_id')}: empty user id")
    bad_kind = ~events["kind"].isin(KINDS)
    if bad_kind.any():
      row = events[bad_kind].iloc[0]
      raise DataError(f"{where(self.events_path, int(row['line']), 'kind')}: "
                      f"{row['kind']!r} is not one of {KINDS}")
    no_query = (events["kind"] == SEARCH) & (events["query"].astype(str).str.strip() == "")
    if no_query.any():
      row = events[no_query].iloc[0]
      raise DataError(f"{where(self.events_path, int(row['line']), 'query')}: "
                      "search event without a query")
    unknown = ~events["item_id"].isin(set(ids))
    if unknown.any():
      row = events[unknown].iloc[0]
      raise DataError(f"{where(self.events_path, int(row['line']), 'item_id')}: "
                      f"unknown item {row['item_id']!r} (not in the catalogue "
                      f"{self.items_path})")

  @property
  def num_users(self) -> int:
    return int(self.events["user_id"].nunique())


def make_items(item_ids: Sequence[str], titles: Sequence[str], descriptions: Sequence[str],
               categories: Sequence[List[List[str]]],
               brands: Optional[Sequence[str]] = None) -> pd.DataFrame:
  """The items table; `brands` (optional metadata) adds a brand column."""
  columns = {
      "item_id": pd.Series(list(item_ids), dtype=object).astype(str),
      "title": list(titles),
      "description": list(descriptions),
      "categories": list(categories),
  }
  if brands is not None:
    columns["brand"] = list(brands)
  return pd.DataFrame(columns)


def make_events(user_ids, timestamps, kinds, item_ids, queries, interactions,
                lines) -> pd.DataFrame:
  return pd.DataFrame({
      "user_id": pd.Series(list(user_ids), dtype=object).astype(str),
      "timestamp": np.asarray(timestamps, dtype=np.int64),
      "kind": list(kinds),
      "item_id": pd.Series(list(item_ids), dtype=object).astype(str),
      "query": list(queries),
      "interaction": np.asarray(interactions, dtype=np.int64),
      "line": np.asarray(lines, dtype=np.int64),
  })


