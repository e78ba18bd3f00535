"""A generic format for users' own logs: two tables, CSV or parquet (chosen by extension).

items (`.csv` / `.parquet`):
  item_id (required), title (required column; cells may be empty), description and brand
  (optional),
  categories (optional): in CSV a string of paths separated by "|", levels by ">"
  ("Electronics > Audio > Headphones | Gifts > For Him"); in parquet the same string or a
  list of lists of strings.
events (`.csv` / `.parquet`):
  user_id, timestamp, item_id (required); timestamp is integer seconds or an ISO-8601 date
  (naive dates are UTC), or a parquet timestamp column; kind (optional, "rec" or "search",
  default "rec", also for empty cells); query (required when kind is "search").
Row numbers in error messages are 1-based data rows (CSV line = row + 1 for the header).
"""
from __future__ import annotations

import os
from typing import List

import gin
import numpy as np
import pandas as pd

from gensar_jax.data.schema import (DataError, KINDS, REC, SearchRecLog, make_events,
                                    make_items, where)


def _read_table(path: str, required: List[str]) -> pd.DataFrame:
  if not os.path.exists(path):
    raise DataError(f"{path}: file not found")
  try:
    if path.endswith(".parquet"):
      frame = pd.read_parquet(path)
    elif path.endswith(".csv") or path.endswith(".csv.gz"):
      frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    else:
      raise DataError(f"{path}: unsupported extension (use .csv, .csv.gz or .parquet)")
  except (ValueError, OSError, pd.errors.ParserError) as e:
    if isinstance(e, DataError):
      raise
    raise DataError(f"{path}: malformed table: {e}") from None
  missing = [c for c in required if c not in frame.columns]
  if missing:
    raise DataError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")
  return frame.reset_index(drop=True)


def _check_filled(frame: pd.DataFrame, columns: List[str], path: str) -> None:
  """Required cells must be filled: an empty CSV cell or a parquet null would otherwise
  become the id "", "None" or "nan" and pass as data."""
  for column in columns:
    values = frame[column]
    empty = (values.isna() | (values.astype(str).str.strip() == "")).to_numpy()
    if empty.any():
      raise DataError(f"{where(path, int(np.argmax(empty)) + 1, column)}: empty value")


def parse_categories(value, path: str, row: int) -> List[List[str]]:
  """Category paths from "A > B | C > D" or a list of lists."""
  if value is None or (isinstance(value, float) and np.isnan(value)):
    return []
  if isinstance(value, str):
    paths = [[level.strip() for level in p.split(">") if level.strip()]
             for p in value.split("|")]
    return [p for p in paths if p]
  try:
    return [[str(level) for level in p] for p in value]
  except TypeError:
    raise DataError(f"{where(path, row, 'categories')}: expected 'A > B | C' or a list of "
                    f"lists, got {type(value).__name__}") from None


def _timestamps(values: pd.Series, path: str) -> np.ndarray:
  """Epoch seconds from integer seconds or ISO-8601 dates, mixed freely in one column.

  Dates are parsed as "ISO8601", not by pandas' format inference: inference fixes the format
  of the first value and turns every differently written date ("2020-01-01" then
  "2020-01-01T10:00") into a spurious error. Only the non-numeric values are parsed as
  dates, so integer seconds never reach the date parser.
  """
  if pd.api.types.is_datetime64_any_dtype(values):
    # A parquet timestamp column: to_numeric would silently give nanoseconds.
    if values.isna().any():
      row = int(np.argmax(values.isna().to_numpy()))
      raise DataError(f"{where(path, row + 1, 'timestamp')}: missing date")
    utc = values.dt.tz_localize("UTC") if values.dt.tz is None else values
    return ((utc - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(np.int64)
  as_int = pd.to_numeric(values, errors="coerce")
  is_date = as_int.isna().to_numpy()
  if not is_date.any():
    return as_int.astype(np.int64).to_numpy()
  seconds = as_int.fillna(0).astype(np.int64).to_numpy()
  dates = pd.to_datetime(values[is_date].astype(str), errors="coerce", utc=True,
                         format="ISO8601")
  bad = dates.isna().to_numpy()
  if bad.any():
    row = int(np.flatnonzero(is_date)[np.argmax(bad)])
    raise DataError(f"{where(path, row + 1, 'timestamp')}: neither integer seconds nor an "
                    f"ISO-8601 date: {values.iloc[row]!r}")
  # Through a Timedelta, so the result does not depend on the datetime resolution.
  seconds[is_date] = ((dates - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
                      ).to_numpy(dtype=np.int64)
  return seconds


@gin.configurable
def load_generic(items_path: str = gin.REQUIRED, events_path: str = gin.REQUIRED
                 ) -> SearchRecLog:
  """Loads a user's own catalogue and event log (see the module docstring for columns)."""
  items_frame = _read_table(items_path, ["item_id", "title"])
  _check_filled(items_frame, ["item_id"], items_path)
  descriptions = (items_frame["description"] if "description" in items_frame
                  else pd.Series([""] * len(items_frame)))
  categories = ([parse_categories(v, items_path, i + 1)
                 for i, v in enumerate(items_frame["categories"])]
                if "categories" in items_frame else [[] for _ in range(len(items_frame))])
  brands = (items_frame["brand"].fillna("").astype(str) if "brand" in items_frame else None)
  items = make_items(items_frame["item_id"].astype(str).str.strip(),
                     items_frame["title"].fillna("").astype(str),
                     descriptions.fillna("").astype(str), categories, brands)

  events_frame = _read_table(events_path, ["user_id", "timestamp", "item_id"])
  _check_filled(events_frame, ["user_id", "timestamp", "item_id"], events_path)
  n = len(events_frame)
  # An empty cell means the default, "rec": CSV cells are read as "" (keep_default_na=False),
  # parquet nulls as None.
  kinds = (events_frame["kind"].fillna("").astype(str).str.strip().str.lower()
           .replace("", REC) if "kind" in events_frame else pd.Series([REC] * n))
  bad = ~kinds.isin(KINDS)
  if bad.any():
    row = int(np.argmax(bad.to_numpy()))
    raise DataError(f"{where(events_path, row + 1, 'kind')}: {kinds.iloc[row]!r} is not one "
                    f"of {KINDS}")
  queries = (events_frame["query"].fillna("").astype(str) if "query" in events_frame
             else pd.Series([""] * n))
  events = make_events(events_frame["user_id"].astype(str).str.strip(),
                       _timestamps(events_frame["timestamp"], events_path), kinds,
                       events_frame["item_id"].astype(str).str.strip(), queries, range(n),
                       np.arange(1, n + 1))
  return SearchRecLog(items=items, events=events, items_path=items_path,
                      events_path=events_path)
