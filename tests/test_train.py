"""The training entry point on a tiny T5 and the synthetic world, through the real CLI.

The training runs use the rec-only mixture (one task keeps the tf.data tracing of each run
short; the six-task mixture's input stream is tested on its own below). One uninterrupted
20-step run is the reference. Against it: a run killed after step 12 and
restarted (resumes from the step-10 checkpoint) must log the same loss at every step; a
run whose newest checkpoint is truncated must fall back to the previous one, say so, and
again match; a run with no restorable checkpoint, a missing MODEL_DIR or an unknown
mixture must stop with exit code 2 and a message naming the problem.
"""
import collections
import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import gin
import numpy as np
import pytest
import tensorflow as tf

from gensar_jax import gin_utils
from gensar_jax import train as train_lib
from gensar_jax import train_inputs
from gensar_jax import train_logging
from gensar_jax import trainer as trainer_lib
from gensar_jax.data.schema import DataError
from gensar_jax.errors import PREEMPTED_EXIT_CODE
from gensar_jax.partitioning import Partitioner, create_mesh

from process_group import cpu_env
from task_world import LENGTHS, build_world

pytestmark = pytest.mark.slow  # end-to-end runs of minutes; `make test-fast` skips them

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 20
BATCH = 8
PREFIX = "ttrain"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return build_world(tmp_path_factory.mktemp("train_world"), prefix=PREFIX)


def cli_args(world, model_dir, *extra):
  return ["--gin_file=gin/runs/train.gin", "--gin_file=gin/models/tiny.gin",
          "--gin_file=gin/mesh/cpu_8.gin",
          f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={STEPS}",
          f"--gin.PREPARED_DIR='{world['prepared']}'", f"--gin.IDENTIFIERS_DIR='{world['dual']}'",
          f"--gin.VOCAB_PATH='{world['vocab_path']}'",
          f"--gin.PSEUDO_QUERIES_PATH='{world['pseudo']}'", f"--gin.TASK_PREFIX='{PREFIX}'",
          "--gin.MIXTURE_VARIANT='rec_only'", f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
          f"--gin.BATCH_SIZE={BATCH}", "--gin.EVAL_PERIOD=10", "--gin.EVAL_BATCHES=1",
          "--gin.CHECKPOINT_PERIOD=5", "--gin.KEEP_CHECKPOINTS=2", "--gin.LOG_PERIOD=1",
          "--gin.WARMUP_STEPS=2", "--gin.LEARNING_RATE=3e-3", "--gin.DROPOUT_RATE=0.1",
          # Keep-best by validation loss: the ranking hook of train.gin is tested in
          # tests/test_evaluate_cli.py.
          "--gin.train.eval_hook=None", "--gin.TrainCheckpoints.best_metric='eval/loss'",
          "--gin.TrainCheckpoints.best_mode='min'", *extra]


def run_cli(argv):
  gin.clear_config()
  try:
    train_lib.cli(argv)
  finally:
    gin.clear_config()


def train_losses(model_dir):
  records = train_logging.read_jsonl_metrics(model_dir, "train")
  steps = [r["step"] for r in records]
  assert steps == list(range(1, STEPS + 1)), steps  # one line per step, no duplicates
  return np.array([r["loss"] for r in records])


def checkpoint_steps(model_dir):
  return sorted(int(d) for d in os.listdir(os.path.join(model_dir, "checkpoints"))
                if d.isdigit())


