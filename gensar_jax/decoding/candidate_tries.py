"""Per-example candidate tries for evaluation, batched as equal-shape arrays.

Evaluation constrains each example to its own candidates (target + 99 negatives). Every
example gets its own small trie, and all of them are padded to shapes that depend only on
the candidate count and identifier length, never on the IDs themselves: a trie over n
sequences has at most n states at any depth, at most n edges per level and at most n
children per state. So one compiled decode serves every batch of the same size.
"""
from __future__ import annotations

import numpy as np

from gensar_jax.decoding import trie as trie_lib


def build_candidate_tries(candidates: np.ndarray, num_dense_levels: int = 1) -> trie_lib.TrieArrays:
  """Stacks one trie per example; leaf items index the example's own candidate list.

  Args:
    candidates: [batch, num_candidates, L] int token ids. Rows with any negative token are
      padding (an example with fewer candidates) and are left out of that example's trie.
    num_dense_levels: levels stored as dense tables; the default 1 keeps only the root
      (behaviour tokens) dense, since deeper levels of a 100-item trie are sparse.
  Returns:
    TrieArrays with trie batch == batch; decoded item i of example b is candidates[b, i].
  """
  candidates = np.asarray(candidates)
  if candidates.ndim != 3:
    raise trie_lib.TrieBuildError(
        f"candidates: expected [batch, num_candidates, length], got shape {candidates.shape}")
  batch, num_candidates, length = candidates.shape
  pad_states = [1] + [num_candidates] * length
  tries = []
  for b in range(batch):
    rows = np.nonzero((candidates[b] >= 0).all(axis=1))[0]   # [valid] original positions
    if len(rows) == 0:
      raise trie_lib.TrieBuildError(f"candidates: example {b} has no valid candidate")
    one = trie_lib.build_trie_numpy(
        candidates[b, rows], num_dense_levels, pad_states=pad_states,
        pad_codes=num_candidates, pad_branch=num_candidates, what=f"candidates of example {b}")
    leaves = one.leaf_items
    one = one.replace(leaf_items=np.where(leaves >= 0, rows[np.maximum(leaves, 0)], -1)
                      .astype(np.int32))
    tries.append(one)
  return trie_lib.stack_tries(tries)
