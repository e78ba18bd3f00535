"""A run directory on a bucket: the filesystem layer and the real CLIs against a GCS emulator.

The emulator (gcp-storage-emulator, on loopback, in memory, wrapped by
tests/gcs_emulator.py to send the generation headers real GCS sends) speaks the GCS JSON API; gcsfs
(the filesystem layer's fsspec backend, `EPATH_USE_TF=0`) and tensorstore (orbax's array
writer, `TENSORSTORE_GCS_HTTP_URL`) are pointed at it. Only MODEL_DIR is on the bucket; the
prepared data stays local, as a pod reads its data from wherever SeqIO's files are.

What must hold: no stage creates a local directory named `gs:`, and the bucket ends up
with the operative config, checkpoints, metrics.jsonl (one line per step, across a resume)
and TensorBoard event files; a second trainer on the same bucket run stops with exit 2;
evaluate, export and infer restore the bucket's checkpoints and write their results, the
serving artifact and the predictions to the bucket, where they read back.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from process_group import free_port
from task_world import LENGTHS, build_world

pytestmark = pytest.mark.slow  # end-to-end runs of minutes; `make test-fast` skips them

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "tbucket"
BUCKET = "gensar-test"
TIMEOUT_S = 420


def _wait_for_port(port: int, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    assert proc.poll() is None, "the GCS emulator exited at start-up"
    try:
      with socket.create_connection(("127.0.0.1", port), timeout=1):
        return
    except OSError:
      time.sleep(0.2)
  raise AssertionError("the GCS emulator did not start listening in time")


def _emulator_env(url: str) -> dict:
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
          "EPATH_USE_TF": "0",
          # gcsfs otherwise probes each bucket's type over gRPC (a minute per call here).
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


@pytest.fixture(scope="module")
def emulator():
  port = free_port()
  proc = subprocess.Popen(
      [sys.executable, os.path.join(REPO, "tests", "gcs_emulator.py"), str(port), BUCKET],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
  try:
    _wait_for_port(port, proc)
    yield _emulator_env(f"http://127.0.0.1:{port}")
  finally:
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def bucket_env(emulator, monkeypatch):
  """This process's filesystem layer pointed at the emulator."""
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  for name, value in emulator.items():
    monkeypatch.setenv(name, value)
  # etils decides once per process whether gs:// goes through TensorFlow; earlier tests in
  # this process (orbax on local paths) have already asked.
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  yield
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access


def test_io_utils_on_a_bucket(bucket_env, tmp_path):
  from gensar_jax import io_utils  # pylint: disable=g-import-not-at-top
  root = f"gs://{BUCKET}/layer"
  log = io_utils.join(root, "logs", "run.log")
  assert log == f"gs://{BUCKET}/layer/logs/run.log" and io_utils.is_remote(log)
  assert not io_utils.exists(log) and io_utils.read_text_if_exists(log) is None
  io_utils.append_text(log, "one\n")
  io_utils.append_text(log, "two\n")  # an object cannot be appended to: rewritten whole
  assert io_utils.read_text(log) == "one\ntwo\n"
  io_utils.write_json(io_utils.join(root, "a.json"), {"x": 1})
  assert io_utils.read_json_if_valid(io_utils.join(root, "a.json")) == {"x": 1}
  assert io_utils.listdir(root) == ["a.json", "logs"]
  assert io_utils.isdir(io_utils.join(root, "logs"))
  assert io_utils.isfile(log) and not io_utils.isfile(io_utils.join(root, "logs"))
  assert time.time() - io_utils.mtime(log) < 600

  out = io_utils.join(root, "out")
  with pytest.raises(RuntimeError):
    with io_utils.atomic_output_dir(out) as tmp:
      with open(os.path.join(tmp, "half.txt"), "w") as f:
        f.write("x")
      raise RuntimeError("fails mid-write")
  assert not io_utils.exists(out)  # nothing uploaded
  with io_utils.atomic_output_dir(out) as tmp:
    os.makedirs(os.path.join(tmp, "sub"))
    with open(os.path.join(tmp, "sub", "b.bin"), "wb") as f:
      f.write(b"\x00\x01")
  assert io_utils.read_bytes(io_utils.join(out, "sub", "b.bin")) == b"\x00\x01"
  with pytest.raises(FileExistsError):
    with io_utils.atomic_output_dir(out):
      pass
  moved = io_utils.join(root, "moved")
  io_utils.move(out, moved)
  assert not io_utils.exists(out) and io_utils.listdir(io_utils.join(moved, "sub")) == ["b.bin"]
  # Local and remote in one call: a bucket directory downloaded, then removed.
  io_utils.copytree(moved, str(tmp_path / "local"))
  assert (tmp_path / "local" / "sub" / "b.bin").read_bytes() == b"\x00\x01"
  io_utils.rmtree(root)
  assert not io_utils.exists(root)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return build_world(tmp_path_factory.mktemp("bucket_world"), prefix=PREFIX)


def _train_flags(world, model_dir, steps):
  return ["--gin_file=gin/runs/train.gin", "--gin_file=gin/models/tiny.gin",
          "--gin_file=gin/runs/evaluate.gin",
          f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}",
          f"--gin.PREPARED_DIR='{world['prepared']}'", f"--gin.IDENTIFIERS_DIR='{world['dual']}'",
          f"--gin.VOCAB_PATH='{world['vocab_path']}'",
          f"--gin.PSEUDO_QUERIES_PATH='{world['pseudo']}'", f"--gin.TASK_PREFIX='{PREFIX}'",
          "--gin.MIXTURE_VARIANT='rec_only'", f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
          "--gin.BATCH_SIZE=8", "--gin.EVAL_PERIOD=4", "--gin.EVAL_BATCHES=1",
          "--gin.CHECKPOINT_PERIOD=4", "--gin.KEEP_CHECKPOINTS=2", "--gin.LOG_PERIOD=1",
          "--gin.WARMUP_STEPS=2", "--gin.LEARNING_RATE=3e-3", "--gin.NUM_BEAMS=4",
          "--gin.train.eval_hook=None", "--gin.TrainCheckpoints.best_metric='eval/loss'",
          "--gin.TrainCheckpoints.best_mode='min'"]


