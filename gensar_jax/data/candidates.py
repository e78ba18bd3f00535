"""Evaluation candidates: the target plus `num_negatives` negatives per validation/test sample.

Recommendation: negatives drawn without replacement, with probability proportional to
popularity (rec interactions in the log), from items the user never interacted with (as
rec or search). Search: the top BM25 hits (bm25s over item text) for the sample's query,
target excluded -- hard negatives, as published -- filled with popularity draws when BM25
finds too few items with a positive score.

Candidates are stored target first. Every draw uses a generator seeded by
(seed, split, kind, sample number), so results do not depend on processing order.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Optional

import gin
import numpy as np
from tqdm import tqdm

from gensar_jax.data.schema import DataError, REC, SEARCH

_SPLIT_CODE = {"train": 0, "validation": 1, "test": 2}
_KIND_CODE = {REC: 0, SEARCH: 1}


class PopularitySampler:
  """Weighted sampling without replacement that skips excluded items.

  Draws with replacement from the popularity distribution and discards repeats and excluded
  items (successive sampling, which is sampling without replacement); falls back to an exact
  draw over the eligible items when rejection would be slow (heavy users, tiny catalogues).
  """

  def __init__(self, counts: np.ndarray):
    counts = np.asarray(counts, dtype=np.float64)
    self.num_items = len(counts)
    self.weights = counts
    self.cdf = np.cumsum(counts)

  def sample(self, k: int, exclude: Iterable[int], rng: np.random.Generator,
             where: str) -> np.ndarray:
    exclude = set(int(e) for e in exclude)
    chosen: List[int] = []
    taken = set(exclude)
    total = self.cdf[-1] if self.num_items else 0.0
    if total > 0:
      for _ in range(8):
        draws = np.searchsorted(self.cdf, rng.random(4 * k + 16) * total, side="right")
        for item in draws.tolist():
          if item not in taken:
            taken.add(item)
            chosen.append(item)
            if len(chosen) == k:
              return np.array(chosen, dtype=np.int64)
    # Exact fallback: popular items first by weight, then unpopular ones uniformly.
    eligible = np.array([i for i in range(self.num_items) if i not in taken], dtype=np.int64)
    need = k - len(chosen)
    if len(eligible) < need:
      raise DataError(f"{where}: only {len(eligible) + len(chosen)} items are eligible as "
                      f"negatives but {k} are needed; lower num_negatives or use a larger "
                      "catalogue")
    w = self.weights[eligible]
    positive = eligible[w > 0]
    take = min(need, len(positive))
    picked = (rng.choice(positive, size=take, replace=False, p=w[w > 0] / w[w > 0].sum())
              if take else np.zeros(0, np.int64))
    rest = np.setdiff1d(eligible, picked)
    if need - take:
      picked = np.concatenate([picked, rng.choice(rest, size=need - take, replace=False)])
    return np.concatenate([np.array(chosen, dtype=np.int64), picked.astype(np.int64)])


class BM25Ranker:
  """Full BM25 ranking of the catalogue per query, cached (queries repeat a lot).

  Ties are broken by item index so the ranking is defined, not left to a partial sort.
  """

  def __init__(self, item_texts: List[str]):
    # Imported here, not at module level: bm25s runs a JAX computation when imported, which
    # starts JAX's backend; every stage imports this module, and on a multi-host slice
    # jax.distributed.initialize must run before the backend starts.
    import bm25s  # pylint: disable=g-import-not-at-top
    self._bm25s = bm25s
    tokens = bm25s.tokenize(item_texts, stopwords="en", show_progress=False,
                            return_ids=False)
    self.num_items = len(item_texts)
    self.retriever = bm25s.BM25()
    self.retriever.index(tokens, show_progress=False)
    self._cache: Dict[str, tuple] = {}

  def rank(self, query: str, limit: Optional[int] = None):
    """(items with a positive score, best first; their scores), at most `limit` of each.

    Only `limit` are cached per query: a query whose words appear in every item's text (a
    category name) matches the whole catalogue, and full rankings of ~1,000 such queries
    over 62k items held ~1 GB for the 100 hits a candidate list reads.
    """
    key = (query, limit)
    if key not in self._cache:
      scores = self.scores(query)
      order = np.lexsort((np.arange(len(scores)), -scores))
      order = order[scores[order] > 0][:limit]
      self._cache[key] = (order.astype(np.int64), scores[order])
    return self._cache[key]

  def scores(self, query: str) -> np.ndarray:
    """BM25 score of every item for a query (for the BM25 baseline and tests)."""
    tokens = self._bm25s.tokenize([query], stopwords="en", show_progress=False,
                            return_ids=False)[0]
    if not tokens:
      return np.zeros(self.num_items, dtype=np.float32)
    return np.asarray(self.retriever.get_scores(tokens))


@dataclasses.dataclass
class CandidateSpec:
  """What one held-out sample needs to get candidates."""
  split: str
  kind: str
  number: int  # position among samples of this split and kind
  target: int  # item index
  user_items: np.ndarray  # every item index the user interacted with
  query: Optional[str]  # search samples only


@gin.configurable
def make_candidates(specs: List[CandidateSpec], popularity: np.ndarray,
                    ranker: Optional[BM25Ranker], num_negatives: int = 99, seed: int = 0
                    ) -> np.ndarray:
  """[len(specs), 1 + num_negatives] int32 item indices, target first.

  int32: the table of a log's validation and test samples is held for the whole of
  prepare (768k x 100 at Amazon-Electronics size: 0.6 GB as int64); the shards store it
  as int64 features either way.
  """
  sampler = PopularitySampler(popularity)
  out = np.zeros((len(specs), 1 + num_negatives), dtype=np.int32)
  for row, spec in enumerate(tqdm(specs, desc="candidates", unit=" samples", mininterval=2.0,
                                  leave=False)):
    rng = np.random.default_rng(
        [seed, _SPLIT_CODE[spec.split], _KIND_CODE[spec.kind], spec.number])
    where = f"{spec.split} {spec.kind} sample {spec.number}"
    if spec.kind == REC:
      exclude = np.union1d(spec.user_items, [spec.target])
      negatives = sampler.sample(num_negatives, exclude, rng, where)
    else:
      hits, _ = ranker.rank(spec.query, limit=num_negatives + 1)  # the target may be one
      negatives = hits[hits != spec.target][:num_negatives]
      if len(negatives) < num_negatives:
        fill = sampler.sample(num_negatives - len(negatives),
                              np.concatenate([negatives, [spec.target]]), rng, where)
        negatives = np.concatenate([negatives, fill])
    out[row, 0] = spec.target
    out[row, 1:] = negatives
  return out
