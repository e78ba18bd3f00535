"""Identifier trie as plain arrays, so constrained decoding is table lookups on device.

A trie over identifier sequences ([n, L] int32; behaviour token, codes, EOS) is stored level
by level, in the spirit of STATIC (arXiv 2602.22647): states at depth d are the distinct
length-d prefixes, numbered 0..S_d-1 in sorted order. Level d holds the edges from depth-d
states to depth-(d+1) states as one of

- dense: `codes` [C] (the vocabulary tokens seen at position d, i.e. the level's small local
  code range) and `next_state` [S_d, C] (-1 where no edge). One gather gives every child. Good
  for the first levels, which have few states and nearly full fan-out.
- CSR: `row_ptr` [S_d + 1] and per edge `local` [E_d], the edge's index into the level's
  sorted token table `codes` [C]. Edges are sorted by (state, token), which is the order of
  the depth-(d+1) states themselves, so edge e *is* child state e and no next-state array
  is stored. `local` is uint8 when the level has at most 256 tokens (every code level of a
  256-entry codebook), so an edge costs one byte.
- unary: every state has exactly one child (the EOS after the last code, and any level
  without branching): `local` [S_d] alone; child state = parent state, and the sentinel
  `len(codes) - 1` marks a padding state with no child. No row pointers.

The depth-L states are the leaves; `leaf_items` maps each to the row of the input it came from.
At 1M SIDs + 1M CIDs of 4 levels x 256 codes this is about 11 bytes per identifier.

Every array carries a leading "trie batch" dim: 1 for one shared (catalogue) trie, or the
example batch for per-example candidate tries (see candidate_tries.py). Lookups take the level
(a Python int for level_candidates, at that level's own width; traced for step_candidates, at
the widest level's) and a per-beam state, and cost O(batch * beams * branch) gathers whatever
the catalogue size, with no host round trip.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gensar_jax.errors import GensarError

Array = Union[jax.Array, np.ndarray]


class TrieBuildError(GensarError):
  """Raised for identifier sequences that cannot form a trie (duplicates, bad shapes)."""


@struct.dataclass
class DenseLevel:
  codes: Array        # [trie_batch, codes] vocabulary token of each local code
  next_state: Array   # [trie_batch, states, codes] child state, -1 where there is no edge


@struct.dataclass
class CsrLevel:
  row_ptr: Array      # [trie_batch, states + 1] edge range of each state
  codes: Array        # [trie_batch, codes] vocabulary token of each local code, sorted
  local: Array        # [trie_batch, edges] local code of each edge; edge e leads to state e


@struct.dataclass
class UnaryLevel:
  codes: Array        # [trie_batch, codes + 1] vocabulary token per local code; last: sentinel
  local: Array        # [trie_batch, states] local code of each state's only child


def level_kind(level) -> str:
  """"dense", "csr" or "unary": how a level is stored (the artifact records it)."""
  return {DenseLevel: "dense", CsrLevel: "csr", UnaryLevel: "unary"}[type(level)]


LEVEL_TYPES = {"dense": DenseLevel, "csr": CsrLevel, "unary": UnaryLevel}


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
      if isinstance(level, DenseLevel):
        total += int((np.asarray(level.next_state) >= 0).sum())
      elif isinstance(level, CsrLevel):
        total += int(np.asarray(level.row_ptr)[:, -1].sum())
      else:
        local = np.asarray(level.local)
        total += int((local != np.asarray(level.codes).shape[-1] - 1).sum())
    return total

  def nbytes(self) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(self)))

  def bytes_per_edge(self) -> float:
    return self.nbytes() / max(self.num_edges(), 1)


# ----------------------------------------------------------------------------- build (host)


@dataclasses.dataclass
class _LevelEdges:
  parent: np.ndarray   # [edges] depth-d state
  local: np.ndarray    # [edges] index of the edge's token in `codes`
  codes: np.ndarray    # [C] the level's distinct tokens, sorted
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


def _local_codes(column: np.ndarray):
  """(sorted distinct tokens of a column, each row's index among them), in O(n)."""
  present = np.zeros(int(column.max()) + 1, bool)
  present[column] = True
  codes = np.flatnonzero(present).astype(np.int32)      # [C]
  rank = np.cumsum(present) - 1                        # token -> local code
  return codes, rank[column]


def _sort_rows(sequences: np.ndarray, max_bits: int = 63):
  """(row order, [n - 1, L] whether each sorted row differs from the previous one in the
  first d+1 tokens, per position (distinct tokens, each row's local code)).

  Rows are packed into one int64 key of their local codes when the codes fit in `max_bits`
  (a 4 x 256 identifier takes 35): one argsort instead of a lexsort over L columns."""
  n, length = sequences.shape
  columns = [_local_codes(sequences[:, d]) for d in range(length)]
  bits = [int(len(codes) - 1).bit_length() for codes, _ in columns]
  if sum(bits) > max_bits:  # a very wide vocabulary per level: sort the columns themselves
    order = np.lexsort(sequences.T[::-1])
    ordered = sequences[order]
    return order, np.logical_or.accumulate(ordered[1:] != ordered[:-1], axis=1), columns
  key = np.zeros(n, np.int64)
  for (_, local), b in zip(columns, bits):
    key = (key << b) | local
  order = np.argsort(key)  # keys are unique unless the rows are (an error below)
  key = key[order]
  rest = np.cumsum(bits[::-1])[::-1]                   # bits of positions d.. L-1
  new_prefix = np.empty((max(n - 1, 0), length), bool)
  for d in range(length):
    shift = int(rest[d + 1]) if d + 1 < length else 0  # drop positions after d
    prefix = key >> shift
    new_prefix[:, d] = prefix[1:] != prefix[:-1]
  return order, new_prefix, columns


def _sorted_level_edges(sequences: np.ndarray, what: str):
  """Sorts the IDs and numbers every prefix; returns per-level edges and leaf -> item."""
  n, length = sequences.shape
  order, new_prefix, columns = _sort_rows(sequences)  # [n], [n - 1, length]
  duplicate = ~new_prefix[:, -1]
  if duplicate.any():
    pairs = np.nonzero(duplicate)[0][:5]
    examples = ", ".join(f"items {order[i]} and {order[i + 1]}" for i in pairs)
    raise TrieBuildError(f"{what}: {int(duplicate.sum())} duplicate identifier sequence(s), "
                         f"e.g. {examples} (sequence {sequences[order[pairs[0]]].tolist()})")
  levels = []
  parent_state = np.zeros(n, np.int64)             # depth-0: the root for every row
  num_parents = 1
  for d in range(length):
    # A row opens a depth-(d+1) state if it differs from the previous row in any of the
    # first d+1 tokens.
    starts = np.concatenate([[True], new_prefix[:, d]])   # [n]
    child_state = np.cumsum(starts) - 1                     # [n]
    first = np.nonzero(starts)[0]
    codes, local = columns[d]
    levels.append(_LevelEdges(parent=parent_state[first], local=local[order[first]],
                              codes=codes, child=child_state[first], num_parents=num_parents,
                              num_children=int(child_state[-1]) + 1))
    parent_state, num_parents = child_state, int(child_state[-1]) + 1
  leaf_items = order.astype(np.int32)  # leaves are the sorted rows, one per item
  return levels, leaf_items


def _dense_level(edges: _LevelEdges, num_states: int, num_codes: int):
  table = np.full((num_states, num_codes), -1, np.int32)   # [states, C]
  table[edges.parent, edges.local] = edges.child
  codes = np.pad(edges.codes, (0, num_codes - len(edges.codes)), constant_values=0)
  return DenseLevel(codes=codes, next_state=table)


def _local_dtype(num_codes: int):
  return np.uint8 if num_codes <= 256 else np.uint16 if num_codes <= 65536 else np.int32


def _csr_level(edges: _LevelEdges, num_states: int, num_edges: int, num_codes: int):
  counts = np.bincount(edges.parent, minlength=num_states)  # [states]
  row_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
  if len(row_ptr) < num_states + 1:
    row_ptr = np.pad(row_ptr, (0, num_states + 1 - len(row_ptr)), mode="edge")
  codes = np.pad(edges.codes, (0, num_codes - len(edges.codes)), constant_values=0)
  local = np.pad(edges.local.astype(_local_dtype(num_codes)),
                 (0, num_edges - len(edges.local)), constant_values=0)
  return CsrLevel(row_ptr=row_ptr, codes=codes, local=local)


def _unary_level(edges: _LevelEdges):
  codes = np.append(edges.codes, 0).astype(np.int32)  # the sentinel slot: no child
  return UnaryLevel(codes=codes, local=edges.local.astype(_local_dtype(len(codes))))


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
    num_codes = len(edges.codes)
    if pad_codes is not None:
      if pad_codes < num_codes:
        raise TrieBuildError(f"{what}: pad_codes {pad_codes} < {num_codes} codes at level {d}")
      num_codes = pad_codes
    if d < num_dense_levels:
      level = _dense_level(edges, states[d], num_codes)
      branch = max(branch, level.codes.shape[0])  # a dense lookup yields the whole code range
    elif pad_states is None and branch == 1 and len(edges.local) == edges.num_parents:
      level = _unary_level(edges)  # one child per state (only unpadded tries: padded ones
                                   # are stacked, so every trie must choose the same kinds)
    else:
      level = _csr_level(edges, states[d], states[d + 1], num_codes)
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
    try:
      host = np.asarray(level.codes)
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
  elif isinstance(level, UnaryLevel):
    local = level.local[state][..., None].astype(jnp.int32)  # [..., 1]
    tokens = level.codes[local]                             # [..., 1]
    nxt = jnp.where(local < level.codes.shape[0] - 1, state[..., None], -1)
  else:
    start = level.row_ptr[state]                            # [...]
    end = level.row_ptr[state + 1]                          # [...]
    offsets = start[..., None] + jnp.arange(max_branch)     # [..., branch]
    inside = offsets < end[..., None]
    offsets = jnp.minimum(offsets, level.local.shape[0] - 1)
    tokens = level.codes[level.local[offsets].astype(jnp.int32)]
    nxt = jnp.where(inside, offsets, -1)                    # edge e leads to state e
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


def level_candidates(trie: TrieArrays, level: int, state: jax.Array):
  """Children of each beam at one level fixed at trace time, at that level's own width.

  Unlike step_candidates (one traced step, every level padded to the widest), the result is
  only max_branch[level] wide: at STATIC's serving shape the last levels have a handful of
  children per state, not the 256 of the widest level, so the top-k that follows is small.

  Args:
    trie: shared (trie batch 1) or per-example (trie batch == batch) trie.
    level: the identifier position being generated (a Python int).
    state: [batch, beams] int32 depth-`level` state of each beam.
  Returns:
    tokens, next_state, valid: each [batch, beams, trie.max_branch[level]].
  """
  branch = trie.max_branch[level]

  def fn(pieces, state_b):
    levels, _ = pieces
    return _level_candidates(levels[level], branch, branch, state_b)

  return _per_trie(trie, fn, state)


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


def allowed_token_mask(trie: TrieArrays, step: int | jax.Array, state: jax.Array,
                       vocab_size: int) -> jax.Array:
  """[batch, beams, vocab] bool: tokens that keep each beam inside the trie.

  With a Python int `step`, only that level's max_branch candidates per beam are scattered
  (level_candidates); with a traced one, every level's width (step_candidates). Either way the
  cost is beams x branch lookups plus one vocab-sized write, whatever the catalogue size.
  Constrained beam search never builds this mask (it ranks the candidates directly); it is
  for callers that want to mask logits themselves.
  """
  if isinstance(step, (int, np.integer)):
    return _level_mask(trie, int(step), state, vocab_size)
  return _step_mask(trie, step, state, vocab_size)


def _scatter_mask(tokens: jax.Array, valid: jax.Array, vocab_size: int) -> jax.Array:
  """[batch, beams, vocab] bool, True at the valid tokens ([batch, beams, width] each).

  Invalid slots point past the vocabulary and are dropped, so the mask is written as bool
  directly (no int32 scatter-max and conversion: a third of the time at 8k tokens)."""
  batch, beams, _ = tokens.shape
  b = jnp.arange(batch)[:, None, None]
  k = jnp.arange(beams)[None, :, None]
  index = jnp.where(valid, tokens, vocab_size)                           # [batch, beams, width]
  mask = jnp.zeros((batch, beams, vocab_size), bool)
  return mask.at[b, k, index].set(True, mode="drop")


@functools.partial(jax.jit, static_argnames=("level", "vocab_size"))
def _level_mask(trie: TrieArrays, level: int, state: jax.Array, vocab_size: int) -> jax.Array:
  tokens, _, valid = level_candidates(trie, level, state)                # [batch, beams, branch]
  return _scatter_mask(tokens, valid, vocab_size)


@functools.partial(jax.jit, static_argnames="vocab_size")
def _step_mask(trie: TrieArrays, step: jax.Array, state: jax.Array, vocab_size: int) -> jax.Array:
  tokens, _, valid = step_candidates(trie, step, state)                  # [batch, beams, width]
  return _scatter_mask(tokens, valid, vocab_size)


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
