"""Checkpoints on plain sharded pytrees: retention (last K + best), restore into another
mesh, fallback past a broken latest step, and the error when nothing restores."""
import glob
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gensar_jax import checkpoints as ckpt_lib


def mesh(shape, names):
  n = int(np.prod(shape))
  return Mesh(np.array(jax.devices()[:n]).reshape(shape), names)


def make_state(value, m):
  """A TrainState-like tree: a sharded matrix, a replicated vector and a step."""
  return {
      "params": {"w": jax.device_put(jnp.full((8, 4), value, jnp.float32),
                                     NamedSharding(m, P("data", "model")))},
      "opt": (jax.device_put(jnp.arange(4, dtype=jnp.float32) * value,
                             NamedSharding(m, P())),),
      "step": jax.device_put(jnp.int32(value), NamedSharding(m, P())),
  }


def target_for(state, m, spec_w):
  shardings = {"params": {"w": NamedSharding(m, spec_w)}, "opt": (NamedSharding(m, P()),),
               "step": NamedSharding(m, P())}
  return ckpt_lib.abstract_state(jax.eval_shape(lambda: state), shardings)


def corrupt_step(directory, step):
  """Truncates every array data file of a step (what a kill mid-copy leaves)."""
  files = glob.glob(os.path.join(directory, str(step), "state", "**", "d", "*"),
                    recursive=True)
  assert files, f"no data files under step {step}"
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(max(os.path.getsize(f) // 3, 1))


def test_keeps_last_k_and_best_by_metric(tmp_path):
  m = mesh((4, 2), ("data", "model"))
  ckpts = ckpt_lib.TrainCheckpoints(str(tmp_path / "ck"), keep_last=2,
                                    best_metric="eval/accuracy", best_mode="max",
                                    async_save=False)
  accuracy = {1: 0.2, 2: 0.9, 3: None, 4: 0.5, 5: 0.1, 6: None}
  for step, acc in accuracy.items():
    metrics = None if acc is None else {"eval/accuracy": acc, "eval/loss": 1 - acc}
    assert ckpts.save(step, make_state(step, m), {"examples": step * 4}, metrics=metrics)
  ckpts.wait_until_finished()
  # last two (5, 6) and the best by accuracy (2); 3 had no metrics, 4 lost to 2.
  assert ckpts.all_steps() == [2, 5, 6]
  assert ckpts.best_step() == 2
  assert sorted(os.listdir(tmp_path / "ck")) == ["2", "5", "6"]
  assert not ckpts.save(6, make_state(6, m), {"examples": 0})  # never overwrites a step
  ckpts.close()

  low = ckpt_lib.TrainCheckpoints(str(tmp_path / "low"), keep_last=1,
                                  best_metric="eval/loss", best_mode="min", keep_best=2,
                                  async_save=False)
  for step, loss in enumerate([0.5, 0.3, 0.4, 0.9, float("nan")], start=1):
    low.save(step, make_state(step, m), {"examples": step}, metrics={"eval/loss": loss})
  assert low.all_steps() == [2, 3, 5]  # two lowest losses + the latest (NaN ranks worst)
  assert low.best_step() == 2
  low.close()


def test_restores_into_another_mesh_with_data_position(tmp_path):
  m = mesh((4, 2), ("data", "model"))
  ckpts = ckpt_lib.TrainCheckpoints(str(tmp_path), keep_last=3, async_save=True)
  state = make_state(3.5, m)
  ckpts.save(7, state, {"examples": 28, "seed": 0})
  ckpts.wait_until_finished()

  other = mesh((2,), ("data",))
  reopened = ckpt_lib.TrainCheckpoints(str(tmp_path), keep_last=3)
  restored = reopened.restore_latest(target_for(state, other, P(None, "data")))
  assert restored.step == 7 and restored.skipped == ()
  assert restored.data_position == {"examples": 28, "seed": 0}
  w = restored.state["params"]["w"]
  assert w.sharding == NamedSharding(other, P(None, "data"))
  np.testing.assert_array_equal(np.asarray(w), np.full((8, 4), 3.5, np.float32))
  np.testing.assert_array_equal(np.asarray(restored.state["opt"][0]),
                                np.arange(4, dtype=np.float32) * 3.5)
  assert int(restored.state["step"]) == 3
  reopened.close()


def test_nothing_saved_restores_none(tmp_path):
  m = mesh((8, 1), ("data", "model"))
  ckpts = ckpt_lib.TrainCheckpoints(str(tmp_path / "empty"))
  assert ckpts.restore_latest(target_for(make_state(1, m), m, P())) is None


def test_falls_back_past_broken_latest_and_can_save_that_step_again(tmp_path, caplog):
  m = mesh((4, 2), ("data", "model"))
  directory = str(tmp_path / "ck")
  ckpts = ckpt_lib.TrainCheckpoints(directory, keep_last=5, async_save=False)
  for step in (10, 20, 30):
    ckpts.save(step, make_state(step, m), {"examples": step})
  ckpts.close()
  corrupt_step(directory, 30)
  os.remove(os.path.join(directory, "20", "data", "metadata"))

  target = target_for(make_state(0, m), m, P("data", "model"))
  reopened = ckpt_lib.TrainCheckpoints(directory, keep_last=5, async_save=False)
  with caplog.at_level(logging.WARNING, logger="gensar_jax.checkpoints"):
    restored = reopened.restore_latest(target)
  assert restored.step == 10
  assert [s for s, _ in restored.skipped] == [30, 20]
  np.testing.assert_array_equal(np.asarray(restored.state["params"]["w"]),
                                np.full((8, 4), 10, np.float32))
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  for step in (30, 20):
    assert any(f"step {step}" in w and os.path.join(directory, str(step)) in w
               for w in warnings), warnings
  # Broken steps are moved aside, not deleted, and the run can save step 20 again.
  assert reopened.all_steps() == [10]
  moved = sorted(os.listdir(directory + ".corrupt"))
  assert [name.split("-")[0] for name in moved] == ["20", "30"]
  assert reopened.save(20, make_state(21, m), {"examples": 21})
  again = reopened.restore_latest(target)
  assert again.step == 20 and again.data_position == {"examples": 21}
  reopened.close()


def test_no_restorable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
  m = mesh((8, 1), ("data", "model"))
  directory = str(tmp_path / "ck")
  ckpts = ckpt_lib.TrainCheckpoints(directory, keep_last=2, async_save=False)
  for step in (1, 2):
    ckpts.save(step, make_state(step, m), {"examples": step})
  ckpts.close()
  corrupt_step(directory, 1)
  corrupt_step(directory, 2)
  reopened = ckpt_lib.TrainCheckpoints(directory, keep_last=2)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"2 checkpoint\(s\) exist but none") as e:
    reopened.restore_latest(target_for(make_state(0, m), m, P()))
  assert os.path.join(directory, "2") in str(e.value)
  assert reopened.all_steps() == [1, 2]  # nothing moved: a person decides


def test_bad_options_are_rejected(tmp_path):
  with pytest.raises(ValueError, match="keep_last"):
    ckpt_lib.TrainCheckpoints(str(tmp_path), keep_last=0)
  with pytest.raises(ValueError, match="best_mode"):
    ckpt_lib.TrainCheckpoints(str(tmp_path), best_metric="x", best_mode="up")
