"""Collaborative embeddings for items the trained SASRec has never seen.

A CID comes from an item's row of SASRec's item table; an item added after training has
none, and re-training SASRec would move every other item's row. What is known about a new
item is who interacted with it and next to what, and what its text says, so its
collaborative embedding is borrowed from existing items, in this order:

  * **neighbours in the rec sequences**: the mean collaborative embedding of the existing
    items within `window` positions of the new item in users' training sequences (the
    part before each user's first held-out interaction, so evaluation targets are never
    read). Next-item models place items that follow each other close together, and this
    is the signal SASRec itself learns from.
  * **text neighbours**, for items nobody has interacted with yet: the mean collaborative
    embedding of the `text_neighbours` existing items whose semantic embeddings are most
    similar (cosine). A cold item then lands in the collaborative region of items like it.

Both are plain means of existing rows, so the new row lies in the span SASRec's table
already uses and the RQ-VAE encodes it like any other.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

NEIGHBOURS = "sequence_neighbours"
TEXT = "text_neighbours"


def sequence_neighbours(sequences: Sequence[Sequence[int]], new_items: Sequence[int],
                        is_existing: np.ndarray, window: int) -> Dict[int, List[int]]:
  """{new item: existing items seen within `window` positions of it} over all sequences."""
  wanted = set(int(i) for i in new_items)
  found: Dict[int, List[int]] = {i: [] for i in wanted}
  for seq in sequences:
    seq = list(seq)
    for p, item in enumerate(seq):
      if item in wanted:
        around = seq[max(0, p - window):p] + seq[p + 1:p + 1 + window]
        found[item].extend(j for j in around if is_existing[j])
  return found


def collaborative_for_new_items(
    existing_collaborative: np.ndarray,  # [n_old, d_c], row per existing item
    existing_semantic: np.ndarray,       # [n_old, d_s]
    new_semantic: np.ndarray,            # [n_new, d_s]
    neighbours: Sequence[Sequence[int]], # per new item: existing rows next to it
    text_neighbours: int = 10) -> Tuple[np.ndarray, List[str]]:
  """[n_new, d_c] embeddings and, per item, which source gave it (NEIGHBOURS or TEXT)."""
  if text_neighbours < 1:
    raise ValueError(f"text_neighbours must be >= 1, got {text_neighbours}")
  n_new = new_semantic.shape[0]
  out = np.zeros((n_new, existing_collaborative.shape[1]), np.float32)
  sources = []
  cold = []
  for i, rows in enumerate(neighbours):
    if len(rows):
      out[i] = existing_collaborative[np.asarray(rows)].mean(axis=0)
      sources.append(NEIGHBOURS)
    else:
      cold.append(i)
      sources.append(TEXT)
  if cold:
    a = _unit(new_semantic[cold])  # [cold, d_s]
    b = _unit(existing_semantic)  # [n_old, d_s]
    k = min(text_neighbours, b.shape[0])
    nearest = np.argsort(-(a @ b.T), axis=1, kind="stable")[:, :k]  # [cold, k]
    out[cold] = existing_collaborative[nearest].mean(axis=1)
  return out, sources


def _unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