def _run(module, flags, emulator, cwd):
  env = dict(os.environ)
  env.update(emulator)
  env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
  # Started from an empty directory, so a local folder named `gs:` would be seen there.
  return subprocess.run([sys.executable, "-m", module, *flags], env=env, cwd=cwd,
                        capture_output=True, text=True, timeout=TIMEOUT_S)


def _config_paths(flags):
  """The gin files are repository paths; the processes run elsewhere."""
  return [f"--gin_file={os.path.join(REPO, f.split('=', 1)[1])}"
          if f.startswith("--gin_file=") else f for f in flags]


@pytest.mark.timeout(4 * TIMEOUT_S)
def test_train_resume_lock_evaluate_export_infer_on_a_bucket(world, emulator, bucket_env, tmp_path):
  from gensar_jax import io_utils, run_lock, train_logging  # pylint: disable=g-import-not-at-top
  model_dir = f"gs://{BUCKET}/runs/tiny"
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  first = _run("gensar_jax.train", _config_paths(_train_flags(world, model_dir, 8)),
               emulator, cwd)
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  assert not os.listdir(cwd), os.listdir(cwd)  # nothing written locally
  names = io_utils.listdir(model_dir)
  assert {"config.gin", "checkpoints", "metrics.jsonl", "train", "eval"} <= set(names), names
  assert run_lock.LOCK_NAME not in names  # released at the end
  assert [n for n in io_utils.listdir(io_utils.join(model_dir, "train"))
          if n.startswith("events.out.tfevents.")]
  assert "MODEL_DIR = 'gs://" in io_utils.read_text(io_utils.join(model_dir, "config.gin"))

  # Relaunched with more steps: resumes from the bucket's step 8.
  second = _run("gensar_jax.train", _config_paths(_train_flags(world, model_dir, 12)),
                emulator, cwd)
  assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
  assert "trained steps 9-12" in second.stdout + second.stderr
  steps = [r["step"] for r in train_logging.read_jsonl_metrics(model_dir, "train")]
  assert steps == list(range(1, 13)), steps

  # A live trainer elsewhere holds the run: a third launch stops at once with exit 2.
  now = time.time()
  io_utils.write_text(io_utils.join(model_dir, run_lock.LOCK_NAME), json.dumps(
      {"host": "other-worker", "pid": 1, "token": "t", "started": now, "heartbeat": now}))
  third = _run("gensar_jax.train", _config_paths(_train_flags(world, model_dir, 16)),
               emulator, cwd)
  assert third.returncode == 2, third.stdout[-2000:] + third.stderr[-2000:]
  assert "in use by another trainer" in third.stderr and "other-worker" in third.stderr
  io_utils.remove(io_utils.join(model_dir, run_lock.LOCK_NAME))

  # Evaluation restores from the bucket and writes its results there.
  eval_dir = f"gs://{BUCKET}/runs/tiny_eval"
  evaluated = _run("gensar_jax.evaluate", _config_paths(_train_flags(world, model_dir, 12)) + [
      f"--gin.evaluate.output_dir='{eval_dir}'", "--gin.evaluate.max_examples=8"],
      emulator, cwd)
  assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
  assert "results.md" in io_utils.listdir(eval_dir)

  # Export: the artifact is built locally and uploaded whole; its metadata reads back.
  export_dir = f"gs://{BUCKET}/runs/tiny_export"
  exported = _run("gensar_jax.export", _config_paths(_train_flags(world, model_dir, 12)) + [
      f"--gin_file={os.path.join(REPO, 'gin/runs/export.gin')}",
      f"--gin.EXPORT_DIR='{export_dir}'", "--gin.SERVING_BEAMS=4",
      "--gin.export.batch_buckets=(1,)"], emulator, cwd)
  assert exported.returncode == 0, exported.stdout[-3000:] + exported.stderr[-3000:]
  from gensar_jax.serving import artifact as artifact_lib  # pylint: disable=g-import-not-at-top
  metadata = io_utils.read_json(io_utils.join(export_dir, artifact_lib.METADATA_FILE))
  assert metadata["num_beams"] == 4 and metadata["batch_buckets"] == [1]
  assert artifact_lib.PARAMS_FILE in io_utils.listdir(export_dir)

  # Infer: predictions written next to the run on the bucket.
  inferred = _run("gensar_jax.infer", _config_paths(_train_flags(world, model_dir, 12)) + [
      f"--gin_file={os.path.join(REPO, 'gin/runs/infer.gin')}", "--gin.infer.num_beams=4",
      "--gin.infer.top_k=3", "--gin.infer.max_examples=4", "--gin.infer.progress=False"],
      emulator, cwd)
  assert inferred.returncode == 0, inferred.stdout[-3000:] + inferred.stderr[-3000:]
  rows = io_utils.read_jsonl(io_utils.join(model_dir, "predictions_rec_test.jsonl"))
  assert len(rows) == 4 and all(len(r["items"]) == 3 for r in rows)
  assert not os.listdir(cwd), os.listdir(cwd)  # nothing of any stage landed locally
