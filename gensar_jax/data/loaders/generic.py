"""A generic format for users' own logs: two tables, CSV or parquet (chosen by extension).

items (`.csv` / `.parquet`):
  item_id (required), title (required column; cells may be empty), description and brand
  (optional),
  categories (optional): in CSV a string of paths separated by "|", levels by ">"
  ("Electronics > Audio > Headphones | Gifts > For Him"); in parquet the same string or a
  list of lists of strings.
events (`.csv` / `.parquet`):
  user_id, timestamp, item_id (required); timestamp is seconds since the epoch or an
  ISO-8601 date (naive dates are UTC), or a parquet timestamp column; kind (optional, "rec"
  or "search", default "rec", also for empty cells); query (required when kind is
  "search").
Timestamps, the rule (a timestamp orders a user's history, so a value that cannot be an
event's time is refused, never wrapped or clamped into one):
  * seconds are plain decimal digits, 0 to 253402300799 (1970-01-01 to 9999-12-31 UTC);
    a larger number is refused (milliseconds, or an overflowing export), as are exponents
    ("1e9"), "inf" and "nan";
  * fractional seconds ("1600000123.75") are accepted and floored to the second; events of
    the same second keep their file order;
  * negative seconds and dates before 1970 are refused.
CSV files are UTF-8 (a leading byte-order mark is allowed); a byte that is not UTF-8 is an
error naming the row and field.
Row numbers in error messages are 1-based data rows (CSV line = row + 1 for the header).
"""
from __future__ import annotations

import os
from typing import List

import gin
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

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
  except UnicodeDecodeError as e:
    raise _not_utf8(path, e) from None
  except (ValueError, OSError, pd.errors.ParserError) as e:
    if isinstance(e, DataError):
      raise
    raise DataError(f"{path}: malformed table: {e}") from None
  missing = [c for c in required if c not in frame.columns]
  if missing:
    raise DataError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")
  return frame.reset_index(drop=True)


def _not_utf8(path: str, error: UnicodeDecodeError) -> DataError:
  """The row and field of the first byte of a CSV that is not UTF-8.

  pandas reports a byte offset into its own read buffer, which no user can act on. The file
  is read again as CSV with undecodable bytes kept as surrogate escapes (so a quoted field
  with line breaks is one row, as pandas counts it), and the first record holding one is
  named like every other data error: path:row: field 'name'.
  """
  import csv
  import gzip
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rt", encoding="utf-8", errors="surrogateescape", newline="") as f:
      header: List[str] = []
      for row, record in enumerate(csv.reader(f)):   # row 0 is the header
        for column, cell in enumerate(record):
          bad = next((c for c in cell if "\udc80" <= c <= "\udcff"), None)
          if bad is None:
            continue
          byte = f"byte 0x{ord(bad) - 0xDC00:02x}"
          if row == 0:
            return DataError(f"{path}: the header is not UTF-8 text ({byte} in column "
                             f"{column + 1}); save the file as UTF-8")
          field = header[column] if column < len(header) else f"column {column + 1}"
          return DataError(f"{where(path, row, field)}: not UTF-8 text ({byte}); save the "
                           "file as UTF-8")
        if row == 0:
          header = record
  except (OSError, csv.Error, EOFError):
    pass
  return DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save the "
                   "file as UTF-8")


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


# The largest timestamp in seconds: 9999-12-31T23:59:59Z, the last second an ISO-8601 date
# can write. Anything larger is not a time (often milliseconds, or an overflowed export).
MAX_SECONDS = 253402300799
_SECONDS = r"\+?\d+(?:\.\d*)?"       # plain decimal seconds, optionally fractional
_NEGATIVE = r"-\d+(?:\.\d*)?"


def _timestamp_error(path: str, row: int, value, why: str) -> DataError:
  return DataError(f"{where(path, row + 1, 'timestamp')}: {value!r} {why}")


