"""The one text an item is known by: what the sentence encoder, BM25 and doc2query read.

Built once, in `prepare`, and stored in items.jsonl (`text`), so every later stage reads
the same string. The paper's code uses "title + description" and leaves an item with
neither empty; real catalogues have such items (Amazon metadata, a MovieLens export with
a missing title), and the semi-synthetic queries are made from the *categories*, which a
text without them cannot match. So the text is made from the fields in `fields`, in order:

  title         as is
  description   as is
  categories    the distinct category names of all paths, general first, joined by ", ";
                a name already present in the text (MovieLens writes its genres into the
                description) is not repeated
  brand         "Brand: <brand>", when the items table has a brand column

Empty fields are skipped, the rest joined by `separator`. An item with none of them is
named by its id ("item B00123"), so no later stage can meet an item without text; the
stats table counts how many items each fallback served.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence, Tuple

import gin
import pandas as pd

FIELDS = ("title", "description", "categories", "brand")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ItemTextConfig:
  fields: Sequence[str] = FIELDS
  separator: str = ". "

  def __post_init__(self):
    unknown = [f for f in self.fields if f not in FIELDS]
    if unknown or not self.fields:
      raise ValueError(f"ItemTextConfig.fields: {list(self.fields)} must be a non-empty "
                       f"subset of {list(FIELDS)}")


def _clean(value) -> str:
  if value is None or (isinstance(value, float) and value != value):  # None / NaN
    return ""
  return " ".join(str(value).split())


def _category_text(paths, text_so_far: str) -> str:
  names: List[str] = []
  for path in paths if isinstance(paths, (list, tuple)) else []:
    for name in path if isinstance(path, (list, tuple)) else [path]:
      name = _clean(name)
      if name and name not in names and name.lower() not in text_so_far.lower():
        names.append(name)
  return ", ".join(names)


def build_item_texts(items: pd.DataFrame, config: ItemTextConfig = None
                     ) -> Tuple[List[str], Dict[str, int]]:
  """(one text per item row, counts of items missing each field and of id-only texts)."""
  config = config or ItemTextConfig()
  n = len(items)
  column = {f: (items[f].tolist() if f in items else [None] * n) for f in FIELDS}
  texts: List[str] = []
  # Only fields the table has are counted as missing: MovieLens has no brand column.
  counted = [f for f in config.fields if f in items]
  missing = {f"items_without_{f}": 0 for f in counted}
  from_id = 0
  for row in range(n):
    parts: List[str] = []
    for field in config.fields:
      if field == "categories":
        part = _category_text(column[field][row], " ".join(parts))
      elif field == "brand":
        brand = _clean(column[field][row])
        part = f"Brand: {brand}" if brand else ""
      else:
        part = _clean(column[field][row])
      if part:
        parts.append(part)
      elif field in counted:
        missing[f"items_without_{field}"] += 1
    if not parts:
      from_id += 1
      parts = [f"item {items['item_id'].iloc[row]}"]
    texts.append(config.separator.join(p.rstrip(".") if i < len(parts) - 1 else p
                                       for i, p in enumerate(parts)))
  return texts, {**missing, "items_named_by_id_only": from_id}
