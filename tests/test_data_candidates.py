"""Tests of evaluation candidates: popularity negatives for rec, BM25 hard negatives for search."""
import numpy as np
import pytest

from gensar_jax.data.candidates import (BM25Ranker, CandidateSpec, PopularitySampler,
                                        make_candidates)
from gensar_jax.data.schema import REC, SEARCH, DataError

WORDS = ["headphones", "cable", "coffee", "kettle", "camera", "lens", "tripod", "mouse"]


def catalogue(num_items=60, seed=0):
  """Item texts with a few shared words each, so BM25 scores vary and tie sometimes."""
  rng = np.random.default_rng(seed)
  texts = []
  for i in range(num_items):
    words = rng.choice(WORDS, size=int(rng.integers(1, 4)), replace=True)
    texts.append(f"Item {i} " + " ".join(words))
  texts[-1] = "espresso grinder"  # the only item with these words
  texts[-2] = "espresso cup"
  return texts


def assert_bm25_top_hits(ranker, query, target, negatives, num_negatives):
  """The chosen BM25 negatives out-score every non-chosen non-target item with a score."""
  scores = ranker.scores(query)
  positive = [i for i in range(len(scores)) if scores[i] > 0 and i != target]
  chosen = [int(n) for n in negatives if scores[n] > 0]
  assert len(chosen) == min(len(positive), num_negatives)
  # BM25 hits come first, best first; the popularity fill (score 0) after them.
  assert list(negatives[:len(chosen)]) == chosen
  assert np.all(np.diff(scores[chosen]) <= 0)
  rest = [i for i in positive if i not in set(chosen)]
  if rest and chosen:
    assert scores[chosen].min() >= scores[rest].max()
  if len(positive) < num_negatives:  # filled: every positive-score item is in
    assert set(chosen) == set(positive)


def test_popularity_sampler_excludes_and_follows_popularity():
  counts = np.array([1000, 500, 100, 10, 0, 0, 5, 1])
  sampler = PopularitySampler(counts)
  firsts = []
  for s in range(300):
    rng = np.random.default_rng(s)
    got = sampler.sample(3, exclude=[1], rng=rng, where="w")
    assert len(got) == len(set(got.tolist())) == 3
    assert 1 not in got
    assert not {4, 5} & set(got.tolist())  # zero-popularity items only as a last resort
    firsts.append(int(got[0]))
  freq = np.bincount(firsts, minlength=8)
  assert freq[0] > freq[2] > freq[3]  # ~ 1000 : 100 : 10 among the remaining


def test_popularity_sampler_exact_fallback_and_error():
  sampler = PopularitySampler(np.array([5, 0, 0, 3, 0]))
  rng = np.random.default_rng(0)
  # Needs every eligible item, zero-popularity ones included.
  got = sampler.sample(4, exclude=[3], rng=rng, where="w")
  assert sorted(got.tolist()) == [0, 1, 2, 4]
  with pytest.raises(DataError, match="test rec sample 7: only 4 items are eligible"):
    sampler.sample(5, exclude=[3], rng=rng, where="test rec sample 7")


def rec_specs(num_items, num_specs, seed=0):
  rng = np.random.default_rng(seed)
  specs = []
  for n in range(num_specs):
    user_items = np.unique(rng.integers(0, num_items, size=int(rng.integers(1, 15))))
    specs.append(CandidateSpec(split="test" if n % 2 else "validation", kind=REC, number=n,
                               target=int(user_items[-1]), user_items=user_items, query=None))
  return specs


def test_rec_candidates():
  num_items = 60
  popularity = np.random.default_rng(1).integers(0, 50, size=num_items)
  specs = rec_specs(num_items, 40)
  cands = make_candidates(specs, popularity, ranker=None, num_negatives=20, seed=0)
  assert cands.shape == (40, 21)
  for spec, row in zip(specs, cands):
    assert row[0] == spec.target
    negatives = row[1:]
    assert len(set(negatives.tolist())) == 20
    assert spec.target not in negatives
    # Never an item the user interacted with.
    assert not set(negatives.tolist()) & set(spec.user_items.tolist())


