"""The pseudo-queries file the doc2query stage writes and the ad-hoc search task reads.

One JSON line per item, `{"item_id": ..., "queries": [...]}` (or a single `"query"`). The
reader lives in the library, beside the data it describes, so the vocabulary corpus and
the SeqIO source read it the same way.
"""
from __future__ import annotations

import json
import os
from typing import List, Tuple


class PseudoQueriesMissingError(FileNotFoundError):
  """The ad-hoc search task was selected before the doc2query stage wrote its file."""


def read_pseudo_queries(path: str) -> List[Tuple[str, str]]:
  """(item id, pseudo-query) pairs from a doc2query file; errors name the line."""
  if not path or not os.path.isfile(path):
    raise PseudoQueriesMissingError(
        f"pseudo-queries file {path!r} does not exist: the ad-hoc search task reads the "
        "doc2query stage's output, which has not been produced yet. Run the doc2query "
        "stage first, or train a mixture without the ad-hoc search task (e.g. the "
        "'<prefix>_no_adhoc' mixture)")
  pairs = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        item = str(row["item_id"])
        queries = row["queries"] if "queries" in row else [row["query"]]
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}:{number}: expected {{\"item_id\": ..., \"queries\": "
                         f"[...]}} or {{\"item_id\": ..., \"query\": ...}}: {e}") from None
      if isinstance(queries, str) or not all(isinstance(q, str) for q in queries):
        raise ValueError(f"{path}:{number}: field 'queries' must be a list of strings")
      pairs.extend((item, q.strip()) for q in queries if q.strip())
  if not pairs:
    raise PseudoQueriesMissingError(f"pseudo-queries file {path} holds no queries")
  return pairs
