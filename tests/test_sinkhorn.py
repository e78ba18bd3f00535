"""Sinkhorn assignment: balanced where argmin piles up; grouped form equals per-group runs."""
import numpy as np

from gensar_jax.identifiers import sinkhorn as sinkhorn_lib


def _crowded_distances(n=512, codes=16, seed=0):
  """Items all lying near codes 0 and 1, so argmin uses only two codes."""
  rng = np.random.default_rng(seed)
  book = rng.normal(size=(codes, 4)).astype(np.float32)
  x = book[rng.integers(0, 2, n)] + 0.3 * rng.normal(size=(n, 4)).astype(np.float32)
  return ((x[:, None, :] - book[None]) ** 2).sum(-1)  # [n, codes]


def test_sinkhorn_balances_where_argmin_piles_up():
  d = _crowded_distances()
  argmin_counts = np.bincount(d.argmin(1), minlength=16)
  codes = np.asarray(sinkhorn_lib.sinkhorn_codes(d, 0.003, 50))
  counts = np.bincount(codes, minlength=16)
  assert argmin_counts.max() >= 200  # the problem: two codes take everything
  assert (counts > 0).sum() == 16  # every code gets used
  assert counts.max() <= 2 * 512 // 16  # near-balanced: at most twice the fair share
  # Still distance-aware: far better than a random balanced assignment.
  rand = np.random.default_rng(1).permutation(np.arange(512) % 16)
  assert d[np.arange(512), codes].mean() < 0.7 * d[np.arange(512), rand].mean()


def test_sinkhorn_log_domain_is_finite_at_small_epsilon():
  d = _crowded_distances(n=64) * 1e4  # huge range: exp(-d / eps) would overflow
  codes = np.asarray(sinkhorn_lib.sinkhorn_codes(d, 0.003, 50))
  assert codes.min() >= 0 and codes.max() < 16


def test_centred_distances_span_minus_one_to_one():
  d = _crowded_distances(n=32)
  c = np.asarray(sinkhorn_lib.center_distances(d))
  assert abs(c.min() + 1) < 1e-3 and abs(c.max() - 1) < 1e-3


def test_grouped_sinkhorn_matches_separate_runs():
  d = _crowded_distances(n=12)
  groups = np.array([7, 3, 7, 3, 3, 9, 7, 3, 3, 9, 7, 7])  # sizes 5, 5, 2 in mixed order
  got = sinkhorn_lib.grouped_sinkhorn_codes(d, groups, 0.003, 50)
  for g in np.unique(groups):
    rows = np.flatnonzero(groups == g)
    expected = np.asarray(sinkhorn_lib.sinkhorn_codes(d[rows], 0.003, 50))
    np.testing.assert_array_equal(got[rows], expected)
  # Items of a group of two with different rows end on different codes.
  pair = np.flatnonzero(groups == 9)
  assert got[pair[0]] != got[pair[1]]
