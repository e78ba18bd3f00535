"""Identifier trie as plain arrays, so constrained decoding is table lookups on device.

A trie over identifier sequences ([n, L] int32; behaviour token, codes, EOS) is stored level
by level, in the spirit of STATIC (arXiv 2602.22647): states at depth d are the distinct
length-d prefixes, numbered 0..S_d-1 in sorted order. Level d holds the edges from depth-d
states to depth-(d+1) states, either

- dense: `codes` [C] (the vocabulary tokens seen at position d, i.e. the level's small local
  code range) and `next_state` [S_d, C] (-1 where no edge). One gather gives every child. Good
  for the first levels, which have few states and nearly full fan-out.
- CSR: `row_ptr` [S_d + 1] and edge arrays `tokens`/`next_state` [E_d] sorted by (state,
  token). A state's children are the slice row_ptr[s]:row_ptr[s+1]. Good for the deep,
  sparse levels, where a dense table would be mostly -1.

The depth-L states are the leaves; `leaf_items` maps each to the row of the input it came from.

Every array carries a leading "trie batch" dim: 1 for one shared (catalogue) trie, or the
example batch for per-example candidate tries (see candidate_tries.py). Lookups take a traced
step (the level) and a per-beam state, and cost O(batch * beams * branch) gathers whatever the
catalogue size, with no host round trip.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = Union[jax.Array, np.ndarray]


class TrieBuildError(ValueError):
  """Raised for identifier sequences that cannot form a trie (duplicates, bad shapes)."""


@struct.dataclass
class DenseLevel:
  codes: Array        # [trie_batch, codes] vocabulary token of each local code
  next_state: Array   # [trie_batch, states, codes] child state, -1 where there is no edge


@struct.dataclass
class CsrLevel:
  row_ptr: Array      # [trie_batch, states + 1] edge range of each state
  tokens: Array       # [trie_batch, edges] vocabulary token of each edge
  next_state: Array   # [trie_batch, edges] child state of each edge (-1 for padding)


@struct.dataclass
class TrieArrays:
  """The trie as a pytree of arrays; `max_branch` (static) sizes the per-state lookups."""
  levels: tuple           # one DenseLevel or CsrLevel per position of the identifier
  leaf_items: Array       # [trie_batch, leaves] item index of each leaf (-1 for padding)
  max_branch: tuple = struct.field(pytree_node=False)  # per level: most children of a state

  @property
  def num_levels(self) -> int:
    return len(self.levels)

  @property
  def trie_batch(self) -> int:
    return int(self.leaf_items.shape[0])

  @property
  def width(self) -> int:
    """Candidates per beam per step: the widest level (every level is padded to it)."""
    return max(self.max_branch)

  def num_edges(self) -> int:
    """Real edges (non-root states) summed over the trie batch."""
    total = 0
    for level in self.levels:
      nxt = np.asarray(level.next_state)
      total += int((nxt >= 0).sum())
    return total

  def nbytes(self) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(self)))

  def bytes_per_edge(self) -> float:
    return self.nbytes() / max(self.num_edges(), 1)


# ----------------------------------------------------------------------------- build (host)


@dataclasses.dataclass
class _LevelEdges:
  parent: np.ndarray   # [edges] depth-d state
  token: np.ndarray    # [edges]
  child: np.ndarray    # [edges] depth-(d+1) state
  num_parents: int
  num_children: int


def _check_sequences(sequences: np.ndarray, what: str) -> np.ndarray:
  sequences = np.asarray(sequences)
  if sequences.ndim != 2:
    raise TrieBuildError(f"{what}: expected [items, length] token ids, got shape {sequences.shape}")
  if sequences.shape[0] == 0 or sequences.shape[1] == 0:
    raise TrieBuildError(f"{what}: empty identifier set, shape {sequences.shape}")
  if not np.issubdtype(sequences.dtype, np.integer):
    raise TrieBuildError(f"{what}: token ids must be integers, got {sequences.dtype}")
  if sequences.min() < 0:
    row, col = np.argwhere(sequences < 0)[0]
    raise TrieBuildError(f"{what}: negative token id {sequences[row, col]} at item {row}, "
                         f"position {col}")
  return sequences.astype(np.int32)


def _sorted_level_edges(sequences: np.ndarray, what: str):
  """Sorts the IDs and numbers every prefix; returns per-level edges and leaf -> item."""
  n, length = sequences.shape
  order = np.lexsort(sequences.T[::-1])           # [n] rows in lexicographic order
  ordered = sequences[order]                       # [n, length]
  differs = ordered[1:] != ordered[:-1]            # [n - 1, length]
  # A row starts a new depth-d prefix if it differs from the previous row in any of the
  # first d tokens: a running OR over positions.
  new_prefix = np.logical_or.accumulate(differs, axis=1)  # [n - 1, length]
  duplicate = ~new_prefix[:, -1]
  if duplicate.any():
    pairs = np.nonzero(duplicate)[0][:5]
    examples = ", ".join(f"items {order[i]} and {order[i + 1]}" for i in pairs)
    raise TrieBuildError(f"{what}: {int(duplicate.sum())} duplicate identifier sequence(s), "
                         f"e.g. {examples} (sequence {ordered[pairs[0] + 1].tolist()})")
  levels = []
  parent_state = np.zeros(n, np.int64)             # depth-0: the root for every row
  num_parents = 1
  for d in range(length):
    starts = np.concatenate([[True], new_prefix[:, d]])   # [n] row opens a depth-(d+1) state
    child_state = np.cumsum(starts) - 1                     # [n]
    first = np.nonzero(starts)[0]
    levels.append(_LevelEdges(parent=parent_state[first], token=ordered[first, d],
                              child=child_state[first], num_parents=num_parents,
                              num_children=int(child_state[-1]) + 1))
    parent_state, num_parents = child_state, int(child_state[-1]) + 1
  leaf_items = order.astype(np.int32)  # leaves are the sorted rows, one per item
  return levels, leaf_items


def _dense_level(edges: _LevelEdges, num_states: int, num_codes: int | None):
  codes = np.unique(edges.token).astype(np.int32)          # [C] sorted
  width = len(codes) if num_codes is None else num_codes
  table = np.full((num_states, width), -1, np.int32)       # [states, C]
  table[edges.parent, np.searchsorted(codes, edges.token)] = edges.child
  codes = np.pad(codes, (0, width - len(codes)), constant_values=0)
  return DenseLevel(codes=codes, next_state=table)


def _csr_level(edges: _LevelEdges, num_states: int, num_edges: int | None):
  counts = np.bincount(edges.parent, minlength=num_states)  # [states]
  row_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
  if len(row_ptr) < num_states + 1:
    row_ptr = np.pad(row_ptr, (0, num_states + 1 - len(row_ptr)), mode="edge")
  width = len(edges.token) if num_edges is None else num_edges
  pad = width - len(edges.token)
  tokens = np.pad(edges.token.astype(np.int32), (0, pad), constant_values=0)
  nxt = np.pad(edges.child.astype(np.int32), (0, pad), constant_values=-1)
  return CsrLevel(row_ptr=row_ptr, tokens=tokens, next_state=nxt)


def build_trie_numpy(sequences: np.ndarray, num_dense_levels: int = 2, *,
                     pad_states: Sequence[int] | None = None,
                     pad_codes: int | None = None,
                     pad_branch: int | None = None,
                     what: str = "identifiers") -> TrieArrays:
  """Builds one trie (trie batch 1) with NumPy arrays; `pad_*` fix shapes for batching.

  pad_states[d] pads the depth-d state count (and, for CSR levels, the edge count, since
  edges into depth d+1 number S_{d+1}); pad_codes pads dense code ranges; pad_branch the
  static per-state width. Without them, shapes are exactly the trie's own.
  """
  sequences = _check_sequences(sequences, what)
  length = sequences.shape[1]
  level_edges, leaf_items = _sorted_level_edges(sequences, what)
  states = [1] + [e.num_children for e in level_edges]     # per depth 0..L
  if pad_states is not None:
    if len(pad_states) != length + 1 or any(p < s for p, s in zip(pad_states, states)):
      raise TrieBuildError(f"{what}: pad_states {list(pad_states)} smaller than the trie's "
                           f"state counts {states}")
    states = list(pad_states)
  levels, max_branch = [], []
  for d, edges in enumerate(level_edges):
    branch = int(np.bincount(edges.parent).max())
    if pad_branch is not None:
      if pad_branch < branch:
        raise TrieBuildError(f"{what}: pad_branch {pad_branch} < {branch} children at level {d}")
      branch = pad_branch
    if d < num_dense_levels:
      num_codes = len(np.unique(edges.token))
      if pad_codes is not None:
        if pad_codes < num_codes:
          raise TrieBuildError(f"{what}: pad_codes {pad_codes} < {num_codes} codes at level {d}")
        num_codes = pad_codes
      level = _dense_level(edges, states[d], num_codes)
      branch = max(branch, level.codes.shape[0])  # a dense lookup yields the whole code range
    else:
      level = _csr_level(edges, states[d], states[d + 1])
    levels.append(level)
    max_branch.append(branch)
  leaves = np.pad(leaf_items, (0, states[-1] - len(leaf_items)), constant_values=-1)
  trie = TrieArrays(levels=tuple(levels), leaf_items=leaves, max_branch=tuple(max_branch))
  return jax.tree.map(lambda x: np.asarray(x)[None], trie)  # add the trie batch dim


def build_trie(sequences: np.ndarray, num_dense_levels: int = 2,
               what: str = "identifiers") -> TrieArrays:
  """Catalogue trie over all `sequences` ([items, L]); leaf -> row index in `sequences`.

  For serving, pass the union of SIDs and CIDs (each row starts with its behaviour token);
  row i of the input is item index i of the result.
  """
  return build_trie_numpy(sequences, num_dense_levels, what=what)


def stack_tries(tries: Sequence[TrieArrays]) -> TrieArrays:
  """Stacks equal-shape tries (trie batch 1 each) into one with trie batch len(tries)."""
  first = jax.tree.structure(tries[0])
  for i, t in enumerate(tries):
    if jax.tree.structure(t) != first:
      raise TrieBuildError(f"trie {i} has a different level layout from trie 0")
  return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs], axis=0), *tries)


def max_token(trie: TrieArrays) -> int | None:
  """Largest token id any level can emit, or None when the arrays are traced."""
  largest = 0
  for level in trie.levels:
    tokens = level.codes if isinstance(level, DenseLevel) else level.tokens
    try:
      host = np.asarray(tokens)
    except jax.errors.TracerArrayConversionError:
      return None
    largest = max(largest, int(host.max(initial=0)))
  return largest


# ----------------------------------------------------------------------------- lookups (device)


def _level_candidates(level, max_branch: int, width: int, state: jax.Array):
  """Children of `state` (any shape [...]) in one trie: tokens, next states, valid, [..., width]."""
  state = jnp.maximum(state, 0)  # dead beams carry -1; their score already rules them out
  if isinstance(level, DenseLevel):
    nxt = level.next_state[state]                           # [..., codes]
    tokens = jnp.broadcast_to(level.codes, nxt.shape)       # [..., codes]
  else:
    start = level.row_ptr[state]                            # [...]
    end = level.row_ptr[state + 1]                          # [...]
    offsets = start[..., None] + jnp.arange(max_branch)     # [..., branch]
    inside = offsets < end[..., None]
    offsets = jnp.minimum(offsets, level.tokens.shape[0] - 1)
    tokens = level.tokens[offsets]
    nxt = jnp.where(inside, level.next_state[offsets], -1)
  pad = width - nxt.shape[-1]
  if pad:
    widen = [(0, 0)] * (nxt.ndim - 1) + [(0, pad)]
    nxt = jnp.pad(nxt, widen, constant_values=-1)
    tokens = jnp.pad(tokens, widen, constant_values=0)
  return tokens.astype(jnp.int32), nxt.astype(jnp.int32), nxt >= 0


def _per_trie(trie: TrieArrays, fn, state: jax.Array, *extra):
  """Applies `fn(unbatched trie pieces, state[b], ...)` for a shared or per-example trie."""
  pieces = jax.tree.map(jnp.asarray, (trie.levels, trie.leaf_items))  # host arrays welcome
  if trie.trie_batch == 1:
    return fn(jax.tree.map(lambda x: x[0], pieces), state, *extra)
  if trie.trie_batch != state.shape[0]:
    raise ValueError(f"per-example trie batch {trie.trie_batch} != decode batch {state.shape[0]}")
  return jax.vmap(fn)(pieces, state, *extra)


@jax.jit
def step_candidates(trie: TrieArrays, step: jax.Array, state: jax.Array):
  """Allowed continuations of each beam at decode position `step` (traced ok).

  Jitted so that eager callers compile the per-level switch once per trie layout.

  Args:
    trie: shared (trie batch 1) or per-example (trie batch == batch) trie.
    step: int32 scalar, the identifier position being generated.
    state: [batch, beams] int32 depth-`step` state of each beam.
  Returns:
    tokens, next_state, valid: each [batch, beams, trie.width].
  """
  width = trie.width

  def fn(pieces, state_b):
    levels, _ = pieces
    branches = [
        (lambda s, lvl=lvl, mb=mb: _level_candidates(lvl, mb, width, s))
        for lvl, mb in zip(levels, trie.max_branch)
    ]
    index = jnp.clip(step, 0, len(branches) - 1)
    return jax.lax.switch(index, branches, state_b)

  return _per_trie(trie, fn, state)


@functools.partial(jax.jit, static_argnames="vocab_size")
def allowed_token_mask(trie: TrieArrays, step: jax.Array, state: jax.Array,
                       vocab_size: int) -> jax.Array:
  """[batch, beams, vocab] bool: tokens that keep each beam inside the trie."""
  tokens, _, valid = step_candidates(trie, step, state)   # [batch, beams, width]
  batch, beams, _ = tokens.shape
  mask = jnp.zeros((batch, beams, vocab_size), jnp.int32)
  b = jnp.arange(batch)[:, None, None]
  k = jnp.arange(beams)[None, :, None]
  mask = mask.at[b, k, tokens].max(valid.astype(jnp.int32))  # max: padding never clears a hit
  return mask.astype(bool)


@jax.jit
def next_state(trie: TrieArrays, step: jax.Array, state: jax.Array,
               token: jax.Array) -> jax.Array:
  """[batch, beams] state after `token` [batch, beams]; -1 where the token is not allowed."""
  tokens, nxt, valid = step_candidates(trie, step, state)
  hit = valid & (tokens == token[..., None])                 # [batch, beams, width]
  return jnp.max(jnp.where(hit, nxt, -1), axis=-1)


@jax.jit
def leaf_items(trie: TrieArrays, state: jax.Array) -> jax.Array:
  """[batch, beams] item index of each depth-L state (-1 for state -1 or padding)."""

  def fn(pieces, state_b):
    _, leaves = pieces
    return jnp.where(state_b >= 0, leaves[jnp.maximum(state_b, 0)], -1)

  return _per_trie(trie, fn, state)


@jax.jit
def contains(trie: TrieArrays, sequences: jax.Array) -> jax.Array:
  """[batch, n] bool: whether each sequence ([batch, n, L]) is a full path of the trie."""
  batch, n, length = sequences.shape
  if length != trie.num_levels:
    raise ValueError(f"sequences have length {length}, trie has {trie.num_levels} levels")
  state = jnp.zeros((batch, n), jnp.int32)
  for d in range(length):
    state = jnp.where(state >= 0, next_state(trie, d, state, sequences[..., d]), -1)
  return state >= 0
