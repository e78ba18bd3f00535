"""Tests of the SASRec collaborative encoder / baseline.

The synthetic catalogue has a strong sequential rule (item i is usually followed by item
i + 1 mod n), which a working causal model learns within a few epochs, while a model that
ignores order, leaks the future or mis-shifts item ids (the +1 padding offset) cannot
score the true next item above 99 random ones.
"""
import dataclasses

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gensar_jax.identifiers import sasrec

NUM_ITEMS = 120
MAX_LEN = 20


def _synthetic_sequences(num_users, length, seed, follow_prob=0.9):
  rng = np.random.default_rng(seed)
  seqs = []
  for _ in range(num_users):
    seq = [int(rng.integers(NUM_ITEMS))]
    for _ in range(length - 1):
      if rng.random() < follow_prob:
        seq.append((seq[-1] + 1) % NUM_ITEMS)
      else:
        seq.append(int(rng.integers(NUM_ITEMS)))
    seqs.append(seq)
  return seqs


def _eval_split(num_users, seed):
  """Histories and [n, 100] candidates, target (the rule's next item) in column 0."""
  rng = np.random.default_rng(seed)
  histories = _synthetic_sequences(num_users, MAX_LEN, seed)
  candidates = []
  for hist in histories:
    target = (hist[-1] + 1) % NUM_ITEMS
    pool = np.setdiff1d(np.arange(NUM_ITEMS), [target])
    candidates.append(np.concatenate([[target], rng.choice(pool, 99, replace=False)]))
  return histories, np.stack(candidates)


# Small and fast, but with dropout so the step compiled here is the real one.
CONFIG = sasrec.SASRecConfig(max_len=MAX_LEN, embed_dim=32, num_blocks=2, num_heads=2,
                             dropout=0.2, lr=5e-3, batch_size=64, epochs=6, patience=3,
                             seed=0, progress=False)


@pytest.fixture(scope="module")
def data():
  return {
      "train": _synthetic_sequences(300, MAX_LEN, seed=0),
      "val": _eval_split(100, seed=1),
      "test": _eval_split(200, seed=2),
  }


@pytest.fixture(scope="module")
def trained(data):
  return sasrec.train_sasrec(data["train"], NUM_ITEMS, CONFIG, validation=data["val"])


def test_learns_sequential_pattern(trained, data):
  metrics = sasrec.evaluate_sasrec(trained, *data["test"])
  # Random ranking gives HR@10 = 0.10 over 100 candidates.
  assert metrics["HR@10"] > 0.8, metrics
  assert metrics["NDCG@10"] > 0.5, metrics
  assert set(metrics) == {"HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10"}


def test_loss_decreases_and_history(trained):
  history = trained.history
  assert 1 <= len(history) <= CONFIG.epochs
  assert history[-1]["loss"] < history[0]["loss"]
  assert all(np.isfinite(h["loss"]) for h in history)
  assert "NDCG@10" in history[0] and "HR@10" in history[0]
  best = max(h["NDCG@10"] for h in history)
  assert trained.history[trained.best_epoch - 1]["NDCG@10"] == best


def test_item_embeddings_match_table(trained):
  emb = trained.item_embeddings
  assert emb.shape == (NUM_ITEMS, CONFIG.embed_dim)
  assert emb.dtype == np.float32
  assert np.all(np.isfinite(emb))
  # Row i is item index i: the padding row (internal id 0) is dropped.
  table = np.asarray(trained.params["item_embed"]["embedding"])
  np.testing.assert_array_equal(emb, table[1:])


def test_scores_are_dot_products_with_item_embeddings(trained, data):
  histories, candidates = data["test"]
  histories, candidates = histories[:5], candidates[:5]
  scores = sasrec.score_candidates(trained, histories, candidates)
  assert scores.shape == (5, 100)
  seqs = jnp.asarray([h[-MAX_LEN:] for h in histories]) + 1  # [5, max_len] shifted ids
  hidden = jax.jit(trained.model.apply)({"params": trained.params}, seqs)[:, -1]  # [5, embed]
  expected = np.einsum("be,bce->bc", hidden, trained.item_embeddings[candidates])
  np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)


def test_short_and_empty_histories_score(trained):
  candidates = np.tile(np.arange(100), (3, 1))
  scores = sasrec.score_candidates(trained, [[5], [], list(range(60))], candidates)
  assert scores.shape == (3, 100)
  assert np.all(np.isfinite(scores))


def test_same_seed_same_embeddings(data):
  config = dataclasses.replace(CONFIG, epochs=2)
  first = sasrec.train_sasrec(data["train"], NUM_ITEMS, config)
  second = sasrec.train_sasrec(data["train"], NUM_ITEMS, config)
  np.testing.assert_array_equal(first.item_embeddings, second.item_embeddings)
  assert [h["loss"] for h in first.history] == [h["loss"] for h in second.history]
  other = sasrec.train_sasrec(data["train"], NUM_ITEMS, dataclasses.replace(config, seed=1))
  assert not np.array_equal(first.item_embeddings, other.item_embeddings)


def _untrained(seqs):
  """A freshly initialised model and a jitted forward pass (eager Flax is slow on CPU)."""
  model = sasrec._make_model(NUM_ITEMS, CONFIG)
  params = sasrec._init_fn(model)(jax.random.PRNGKey(0), seqs)["params"]
  return params, jax.jit(model.apply)


