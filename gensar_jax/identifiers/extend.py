"""Identifiers for items added after training, without moving any existing item.

A trained T5 has learned the existing items' codes, so a new item must fit around them:
every existing SID and CID stays as it is, the new item's codes come from the same
trained RQ-VAE (argmin at every level, as `assign_identifiers` starts), and where the
argmin identifier is already taken the item moves to the nearest code that still leads to
a free identifier, as deep in the tree as possible:

  1. its argmin SID / CID, if free in that space;
  2. else, in each space separately, the deepest *specific* level whose subtree still has
     room (the last level first, as the published Sinkhorn fix does): from there down the
     item takes, level by level, the nearest code whose subtree has room, re-computing the
     residual after each choice;
  3. else (every specific subtree under its shared prefix is full in some space) the same
     on the shared levels, with room required in both spaces, so SID and CID keep one
     shared prefix, then step 2 for each space.

Items are placed one at a time in input order (new items are few next to a catalogue;
per-item work is O(levels x codebook)). The result is unique in every space by
construction, which `extend_codes` checks before returning.
"""
from __future__ import annotations

import collections
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from gensar_jax.identifiers import assignment as assignment_lib
from gensar_jax.identifiers import rqvae as rqvae_lib
from gensar_jax.identifiers import rqvae_config as rqvae_config_lib

SPACE_OF = {rqvae_config_lib.SEMANTIC: "sid", rqvae_config_lib.COLLABORATIVE: "cid"}


class _Occupancy:
  """How many identifiers of one space lie under every prefix (all prefix lengths)."""

  def __init__(self, codes: np.ndarray, codebook_size: int):
    self.length = codes.shape[1]
    self.k = codebook_size
    self.counts: Dict[Tuple[int, ...], int] = collections.Counter()
    for row in codes.tolist():
      self.add(row)

  def add(self, row: Sequence[int]) -> None:
    for j in range(self.length + 1):  # the empty prefix counts the whole space
      self.counts[tuple(row[:j])] += 1

  def has_room(self, prefix: Sequence[int]) -> bool:
    """True when some full identifier starting with `prefix` is still free."""
    return self.counts.get(tuple(prefix), 0) < self.k ** (self.length - len(prefix))


def _row(tree: assignment_lib._CodeTree, item: int, space: str) -> list:
  """One item's full codes in one space (tree.full would concatenate every item's)."""
  return tree.shared[item].tolist() + tree.specific[space][item].tolist()


def _repick(tree: assignment_lib._CodeTree, item: int, spaces: Sequence[str],
            occupancy: Dict[str, _Occupancy], first: int, last: int) -> None:
  """Re-chooses levels first..last-1 of `item`: nearest code whose subtree has room in every
  space of `spaces` (one space for specific levels, all for shared ones)."""
  index = np.asarray([item])
  for level in range(first, last):
    residual = tree.residual(index, spaces[0], level)  # [1, width]
    dist = assignment_lib._sq_dist(residual, tree.codebook(spaces[0], level))[0]  # [K]
    prefixes = [(occupancy[s], _row(tree, item, s)[:level]) for s in spaces]
    for code in np.argsort(dist, kind="stable").tolist():
      if all(room.has_room(prefix + [code]) for room, prefix in prefixes):
        tree.set_codes(index, spaces[0], level, np.asarray([code]))
        break
    else:  # the caller only starts below a prefix with room, so a code must exist
      raise RuntimeError(f"internal error: no code with room at level {level}")


def _deepest_with_room(tree, item: int, spaces: Sequence[str], occupancy, lowest: int,
                       highest: int) -> Optional[int]:
  """The deepest level in [lowest, highest) whose parent prefix has room in all `spaces`."""
  for level in range(highest - 1, lowest - 1, -1):
    if all(occupancy[s].has_room(_row(tree, item, s)[:level]) for s in spaces):
      return level
  return None


