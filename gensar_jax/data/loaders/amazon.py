"""The Amazon 2014 review + metadata format (McAuley et al.), as in the published experiments.

`reviews_<Category>_5.json.gz`: one JSON object per line (reviewerID, asin, unixReviewTime, ...).
`meta_<Category>.json.gz`: one object per line (asin, title, description, categories, ...);
in the 2014 release these lines are Python literals (single quotes), so `ast.literal_eval`
is the fallback when `json.loads` fails.

Every review is a recommendation interaction; semi-synthetic search sessions are added from
the category paths later (queries.py). The catalogue is restricted to reviewed items: the
metadata file lists many more products than the 5-core reviews touch.
"""
from __future__ import annotations

import ast
import gzip
import json
import os
from typing import Dict, Iterator, Tuple

import gin
from tqdm import tqdm

from gensar_jax.data.schema import DataError, REC, SearchRecLog, make_events, make_items, where


def _open_text(path: str):
  if not os.path.exists(path):
    raise DataError(f"{path}: file not found")
  if path.endswith(".gz"):
    return gzip.open(path, "rt", encoding="utf-8")
  return open(path, encoding="utf-8")


def read_json_lines(path: str, desc: str) -> Iterator[Tuple[int, dict]]:
  """(line number, object) per non-empty line; JSON first, Python literal as fallback."""
  with _open_text(path) as f:
    try:
      for line_no, text in enumerate(tqdm(f, desc=desc, unit=" lines", mininterval=2.0,
                                          leave=False), start=1):
        text = text.strip()
        if not text:
          continue
        try:
          obj = json.loads(text)
        except json.JSONDecodeError:
          try:
            obj = ast.literal_eval(text)
          except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
            # TypeError: an unhashable dict key ("{['a']: 1}"); the last two: absurd nesting.
            raise DataError(f"{where(path, line_no)}: malformed line (neither JSON nor a "
                            f"Python literal): {e}") from None
        if not isinstance(obj, dict):
          raise DataError(f"{where(path, line_no)}: expected an object, got "
                          f"{type(obj).__name__}")
        yield line_no, obj
    except (OSError, EOFError, UnicodeDecodeError) as e:  # truncated gzip, bad bytes
      raise DataError(f"{path}: unreadable: {e}") from None


def _require(obj: dict, key: str, path: str, line: int):
  if key not in obj:
    raise DataError(f"{where(path, line, key)}: missing key")
  if obj[key] is None or str(obj[key]).strip() == "":
    raise DataError(f"{where(path, line, key)}: empty value")
  return obj[key]


def _categories(value, path: str, line: int):
  if value is None:
    return []
  if not isinstance(value, list) or not all(isinstance(p, list) for p in value):
    raise DataError(f"{where(path, line, 'categories')}: expected a list of category paths "
                    "(lists of strings)")
  return [[str(c) for c in p] for p in value]


@gin.configurable
def load_amazon_2014(reviews_path: str = gin.REQUIRED, meta_path: str = gin.REQUIRED
                     ) -> SearchRecLog:
  """Loads an Amazon 2014 category (reviews + metadata) as rec events plus a catalogue."""
  users, times, asins, lines = [], [], [], []
  for line, obj in read_json_lines(reviews_path, "reviews"):
    users.append(str(_require(obj, "reviewerID", reviews_path, line)))
    asins.append(str(_require(obj, "asin", reviews_path, line)))
    t = _require(obj, "unixReviewTime", reviews_path, line)
    try:
      times.append(int(t))
    except (TypeError, ValueError):
      raise DataError(f"{where(reviews_path, line, 'unixReviewTime')}: not an integer: "
                      f"{t!r}") from None
    lines.append(line)
  if not users:
    # Checked here: the catalogue is restricted to reviewed items, so without this the error
    # would blame the metadata file ("empty catalogue") for an empty reviews file.
    raise DataError(f"{reviews_path}: no reviews")
  reviewed = set(asins)

  meta: Dict[str, Tuple[int, dict]] = {}
  for line, obj in read_json_lines(meta_path, "metadata"):
    asin = str(_require(obj, "asin", meta_path, line))
    if asin in meta:
      raise DataError(f"{where(meta_path, line, 'asin')}: duplicate item id {asin!r} "
                      f"(first at line {meta[asin][0]})")
    if asin in reviewed:
      meta[asin] = (line, obj)

  ids, titles, descriptions, categories, brands = [], [], [], [], []
  for asin, (line, obj) in meta.items():
    ids.append(asin)
    titles.append(str(obj.get("title") or ""))
    brands.append(str(obj.get("brand") or ""))
    description = obj.get("description") or ""
    if isinstance(description, list):
      description = " ".join(str(d) for d in description)
    descriptions.append(str(description))
    categories.append(_categories(obj.get("categories"), meta_path, line))
  # A metadata file without any brand has no brand column, as a generic table without one.
  items = make_items(ids, titles, descriptions, categories,
                     brands if any(brands) else None)
  n = len(users)
  events = make_events(users, times, [REC] * n, asins, [""] * n, range(n), lines)
  return SearchRecLog(items=items, events=events, items_path=meta_path,
                      events_path=reviews_path)