def _timestamps(values: pd.Series, path: str) -> np.ndarray:
  """Epoch seconds from seconds or ISO-8601 dates, mixed freely in one column, by the rule
  of the module docstring.

  Seconds are matched as text, not through pd.to_numeric: a float64 detour silently wraps
  an overflowing integer to -2**63 (moving the event to the start of its user's history)
  and crashes on "inf". Dates are parsed as "ISO8601", not by pandas' format inference:
  inference fixes the format of the first value and turns every differently written date
  ("2020-01-01" then "2020-01-01T10:00") into a spurious error. Only the values that are
  not seconds reach the date parser.
  """
  if pd.api.types.is_datetime64_any_dtype(values):
    # A parquet timestamp column: to_numeric would silently give nanoseconds.
    if values.isna().any():
      row = int(np.argmax(values.isna().to_numpy()))
      raise DataError(f"{where(path, row + 1, 'timestamp')}: missing date")
    utc = values.dt.tz_localize("UTC") if values.dt.tz is None else values
    seconds = ((utc - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
               ).to_numpy(np.int64)
    _check_range(seconds, values, path)
    return seconds
  # Arrow-backed strings: the regex tests below run as vectorised Arrow kernels (a Python
  # regex per row would be several times slower than the CSV read on millions of events).
  text = values.astype(str).astype("string[pyarrow]").str.strip().reset_index(drop=True)
  is_seconds = text.str.fullmatch(_SECONDS).to_numpy(dtype=bool)
  negative = text.str.fullmatch(_NEGATIVE).to_numpy(dtype=bool)
  if negative.any():
    row = int(np.argmax(negative))
    raise _timestamp_error(path, row, text.iloc[row], "is negative: timestamps are seconds "
                           "since 1970-01-01 UTC")
  seconds = np.zeros(len(text), np.int64)
  # The whole seconds: no sign, no leading zeros, the fraction floored away.
  digits = text[is_seconds].str.replace(r"^\+?0*|\.\d*$", "", regex=True)
  # More digits than MAX_SECONDS has cannot be in range, and would not fit an int64.
  too_long = (digits.str.len() > len(str(MAX_SECONDS))).to_numpy(dtype=bool)
  if too_long.any():
    row = int(np.flatnonzero(is_seconds)[np.argmax(too_long)])
    raise _range_error(path, row, text.iloc[row])
  digits = pa.array(digits.replace("", "0"), type=pa.string())
  seconds[is_seconds] = pc.cast(digits, pa.int64()).to_numpy(zero_copy_only=False)
  is_date = ~is_seconds
  if is_date.any():
    dates = pd.to_datetime(text[is_date], errors="coerce", utc=True, format="ISO8601")
    # Through a Timedelta, so the result does not depend on the datetime resolution.
    date_seconds = ((dates - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1))
    for row in np.flatnonzero(is_date)[dates.isna().to_numpy()]:
      # pandas' nanosecond dates end in 2262; the rule's range runs to 9999.
      date_seconds.loc[row] = _late_date_seconds(path, int(row), text.iloc[row])
    seconds[is_date] = date_seconds.to_numpy(dtype=np.int64)
  _check_range(seconds, text, path)
  return seconds


def _late_date_seconds(path: str, row: int, value: str) -> int:
  """Seconds of an ISO-8601 date pandas cannot hold (after 2262), or the row's error."""
  import datetime
  try:
    date = datetime.datetime.fromisoformat(value)
  except ValueError:
    raise _timestamp_error(path, row, value, "is neither seconds since the epoch nor an "
                           "ISO-8601 date") from None
  if date.tzinfo is None:
    date = date.replace(tzinfo=datetime.timezone.utc)
  epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
  return (date - epoch) // datetime.timedelta(seconds=1)


def _range_error(path: str, row: int, value) -> DataError:
  return _timestamp_error(path, row, value, f"is out of range: seconds since the epoch run "
                          f"from 0 to {MAX_SECONDS} (1970 to 9999; milliseconds?)")


def _check_range(seconds: np.ndarray, values: pd.Series, path: str) -> None:
  """Seconds in [0, MAX_SECONDS]; a date before 1970 is as refused as negative seconds."""
  bad = (seconds < 0) | (seconds > MAX_SECONDS)
  if bad.any():
    row = int(np.argmax(bad))
    value = values.iloc[row]
    if seconds[row] < 0:
      raise _timestamp_error(path, row, str(value), "is before 1970-01-01 UTC, the "
                             "earliest timestamp")
    raise _range_error(path, row, str(value))


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
