"""From a trained RQ-VAE to final, unique semantic and collaborative IDs.

Three phases, each reported in the stats:
  1. argmin codes at every level (the trained quantiser as is);
  2. the published collision fix: items whose SID (or CID) collides are re-assigned on the
     last level with Sinkhorn, one balanced problem per colliding group, up to
     `collision_rounds` rounds;
  3. a final de-duplication the paper does not have: Sinkhorn cannot separate items with
     identical embeddings, so any leftover collision is resolved by moving items to the
     nearest *free* code, level by level from the top (a level is only touched when a
     prefix holds more items than the levels below it can tell apart). After it every
     SID is unique and every CID is unique, with the ID length unchanged.

Everything is vectorised over items with numpy (and JAX for encoding and Sinkhorn); the
only Python loops are over levels, rounds and group-size buckets.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from gensar_jax.identifiers import rqvae as rqvae_lib
from gensar_jax.identifiers import rqvae_config as rqvae_config_lib
from gensar_jax.identifiers import sinkhorn as sinkhorn_lib


def codes_to_tokens(codes: np.ndarray, level_names: Sequence[str]) -> List[List[str]]:
  """[n, levels] codes -> per item the token strings, e.g. ["<m0_12>", "<m1_201>", ...]."""
  codes = np.asarray(codes)
  tables = [None] * len(level_names)
  max_code = int(codes.max()) + 1 if codes.size else 0
  for i, name in enumerate(level_names):
    tables[i] = [f"<{name}_{c}>" for c in range(max_code)]
  return [[tables[i][c] for i, c in enumerate(row)] for row in codes.tolist()]


@dataclasses.dataclass
class IdentifierAssignment:
  """The final identifiers of a catalogue (row i = item i of the input tables).

  A space the mode does not have ("cid" in sid_only, "sid" in cid_only) is None.
  """
  mode: str
  sid_codes: Optional[np.ndarray]  # [n, sid_length] int32
  cid_codes: Optional[np.ndarray]  # [n, cid_length] int32
  sid_levels: Tuple[str, ...]  # token prefix per SID level, e.g. ("m0", "m1", "s0", "s1")
  cid_levels: Tuple[str, ...]
  codebook_size: int
  stats: Dict[str, Any]
  # [n, spaces * latent] the RQ-VAE encoder's outputs the codes were assigned from (None
  # when the assignment was not made from an encoding, e.g. a table read back from disk).
  latents: Optional[np.ndarray] = None

  @property
  def num_items(self) -> int:
    codes = self.sid_codes if self.sid_codes is not None else self.cid_codes
    return int(codes.shape[0])

  @functools.cached_property
  def sid_tokens(self) -> Optional[List[List[str]]]:
    return None if self.sid_codes is None else codes_to_tokens(self.sid_codes, self.sid_levels)

  @functools.cached_property
  def cid_tokens(self) -> Optional[List[List[str]]]:
    return None if self.cid_codes is None else codes_to_tokens(self.cid_codes, self.cid_levels)

  def vocabulary(self) -> List[str]:
    """Every identifier token the model may have to emit (shared levels listed once)."""
    names = list(dict.fromkeys(self.sid_levels + self.cid_levels))
    return [f"<{name}_{c}>" for name in names for c in range(self.codebook_size)]


def row_ids(codes: np.ndarray, base: int) -> np.ndarray:
  """Dense group id per row of [n, p] codes (equal rows <-> equal ids); p may be 0."""
  n, p = codes.shape
  if p == 0:
    return np.zeros((n,), np.int64)
  if p * np.log2(max(base, 2)) < 62:
    key = np.zeros((n,), np.int64)
    for j in range(p):
      key = key * base + codes[:, j]
    return np.unique(key, return_inverse=True)[1].reshape(-1)
  return np.unique(codes, axis=0, return_inverse=True)[1].reshape(-1)


def _run_ranks(sorted_keys: np.ndarray) -> np.ndarray:
  """Position of each element within its run of equal keys (keys already sorted)."""
  idx = np.arange(sorted_keys.size)
  starts = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]] if sorted_keys.size else idx
  return idx - np.maximum.accumulate(np.where(starts, idx, 0))


def _sq_dist(r: np.ndarray, codebook: np.ndarray) -> np.ndarray:
  """[m, d] x [K, d] -> [m, K] squared distances (float32)."""
  d = (np.sum(r * r, 1, keepdims=True) - 2.0 * r @ codebook.T
       + np.sum(codebook * codebook, 1)[None, :])
  return np.maximum(d, 0.0).astype(np.float32)


class _CodeTree:
  """Codes of every item plus what is needed to recompute any level's residual.

  Levels are numbered per space along its full ID: 0 .. L_m-1 shared, L_m .. L-1 specific.
  """

  def __init__(self, layout, r0, shared_codes, specific_codes, shared_books, specific_books):
    self.layout = layout
    self.r0 = r0  # [n, spaces * latent]
    self.shared = shared_codes  # [n, L_m] (L_m may be 0)
    self.specific = specific_codes  # {space: [n, L_n]}
    self.shared_books = shared_books  # [L_m, K, spaces * latent]
    self.specific_books = specific_books  # {space: [L_n, K, latent]}
    self.length = layout.shared_levels + layout.specific_levels

  def full(self, space: str) -> np.ndarray:
    return np.concatenate([self.shared, self.specific[space]], axis=1)  # [n, L]

  def codebook(self, space: str, level: int) -> np.ndarray:
    m = self.layout.shared_levels
    return self.shared_books[level] if level < m else self.specific_books[space][level - m]

  def residual(self, items: np.ndarray, space: str, level: int) -> np.ndarray:
    """Residual entering `level` for `items`, given their current codes above it."""
    m, lat = self.layout.shared_levels, self.layout.latent_dim
    r = self.r0[items].copy()  # [m_items, spaces * latent]
    for q in range(min(level, m)):
      r -= self.shared_books[q][self.shared[items, q]]
    if level < m:
      return r
    i = self.layout.spaces.index(space)
    r = r[:, i * lat:(i + 1) * lat]  # [m_items, latent]
    for q in range(level - m):
      r -= self.specific_books[space][q][self.specific[space][items, q]]
    return r

  def set_codes(self, items: np.ndarray, space: str, level: int, codes: np.ndarray):
    m = self.layout.shared_levels
    if level < m:
      self.shared[items, level] = codes
    else:
      self.specific[space][items, level - m] = codes

  def requantize_below(self, items: np.ndarray, space: str, level: int):
    """After `items` moved at `level`, re-pick their deeper codes by argmin on the new residual.

    A shared move changes the residual of both spaces, so both are re-quantised.
    """
    spaces = self.layout.spaces if level < self.layout.shared_levels else (space,)
    for s in spaces:
      for q in range(level + 1, self.length):
        if q < self.layout.shared_levels and s != spaces[0]:
          continue  # shared levels are redone once
        codes = np.argmin(_sq_dist(self.residual(items, s, q), self.codebook(s, q)), axis=1)
        self.set_codes(items, s, q, codes)


def _collision_stats(codes: np.ndarray) -> Dict[str, float]:
  ids = row_ids(codes, int(codes.max()) + 1 if codes.size else 1)
  counts = np.bincount(ids)
  return {"collision_rate": 1.0 - counts.size / codes.shape[0],
          "colliding_items": int(counts[counts > 1].sum())}


def _separable(items: np.ndarray, groups: np.ndarray, residual: np.ndarray):
  """Keeps the items of groups that hold at least two different residuals."""
  if items.size == 0:
    return items, residual
  order = np.argsort(groups, kind="stable")
  g, r = groups[order], residual[order]
  starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])  # [groups]
  first_of = np.repeat(starts, np.diff(np.r_[starts, g.size]))  # [m] row of the group's first
  differs = np.any(r != r[first_of], axis=1)  # [m]
  group_differs = np.maximum.reduceat(differs.astype(np.int8), starts) > 0  # [groups]
  keep = np.repeat(group_differs, np.diff(np.r_[starts, g.size]))  # [m] in sorted order
  return items[order][keep], r[keep]


def _sinkhorn_rounds(tree: _CodeTree, space: str, config) -> List[int]:
  """Published collision fix: re-assign colliding groups on the last level with Sinkhorn.

  Returns the number of colliding items before each round that ran (its length is the
  number of rounds used).
  """
  last = tree.length - 1
  k = tree.layout.codebook_size
  history = []
  for _ in range(config.collision_rounds):
    ids = row_ids(tree.full(space), k)  # [n]
    counts = np.bincount(ids)
    items = np.flatnonzero(counts[ids] > 1)
    residual = tree.residual(items, space, last)  # [m, latent]
    # Sinkhorn gives identical rows identical codes, so a group whose items all have the
    # same residual can never be split here; leave those to the final step.
    items, residual = _separable(items, ids[items], residual)
    if items.size == 0:
      break
    history.append(int(items.size))
    dist = _sq_dist(residual, tree.codebook(space, last))  # [m, K]
    codes = sinkhorn_lib.grouped_sinkhorn_codes(
        dist, ids[items], config.sinkhorn_epsilon, config.sinkhorn_iters)
    tree.set_codes(items, space, last, codes)
  return history


def _rebalance_level(tree: _CodeTree, space: str, level: int, capacity: int) -> np.ndarray:
  """Ensures no (prefix, code) cell at `level` holds more than `capacity` items.

  In an overfull cell the `capacity` items nearest to the code stay; the others move to the
  nearest code of the same prefix that still has room. All movers propose at once; a cell
  with s free places takes its s nearest proposers; the rest propose again (each round
  fills at least one place per prefix, and the level above guarantees enough room).

  Returns the indices of the items that moved.
  """
  k = tree.layout.codebook_size
  codes = tree.full(space)  # [n, L]
  prefix = row_ids(codes[:, :level], k)  # [n]
  cell = prefix * k + codes[:, level]  # [n]
  _, cell_inv, cell_counts = np.unique(cell, return_inverse=True, return_counts=True)
  cand = np.flatnonzero(cell_counts[cell_inv.reshape(-1)] > capacity)
  if cand.size == 0:
    return cand
  book = tree.codebook(space, level)
  d_cand = _sq_dist(tree.residual(cand, space, level), book)  # [c, K]
  d_own = d_cand[np.arange(cand.size), codes[cand, level]]
  order = np.lexsort((d_own, cell[cand]))
  rank = _run_ranks(cell[cand][order])
  movers_pos = order[rank >= capacity]  # positions in cand
  movers = cand[movers_pos]
  dist = d_cand[movers_pos]  # [m, K]
  # Free places per (prefix of a mover, code), counting every item that stays.
  groups, g_of_mover = np.unique(prefix[movers], return_inverse=True)
  g_of_mover = g_of_mover.reshape(-1)
  in_groups = np.flatnonzero(np.isin(prefix, groups))
  g_local = np.searchsorted(groups, prefix[in_groups])
  occupied = np.bincount(g_local * k + codes[in_groups, level], minlength=groups.size * k)
  occupied -= np.bincount(g_of_mover * k + codes[movers, level], minlength=groups.size * k)
  spare = np.minimum(capacity, np.iinfo(np.int64).max) - occupied  # [groups * K]
  new_codes = np.empty(movers.size, np.int64)
  active = np.arange(movers.size)
  while active.size:
    cand_d = np.where(spare.reshape(groups.size, k)[g_of_mover[active]] > 0, dist[active], np.inf)
    choice = np.argmin(cand_d, axis=1)  # [a]
    if not np.isfinite(cand_d[np.arange(active.size), choice]).all():
      raise RuntimeError("no free code left in a prefix; the level above is over capacity")
    keys = g_of_mover[active] * k + choice
    order = np.lexsort((cand_d[np.arange(active.size), choice], keys))
    rank = _run_ranks(keys[order])
    accept = rank < spare[keys[order]]
    taken = order[accept]
    new_codes[active[taken]] = choice[taken]
    spare -= np.bincount(keys[taken], minlength=spare.size)
    active = active[order[~accept]]
  tree.set_codes(movers, space, level, new_codes)
  tree.requantize_below(movers, space, level)
  return movers


def _deduplicate(tree: _CodeTree) -> None:
  """Final step: top-down capacity rebalancing that ends with unique IDs in every space."""
  lay = tree.layout
  k, m, length = lay.codebook_size, lay.shared_levels, tree.length
  n = tree.r0.shape[0]
  if n > k ** lay.specific_levels * k ** m:
    raise ValueError(f"catalogue of {n} items exceeds the identifier capacity "
                     f"{k}^{length} = {k ** length}; use more levels or a larger codebook")
  cap = lambda levels_below: min(k ** levels_below, n + 1)
  for level in range(m):  # shared: each subtree must fit both spaces' specific levels
    _rebalance_level(tree, lay.spaces[0], level, cap(length - 1 - level))
  for space in lay.spaces:
    for level in range(m, length):
      _rebalance_level(tree, space, level, cap(length - 1 - level))


def code_usage(codes: np.ndarray, k: int) -> Dict[str, Any]:
  """Codes used, perplexity exp(entropy) of the code distribution (k = perfectly even), counts."""
  counts = np.bincount(codes, minlength=k)
  p = counts[counts > 0] / codes.size
  return {"codes_used": int((counts > 0).sum()),
          "perplexity": float(np.exp(-np.sum(p * np.log(p)))), "counts": counts.tolist()}


def assign_identifiers(state: rqvae_lib.TrainedRQVAE, semantic: Optional[np.ndarray],
                       collaborative: Optional[np.ndarray],
                       config: Optional[rqvae_config_lib.RQVAEConfig] = None
                       ) -> IdentifierAssignment:
  """Assigns every item a unique SID and a unique CID (see module docstring).

  Args:
    state: what `train_rqvae` returned (its kept params are used).
    semantic, collaborative: the embedding tables (row i = item i); None where the mode
      does not use one.
    config: settings for the collision phases (rounds, Sinkhorn); must describe the same
      architecture as the trained model. Defaults to the model's own config.
  """
  config = state.config if config is None else config
  lay = config.layout()
  if lay != state.config.layout() or tuple(config.hidden_dims) != tuple(state.config.hidden_dims):
    raise ValueError(f"config describes another model than the trained one: {lay} vs "
                     f"{state.config.layout()}")
  tables = rqvae_config_lib.validate_embeddings(semantic, collaborative, config)
  if tuple(t.shape[1] for t in tables) != tuple(state.input_dims):
    raise ValueError(f"embedding widths {[t.shape[1] for t in tables]} differ from the "
                     f"trained model's {list(state.input_dims)}")
  timings = {}
  t0 = time.perf_counter()
  r0, shared, specific = rqvae_lib.encode_and_quantize(state, tables)
  n = r0.shape[0]
  params = state.params["params"]
  tree = _CodeTree(
      lay, r0.astype(np.float32),
      shared if shared is not None else np.zeros((n, 0), np.int64), specific,
      np.asarray(params["shared_codebook"]) if lay.shared_levels else None,
      {s: np.asarray(params["specific_codebook"][i]) for i, s in enumerate(lay.spaces)})
  timings["encode_s"] = time.perf_counter() - t0
  phases = {s: {"argmin": _collision_stats(tree.full(s))} for s in lay.spaces}

  t0 = time.perf_counter()
  rounds = {s: _sinkhorn_rounds(tree, s, config) for s in lay.spaces}
  for s in lay.spaces:
    phases[s]["sinkhorn"] = _collision_stats(tree.full(s))
  timings["sinkhorn_s"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  before = {s: tree.full(s) for s in lay.spaces}
  _deduplicate(tree)
  moved = {s: int(np.any(tree.full(s) != before[s], axis=1).sum()) for s in lay.spaces}
  moved_any = np.zeros(n, bool)
  for s in lay.spaces:
    moved_any |= np.any(tree.full(s) != before[s], axis=1)
    phases[s]["final"] = _collision_stats(tree.full(s))
    if phases[s]["final"]["colliding_items"]:
      raise RuntimeError(f"internal error: {s} IDs still collide after de-duplication")
  timings["dedup_s"] = time.perf_counter() - t0

  name = {rqvae_config_lib.SEMANTIC: "sid", rqvae_config_lib.COLLABORATIVE: "cid"}
  full = {name[s]: tree.full(s).astype(np.int32) for s in lay.spaces}
  levels = {name[s]: lay.level_names(s) for s in lay.spaces}
  usage = {}
  for s in lay.spaces:
    for j, level_name in enumerate(lay.level_names(s)):
      usage.setdefault(level_name, code_usage(full[name[s]][:, j], lay.codebook_size))
  # Share of items whose SID and CID start with the same tokens (the first L_m, or the first
  # one without shared levels): 1.0 in dual mode by construction, 0.0 in dual_no_shared
  # (different token spaces), None when the mode has only one space.
  prefix_share = None
  if "sid" in full and "cid" in full:
    p = max(lay.shared_levels, 1)
    same_tokens = levels["sid"][:p] == levels["cid"][:p]
    prefix_share = float(np.mean(np.all(full["sid"][:, :p] == full["cid"][:, :p], axis=1))
                         ) if same_tokens else 0.0
  stats = {
      "mode": config.mode,
      "num_items": n,
      "codebook_size": lay.codebook_size,
      "shared_levels": lay.shared_levels,
      "specific_levels": lay.specific_levels,
      "sid_levels": list(levels.get("sid", ())),
      "cid_levels": list(levels.get("cid", ())),
      "collisions": {name[s]: phases[s] for s in lay.spaces},
      "sinkhorn_rounds_used": {name[s]: len(rounds[s]) for s in lay.spaces},
      # Separable colliding items entering each Sinkhorn round.
      "sinkhorn_round_items": {name[s]: rounds[s] for s in lay.spaces},
      "dedup_moved_items": {**{name[s]: moved[s] for s in lay.spaces},
                            "total": int(moved_any.sum())},
      "code_usage": usage,
      "sid_cid_shared_prefix_share": prefix_share,
      "rqvae_best_epoch": state.best_epoch,
      "rqvae_best_collision_rate": (state.best_collision_rate
                                    if np.isfinite(state.best_collision_rate) else None),
      "timings_s": timings,
  }
  return IdentifierAssignment(
      mode=config.mode, sid_codes=full.get("sid"), cid_codes=full.get("cid"),
      sid_levels=tuple(levels.get("sid", ())), cid_levels=tuple(levels.get("cid", ())),
      codebook_size=lay.codebook_size, stats=stats, latents=tree.r0)
