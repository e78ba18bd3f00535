"""Identifier token embeddings initialised from their items (gensar_jax/identifier_init.py).

What must hold: a token's feature is the mean over the items whose SID or CID holds it (a
shared-prefix token counts an item once); only identifier rows of the input embedding and
columns of the output layer change, each keeping its norm and its sharding; tokens of items
with similar embeddings start closer than random tokens do; and `train` applies the
initialiser to a fresh run only, never to a resumed one.
"""
import os
import shutil

import flax
import gin
import jax
import numpy as np
import pytest

from gensar_jax import gin_utils
from gensar_jax import identifier_init
from gensar_jax import optimizers
from gensar_jax import train as train_lib
from gensar_jax import trainer as trainer_lib
from gensar_jax import vocabulary as vocab_lib
from gensar_jax.identifiers import table as table_lib
from gensar_jax.models import encoder_decoder
from gensar_jax.models.t5_config import T5Config
from gensar_jax.partitioning import Partitioner, create_mesh
from task_world import CODEBOOK, LENGTHS, NUM_ITEMS, build_world

PREFIX = "tinit"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return build_world(tmp_path_factory.mktemp("init_world"), prefix=PREFIX)


@pytest.fixture(scope="module")
def identifiers(world, tmp_path_factory):
  """The world's dual table plus item embeddings: items 0-14 and 15-29 form two clusters
  in both spaces, so tokens used only by one cluster have clearly separated features."""
  path = str(tmp_path_factory.mktemp("ids") / "dual")
  shutil.copytree(world["dual"], path)
  rng = np.random.default_rng(0)
  cluster = (np.arange(NUM_ITEMS) >= NUM_ITEMS // 2).astype(np.float64)
  semantic = rng.normal(size=(NUM_ITEMS, 12)) * 0.1
  semantic[:, 0] += 3 * cluster - 1.5
  collaborative = rng.normal(size=(NUM_ITEMS, 4)) * 0.1
  collaborative[:, 1] += 3 * cluster - 1.5
  np.save(os.path.join(path, identifier_init.SEMANTIC_FILE), semantic.astype(np.float32))
  np.save(os.path.join(path, identifier_init.COLLABORATIVE_FILE),
          collaborative.astype(np.float32))
  return path


def test_token_features_average_the_items_that_use_each_token(identifiers):
  table = table_lib.load_identifier_table(identifiers)
  features = np.arange(NUM_ITEMS * 2, dtype=np.float64).reshape(NUM_ITEMS, 2)
  by_token = identifier_init.token_features(table, features)
  # Level m0 code c is shared by SID and CID of items c*CODEBOOK .. c*CODEBOOK+7: each once.
  members = [i for i in range(NUM_ITEMS) if i // CODEBOOK == 1]
  np.testing.assert_allclose(by_token["<m0_1>"], features[members].mean(axis=0))
  # A specific level: s0 holds (3 i) % CODEBOOK.
  members = [i for i in range(NUM_ITEMS) if (3 * i) % CODEBOOK == 2]
  np.testing.assert_allclose(by_token["<s0_2>"], features[members].mean(axis=0))
  assert set(by_token) == {t for row in table.sid_tokens + table.cid_tokens for t in row}
  with pytest.raises(ValueError, match="different runs"):
    identifier_init.token_features(table, features[:-1])


def test_mixed_rows_keep_norms_and_follow_item_weight():
  rng = np.random.default_rng(1)
  random_rows = (rng.normal(size=(5, 8)) * 3).astype(np.float32)
  item_rows = rng.normal(size=(5, 8)).astype(np.float32)
  for weight in (0.0, 0.5, 1.0):
    mixed = np.asarray(identifier_init.mixed_rows(random_rows, item_rows, weight))
    np.testing.assert_allclose(np.linalg.norm(mixed, axis=1),
                               np.linalg.norm(random_rows, axis=1), rtol=1e-5)
  np.testing.assert_allclose(identifier_init.mixed_rows(random_rows, item_rows, 0.0),
                             random_rows, rtol=1e-5)
  cosine = lambda a, b: np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
  np.testing.assert_allclose(
      cosine(np.asarray(identifier_init.mixed_rows(random_rows, item_rows, 1.0)), item_rows),
      1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="item_weight"):
    identifier_init.IdentifierEmbeddingInit("x", item_weight=1.5)


def _sharded_params(world):
  vocabulary = vocab_lib.load_vocabulary(world["vocab_path"])
  config = T5Config(emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32, num_encoder_layers=1,
                    num_decoder_layers=1, dtype="float32")
  model = encoder_decoder.build_model(vocabulary, config)
  trainer = trainer_lib.Trainer(model, Partitioner(create_mesh(4, 2), fsdp=True),
                                optimizers.create_optimizer())
  state = trainer.init_state({"encoder_input_tokens": (8, 16), "decoder_input_tokens": (8, 8)})
  return state.params, vocabulary


def test_only_identifier_rows_change_with_their_norms_and_shardings(world, identifiers):
  params, vocabulary = _sharded_params(world)
  initialiser = identifier_init.IdentifierEmbeddingInit(identifiers, item_weight=0.8)
  new = initialiser(params, vocabulary)
  table = table_lib.load_identifier_table(identifiers)
  used = sorted({vocab_lib.token_id(vocabulary, t)
                 for row in table.sid_tokens + table.cid_tokens for t in row})
  old_flat, new_flat = (flax.traverse_util.flatten_dict(p) for p in (params, new))
  for path in (identifier_init.EMBEDDING, identifier_init.OUTPUT_KERNEL):
    old_x, new_x = old_flat[path], new_flat[path]
    assert new_x.sharding == old_x.sharding
    old_rows, new_rows = np.asarray(old_x), np.asarray(new_x)
    if path == identifier_init.OUTPUT_KERNEL:
      old_rows, new_rows = old_rows.T, new_rows.T                      # [vocab, embed]
    others = np.setdiff1d(np.arange(old_rows.shape[0]), used)
    np.testing.assert_array_equal(new_rows[others], old_rows[others])
    assert not np.allclose(new_rows[used], old_rows[used])
    np.testing.assert_allclose(np.linalg.norm(new_rows[used], axis=1),
                               np.linalg.norm(old_rows[used], axis=1), rtol=1e-5)
    # Tokens used only by the first cluster's items (m0_0: items 0-7) against the second's
    # (m0_2: items 16-23): far apart; two first-cluster tokens (m0_0, m0_1: items 0-15
    # minus 15): close.
    row = lambda t: new_rows[vocab_lib.token_id(vocabulary, t)]
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert cos(row("<m0_0>"), row("<m0_1>")) > 0.3 > cos(row("<m0_0>"), row("<m0_2>"))
  # Other parameters are untouched.
  flat_old = jax.tree_util.tree_leaves_with_path(params)
  flat_new = dict(jax.tree_util.tree_leaves_with_path(new))
  for key, leaf in flat_old:
    if "token_embedder" not in str(key) and "logits_dense" not in str(key):
      np.testing.assert_array_equal(np.asarray(flat_new[key]), np.asarray(leaf))


@pytest.mark.slow
def test_train_initialises_a_fresh_run_and_never_a_resumed_one(world, identifiers, tmp_path):
  model_dir = str(tmp_path / "run")
  calls = []

  def recording(params, vocabulary):
    calls.append(vocabulary.vocab_size)
    return identifier_init.IdentifierEmbeddingInit(identifiers)(params, vocabulary)

  def run(steps):
    gin.clear_config()
    try:
      gin_utils.parse_gin([
          "--gin_file=gin/runs/train.gin", "--gin_file=gin/models/tiny.gin",
          f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}",
          f"--gin.PREPARED_DIR='{world['prepared']}'", f"--gin.IDENTIFIERS_DIR='{identifiers}'",
          f"--gin.VOCAB_PATH='{world['vocab_path']}'", f"--gin.TASK_PREFIX='{PREFIX}'",
          f"--gin.PSEUDO_QUERIES_PATH='{world['pseudo']}'",
          "--gin.MIXTURE_VARIANT='rec_only'", f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
          "--gin.BATCH_SIZE=8", "--gin.EVAL_PERIOD=0", "--gin.CHECKPOINT_PERIOD=2",
          "--gin.LOG_PERIOD=1", "--gin.WARMUP_STEPS=1", "--gin.train.eval_hook=None",
          "--gin.TrainCheckpoints.best_metric=None"])
      return train_lib.train(initialise_params=recording)
    finally:
      gin.clear_config()

  first = run(2)
  assert first.final_step == 2 and len(calls) == 1
  resumed = run(4)
  assert resumed.start_step == 2 and resumed.final_step == 4
  assert len(calls) == 1  # the checkpoint's parameters were kept
