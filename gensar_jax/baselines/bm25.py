"""BM25 search baseline: the query scored against each candidate's item text.

This is the classic lexical retriever the search candidates were mined with, so on the
default prepared data it ranks *its own* hard negatives: a target that BM25 already puts
first gets credit, a target tied with its negatives gets none (ties count against the
system). It indexes the item text `prepare` stored, the text the candidates were mined with.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from gensar_jax.data.candidates import BM25Ranker


class BM25Scorer:
  """Scores candidates for a query; whole-catalogue scores are cached per distinct query
  (semi-synthetic queries repeat a lot: 366 distinct ones for ~1k test samples on ML-100K)."""

  def __init__(self, item_texts: Sequence[str]):
    if not item_texts:
      raise ValueError("BM25 needs a non-empty catalogue")
    self.num_items = len(item_texts)
    self._ranker = BM25Ranker(list(item_texts))

  def score(self, queries: Sequence[str], candidates: np.ndarray) -> np.ndarray:
    """[n, c] scores of each row's candidates for that row's query."""
    candidates = np.asarray(candidates, np.int64)  # [n, c]
    if candidates.ndim != 2 or len(queries) != len(candidates):
      raise ValueError(f"need one query per candidate row; got {len(queries)} queries and "
                       f"candidates of shape {candidates.shape}")
    out = np.zeros(candidates.shape, np.float64)  # [n, c]
    # Rows grouped by query, each query's catalogue scores computed once and dropped: a
    # cache of every distinct query's [items] scores grows as queries x items (~0.5 GB at
    # Amazon-Electronics size).
    rows_of: Dict[str, List[int]] = {}
    for row, query in enumerate(queries):
      rows_of.setdefault(query, []).append(row)
    for query, rows in rows_of.items():
      scores = np.asarray(self._ranker.scores(query), np.float64)  # [items]
      out[rows] = scores[candidates[rows]]
    return out
