"""ID assignment: every SID and every CID unique, shared prefixes, modes, nearest-free moves."""
import dataclasses
import time

import numpy as np
import pytest

from gensar_jax.identifiers import assignment as assignment_lib
from gensar_jax.identifiers import rqvae

SMALL = rqvae.RQVAEConfig(hidden_dims=(32, 16), latent_dim=8, codebook_size=16, batch_size=128,
                          eval_chunk=256, epochs=2, eval_every=1, progress=False)


def random_tables(n, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, 24)).astype(np.float32),
          rng.normal(size=(n, 12)).astype(np.float32))


def assert_unique(codes):
  assert np.unique(codes, axis=0).shape[0] == codes.shape[0]


@pytest.fixture(scope="module")
def adversarial():
  """1000 items, 600 of them with identical embeddings in both tables."""
  sem, col = random_tables(1000)
  sem[:600], col[:600] = sem[0], col[0]
  trained = rqvae.train_rqvae(sem, col, SMALL)
  return assignment_lib.assign_identifiers(trained, sem, col, SMALL)


def test_identical_items_still_get_unique_sids_and_cids(adversarial):
  a = adversarial
  assert a.sid_codes.shape == a.cid_codes.shape == (1000, 4)
  assert_unique(a.sid_codes)
  assert_unique(a.cid_codes)
  assert len({"".join(t) for t in a.sid_tokens}) == 1000
  assert len({"".join(t) for t in a.cid_tokens}) == 1000
  # 600 identical items exceed the 16 x 16 specific codes under one shared prefix,
  # so the shared levels had to be rebalanced as well.
  assert len(np.unique(a.sid_codes[:600, :2], axis=0)) >= 3


def test_stats_report_every_phase(adversarial):
  stats = adversarial.stats
  for space in ("sid", "cid"):
    phases = stats["collisions"][space]
    assert phases["argmin"]["collision_rate"] >= 0.59  # 599 of the identical items at least
    assert phases["sinkhorn"]["collision_rate"] >= 0.59  # Sinkhorn cannot split identical rows
    assert phases["final"] == {"collision_rate": 0.0, "colliding_items": 0}
    assert stats["dedup_moved_items"][space] >= 599
  assert stats["sid_cid_shared_prefix_share"] == 1.0
  usage = stats["code_usage"]
  assert list(usage) == ["m0", "m1", "s0", "s1", "c0", "c1"]
  for level in usage.values():
    assert sum(level["counts"]) == 1000 and 1 <= level["perplexity"] <= level["codes_used"] <= 16


def test_sid_and_cid_share_the_first_two_tokens(adversarial):
  for sid, cid in zip(adversarial.sid_tokens, adversarial.cid_tokens):
    assert sid[:2] == cid[:2]
    assert [t[:3] for t in sid] == ["<m0", "<m1", "<s0", "<s1"]
    assert [t[:3] for t in cid] == ["<m0", "<m1", "<c0", "<c1"]
  vocab = adversarial.vocabulary()
  assert len(vocab) == 6 * 16 and "<m0_0>" in vocab and "<c1_15>" in vocab


@pytest.mark.parametrize("mode,sid_prefixes,cid_prefixes", [
    ("dual_no_shared", ["s0", "s1", "s2", "s3"], ["c0", "c1", "c2", "c3"]),
    ("sid_only", ["s0", "s1", "s2", "s3"], None),
    ("cid_only", None, ["c0", "c1", "c2", "c3"]),
])
def test_ablation_modes_token_spaces(mode, sid_prefixes, cid_prefixes):
  sem, col = random_tables(300, seed=1)
  sem[:40], col[:40] = sem[0], col[0]
  config = dataclasses.replace(SMALL, mode=mode)
  sem_in = None if mode == "cid_only" else sem
  col_in = None if mode == "sid_only" else col
  trained = rqvae.init_rqvae(sem_in, col_in, config)  # k-means initialised, untrained
  a = assignment_lib.assign_identifiers(trained, sem_in, col_in, config)
  for tokens, codes, prefixes in ((a.sid_tokens, a.sid_codes, sid_prefixes),
                                  (a.cid_tokens, a.cid_codes, cid_prefixes)):
    if prefixes is None:
      assert tokens is None and codes is None
      continue
    assert codes.shape == (300, 4)
    assert_unique(codes)
    assert all([t[1:3] for t in row] == prefixes for row in tokens)
  assert a.stats["sid_cid_shared_prefix_share"] == (0.0 if mode == "dual_no_shared" else None)
  assert a.stats["mode"] == mode