def extend_codes(trained: rqvae_lib.TrainedRQVAE, existing: Dict[str, np.ndarray],
                 semantic: Optional[np.ndarray], collaborative: Optional[np.ndarray]
                 ) -> Tuple[Dict[str, np.ndarray], Dict[str, int]]:
  """Codes for new items that collide neither with `existing` nor with each other.

  Args:
    trained: the RQ-VAE the existing identifiers came from (`rqvae_store.load_rqvae`).
    existing: {"sid": [n_old, L], "cid": [n_old, L]} codes of the current table (the
      spaces of the trained mode).
    semantic, collaborative: the new items' embedding tables [n_new, d] (None where the
      mode has no such space).

  Returns:
    ({"sid"/"cid": [n_new, L] int32}, {"sid"/"cid": items moved off their argmin code}).
  """
  config = trained.config
  lay = config.layout()
  tables = rqvae_config_lib.validate_embeddings(semantic, collaborative, config)
  if tuple(t.shape[1] for t in tables) != tuple(trained.input_dims):
    raise ValueError(f"new items' embedding widths {[t.shape[1] for t in tables]} differ "
                     f"from the trained RQ-VAE's {list(trained.input_dims)}")
  n = tables[0].shape[0]
  r0, shared, specific = rqvae_lib.encode_and_quantize(trained, tables)
  params = trained.params["params"]
  tree = assignment_lib._CodeTree(
      lay, r0.astype(np.float32),
      shared if shared is not None else np.zeros((n, 0), np.int64), specific,
      np.asarray(params["shared_codebook"]) if lay.shared_levels else None,
      {s: np.asarray(params["specific_codebook"][i]) for i, s in enumerate(lay.spaces)})
  argmin = {s: tree.full(s).copy() for s in lay.spaces}
  occupancy = {}
  for s in lay.spaces:
    codes = np.asarray(existing[SPACE_OF[s]])
    if codes.shape[1] != tree.length:
      raise ValueError(f"existing {SPACE_OF[s]} codes have {codes.shape[1]} levels, the "
                       f"trained RQ-VAE makes {tree.length}")
    occupancy[s] = _Occupancy(codes, lay.codebook_size)
  m, length = lay.shared_levels, tree.length
  for item in range(n):
    crowded = [s for s in lay.spaces if not occupancy[s].has_room(_row(tree, item, s))]
    if crowded:
      needs_shared = [s for s in crowded
                      if _deepest_with_room(tree, item, (s,), occupancy, m, length) is None]
      if needs_shared:
        level = _deepest_with_room(tree, item, lay.spaces, occupancy, 0, m)
        if level is None:
          raise ValueError(f"no free identifier left for new item {item}: the catalogue "
                           f"fills all {lay.codebook_size}^{length} identifiers")
        _repick(tree, item, lay.spaces, occupancy, level, m)
        for s in lay.spaces:  # a moved shared prefix changes every space's residual below it
          _repick(tree, item, (s,), occupancy, m, length)
      else:
        for s in crowded:
          level = _deepest_with_room(tree, item, (s,), occupancy, m, length)
          _repick(tree, item, (s,), occupancy, level, length)
    for s in lay.spaces:
      occupancy[s].add(_row(tree, item, s))
  codes = {SPACE_OF[s]: tree.full(s).astype(np.int32) for s in lay.spaces}
  moved = {SPACE_OF[s]: int(np.any(codes[SPACE_OF[s]] != argmin[s], axis=1).sum())
           for s in lay.spaces}
  for s in lay.spaces:
    merged = np.concatenate([np.asarray(existing[SPACE_OF[s]]), codes[SPACE_OF[s]]])
    if len(np.unique(merged, axis=0)) != len(merged):
      raise RuntimeError(f"internal error: {SPACE_OF[s]} identifiers collide after extension")
  return codes, moved


def shared_prefix_kept(codes: Dict[str, np.ndarray], shared_levels: int) -> bool:
  """True when every item's SID and CID agree on the shared levels (dual mode)."""
  if shared_levels == 0 or "sid" not in codes or "cid" not in codes:
    return True
  return bool(np.all(codes["sid"][:, :shared_levels] == codes["cid"][:, :shared_levels]))

