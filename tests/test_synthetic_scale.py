"""The synthetic scale generator, and the guards that keep prepare and SASRec linear.

The quadratic versions these tests catch were invisible at MovieLens size: a per-user
`Series.map(item_index)` in prepare (one rebuilt 62k-entry lookup per user, ~1h45m at
Amazon-Electronics size), the whole train split held as dicts before writing, and SASRec
batches padded to max_len for users with ~8 interactions. Nothing here is timed: the tests
count calls or compare outputs, so a noisy machine cannot fail them.
"""
import collections

import gin
import numpy as np
import pandas as pd
import pytest

from gensar_jax import prepare as prepare_lib
from gensar_jax.data import records, synthetic
from gensar_jax.data.loaders.generic import load_generic
from gensar_jax.data.prepared import load_prepared
from gensar_jax.identifiers import sasrec


@pytest.fixture(scope="module")
def small_log(tmp_path_factory):
  """1% of Electronics: 627 items, 1,920 users, ~16k interactions."""
  out = tmp_path_factory.mktemp("synthetic")
  info = synthetic.generate(str(out), synthetic.SyntheticSize.electronics(0.01), seed=3)
  return info


def test_generator_is_seeded_and_shaped_like_electronics(small_log, tmp_path):
  again = synthetic.generate(str(tmp_path), synthetic.SyntheticSize.electronics(0.01), seed=3)
  for name in ("items_path", "events_path"):
    with open(small_log[name], "rb") as a, open(again[name], "rb") as b:
      assert a.read() == b.read(), f"{name} differs between two runs with one seed"
  other = synthetic.generate(str(tmp_path / "other"), synthetic.SyntheticSize.electronics(0.01),
                             seed=4)
  assert open(other["events_path"]).read() != open(small_log["events_path"]).read()

  log = load_generic(small_log["items_path"], small_log["events_path"])
  assert len(log.items) == 627 and log.num_users == 1920
  assert abs(len(log.events) - 16_200) < 1_000  # 1.62M x 1%, geometric tail
  per_user = log.events.groupby("user_id").size()
  assert per_user.min() >= 5  # a 5-core log
  assert all(len(paths) == 1 and len(paths[0]) == 3 for paths in log.items["categories"])
  assert (log.items["title"].str.len() > 0).all()
  assert (log.items["description"].str.len() > 0).all()
  # Users lean towards one leaf category: the most common leaf of a user covers well over
  # the share a uniform draw over ~100 leaves would give.
  leaf = dict(zip(log.items["item_id"], [p[0][2] for p in log.items["categories"]]))
  top_share = log.events.assign(leaf=log.events["item_id"].map(leaf)).groupby("user_id")[
      "leaf"].agg(lambda s: s.value_counts().iloc[0] / len(s))
  assert top_share.mean() > 0.5


def test_generator_search_sessions(tmp_path):
  info = synthetic.generate(str(tmp_path), synthetic.SyntheticSize(items=300, users=100,
                                                                   events=1000),
                            search_fraction=0.3)
  log = load_generic(info["items_path"], info["events_path"])
  search = log.events[log.events["kind"] == "search"]
  assert 0.2 < len(search) / len(log.events) < 0.4
  assert (search["query"].str.len() > 0).all()


def test_items_of_users_matches_a_per_user_lookup():
  rng = np.random.default_rng(0)
  users = rng.choice(np.array([f"u{i}" for i in range(50)], dtype=object), 2000)
  items = rng.integers(0, 300, 2000)
  got = prepare_lib.items_of_users(users, items)
  assert set(got) == set(users)
  for user in set(users):
    np.testing.assert_array_equal(got[user], np.unique(items[users == user]))


def test_item_indices_is_a_join_and_names_unknown_items():
  ids = np.array(["b", "a", "c"], dtype=object)
  np.testing.assert_array_equal(prepare_lib.item_indices(ids, ["c", "c", "a", "b"]),
                                [2, 2, 1, 0])
  with pytest.raises(Exception, match="'zz'"):
    prepare_lib.item_indices(ids, ["a", "zz"])


