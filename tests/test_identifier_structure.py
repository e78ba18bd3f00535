"""Identifier structure diagnostics: what items sharing a prefix have in common."""
import itertools

import numpy as np
import pytest

from gensar_jax.identifiers import rqvae
from gensar_jax.identifiers import structure
from gensar_jax.identifiers.assignment import assign_identifiers
from gensar_jax.identify import format_identifier_stats

N, CLUSTERS = 400, 8


@pytest.fixture(scope="module")
def catalogue():
  """Text and behaviour that disagree: semantic embeddings, categories and queries follow
  one random label, collaborative embeddings an independent one."""
  rng = np.random.default_rng(0)
  text_label = rng.integers(0, CLUSTERS, N)  # [items]
  behaviour_label = rng.integers(0, CLUSTERS, N)  # [items]
  semantic = (rng.normal(size=(CLUSTERS, 24))[text_label]
              + 0.3 * rng.normal(size=(N, 24))).astype(np.float32)  # [items, 24]
  collaborative = (rng.normal(size=(CLUSTERS, 16))[behaviour_label]
                   + 0.3 * rng.normal(size=(N, 16))).astype(np.float32)  # [items, 16]
  categories = structure.category_labels([[["Shop", f"genre {a}"]] for a in text_label])
  queries = [[f"query {a}", f"more {a}"] for a in text_label]
  return dict(text_label=text_label, behaviour_label=behaviour_label, semantic=semantic,
              collaborative=collaborative, categories=categories, queries=queries)


def label_codes(label):
  """[items, 2] codes whose first level is `label` and whose full ID is unique."""
  return np.stack([label, np.arange(label.size)], axis=1)


def test_prefixes_grouped_by_text_or_behaviour_measure_what_they_share(catalogue):
  c = catalogue
  s = structure.identifier_structure(
      label_codes(c["text_label"]), label_codes(c["behaviour_label"]), c["semantic"],
      c["collaborative"], c["categories"], c["queries"], seed=3)
  assert list(s["prefixes"]) == ["s0", "c0", "sid", "cid"]
  rand, by_text, by_behaviour = s["random"], s["prefixes"]["s0"], s["prefixes"]["c0"]
  assert by_text["groups"] == CLUSTERS and by_text["items_per_group"] == N / CLUSTERS
  assert by_text["semantic_cosine"] > rand["semantic_cosine"] + 0.5
  assert by_text["category_jaccard"] > 0.99 > 0.7 > rand["category_jaccard"]
  assert by_text["query_agreement"] == 1.0 and rand["query_agreement"] < 0.25
  assert abs(by_text["collaborative_cosine"] - rand["collaborative_cosine"]) < 0.1
  assert by_behaviour["collaborative_cosine"] > rand["collaborative_cosine"] + 0.5
  assert abs(by_behaviour["semantic_cosine"] - rand["semantic_cosine"]) < 0.1
  assert abs(by_behaviour["category_jaccard"] - rand["category_jaccard"]) < 0.1
  assert abs(by_behaviour["query_agreement"] - rand["query_agreement"]) < 0.1
  # Unique full IDs: no pairs, nothing measured; the baseline is still there.
  assert s["prefixes"]["sid"]["pairs"] == 0 and s["prefixes"]["sid"]["semantic_cosine"] is None
  assert s["levels"]["s0"]["codes_used"] == CLUSTERS
  assert s["levels"]["s1"]["perplexity"] == pytest.approx(N)
  assert s == structure.identifier_structure(
      label_codes(c["text_label"]), label_codes(c["behaviour_label"]), c["semantic"],
      c["collaborative"], c["categories"], c["queries"], seed=3)  # deterministic


def test_shared_levels_are_one_prefix(catalogue):
  c = catalogue
  shared = np.stack([c["text_label"], c["behaviour_label"]], axis=1)  # [items, 2]
  sid = np.concatenate([shared, np.arange(N)[:, None]], axis=1)
  cid = np.concatenate([shared, (N - np.arange(N))[:, None]], axis=1)
  s = structure.identifier_structure(sid, cid, c["semantic"], c["collaborative"],
                                     sid_levels=("m0", "m1", "s0"),
                                     cid_levels=("m0", "m1", "c0"), codebook_size=512)
  assert list(s["prefixes"]) == ["m0", "m0+m1", "sid", "cid"]
  assert list(s["levels"]) == ["m0", "m1", "s0", "c0"]
  both = s["prefixes"]["m0+m1"]
  assert both["semantic_cosine"] > s["random"]["semantic_cosine"] + 0.5
  assert both["collaborative_cosine"] > s["random"]["collaborative_cosine"] + 0.5
  assert both["category_jaccard"] is None and both["query_agreement"] is None


