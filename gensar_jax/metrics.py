"""Ranking metrics shared by every evaluator (generative model, SASRec, BM25, dense retrieval).

All systems are scored the same way: the 0-based rank of the target among the ranked
candidates (or beams), -1 when the target was not returned at all. Keeping one definition
here is what makes the comparison table honest.
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

HIT_CUTOFFS: Sequence[int] = (1, 5, 10)
NDCG_CUTOFFS: Sequence[int] = (5, 10)


def target_ranks(ranked_items: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """0-based position of each target in its ranked list, -1 if absent.

  Args:
    ranked_items: [batch, k] item ids (or indices), best first; -1 marks an empty slot.
    targets: [batch] the relevant item of each row.
  """
  ranked_items = np.asarray(ranked_items)
  targets = np.asarray(targets)
  if ranked_items.ndim != 2 or targets.shape != ranked_items.shape[:1]:
    raise ValueError(
        f"ranked_items must be [batch, k] and targets [batch]; got {ranked_items.shape} "
        f"and {targets.shape}")
  hits = ranked_items == targets[:, None]  # [batch, k]
  return np.where(hits.any(axis=1), hits.argmax(axis=1), -1)


def ranking_metrics(ranks: np.ndarray) -> Dict[str, float]:
  """HR@{1,5,10} and NDCG@{5,10} from 0-based target ranks (-1 = not retrieved).

  With a single relevant item, NDCG@k = 1 / log2(rank + 2) when rank < k, else 0.
  """
  ranks = np.asarray(ranks)
  if ranks.ndim != 1 or ranks.size == 0:
    raise ValueError(f"ranks must be a non-empty 1-D array; got shape {ranks.shape}")
  found = ranks >= 0
  metrics = {}
  for k in HIT_CUTOFFS:
    metrics[f"HR@{k}"] = float(np.mean(found & (ranks < k)))
  gains = np.where(found, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)
  for k in NDCG_CUTOFFS:
    metrics[f"NDCG@{k}"] = float(np.mean(np.where(found & (ranks < k), gains, 0.0)))
  return metrics


def ranks_from_scores(scores: np.ndarray, target_column: int = 0) -> np.ndarray:
  """Rank of the target column among candidate scores, ties counted pessimistically.

  Args:
    scores: [batch, candidates] higher is better.
    target_column: where the target sits in each row (prepared data puts it first).
  """
  scores = np.asarray(scores, dtype=np.float64)
  target = scores[:, target_column:target_column + 1]  # [batch, 1]
  others = np.delete(scores, target_column, axis=1)  # [batch, candidates - 1]
  # A tie with a negative counts against the system: no credit for arbitrary order.
  return (others >= target).sum(axis=1)
