"""Optimisers: the embedding learning-rate multiplier and Adafactor from gin."""
from __future__ import annotations

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gensar_jax import gin_utils
from gensar_jax import optimizers
from gensar_jax import partitioning
from gensar_jax import trainer as trainer_lib
from task_world import input_shapes, synthetic_batch, tiny_model

EMBEDDING = ("token_embedder", "embedding")
OUTPUT = ("decoder", "logits_dense", "kernel")


def _params_and_grads():
  """A tiny parameter tree with the model's paths, and a gradient for it."""
  rng = np.random.default_rng(0)
  params = {"token_embedder": {"embedding": rng.normal(size=(16, 4))},          # [vocab, embed]
            "decoder": {"logits_dense": {"kernel": rng.normal(size=(4, 16)) * 0.5},
                        "decoder_norm": {"scale": np.ones(4)}},
            "encoder": {"relpos_bias": {"rel_embedding": rng.normal(size=(2, 8))}}}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
  return params, grads


def _first_update(name, multiplier, **kwargs):
  optimizer = optimizers.create_optimizer(name=name, learning_rate_fn=optax.constant_schedule(
      0.1), embedding_lr_multiplier=multiplier, **kwargs)
  params, grads = _params_and_grads()
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  return flax.traverse_util.flatten_dict(jax.device_get(updates))


def test_embedding_path_predicate_names_only_the_token_embedding():
  assert optimizers.is_embedding_path(EMBEDDING)
  assert optimizers.is_embedding_path(("params",) + EMBEDDING)
  for path in [OUTPUT, ("encoder", "relpos_bias", "rel_embedding"), ("embedding",),
               ("encoder", "layers_0", "mlp", "wo", "kernel")]:
    assert not optimizers.is_embedding_path(path), path


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_multiplier_scales_exactly_the_embedding_updates(name):
  base = _first_update(name, 1.0, weight_decay=0.01)
  doubled = _first_update(name, 2.0, weight_decay=0.01)
  frozen = _first_update(name, 0.0, weight_decay=0.01)
  for path, update in base.items():
    assert np.abs(update).max() > 0, path
    if path == EMBEDDING:
      np.testing.assert_array_equal(doubled[path], 2 * update)
      np.testing.assert_array_equal(frozen[path], 0 * update)
    else:  # the untied output layer included: untouched
      np.testing.assert_array_equal(doubled[path], update)
      np.testing.assert_array_equal(frozen[path], update)


def test_adamw_first_step_update_is_lr_times_sign_times_multiplier():
  # Adam's first step is g / (|g| + eps) per coordinate: the lr (x multiplier) in size.
  update = _first_update("adamw", 2.0, weight_decay=0.0, clip_grad_norm=None)
  _, grads = _params_and_grads()
  expected = -0.1 * 2.0 * np.sign(np.asarray(grads["token_embedder"]["embedding"]))
  np.testing.assert_allclose(update[EMBEDDING], expected, rtol=1e-5)
  np.testing.assert_allclose(np.abs(update[OUTPUT]), 0.1, rtol=1e-5)


def test_multiplier_keeps_the_optimiser_state_structure():
  """A checkpoint restores whatever the multiplier: the state tree is the same."""
  params, _ = _params_and_grads()
  for name in ("adamw", "adafactor"):
    states = [optimizers.create_optimizer(name=name, embedding_lr_multiplier=m).init(params)
              for m in (1.0, 3.0)]
    assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])
  with pytest.raises(ValueError, match="embedding_lr_multiplier"):
    optimizers.create_optimizer(embedding_lr_multiplier=-1.0)


def _gin_optimizer(*bindings):
  gin.clear_config()
  try:
    required = [f"{macro}='unused'" for macro in ("MODEL_DIR", "PREPARED_DIR",
                                                   "IDENTIFIERS_DIR", "VOCAB_PATH")]
    gin_utils.parse_gin(["--gin_file=gin/runs/train.gin", "--gin.TRAIN_STEPS=8",
                         "--gin.WARMUP_STEPS=2", "--gin.LEARNING_RATE=1e-2",
                         *[f"--gin.{b}" for b in required + list(bindings)]])
    return optimizers.create_optimizer()
  finally:
    gin.clear_config()


def test_gin_binds_the_multiplier_and_adafactor():
  adamw = _gin_optimizer("EMBEDDING_LR_MULTIPLIER=0.0")
  params, grads = _params_and_grads()
  updates, _ = adamw.update(grads, adamw.init(params), params)
  assert float(jnp.abs(updates["token_embedder"]["embedding"]).max()) == 0.0
  adafactor = _gin_optimizer("create_optimizer.name='adafactor'")
  state = adafactor.init(params)
  # Adafactor's factored second moments: a row and a column vector per matrix.
  assert any(isinstance(s, optax.FactoredState) for s in jax.tree.leaves(
      state, is_leaf=lambda s: isinstance(s, optax.FactoredState)))
  np.testing.assert_allclose(adafactor.learning_rate_fn(2), 1e-2)  # the gin schedule


def test_adafactor_trains_the_tiny_model_on_a_sharded_mesh():
  """Adafactor with the warm-up/cosine schedule and global-norm clipping, through the
  Trainer on a data x model mesh (factored statistics get replicated shardings)."""
  schedule = optimizers.create_learning_rate_schedule(peak_learning_rate=1e-2,
                                                      warmup_steps=2, decay_steps=12)
  optimizer = optimizers.create_optimizer(name="adafactor", learning_rate_fn=schedule,
                                          clip_grad_norm=1.0, embedding_lr_multiplier=2.0)
  mesh = partitioning.create_mesh(data=4, model=2, devices=jax.devices()[:8])
  trainer = trainer_lib.Trainer(tiny_model(), partitioning.Partitioner(mesh), optimizer)
  state = trainer.init_state(input_shapes(8))
  batch = synthetic_batch(0, 8)
  losses = []
  for step in range(12):
    state, metrics = trainer.train_step(state, batch)
    metrics = jax.device_get(metrics)
    np.testing.assert_allclose(metrics["learning_rate"], schedule(step), rtol=1e-6)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1
