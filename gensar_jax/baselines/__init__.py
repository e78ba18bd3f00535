"""Non-generative baselines scored on exactly the candidates GenSAR ranks.

  popularity  rec and search: how often the item was interacted with in the training period
  bm25        search: lexical match of the query against the item text
  dense       search: MiniLM cosine between the query and the item text
  (SASRec, the rec baseline, is trained by the identifiers stage; `run` reads its metrics.)

Every baseline only turns a held-out sample into one score per candidate; `run` turns the
scores into ranks and metrics with `gensar_jax.metrics`, so ties and cut-offs are treated the
same as for the generative model.
"""
from __future__ import annotations

from typing import List, Sequence

import pandas as pd

from gensar_jax.data.schema import DataError

# What an item is "known by" for text retrieval. The search candidates were mined with BM25
# over title + description, so a baseline restricted to that text would largely see ties
# between the target and its hard negatives; the category words are the item's own public
# metadata (on Amazon the category path, on MovieLens genres + release decade) and are what
# real product search indexes too. Bind `fields` to ("title", "description") to match the
# candidate miner exactly.
DEFAULT_TEXT_FIELDS = ("title", "description", "categories")
TEXT_FIELDS = ("title", "description", "categories")


def catalogue_texts(items: pd.DataFrame, fields: Sequence[str] = DEFAULT_TEXT_FIELDS
                    ) -> List[str]:
  """One retrieval text per item, in catalogue (index) order.

  Category paths contribute their distinct words once each, in path order, so an item
  listed under several paths does not get its shared words counted several times.
  """
  unknown = [f for f in fields if f not in TEXT_FIELDS]
  if unknown or not fields:
    raise ValueError(f"text fields must be a non-empty subset of {TEXT_FIELDS}; got {fields}")
  missing = [f for f in fields if f not in items.columns]
  if missing:
    raise DataError(f"items.jsonl: missing column(s) {missing} needed for retrieval text")
  texts = []
  for row in items.itertuples(index=False):
    parts = []
    for field in fields:
      value = getattr(row, field)
      if field == "categories":
        seen = []
        for path in value or []:
          for level in path:
            if level not in seen:
              seen.append(level)
        value = " ".join(seen)
      value = (value or "").strip()
      if value:
        parts.append(value if value[-1] in ".!?" else value + ".")
    texts.append(" ".join(parts))
  return texts