def _tree(codebooks, r0, k):
  """A one-space tree without shared levels, codes by argmin (the state after phase 1)."""
  levels = len(codebooks)
  layout = rqvae.QuantizerLayout((rqvae.SEMANTIC,), 0, levels, k, r0.shape[1])
  books = np.stack(codebooks).astype(np.float32)
  codes = np.zeros((r0.shape[0], levels), np.int64)
  tree = assignment_lib._CodeTree(layout, r0.astype(np.float32), codes[:, :0],
                                  {rqvae.SEMANTIC: codes}, None, {rqvae.SEMANTIC: books})
  for level in range(levels):
    d = assignment_lib._sq_dist(tree.residual(np.arange(len(r0)), rqvae.SEMANTIC, level),
                                books[level])
    codes[:, level] = d.argmin(1)
  return tree


def test_final_step_moves_to_the_nearest_free_code():
  zero = np.zeros((4, 1))
  last = np.array([[0.0], [1.0], [3.0], [-2.0]])  # from 0.1: code 0, then 1, then 3, then 2
  r0 = np.array([[0.1], [0.1], [0.1]])
  tree = _tree([zero, last], r0, k=4)
  assignment_lib._deduplicate(tree)
  assert sorted(tree.full(rqvae.SEMANTIC)[:, 1].tolist()) == [0, 1, 3]


def test_final_step_rebalances_the_level_above_when_a_prefix_is_full():
  first = np.array([[0.0], [10.0], [-10.0], [30.0]])
  last = np.array([[0.0], [0.5], [1.0], [1.5]])
  r0 = np.full((7, 1), 0.2)  # 7 identical items, 4 codes on the last level
  tree = _tree([first, last], r0, k=4)
  assignment_lib._deduplicate(tree)
  codes = tree.full(rqvae.SEMANTIC)
  assert_unique(codes)
  # 4 stay under code 0; the other 3 move to the nearest first-level code with room (10.0),
  # which has room for 4.
  assert np.bincount(codes[:, 0], minlength=4).tolist() == [4, 3, 0, 0]


def test_catalogue_larger_than_capacity_raises():
  book = np.array([[0.0], [1.0]])
  tree = _tree([book, book], np.zeros((5, 1)), k=2)  # 2 x 2 = 4 IDs for 5 items
  with pytest.raises(ValueError, match="exceeds the identifier capacity"):
    assignment_lib._deduplicate(tree)


def test_final_step_is_vectorised_on_many_collisions():
  """50k items on 64^3 IDs with heavy collisions: unique and fast."""
  rng = np.random.default_rng(0)
  k, n = 64, 50_000
  books = [rng.normal(size=(k, 4)) * s for s in (4.0, 1.0, 0.25)]
  r0 = rng.normal(size=(n, 4)) * 4.0
  r0[:3000] = r0[0]  # a block of identical items
  tree = _tree(books, r0, k=k)
  before = assignment_lib._collision_stats(tree.full(rqvae.SEMANTIC))["collision_rate"]
  t0 = time.perf_counter()
  assignment_lib._deduplicate(tree)
  assert time.perf_counter() - t0 < 20.0
  assert before > 0.3
  assert_unique(tree.full(rqvae.SEMANTIC))