def test_one_space_and_missing_labels(catalogue):
  c = catalogue
  sid = np.stack([c["text_label"], c["behaviour_label"], np.arange(N)], axis=1)
  latents = np.random.default_rng(1).normal(size=(N, 6))  # [items, latent]
  s = structure.identifier_structure(sid, None, c["semantic"], None, categories=None,
                                     queries=[], latents=latents)
  assert list(s["prefixes"]) == ["s0", "s0+s1", "sid"]
  for row in (*s["prefixes"].values(), s["random"]):
    assert row["collaborative_cosine"] is None and row["category_jaccard"] is None
    assert row["query_agreement"] is None
  assert set(s["latent_variance"]) == {"semantic", "semantic_to_collaborative"}
  assert s["latent_variance"]["semantic_to_collaborative"] is None
  # Items without labels (None, NaN, []) are left out of the pairs, not counted as apart.
  queries = [["q"] if i < 10 else (None, float("nan"), [])[i % 3] for i in range(N)]
  s = structure.identifier_structure(None, sid, None, None, queries=queries)
  assert s["random"]["query_agreement"] == 1.0
  assert s["prefixes"]["c0"]["semantic_cosine"] is None
  text = structure.format_structure(s)
  assert "c0+c1" in text and "latent variance" not in text


def test_category_labels_flatten_paths():
  assert structure.category_labels([[["A", "B"], ["A", "C"]], [], None, float("nan")]) == [
      {"A", "B", "C"}, set(), set(), set()]


def test_latent_variance_per_space():
  semantic = np.tile([[-1.0], [1.0]], (50, 3))  # [100, 3]: variance 1 per dimension
  collaborative = np.tile([[-2.0], [2.0]], (50, 3))  # [100, 3]: variance 4 per dimension
  v = structure.latent_variance(np.concatenate([semantic, collaborative], axis=1),
                                ("semantic", "collaborative"))
  assert v == pytest.approx({"semantic": 3.0, "collaborative": 12.0,
                             "semantic_to_collaborative": 0.25})
  with pytest.raises(ValueError, match="do not split"):
    structure.latent_variance(np.zeros((4, 5)), ("semantic", "collaborative"))


def test_pairs_all_or_a_uniform_sample():
  groups = np.array([0, 1, 0, 2, 1, 0, 2, 2, 2, 3])
  i, j, total = structure._pairs(groups, 100, np.random.default_rng(0))
  expected = [p for p in itertools.combinations(range(10), 2) if groups[p[0]] == groups[p[1]]]
  assert total == len(expected) == 10
  assert sorted(tuple(sorted(p)) for p in zip(i.tolist(), j.tolist())) == expected
  i, j, total = structure._pairs(np.zeros(1000, np.int64), 5000, np.random.default_rng(0))
  assert total == 1000 * 999 // 2 and i.size == 5000
  assert np.all(i != j) and len(set(zip(i.tolist(), j.tolist()))) == 5000


def test_table_and_plot(catalogue, tmp_path):
  c = catalogue
  s = structure.identifier_structure(
      label_codes(c["text_label"]), label_codes(c["behaviour_label"]), c["semantic"],
      c["collaborative"], c["categories"], c["queries"],
      latents=np.concatenate([c["semantic"][:, :8], c["collaborative"][:, :8]], axis=1))
  text = structure.format_structure(s)
  row = next(line for line in text.splitlines() if line.strip().startswith("s0 "))
  s0, random_pairs = s['prefixes']['s0'], s['random']
  assert f"{s0['semantic_cosine']:.3f} ({random_pairs['semantic_cosine']:.3f})" in row
  assert "semantic / collaborative" in text
  stats = {"mode": "dual_no_shared", "num_items": N, "codebook_size": N, "structure": s}
  assert text in format_identifier_stats(stats)
  path = tmp_path / structure.PLOT_FILE
  structure.plot_structure(path, s)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trained_shared_levels_follow_both_spaces(catalogue):
  """The joint RQ-VAE's m0 on tables of equal per-dimension variance (standardised here;
  the RQ-VAE does not rescale its inputs) groups items alike in text AND in behaviour."""
  c = catalogue
  tables = [((t - t.mean(0)) / t.std(0)).astype(np.float32)  # [items, d], unit variance
            for t in (c["semantic"], c["collaborative"])]
  config = rqvae.RQVAEConfig(hidden_dims=(32, 16), latent_dim=8, codebook_size=16,
                             batch_size=128, eval_chunk=256, epochs=30, eval_every=10,
                             progress=False)
  trained = rqvae.train_rqvae(*tables, config)
  assignment = assign_identifiers(trained, *tables)
  latents = rqvae.encode_and_quantize(trained, tables)[0]  # [items, 2 * latent]
  s = structure.structure_of_assignment(assignment, *tables, c["categories"], c["queries"],
                                        latents)
  m0, rand = s["prefixes"]["m0"], s["random"]
  assert list(s["prefixes"])[:2] == ["m0", "m0+m1"]
  assert m0["semantic_cosine"] > rand["semantic_cosine"] + 0.1
  assert m0["collaborative_cosine"] > rand["collaborative_cosine"] + 0.1
  assert m0["category_jaccard"] > rand["category_jaccard"]
  assert s["latent_variance"]["semantic_to_collaborative"] > 0