def test_rec_candidates_deterministic_and_seeded():
  num_items = 60
  popularity = np.random.default_rng(1).integers(1, 50, size=num_items)
  specs = rec_specs(num_items, 30)
  a = make_candidates(specs, popularity, None, num_negatives=10, seed=0)
  b = make_candidates(specs, popularity, None, num_negatives=10, seed=0)
  c = make_candidates(specs, popularity, None, num_negatives=10, seed=1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a[:, 1:], c[:, 1:])
  np.testing.assert_array_equal(a[:, 0], c[:, 0])
  # Each sample's draws depend on (seed, split, kind, number), not on processing order.
  order = np.random.default_rng(2).permutation(len(specs))
  d = make_candidates([specs[i] for i in order], popularity, None, num_negatives=10, seed=0)
  np.testing.assert_array_equal(d, a[order])


def test_search_candidates_are_bm25_top_hits():
  texts = catalogue()
  ranker = BM25Ranker(texts)
  popularity = np.ones(len(texts), dtype=np.int64)
  queries = ["headphones cable", "camera lens tripod", "coffee", "mouse kettle camera"]
  specs = []
  for n, q in enumerate(queries * 3):
    hits, _ = ranker.rank(q)
    target = int(hits[n % len(hits)]) if n < 8 else int(np.flatnonzero(
        ranker.scores(q) == 0)[0])  # also a target BM25 does not find
    specs.append(CandidateSpec(split="test", kind=SEARCH, number=n, target=target,
                               user_items=np.array([target]), query=q))
  cands = make_candidates(specs, popularity, ranker, num_negatives=10, seed=0)
  for spec, row in zip(specs, cands):
    assert row[0] == spec.target
    assert spec.target not in row[1:]
    assert len(set(row[1:].tolist())) == 10
    assert_bm25_top_hits(ranker, spec.query, spec.target, row[1:], 10)


def test_search_candidates_filled_by_popularity_when_bm25_finds_too_few():
  texts = catalogue()
  ranker = BM25Ranker(texts)
  n = len(texts)
  popularity = np.zeros(n, dtype=np.int64)
  popularity[:5] = [50, 40, 30, 20, 10]  # the fill must come from these popular items
  specs = [
      CandidateSpec("validation", SEARCH, 0, target=n - 1, user_items=np.array([0]),
                    query="espresso"),  # two hits, one of them the target
      CandidateSpec("validation", SEARCH, 1, target=3, user_items=np.array([3]),
                    query="nothing matches this"),  # no hit at all
  ]
  cands = make_candidates(specs, popularity, ranker, num_negatives=4, seed=0)
  assert cands[0, 0] == n - 1 and cands[0, 1] == n - 2  # the one BM25 hit first
  assert set(cands[0, 2:].tolist()) <= {0, 1, 2, 3, 4}
  assert cands[1, 0] == 3
  assert set(cands[1, 1:].tolist()) == {0, 1, 2, 4}
  for spec, row in zip(specs, cands):
    assert len(set(row.tolist())) == 5
    assert_bm25_top_hits(ranker, spec.query, spec.target, row[1:], 4)


def test_bm25_ranker_orders_ties_by_index():
  ranker = BM25Ranker(["red apple", "green pear", "red apple", "red apple pie", "blue"])
  hits, scores = ranker.rank("red apple")
  assert np.all(np.diff(scores) <= 0)
  assert set(hits.tolist()) == {0, 2, 3}
  tied = [h for h, s in zip(hits, scores) if s == scores[list(hits).index(0)]]
  assert tied == sorted(tied)
  assert ranker.rank("unknownword")[0].size == 0
  assert ranker.scores("the of").max() == 0  # stop-words only
