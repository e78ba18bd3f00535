"""Identifier trie: membership, rejection, dense/CSR agreement, padding, size."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gensar_jax.decoding import candidate_tries, trie as trie_lib

SRC_ITEM, REC_ITEM, EOS = 5, 6, 1


def random_identifiers(rng, n, codes=8, code_base=10, behaviour=(SRC_ITEM, REC_ITEM),
                       shared_prefix_fraction=0.5):
  """[n, 6] unique IDs; many share 3 of 4 codes with another ID (long shared prefixes)."""
  seen, rows = set(), []
  while len(rows) < n:
    if rows and rng.random() < shared_prefix_fraction:
      row = list(rows[rng.integers(len(rows))])
      row[4] = code_base + 3 * codes + int(rng.integers(codes))    # change only the last code
    else:
      row = [int(rng.choice(behaviour))] + [code_base + level * codes + int(rng.integers(codes))
                                            for level in range(4)] + [EOS]
    if tuple(row) not in seen:
      seen.add(tuple(row))
      rows.append(row)
  return np.array(rows, np.int32)


def walk(trie, sequences):
  """Follows each sequence [1, n, L] through the trie; returns final states [1, n]."""
  state = jnp.zeros(sequences.shape[:2], jnp.int32)
  for d in range(sequences.shape[-1]):
    state = jnp.where(state >= 0,
                      trie_lib.next_state(trie, jnp.int32(d), state, sequences[..., d]), -1)
  return state


@pytest.mark.parametrize("num_dense_levels", [0, 2, 6])
def test_members_found_and_leaves_name_their_rows(num_dense_levels):
  seqs = random_identifiers(np.random.default_rng(0), 300)
  trie = trie_lib.build_trie(seqs, num_dense_levels)
  assert np.asarray(trie_lib.contains(trie, jnp.asarray(seqs)[None])).all()
  items = trie_lib.leaf_items(trie, walk(trie, jnp.asarray(seqs)[None]))
  np.testing.assert_array_equal(np.asarray(items)[0], np.arange(len(seqs)))


def test_non_members_rejected():
  rng = np.random.default_rng(1)
  seqs = random_identifiers(rng, 200)
  members = {tuple(r) for r in seqs.tolist()}
  probes = seqs.copy()
  position = rng.integers(0, 6, size=len(probes))
  probes[np.arange(len(probes)), position] += rng.integers(1, 4, size=len(probes))
  truth = np.array([tuple(r) in members for r in probes.tolist()])
  assert (~truth).sum() > 150
  for dense in (0, 2):
    got = np.asarray(trie_lib.contains(trie_lib.build_trie(seqs, dense), jnp.asarray(probes)[None]))
    np.testing.assert_array_equal(got[0], truth)
  # A prefix of a member is not a member.
  short = trie_lib.build_trie(seqs[:, :5], 2)
  assert np.asarray(trie_lib.contains(short, jnp.asarray(seqs[:, :5])[None])).all()


def test_dense_and_csr_give_the_same_masks_and_states():
  seqs = random_identifiers(np.random.default_rng(2), 250)
  dense = trie_lib.build_trie(seqs, num_dense_levels=6)
  csr = trie_lib.build_trie(seqs, num_dense_levels=0)
  vocab = 64
  prefixes = jnp.asarray(seqs)[None]                              # [1, n, L]
  state_dense = jnp.zeros((1, len(seqs)), jnp.int32)
  state_csr = state_dense
  for d in range(6):
    step = jnp.int32(d)
    mask_dense = trie_lib.allowed_token_mask(dense, step, state_dense, vocab)
    mask_csr = trie_lib.allowed_token_mask(csr, step, state_csr, vocab)
    np.testing.assert_array_equal(mask_dense, mask_csr)
    # The mask is exactly the set of next tokens of members sharing the prefix.
    for i in range(0, len(seqs), 37):
      expected = {int(t) for t in seqs[(seqs[:, :d] == seqs[i, :d]).all(1), d]}
      assert set(np.nonzero(np.asarray(mask_dense)[0, i])[0].tolist()) == expected
    state_dense = trie_lib.next_state(dense, step, state_dense, prefixes[..., d])
    state_csr = trie_lib.next_state(csr, step, state_csr, prefixes[..., d])
    np.testing.assert_array_equal(state_dense, state_csr)
    assert (np.asarray(state_dense) >= 0).all()


def test_duplicates_are_an_error_naming_the_items():
  seqs = random_identifiers(np.random.default_rng(3), 20)
  dup = np.concatenate([seqs, seqs[7:8]])
  with pytest.raises(trie_lib.TrieBuildError, match=r"items 7 and 20"):
    trie_lib.build_trie(dup)
  with pytest.raises(trie_lib.TrieBuildError, match=r"negative token id -3 at item 2"):
    bad = seqs.copy()
    bad[2, 3] = -3
    trie_lib.build_trie(bad)
  with pytest.raises(trie_lib.TrieBuildError, match=r"\[items, length\]"):
    trie_lib.build_trie(seqs[0])


def test_catalogue_trie_size_per_edge():
  rng = np.random.default_rng(4)
  n = 20000
  codes = rng.integers(0, 256, size=(n, 4)) + np.arange(4) * 256 + 10
  seqs = np.unique(np.concatenate([np.full((n, 1), SRC_ITEM), codes, np.full((n, 1), EOS)], 1),
                   axis=0).astype(np.int32)
  trie = trie_lib.build_trie(seqs, num_dense_levels=2)
  # Every non-root state is one edge: 1 (behaviour) + 256 + 20000-ish + ... + EOS edges.
  assert trie.num_edges() > 3 * len(seqs)
  kinds = [trie_lib.level_kind(level) for level in trie.levels]
  assert kinds == ["dense", "dense", "csr", "csr", "csr", "unary"]  # EOS: one child each
  assert all(level.local.dtype == np.uint8 for level in trie.levels[2:])
  # Below STATIC's 20.8 bytes per identifier (docs/benchmarks.md): one byte per edge, row
  # pointers of the branching levels and the leaf -> item table.
  bytes_per_id = trie.nbytes() / len(seqs)
  print(f"bytes per identifier: {bytes_per_id:.2f}, per edge {trie.bytes_per_edge():.2f}")
  assert bytes_per_id <= 16.0


def test_packed_sort_and_column_sort_agree():
  """Identifiers whose local codes fit 63 bits are sorted by one packed key; wider ones by
  a lexsort over the columns. Both must give the same row order and prefix boundaries."""
  seqs = random_identifiers(np.random.default_rng(6), 400)
  packed_order, packed_new, _ = trie_lib._sort_rows(seqs)
  column_order, column_new, _ = trie_lib._sort_rows(seqs, max_bits=0)
  np.testing.assert_array_equal(packed_order, column_order)
  np.testing.assert_array_equal(packed_new, column_new)
  np.testing.assert_array_equal(packed_order, np.lexsort(seqs.T[::-1]))


def test_candidate_tries_share_shapes_and_map_to_candidate_positions():
  rng = np.random.default_rng(5)
  first = random_identifiers(rng, 12)
  second = random_identifiers(rng, 12, codes=3)                   # narrower fan-out
  second[[3, 9]] = -1                                             # two padded candidates
  batch = np.stack([first, second])                               # [2, 12, 6]
  tries = candidate_tries.build_candidate_tries(batch)
  assert tries.trie_batch == 2 and tries.width == 12
  again = candidate_tries.build_candidate_tries(batch[::-1])
  assert jax.tree.map(np.shape, tries) == jax.tree.map(np.shape, again)
  state = walk(tries, jnp.asarray(np.where(batch < 0, 0, batch)))
  items = np.asarray(trie_lib.leaf_items(tries, state))
  np.testing.assert_array_equal(items[0], np.arange(12))
  expected = np.arange(12)
  expected[[3, 9]] = -1
  np.testing.assert_array_equal(items[1], expected)
  # Example 0's candidates are not in example 1's trie unless they are equal sequences.
  swapped = np.asarray(trie_lib.contains(tries, jnp.asarray(np.stack([second, first]))))
  own = {tuple(r) for r in second.tolist()}
  assert swapped[1].tolist() == [tuple(r) in own for r in first.tolist()]


def test_candidate_tries_reject_an_example_without_candidates():
  batch = np.stack([random_identifiers(np.random.default_rng(6), 4), -np.ones((4, 6), np.int32)])
  with pytest.raises(trie_lib.TrieBuildError, match="example 1 has no valid candidate"):
    candidate_tries.build_candidate_tries(batch)


def brute_force_children(seqs, depth):
  """Per depth-`depth` state (numbered as the sorted distinct prefixes), the set of
  (token, child state) pairs, from the identifier list itself."""
  parents = np.unique(seqs[:, :depth], axis=0)                   # [S_d, depth], sorted
  children = np.unique(seqs[:, :depth + 1], axis=0)              # [S_{d+1}, depth + 1]
  child_of = {tuple(row): s for s, row in enumerate(children.tolist())}
  out = [set() for _ in range(len(parents))]
  index = {tuple(row): s for s, row in enumerate(parents.tolist())}
  for row in seqs.tolist():
    parent = index[tuple(row[:depth])]
    out[parent].add((row[depth], child_of[tuple(row[:depth + 1])]))
  return out


@pytest.mark.parametrize("num_dense_levels", [0, 2, 6])
def test_candidates_and_masks_equal_brute_force_continuations(num_dense_levels):
  """Every level's candidates (static level and traced step) and masks are exactly the
  set of next tokens and child states of the identifiers sharing the beam's prefix."""
  rng = np.random.default_rng(7)
  seqs = random_identifiers(rng, 400, codes=6)
  trie = trie_lib.build_trie(seqs, num_dense_levels)
  vocab = 64
  for d in range(seqs.shape[1]):
    expected = brute_force_children(seqs, d)
    state = rng.integers(0, len(expected), size=(2, 40)).astype(np.int32)    # [batch, beams]
    tokens, nxt, valid = map(np.asarray, trie_lib.level_candidates(trie, d, state))
    assert tokens.shape[-1] == trie.max_branch[d]
    traced = [np.asarray(x) for x in trie_lib.step_candidates(trie, jnp.int32(d), state)]
    masks = [np.asarray(trie_lib.allowed_token_mask(trie, step, state, vocab))
             for step in (d, jnp.int32(d))]
    for b, k in np.ndindex(*state.shape):
      want = expected[state[b, k]]
      got = set(zip(tokens[b, k][valid[b, k]].tolist(), nxt[b, k][valid[b, k]].tolist()))
      assert got == want, (d, b, k)
      got_traced = set(zip(traced[0][b, k][traced[2][b, k]].tolist(),
                           traced[1][b, k][traced[2][b, k]].tolist()))
      assert got_traced == want
      for mask in masks:
        assert set(np.flatnonzero(mask[b, k]).tolist()) == {t for t, _ in want}