def test_causal_mask():
  seqs = jnp.asarray([[0, 0, 0, 4, 9, 17, 3, 8, 1, 2] + [5] * (MAX_LEN - 10)])  # [1, L]
  params, apply = _untrained(seqs)
  changed = seqs.at[0, 7].set(60)
  base = apply({"params": params}, seqs)  # [1, L, embed]
  other = apply({"params": params}, changed)
  np.testing.assert_allclose(base[0, :7], other[0, :7], rtol=1e-6, atol=1e-6)
  # Position 7 and later see the change.
  assert not np.allclose(base[0, 7:], other[0, 7:], atol=1e-4)


def test_left_padding_is_ignored():
  """A history's representation does not depend on how much padding precedes it."""
  short = jnp.asarray([[0] * (MAX_LEN - 3) + [4, 9, 17]])  # [1, max_len]
  params, apply = _untrained(short)
  shorter_input = short[:, -5:]  # The same history with 2 padding columns instead of 17.
  full = apply({"params": params}, short)[:, -1]  # [1, embed]
  trimmed = apply({"params": params}, shorter_input)[:, -1]
  np.testing.assert_allclose(full, trimmed, rtol=1e-5, atol=1e-5)


def test_validation_is_capped_to_a_fixed_sample(data):
  """Early stopping scores a seeded sample of at most max_validation_rows held-out rows:
  training on the whole split with a cap gives the same run, epoch by epoch, as training
  with that sample passed explicitly."""
  config = dataclasses.replace(CONFIG, epochs=2, max_validation_rows=30)
  histories, candidates = data["val"]
  keep = sasrec.validation_sample(len(histories), 30, config.seed)
  assert len(keep) == 30 and len(set(keep.tolist())) == 30
  np.testing.assert_array_equal(keep, sasrec.validation_sample(len(histories), 30, 0))
  np.testing.assert_array_equal(sasrec.validation_sample(20, 30, 0), np.arange(20))
  capped = sasrec.train_sasrec(data["train"], NUM_ITEMS, config,
                               validation=(histories, candidates))
  explicit = sasrec.train_sasrec(
      data["train"], NUM_ITEMS, dataclasses.replace(config, max_validation_rows=10_000),
      validation=([histories[i] for i in keep], candidates[keep]))
  uncapped = sasrec.train_sasrec(
      data["train"], NUM_ITEMS, dataclasses.replace(config, max_validation_rows=10_000),
      validation=(histories, candidates))
  drop = lambda history: [{k: v for k, v in h.items() if k != "seconds"} for h in history]
  assert drop(capped.history) == drop(explicit.history)
  assert drop(capped.history) != drop(uncapped.history)


def test_sampled_softmax_trains(data):
  # No dropout: a cheaper compile; the dropout path is covered by the other trainings.
  config = dataclasses.replace(CONFIG, loss="sampled_softmax", num_negatives=16,
                               dropout=0.0, epochs=3)
  result = sasrec.train_sasrec(data["train"], NUM_ITEMS, config)
  assert result.item_embeddings.shape == (NUM_ITEMS, CONFIG.embed_dim)
  assert result.history[-1]["loss"] < result.history[0]["loss"]
  assert np.all(np.isfinite(result.item_embeddings))


def test_training_windows_cover_every_target():
  seq = np.arange(45)
  inputs, targets = sasrec._training_windows([seq, np.array([3])], max_len=20,
                                             all_windows=True)
  assert inputs.shape == targets.shape == (3, 20)
  # Every item after the first is a target exactly once (shifted by +1, 0 = padding).
  got = np.sort(targets[targets > 0]) - 1
  np.testing.assert_array_equal(got, np.arange(1, 45))
  # Inputs are the previous item of each target.
  np.testing.assert_array_equal(inputs[targets > 0], targets[targets > 0] - 1)
  last_only, _ = sasrec._training_windows([seq], max_len=20, all_windows=False)
  assert last_only.shape == (1, 20) and last_only[0, -1] == 44  # Item 43, shifted.


def test_errors(trained):
  with pytest.raises(ValueError, match="empty"):
    sasrec.train_sasrec([], NUM_ITEMS, CONFIG)
  with pytest.raises(ValueError, match=r"train_sequences\[1\].*item index 120"):
    sasrec.train_sasrec([[1, 2, 3], [4, 120, 5]], NUM_ITEMS, CONFIG)
  with pytest.raises(ValueError, match=r"train_sequences\[0\].*item index -1"):
    sasrec.train_sasrec([[1, -1, 3]], NUM_ITEMS, CONFIG)
  with pytest.raises(ValueError, match="at least 2 items"):
    sasrec.train_sasrec([[1], [2]], NUM_ITEMS, CONFIG)
  with pytest.raises(ValueError, match="candidates must be"):
    sasrec.score_candidates(trained, [[1, 2]], np.arange(100))
  with pytest.raises(ValueError, match="rows"):
    sasrec.score_candidates(trained, [[1, 2], [3]], np.zeros((1, 100), np.int64))
  with pytest.raises(ValueError, match=r"candidates\[0\].*item index 500"):
    sasrec.score_candidates(trained, [[1, 2]], np.full((1, 100), 500))
  with pytest.raises(ValueError, match=r"histories\[1\].*item index 999"):
    sasrec.evaluate_sasrec(trained, [[1], [999]], np.zeros((2, 100), np.int64))
  with pytest.raises(ValueError, match="loss"):
    sasrec.SASRecConfig(loss="bpr")
  with pytest.raises(ValueError, match="divisible"):
    sasrec.SASRecConfig(embed_dim=30, num_heads=4)


def test_gin_binds_config():
  gin.parse_config(["sasrec_test/SASRecConfig.embed_dim = 16"])
  with gin.config_scope("sasrec_test"):
    assert sasrec.SASRecConfig().embed_dim == 16
  assert sasrec.SASRecConfig().embed_dim == 64