def truncate_step(model_dir, step):
  files = glob.glob(os.path.join(model_dir, "checkpoints", str(step), "state", "**", "d", "*"),
                    recursive=True)
  assert files
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(max(os.path.getsize(f) // 3, 1))


def scalar_tags(event_dir):
  tags = set()
  for path in glob.glob(os.path.join(event_dir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        tags.add(value.tag)
  return tags


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
  """The uninterrupted run."""
  model_dir = str(tmp_path_factory.mktemp("reference") / "run")
  run_cli(cli_args(world, model_dir))
  return model_dir


def test_cli_writes_checkpoints_events_metrics_and_config(reference, world, capsys):
  losses = train_losses(reference)
  assert np.all(np.isfinite(losses))
  assert losses[-5:].mean() < losses[:5].mean()  # it learns
  # Saved at 5, 10, 15, 20; kept: the last two and the best eval/loss of {10, 20}.
  steps = checkpoint_steps(reference)
  assert steps[-2:] == [15, 20] and len(steps) <= 3
  eval_records = train_logging.read_jsonl_metrics(reference, "eval")
  assert [r["step"] for r in eval_records] == [10, 20]
  best = min(eval_records, key=lambda r: r["loss"])["step"]
  assert best in steps
  assert all(r["loss"] > 0 and 0 <= r["accuracy"] <= 1 for r in eval_records)
  rec_task = world["reg"].tasks["next_rec_item"]
  assert f"{rec_task}/loss" in eval_records[0]

  train_record = train_logging.read_jsonl_metrics(reference, "train")[-1]
  for key in ("loss", "accuracy", "learning_rate", "examples_per_sec", "grad_norm"):
    assert key in train_record and train_record[key] is not None
  assert scalar_tags(os.path.join(reference, "train")) >= {
      "loss", "accuracy", "learning_rate", "examples_per_sec"}
  assert scalar_tags(os.path.join(reference, "eval")) >= {
      "loss", "accuracy", f"{rec_task}/loss"}

  with open(os.path.join(reference, "config.gin")) as f:
    config = f.read()
  assert "TRAIN_STEPS = 20" in config and "T5Config.emb_dim = 32" in config

  # Running again with the same TRAIN_STEPS restores step 20 and does nothing.
  capsys.readouterr()
  run_cli(cli_args(world, reference))
  assert "already at step 20" in capsys.readouterr().out
  np.testing.assert_array_equal(train_losses(reference), losses)


def read_movement(model_dir):
  with open(os.path.join(model_dir, "param_movement.json")) as f:
    return json.load(f)


def test_param_movement_is_logged_and_written_at_the_end(reference):
  report = read_movement(reference)
  assert report["step"] == STEPS and report["reference_step"] == 0
  assert report["relative_to"] == "initialisation"
  movement = report["movement"]
  # The world's vocabulary has identifier, behaviour and word-piece tokens.
  assert {"embedding/identifier", "embedding/identifier_row_median", "embedding/behaviour",
          "embedding/word_piece", "output/identifier", "output/identifier_row_median",
          "output/word_piece", "encoder/attention", "encoder/mlp", "decoder/self_attention",
          "decoder/encoder_decoder_attention", "decoder/mlp"} <= set(movement)
  assert all(0 < value < 10 for value in movement.values()), movement
  # The last log line (step 20) carries the same figures, as TensorBoard scalars too.
  last = train_logging.read_jsonl_metrics(reference, "train")[-1]
  assert last["step"] == STEPS and last["movement/reference_step"] == 0
  for name, value in movement.items():
    assert last[f"movement/{name}"] == pytest.approx(value, rel=1e-6), name
  assert "movement/embedding/identifier" in scalar_tags(os.path.join(reference, "train"))


class SimulatedKill(Exception):
  pass


def test_resume_after_kill_reproduces_every_loss(reference, world, tmp_path, monkeypatch,
                                                 caplog):
  model_dir = str(tmp_path / "killed")
  real_step = trainer_lib.Trainer.train_step
  calls = {"n": 0}

  def dies_after_12_steps(self, state, batch):
    calls["n"] += 1
    if calls["n"] > 12:
      raise SimulatedKill()
    return real_step(self, state, batch)

  monkeypatch.setattr(trainer_lib.Trainer, "train_step", dies_after_12_steps)
  with pytest.raises(SimulatedKill):
    run_cli(cli_args(world, model_dir))
  monkeypatch.setattr(trainer_lib.Trainer, "train_step", real_step)
  assert checkpoint_steps(model_dir) == [5, 10]  # 11 and 12 were lost with the process

  with caplog.at_level(logging.INFO, logger="gensar_jax.train"):
    run_cli(cli_args(world, model_dir))
  assert any("resuming from step 10" in r.getMessage() for r in caplog.records)
  np.testing.assert_allclose(train_losses(model_dir), train_losses(reference),
                             rtol=1e-6, atol=1e-7)
  eval_after = train_logging.read_jsonl_metrics(model_dir, "eval")
  eval_ref = train_logging.read_jsonl_metrics(reference, "eval")
  assert [r["step"] for r in eval_after] == [10, 20]
  np.testing.assert_allclose([r["loss"] for r in eval_after], [r["loss"] for r in eval_ref],
                             rtol=1e-6)
  # No step-0 parameters after a restart: movement is relative to the restored step 10.
  report = read_movement(model_dir)
  assert (report["step"], report["reference_step"]) == (20, 10)
  assert report["relative_to"] == "the restored step 10"
  assert report["movement"]["encoder/mlp"] < read_movement(reference)["movement"]["encoder/mlp"]
  references = {r["step"]: r["movement/reference_step"]
                for r in train_logging.read_jsonl_metrics(model_dir, "train")}
  assert references == {step: 0 if step <= 10 else 10 for step in range(1, STEPS + 1)}


class SimulatedTermination(Exception):
  """What SIGTERM does to a trainer that does not handle it: the process ends mid-run."""


def test_sigterm_saves_the_current_step_and_exits_75_then_resumes(reference, world, tmp_path,
                                                                   monkeypatch, capsys, caplog):
  """A real SIGTERM to this process after step 17 (checkpoint period 5): the trainer saves
  step 17, waits for it, and exits with PREEMPTED_EXIT_CODE; the rerun resumes from 17 and
  logs the same losses as the uninterrupted run. Without a handler of the trainer's own,
  the test's (standing in for the default kill) would end the run with nothing saved."""
  model_dir = str(tmp_path / "terminated")
  real_step = trainer_lib.Trainer.train_step
  calls = {"n": 0}

  def sigterm_after_17_steps(self, state, batch):
    out = real_step(self, state, batch)
    calls["n"] += 1
    if calls["n"] == 17:
      os.kill(os.getpid(), signal.SIGTERM)
    return out

  def default_kill(signum, frame):
    raise SimulatedTermination()

  previous = signal.signal(signal.SIGTERM, default_kill)
  try:
    monkeypatch.setattr(trainer_lib.Trainer, "train_step", sigterm_after_17_steps)
    with pytest.raises(SystemExit) as e:
      run_cli(cli_args(world, model_dir))
    assert signal.getsignal(signal.SIGTERM) is default_kill  # the trainer's handler is gone
  finally:
    signal.signal(signal.SIGTERM, previous)
  monkeypatch.setattr(trainer_lib.Trainer, "train_step", real_step)
  assert e.value.code == PREEMPTED_EXIT_CODE == 75
  assert calls["n"] == 17  # stopped at once, not at the end
  assert "preempted: saved step 17" in capsys.readouterr().err
  assert max(checkpoint_steps(model_dir)) == 17 and 15 in checkpoint_steps(model_dir)
  assert not os.path.exists(os.path.join(model_dir, "trainer.lock"))
  assert [r["step"] for r in train_logging.read_jsonl_metrics(model_dir, "train")] == list(
      range(1, 18))

  with caplog.at_level(logging.INFO, logger="gensar_jax.train"):
    run_cli(cli_args(world, model_dir))
  assert any("resuming from step 17" in r.getMessage() for r in caplog.records)
  np.testing.assert_allclose(train_losses(model_dir), train_losses(reference),
                             rtol=1e-6, atol=1e-7)


def test_a_full_disk_exits_2_with_one_line_naming_the_step_kept(world, tmp_path, monkeypatch,
                                                                 capsys, caplog):
  """ENOSPC from orbax's background write of the step-10 checkpoint (the first, step 5,
  was written): exit 2 and one line that says so and names step 5 as what was kept, where
  it was a traceback per failed write (issue 30, row 8)."""
  import errno
  from orbax.checkpoint._src.handlers import json_checkpoint_handler
  model_dir = str(tmp_path / "full")
  real_save = json_checkpoint_handler.JsonCheckpointHandler._save_fn
  writes = {"n": 0}

  async def disk_fills_after_the_first_checkpoint(self, x, directory):
    writes["n"] += 1
    if writes["n"] > 1:
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return await real_save(self, x, directory)

  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn",
                      disk_fills_after_the_first_checkpoint)
  with pytest.raises(SystemExit) as e:
    run_cli(cli_args(world, model_dir, "--gin.EVAL_PERIOD=0"))
  assert e.value.code == 2
  err = capsys.readouterr().err
  lines = [line for line in err.split("error: ")[1:]]  # progress bars share stderr
  assert len(lines) == 1 and "Traceback" not in err, err
  assert "error: " + lines[0].strip() == (
      f"error: {model_dir}: no space left on device; kept: the checkpoint of step 5 "
      f"({os.path.join(model_dir, 'checkpoints', '5')}), the last complete one. Free space "
      "(or move MODEL_DIR to a larger disk) and rerun the same command to resume"), err
  assert checkpoint_steps(model_dir) == [5]
  assert not os.path.exists(os.path.join(model_dir, "trainer.lock"))
  # orbax's threads logged each failed write with its traceback; none of them gets out.
  assert not [r for r in caplog.records if r.exc_info or "No space left" in r.getMessage()]


def test_truncated_latest_checkpoint_falls_back_to_previous(reference, world, tmp_path,
                                                            caplog):
  model_dir = str(tmp_path / "broken")
  shutil.copytree(reference, model_dir)
  truncate_step(model_dir, 20)
  os.remove(os.path.join(model_dir, "param_movement.json"))
  with caplog.at_level(logging.WARNING):
    run_cli(cli_args(world, model_dir, "--gin.train.report_param_movement=False"))
  # Switched off: no movement metrics and no file.
  assert not os.path.exists(os.path.join(model_dir, "param_movement.json"))
  assert not any(k.startswith("movement/")
                 for k in train_logging.read_jsonl_metrics(model_dir, "train")[-1])
  path = os.path.join(model_dir, "checkpoints", "20")
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("step 20" in w and path in w for w in warnings), warnings
  moved = os.listdir(os.path.join(model_dir, "checkpoints.corrupt"))
  assert [m.split("-")[0] for m in moved] == ["20"]
  assert 20 in checkpoint_steps(model_dir)  # trained 16..20 again and saved
  np.testing.assert_allclose(train_losses(model_dir), train_losses(reference),
                             rtol=1e-6, atol=1e-7)


def test_no_restorable_checkpoint_exits_2_without_starting_over(reference, world, tmp_path,
                                                               capsys):
  model_dir = str(tmp_path / "all_broken")
  shutil.copytree(reference, model_dir)
  steps = checkpoint_steps(model_dir)
  for step in steps:
    truncate_step(model_dir, step)
  with pytest.raises(SystemExit) as e:
    run_cli(cli_args(world, model_dir))
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "none can be restored" in err and os.path.join(model_dir, "checkpoints") in err
  assert checkpoint_steps(model_dir) == steps


@pytest.mark.parametrize("binding,message", [
    ("--gin.MODEL_DIR=None", "MODEL_DIR is required"),
    ("--gin.MIXTURE_OR_TASK_NAME='no_such_mixture'", "'no_such_mixture': no SeqIO task"),
    ("--gin.BATCH_SIZE=0", "BATCH_SIZE=0 must be >= 1"),
])
def test_bad_config_exits_2_with_a_message(world, tmp_path, capsys, binding, message):
  with pytest.raises(SystemExit) as e:
    run_cli(cli_args(world, str(tmp_path / "run"), binding))
  assert e.value.code == 2
  assert message in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_missing_model_dir_binding_exits_2(world, tmp_path, capsys):
  argv = [a for a in cli_args(world, "unused") if not a.startswith("--gin.MODEL_DIR")]
  with pytest.raises(SystemExit) as e:
    run_cli(argv)
  assert e.value.code == 2 and "MODEL_DIR is required" in capsys.readouterr().err


def test_input_stream_skip_matches_consumption_and_host_slices(world):
  """The full six-task mixture: skipping N examples rebuilds the stream exactly."""
  mixture = world["reg"].mixtures["all"]
  fresh = train_inputs.train_batches(mixture, LENGTHS, BATCH, slice(0, BATCH), seed=3)
  first = [next(fresh) for _ in range(3)]
  assert not np.array_equal(first[0]["encoder_input_tokens"], first[1]["encoder_input_tokens"])
  # A second process resuming after 2 batches with rows 4:8 of each global batch.
  resumed = next(train_inputs.train_batches(mixture, LENGTHS, BATCH, slice(4, 8), seed=3,
                                            examples_to_skip=2 * BATCH))
  assert set(resumed) == set(first[2])
  for key in first[2]:
    np.testing.assert_array_equal(resumed[key], first[2][key][4:8])
  partitioner = Partitioner(create_mesh(data=4, model=2))
  assert partitioner.per_host_batch_slice(BATCH) == slice(0, BATCH)  # one process

  tasks = world["reg"].tasks
  assert train_inputs.eval_batches(tasks["item_to_id"], LENGTHS, BATCH, slice(0, BATCH),
                                   num_batches=1) == {}  # a train-only task has no eval
  evals = train_inputs.eval_batches(tasks["next_rec_item"], LENGTHS, 64, slice(0, 64),
                                    num_batches=1)
  (batch,) = evals[tasks["next_rec_item"]]
  weights = batch["decoder_loss_weights"]
  # 10 users -> at most 10 real validation rows; the filler rows of the batch weigh 0.
  assert weights.shape == (64, LENGTHS["targets"])
  real_rows = sum(1 for _ in train_inputs.member_tasks(tasks["next_rec_item"])[0]
                  .get_dataset(LENGTHS, split="validation", shuffle=False))
  assert 0 < real_rows <= 10
  assert weights[:real_rows].sum() > 0 and weights[real_rows:].sum() == 0


def _rows(batch):
  return {tuple(row[row > 0]) for row in batch["encoder_input_tokens"]}


def test_input_shards_give_each_process_its_own_disjoint_examples(world):
  """Two input shards: one process reading both builds the global batch a pair of
  processes builds reading one each; the shards hold different examples; resume skips
  whole batches of every shard."""
  mixture = world["reg"].mixtures["all"]
  both = train_inputs.train_batches(mixture, LENGTHS, BATCH, slice(0, BATCH), seed=3,
                                    num_input_shards=2)
  first = [next(both) for _ in range(4)]
  second_half = train_inputs.train_batches(mixture, LENGTHS, BATCH, slice(4, 8), seed=3,
                                           num_input_shards=2)
  for batch in first:
    half = next(second_half)
    for key in batch:
      np.testing.assert_array_equal(half[key], batch[key][4:8])
  # The rec task's examples (one per user and position): no example in both shards.
  rec = world["reg"].tasks["next_rec_item"]
  shards = [train_inputs.train_batches(rec, LENGTHS, BATCH, slice(4 * k, 4 * k + 4), seed=3,
                                       num_input_shards=2) for k in range(2)]
  seen = [set().union(*(_rows(next(stream)) for _ in range(5))) for stream in shards]
  assert len(seen[0]) > 10 and len(seen[1]) > 10 and not seen[0] & seen[1]
  unsharded = train_inputs.train_batches(mixture, LENGTHS, BATCH, slice(0, BATCH), seed=3)
  assert _rows(next(unsharded)) != _rows(first[0])  # another stream than one shard's
  resumed = train_inputs.train_batches(mixture, LENGTHS, BATCH, slice(0, BATCH), seed=3,
                                       num_input_shards=2, examples_to_skip=2 * BATCH)
  np.testing.assert_array_equal(next(resumed)["encoder_input_tokens"],
                                first[2]["encoder_input_tokens"])
  with pytest.raises(DataError, match="must be >= 1 and divide BATCH_SIZE"):
    train_inputs.train_batches(mixture, LENGTHS, BATCH, slice(0, BATCH), seed=3,
                               num_input_shards=3)
  with pytest.raises(DataError, match="not whole blocks of 2"):
    train_inputs.train_batches(mixture, LENGTHS, BATCH, slice(3, 8), seed=3,
                               num_input_shards=4)


def test_input_shards_with_target_buckets_agree_on_one_length_per_step(world):
  mixture = world["reg"].mixtures["all"]
  full = LENGTHS["targets"]
  local = train_inputs.train_batches(mixture, LENGTHS, BATCH, slice(0, BATCH), seed=5,
                                     num_input_shards=2, target_buckets=[8])
  agreed = train_inputs.train_batches(mixture, LENGTHS, BATCH, slice(0, BATCH), seed=5,
                                      num_input_shards=2, target_buckets=[8],
                                      agree_target_length=lambda length: full)
  lengths = set()
  for _ in range(12):
    a, b = next(local), next(agreed)
    length = a["decoder_target_tokens"].shape[1]
    lengths.add(length)
    assert b["decoder_target_tokens"].shape[1] == full
    for key in train_inputs.TARGET_FEATURES:
      if key in a:
        np.testing.assert_array_equal(b[key][:, :length], a[key])
        assert not b[key][:, length:].any()  # padding only: no loss, no tokens
  assert lengths <= {8, full} and 8 in lengths


def test_target_buckets_batch_each_example_once_at_its_bucket_length(world):
  """Bucketed batches hold the examples of the padded stream, each batch in one bucket with
  its target features cut to that bucket; skipping N batches resumes exactly."""
  mixture = world["reg"].mixtures["all"]
  # Identifier targets are 6 tokens (behaviour + 4 codes + EOS); queries and item texts
  # vary, so a bucket at 6 splits the stream into at least two buckets.
  buckets = [6]
  stream = train_inputs.train_batches(mixture, LENGTHS, BATCH, slice(0, BATCH), seed=5,
                                      target_buckets=buckets)
  batches = [next(stream) for _ in range(40)]
  widths = collections.Counter(b["decoder_target_tokens"].shape[1] for b in batches)
  assert set(widths) <= {6, LENGTHS["targets"]} and len(widths) == 2, widths
  for b in batches:
    width = b["decoder_target_tokens"].shape[1]
    used = (b["decoder_target_tokens"] > 0).sum(axis=1)  # [batch] target tokens, EOS incl.
    assert used.max() <= width
    shorter = [x for x in [0, *buckets, LENGTHS["targets"]] if x < width]
    assert used.max() > max(shorter), "an example sits in a longer bucket than it needs"
    assert b["decoder_loss_weights"].shape == b["decoder_input_tokens"].shape == used.shape + (
        width,)
  # The same examples as the padded stream: every bucketed target is a padded-stream target.
  padded = train_inputs.train_batches(mixture, LENGTHS, BATCH, slice(0, BATCH), seed=5)
  seen = {tuple(row[row > 0]) for _ in range(40)
          for row in next(padded)["decoder_target_tokens"]}
  bucketed = [tuple(row[row > 0]) for b in batches[:4] for row in b["decoder_target_tokens"]]
  assert sum(t in seen for t in bucketed) >= 0.9 * len(bucketed)
  resumed = next(train_inputs.train_batches(mixture, LENGTHS, BATCH, slice(0, BATCH), seed=5,
                                            examples_to_skip=7 * BATCH,
                                            target_buckets=buckets))
  for key, value in batches[7].items():
    np.testing.assert_array_equal(resumed[key], value)
  with pytest.raises(DataError, match="TARGET_BUCKETS"):
    next(train_inputs.train_batches(mixture, LENGTHS, BATCH, slice(0, BATCH), seed=5,
                                    target_buckets=[LENGTHS["targets"] + 1]))


def test_packed_stream_counts_examples_and_resumes_exactly(world):
  mixture = world["reg"].mixtures["all"]
  pack = {"inputs": 2 * LENGTHS["inputs"], "targets": 2 * LENGTHS["targets"]}
  stream = train_inputs.train_batches(mixture, LENGTHS, BATCH, slice(0, BATCH), seed=2,
                                      pack_lengths=pack)
  batches = [next(stream) for _ in range(3)]
  first = batches[0]
  assert first["encoder_input_tokens"].shape == (BATCH, pack["inputs"])
  assert first["decoder_segment_ids"].max() >= 2  # several examples in some row
  assert train_inputs.examples_in(first) > BATCH
  resumed = next(train_inputs.train_batches(mixture, LENGTHS, BATCH, slice(0, BATCH), seed=2,
                                            examples_to_skip=2 * BATCH, pack_lengths=pack))
  for key, value in batches[2].items():
    np.testing.assert_array_equal(resumed[key], value)
  with pytest.raises(DataError, match="PACK_LENGTHS"):
    train_inputs.check_pack_lengths(LENGTHS, {"inputs": 8, "targets": 64})


def test_early_stopping_ends_a_run_that_stopped_improving_and_stays_stopped(world, tmp_path):
  """Selecting the *highest* validation loss while training lowers it: no evaluation after
  the first improves, so with a patience of 2 training stops at the third evaluation;
  rerun, it trains nothing."""
  model_dir = str(tmp_path / "stop")
  flags = ("--gin.TrainCheckpoints.best_mode='max'", "--gin.LEARNING_RATE=1e-2",
           "--gin.EVAL_PERIOD=2", "--gin.EARLY_STOPPING_EVALS=2")
  def train_once():
    gin.clear_config()
    try:
      gin_utils.parse_gin(cli_args(world, model_dir, *flags))
      return train_lib.train()
    finally:
      gin.clear_config()

  summary = train_once()
  assert summary.final_step == 6 and summary.start_step == 0
  evals = train_logging.read_jsonl_metrics(model_dir, "eval")
  assert [e["step"] for e in evals] == [2, 4, 6]
  assert 6 in checkpoint_steps(model_dir)
  again = train_once()
  assert again.final_step == again.start_step == 6
  stopper = train_lib.EarlyStopping(2, "eval/x", "max", {})
  assert not stopper.update({"eval/x": 1.0}) and not stopper.update({"eval/x": 0.5})
  assert not stopper.update({"eval/x": 2.0}) and stopper.evals_since_best == 0
  assert not stopper.update({}) and stopper.update({"eval/x": 2.0})


def _subprocess_env():
  return cpu_env(8, keep_xla_flags=False)


def test_second_trainer_on_a_directory_in_use_exits_2_and_the_first_finishes(world, tmp_path,
                                                                            capsys):
  model_dir = str(tmp_path / "shared")
  steps = 60
  first = subprocess.Popen([sys.executable, "-m", "gensar_jax.train",
                            *cli_args(world, model_dir, f"--gin.TRAIN_STEPS={steps}",
                                      "--gin.EVAL_PERIOD=0")],
                           env=_subprocess_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  try:
    lock = os.path.join(model_dir, "trainer.lock")
    deadline = time.time() + 240
    while not os.path.exists(lock):
      assert first.poll() is None, first.communicate()[0][-3000:]
      assert time.time() < deadline
      time.sleep(0.2)
    with pytest.raises(SystemExit) as exit_info:
      run_cli(cli_args(world, model_dir, f"--gin.TRAIN_STEPS={steps}"))
    assert exit_info.value.code == 2
    assert f"{model_dir} is in use by another trainer: pid {first.pid}" in \
        capsys.readouterr().err
    out, _ = first.communicate(timeout=400)
  finally:
    if first.poll() is None:
      first.kill()
  assert first.returncode == 0, out[-3000:]
  records = train_logging.read_jsonl_metrics(model_dir, "train")
  assert [r["step"] for r in records] == list(range(1, steps + 1))  # one writer's lines
  assert not os.path.exists(lock)  # released at the end


def test_a_failing_checkpoint_save_ends_the_run_with_an_error(world, tmp_path):
  """A save that cannot be written must end the trainer with an error, not leave it
  hanging (orbax's signalling threads used to keep the failed process alive, in about
  half the runs). Here the checkpoint directory is replaced by a plain file after the first
  save (permissions would not stop a root test runner)."""
  model_dir = str(tmp_path / "broken")
  proc = subprocess.Popen([sys.executable, "-m", "gensar_jax.train",
                           *cli_args(world, model_dir, "--gin.TRAIN_STEPS=400",
                                     "--gin.EVAL_PERIOD=0", "--gin.LOG_PERIOD=5")],
                          env=_subprocess_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  checkpoints = os.path.join(model_dir, "checkpoints")
  try:
    deadline = time.time() + 240
    while not (os.path.isdir(checkpoints) and checkpoint_steps(model_dir)):
      assert proc.poll() is None, proc.communicate()[0][-3000:]
      assert time.time() < deadline
      time.sleep(0.05)
    os.rename(checkpoints, checkpoints + ".moved")
    with open(checkpoints, "w") as f:
      f.write("not a directory")
    out, _ = proc.communicate(timeout=240)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 1, out[-3000:]
  assert "Not a directory" in out  # the failed save, named (orbax or tensorstore wording)
  metrics = train_logging.read_jsonl_metrics(model_dir, "train")
  assert metrics[-1]["step"] < 400
