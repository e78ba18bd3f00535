"""The sharded train step: mesh-independence, exact accumulation, resumability, learning."""
from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from gensar_jax import optimizers
from gensar_jax import partitioning
from gensar_jax import trainer as trainer_lib
from task_world import input_shapes, synthetic_batch, tiny_model


def _trainer(data, model, fsdp=False, num_microbatches=1, peak=1e-2, warmup=0, seed=0,
             dropout_rate=0.0, optimizer=None):
  mesh = partitioning.create_mesh(data=data, model=model, devices=jax.devices()[:data * model])
  if optimizer is None:
    schedule = optimizers.create_learning_rate_schedule(
        peak_learning_rate=peak, warmup_steps=warmup, decay_steps=20)
    optimizer = optimizers.create_optimizer(learning_rate_fn=schedule)
  return trainer_lib.Trainer(tiny_model(dropout_rate=dropout_rate),
                             partitioning.Partitioner(mesh, fsdp=fsdp), optimizer,
                             num_microbatches=num_microbatches, seed=seed)


def _train(trainer, batches, state=None):
  if state is None:
    state = trainer.init_state(input_shapes(len(batches[0]["encoder_input_tokens"])))
  history = []
  for batch in batches:
    state, metrics = trainer.train_step(state, batch)
    history.append(jax.device_get(metrics))
  return state, history


def _on(trainer, host_state, batch_size):
  """A host copy of a state placed in `trainer`'s layout (saves compiling another init)."""
  trainer.set_input_shapes(input_shapes(batch_size))
  return jax.device_put(host_state, trainer.state_shardings)


def test_five_steps_agree_on_8x1_4x2_fsdp_and_1x1_meshes():
  batches = [synthetic_batch(seed, 8) for seed in range(5)]
  reference = _trainer(1, 1, warmup=2)
  initial = reference.init_state(input_shapes(8))
  host_initial = jax.device_get(initial)
  # Train metrics describe the params before the update, so step 0's equal eval's.
  eval_before = jax.device_get(reference.eval_step(initial.params, batches[0]))
  runs = {}
  for data, model, fsdp in [(1, 1, False), (8, 1, False), (4, 2, True)]:
    trainer = reference if data == 1 else _trainer(data, model, fsdp=fsdp, warmup=2)
    state, history = _train(trainer, batches, state=_on(trainer, host_initial, 8))
    runs[(data, model)] = ([h["loss"] for h in history], jax.device_get(state.params))
    # Metrics of each step: the schedule at that step, token counts of that batch.
    schedule = trainer.optimizer.learning_rate_fn
    for step, (metrics, batch) in enumerate(zip(history, batches)):
      np.testing.assert_allclose(metrics["learning_rate"], schedule(step), rtol=1e-6)
      assert metrics["weight_sum"] == batch["decoder_loss_weights"].sum()
      assert metrics["grad_norm"] > 0 and 0.0 < metrics["z_loss"] < metrics["loss"]
    assert history[0]["learning_rate"] == 0.0   # linear warm-up starts at zero
    assert int(state.step) == 5
    for key in ("loss", "z_loss", "accuracy", "weight_sum"):
      np.testing.assert_allclose(history[0][key], eval_before[key], rtol=1e-5, err_msg=key)
  reference_losses, reference_params = runs[(1, 1)]
  # The model learns (so the runs are not equal merely because nothing moves).
  assert reference_losses[-1] < reference_losses[0] - 0.1
  for key, (losses, params) in runs.items():
    np.testing.assert_allclose(losses, reference_losses, rtol=2e-5, err_msg=str(key))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params,
                 reference_params)