def test_prepare_makes_no_per_user_lookups(small_log, tmp_path, monkeypatch):
  """prepare on 1,920 users calls Series.map a handful of times, not once per user, and
  streams examples (no list of every example of a split is built)."""
  calls = collections.Counter()
  original_map = pd.Series.map

  def counting_map(self, *args, **kwargs):
    calls["map"] += 1
    return original_map(self, *args, **kwargs)

  monkeypatch.setattr(pd.Series, "map", counting_map)
  written = []
  original_write = records.write_split_shards

  def recording_write(prepared_dir, split_examples):
    written.extend(type(v) for v in split_examples.values())
    return original_write(prepared_dir, split_examples)

  monkeypatch.setattr(records, "write_split_shards", recording_write)
  out = str(tmp_path / "prepared")
  with gin.unlock_config():
    stats = prepare_lib.prepare(
        output_dir=out, name="synthetic",
        loader=lambda: load_generic(small_log["items_path"], small_log["events_path"]))
  assert stats["users"] > 1500
  assert calls["map"] < 50, f"{calls['map']} Series.map calls for {stats['users']} users"
  assert all(t is not list for t in written)
  prepared = load_prepared(out)
  assert len(prepared.users) == stats["users"]
  # Rec candidates never contain an item the user interacted with.
  from gensar_jax.data.columns import read_columns
  test = read_columns(out, "test", ["user_id", "kind", "candidate_indices"])
  log = load_generic(small_log["items_path"], small_log["events_path"])
  index = {item: i for i, item in enumerate(log.items["item_id"])}
  seen = log.events.groupby("user_id")["item_id"].agg(lambda s: {index[i] for i in s})
  for user, kind, cands in list(zip(test["user_id"], test["kind"],
                                    test["candidate_indices"]))[:200]:
    if kind == "rec":
      assert not (set(cands[1:].tolist()) & seen[user])


def test_serialize_fills_the_same_bytes_as_nested_features():
  import tensorflow as tf
  example = {"user_id": "u1", "kind": "rec", "timestamp": 5, "target_item": "i9",
             "target_index": 9, "query": "", "query_id": -1,
             "history_kind": np.array([b"rec", "search"], dtype=object),
             "history_item": np.array(["i1", "i2"], dtype=object),
             "history_item_index": np.array([1, 2]),
             "history_query": np.array(["", "café"], dtype=object),
             "history_query_id": np.array([-1, 0]), "history_timestamp": np.array([1, 2]),
             "candidates": np.array([b"i9", b"i3"], dtype=object),
             "candidate_indices": np.array([9, 3])}
  feature = {}
  for k in records.SCALAR_STRINGS:
    feature[k] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[example[k].encode()]))
  for k in records.SCALAR_INTS:
    feature[k] = tf.train.Feature(int64_list=tf.train.Int64List(value=[example[k]]))
  for k in records.LIST_STRINGS:
    feature[k] = tf.train.Feature(bytes_list=tf.train.BytesList(
        value=[v.encode() if isinstance(v, str) else v for v in example[k]]))
  for k in records.LIST_INTS:
    feature[k] = tf.train.Feature(int64_list=tf.train.Int64List(value=example[k].tolist()))
  expected = tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(
      deterministic=True)
  assert records.serialize(example) == expected


def test_sasrec_width_buckets_score_like_full_width():
  """Cutting a batch's leading padding columns must not change any score."""
  import jax
  config = sasrec.SASRecConfig(max_len=16, embed_dim=16, num_blocks=2, num_heads=2,
                               dropout=0.0, eval_batch_size=4, progress=False)
  rng = np.random.default_rng(0)
  histories = [rng.integers(0, 50, n) for n in (0, 1, 3, 8, 9, 12, 16, 30)]
  candidates = rng.integers(0, 50, (len(histories), 7))
  model = sasrec._make_model(50, config)
  params = sasrec._init_fn(model)(jax.random.PRNGKey(1), np.ones((1, 16), np.int32))["params"]
  result = sasrec.SASRecResult(params=params, config=config, num_items=50,
                               item_embeddings=None, history=[], best_epoch=0)
  got = sasrec.score_candidates(result, histories, candidates)
  full = sasrec._pad_histories([np.asarray(h) for h in histories], 16)  # [n, 16]
  hidden = model.apply({"params": params}, full, deterministic=True)[:, -1]
  table = np.asarray(model.apply({"params": params}, candidates + 1,
                                 method=sasrec.SASRec.embed_items))  # [n, c, e]
  expected = np.einsum("be,bce->bc", np.asarray(hidden), table)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
  assert list(sasrec.width_of(np.array([1, 8, 9, 33, 40]), 40)) == [8, 8, 16, 40, 40]
  assert sorted(set(sasrec.width_of(np.array([1, 9, 16]), 16))) == [8, 16]  # both used


def test_sasrec_auto_loss_is_linear_in_the_catalogue():
  config = sasrec.SASRecConfig()
  assert config.loss == "auto"
  assert sasrec.resolved_loss(config, 1682) == "full_softmax"  # ML-100K unchanged
  assert sasrec.resolved_loss(config, 62_671) == "sampled_softmax"