def test_gradient_accumulation_equals_full_batch_gradient():
  batch = synthetic_batch(7, 16)
  # Microbatch m takes rows m, m+4, ...; their token weights differ, so averaging the
  # per-microbatch mean losses would not give the full-batch gradient.
  per_micro = batch["decoder_loss_weights"].reshape(4, 4, -1).transpose(1, 0, 2).sum((1, 2))
  assert len(set(per_micro.tolist())) > 1
  # Plain SGD with rate 1: the update is exactly minus the gradient.
  sgd = optimizers.Optimizer(tx=optax.sgd(1.0), learning_rate_fn=lambda step: 1.0)
  host_initial = None
  results = {}
  for microbatches in (1, 4):
    trainer = _trainer(4, 2, fsdp=True, num_microbatches=microbatches, optimizer=sgd)
    if host_initial is None:
      host_initial = jax.device_get(trainer.init_state(input_shapes(16)))
    state, (metrics,) = _train(trainer, [batch], state=_on(trainer, host_initial, 16))
    grads = jax.tree.map(lambda b, a: b - a, host_initial.params, jax.device_get(state.params))
    results[microbatches] = (metrics, grads)
  (m1, g1), (m4, g4) = results[1], results[4]
  for key in ("loss", "z_loss", "accuracy", "weight_sum", "grad_norm"):
    np.testing.assert_allclose(m4[key], m1[key], rtol=1e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), g4, g1)
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(g1)) > 1e-3

  uneven = _trainer(4, 2, num_microbatches=3)
  uneven.set_input_shapes(input_shapes(16))
  with pytest.raises(ValueError, match="not divisible by num_microbatches=3"):
    uneven.train_step(None, batch)


def test_dropout_is_reproducible_and_resumable_from_the_step_counter():
  batches = [synthetic_batch(seed, 8) for seed in range(4)]
  trainer = _trainer(8, 1, dropout_rate=0.3, seed=5)
  _, straight = _train(trainer, batches)
  # Stop after two steps, take the state off device (a checkpoint), put it back, go on.
  state, first = _train(trainer, batches[:2])
  restored = jax.device_put(jax.device_get(state), trainer.state_shardings)
  params_before_step_2 = jax.device_get(restored.params)
  _, second = _train(trainer, batches[2:], state=restored)
  resumed = [h["loss"] for h in first + second]
  np.testing.assert_allclose(resumed, [h["loss"] for h in straight], rtol=1e-6)
  # Dropout is really on: the training loss differs from the dropout-free eval loss on
  # the same params and batch.
  eval_metrics = jax.device_get(trainer.eval_step(
      jax.device_put(params_before_step_2, trainer.state_shardings.params), batches[2]))
  assert abs(float(eval_metrics["loss"]) - second[0]["loss"]) > 1e-3
  assert eval_metrics["weight_sum"] == second[0]["weight_sum"]


def test_bad_trainer_inputs_are_named():
  trainer = _trainer(4, 2)
  with pytest.raises(TypeError, match="Optimizer"):
    trainer_lib.Trainer(tiny_model(), trainer.partitioner, optax.sgd(0.1))
  with pytest.raises(ValueError, match="num_microbatches"):
    trainer_lib.Trainer(tiny_model(), trainer.partitioner, trainer.optimizer,
                        num_microbatches=0)
  with pytest.raises(RuntimeError, match="init_state"):
    trainer.train_step(None, synthetic_batch(0, 8))
  with pytest.raises(RuntimeError, match="init_state"):
    trainer.state_shardings


def test_tiny_model_overfits_a_fixed_batch():
  """Fails if gradients, the update or the sharded loss were wrong."""
  schedule = optimizers.create_learning_rate_schedule(
      peak_learning_rate=1e-2, warmup_steps=10, decay_steps=100)
  trainer = _trainer(2, 1, optimizer=optimizers.create_optimizer(learning_rate_fn=schedule))
  batch = synthetic_batch(11, 32)
  state = trainer.init_state(input_shapes(32))
  global_batch = trainer.partitioner.shard_batch(batch)   # shard once, reuse
  losses = []
  for _ in range(100):
    state, metrics = trainer.train_step(state, global_batch)
    losses.append(metrics["loss"])
  metrics = jax.device_get(metrics)
  assert float(losses[0]) > 4.0   # ~log(128) at initialisation
  assert metrics["loss"] < 0.05, metrics
  assert metrics["accuracy"] == 1.0
