"""A 2-host slice simulated on loopback, through the real `python -m gensar_jax.train`.

The workers get exactly what launch/tpu_commands.py gives the workers of a 2-host slice
(v4-16: 8 chips on 2 TPU VMs): its environment and its gin flags. Only what Cloud TPU
itself would supply is added for the simulation: the coordinator address and each process's
index (on a TPU VM, jax.distributed finds both in the VM metadata), 4 CPU devices per
process standing in for a worker's 4 chips, and a local MODEL_DIR in place of the bucket
(both processes share this machine's disk, as the workers share the bucket).

Each worker reads only its own input shard (one of 2; INPUT_SHARDS defaults to the
process count). Against a 1-process run on 8 local devices with the same flags, reading
both shards: the same 8-device mesh,
the same loss at every step, one metrics file and one set of checkpoints. Preempted after
the step-6 checkpoint (SIGTERM to both workers, as a spot preemption sends), the pair saves
the step it is at (JAX's preemption sync point: the same step on both), exits with
PREEMPTED_EXIT_CODE, and relaunched with the same command resumes from that step, not from
the periodic checkpoint, and still logs the same losses.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gensar_jax import train_logging
from gensar_jax.errors import PREEMPTED_EXIT_CODE

from process_group import free_port
from task_world import LENGTHS, build_world

pytestmark = pytest.mark.slow  # end-to-end runs of minutes; `make test-fast` skips them

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "tpod"
STEPS = 12
TIMEOUT_S = 420


def _launch_module(name):
  sys.path.insert(0, os.path.join(REPO, "launch"))
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "launch", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


tpu_pod = _launch_module("tpu_pod")
tpu_commands = sys.modules["tpu_commands"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return build_world(tmp_path_factory.mktemp("pod_world"), prefix=PREFIX)


def _run_flags(world):
  return ["--gin_file=gin/runs/train.gin", "--gin_file=gin/models/tiny.gin",
          "--gin.MODEL_DIR='gs://bucket/pod_run'", f"--gin.TRAIN_STEPS={STEPS}",
          f"--gin.PREPARED_DIR='{world['prepared']}'", f"--gin.IDENTIFIERS_DIR='{world['dual']}'",
          f"--gin.VOCAB_PATH='{world['vocab_path']}'",
          f"--gin.PSEUDO_QUERIES_PATH='{world['pseudo']}'", f"--gin.TASK_PREFIX='{PREFIX}'",
          "--gin.MIXTURE_VARIANT='rec_only'", f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
          "--gin.BATCH_SIZE=8", "--gin.EVAL_PERIOD=0", "--gin.CHECKPOINT_PERIOD=6",
          "--gin.LOG_PERIOD=1", "--gin.WARMUP_STEPS=2", "--gin.LEARNING_RATE=3e-3",
          "--gin.DROPOUT_RATE=0.0", "--gin.train.eval_hook=None",
          "--gin.TrainCheckpoints.best_metric=None"]


def worker_command(world):
  """(environment, argv) of a worker of a 2-host v4-16 slice, from the launcher itself."""
  spec, _, _ = tpu_pod.parse_args([
      "--name=sim", "--zone=us-central2-b", "--accelerator_type=v4-16",
      "--mesh_gin=gin/mesh/cpu_8.gin", *_run_flags(world)])
  assert spec.shape.workers == 2 and spec.shape.chips == 8
  words = tpu_commands.train_command(spec)[1:]
  env = {}
  while "=" in words[0] and not words[0].startswith("-"):
    name, value = words.pop(0).split("=", 1)
    env[name] = value
  assert words[:3] == [".venv/bin/python", "-m", "gensar_jax.train"]
  return env, words[3:]


def _with_model_dir(argv, model_dir):
  return [f"--gin.MODEL_DIR='{model_dir}'" if a.startswith("--gin.MODEL_DIR=") else a
          for a in argv]


def _base_env(devices):
  env = dict(os.environ)
  for name in ("GENSAR_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "GENSAR_NUM_PROCESSES",
               "GENSAR_PROCESS_ID", "GENSAR_EXPECTED_PROCESSES"):
    env.pop(name, None)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
  return env


def start_pod(world, model_dir, log_dir, attempt):
  launcher_env, argv = worker_command(world)
  port = free_port()
  procs = []
  for index in range(2):
    env = _base_env(4)
    env.update(launcher_env)
    env.update({"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "GENSAR_NUM_PROCESSES": "2",
                "GENSAR_PROCESS_ID": str(index)})
    log = open(os.path.join(log_dir, f"attempt{attempt}_process{index}.log"), "w")
    procs.append((subprocess.Popen(
        [sys.executable, "-m", "gensar_jax.train", *_with_model_dir(argv, model_dir)],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True),
        log))
  return procs


def wait_all(procs, timeout=TIMEOUT_S):
  deadline = time.time() + timeout
  codes = []
  try:
    for proc, _ in procs:
      codes.append(proc.wait(timeout=max(deadline - time.time(), 1)))
  finally:
    kill_all(procs)
  return codes


def kill_all(procs):
  for proc, log in procs:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
    log.close()


def _log(log_dir, name):
  with open(os.path.join(log_dir, name), errors="replace") as f:
    return f.read()


def checkpoint_steps(model_dir):
  path = os.path.join(model_dir, "checkpoints")
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def losses(model_dir):
  records = train_logging.read_jsonl_metrics(model_dir, "train")
  assert [r["step"] for r in records] == list(range(1, STEPS + 1)), records
  return np.array([r["loss"] for r in records])


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
  """One process, 8 local devices, the workers' flags, reading the 2 input shards the two
  workers read one each: what the pair must reproduce."""
  _, argv = worker_command(world)
  argv = [*argv, "--gin.INPUT_SHARDS=2"]
  model_dir = str(tmp_path_factory.mktemp("pod_reference") / "run")
  result = subprocess.run([sys.executable, "-m", "gensar_jax.train",
                           *_with_model_dir(argv, model_dir)], env=_base_env(8), cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "process 0 of 1 (single process): 8 local / 8 global cpu devices" in result.stderr
  return model_dir


@pytest.mark.timeout(3 * TIMEOUT_S)
def logged_steps(model_dir):
  try:
    return [r["step"] for r in train_logging.read_jsonl_metrics(model_dir, "train")]
  except (OSError, ValueError):  # not written yet, or a line being written
    return []


def test_two_hosts_train_one_model_like_one_host_and_resume(world, reference, tmp_path):
  model_dir = str(tmp_path / "run")
  log_dir = str(tmp_path)
  # First attempt: SIGTERM to both workers (a spot preemption) once step 6 is saved.
  procs = start_pod(world, model_dir, log_dir, 0)
  deadline = time.time() + TIMEOUT_S
  while 6 not in checkpoint_steps(model_dir) or max(logged_steps(model_dir)) < 7:
    assert all(p.poll() is None for p, _ in procs), _log(log_dir, "attempt0_process0.log")
    assert time.time() < deadline, "no step-6 checkpoint in time"
    time.sleep(0.05)
  for proc, _ in procs:
    proc.send_signal(signal.SIGTERM)
  codes = wait_all(procs)
  assert codes == [PREEMPTED_EXIT_CODE] * 2, _log(log_dir, "attempt0_process0.log")[-3000:]
  for index in range(2):
    text = _log(log_dir, f"attempt0_process{index}.log")
    assert f"process {index} of 2 (distributed): 4 local / 8 global cpu devices" in text
  # Both saved the step they were at together, past the periodic checkpoint of step 6.
  preempted_at = max(checkpoint_steps(model_dir))
  assert 6 < preempted_at < STEPS and logged_steps(model_dir)[-1] == preempted_at
  assert f"preempted: saved step {preempted_at}" in _log(log_dir, "attempt0_process0.log")
  assert not os.path.exists(os.path.join(model_dir, "trainer.lock"))
  # Relaunched with the same command: resumes from that step and finishes.
  codes = wait_all(start_pod(world, model_dir, log_dir, 1))
  assert codes == [0, 0], _log(log_dir, "attempt1_process0.log")[-3000:]
  assert f"trained steps {preempted_at + 1}-{STEPS}" in _log(log_dir, "attempt1_process0.log")
  # One model: one metrics file whose losses are the 1-process run's, one checkpoint set.
  np.testing.assert_allclose(losses(model_dir), losses(reference), rtol=2e-5)
  assert checkpoint_steps(reference) == [6, 12]
  assert checkpoint_steps(model_dir) == sorted({6, preempted_at, 12})
  assert sorted(os.listdir(model_dir)) == sorted(os.listdir(reference))
  # Parameter movement, measured on arrays spread over both processes, agrees with the
  # 1-process run while both count from step 0, then counts from the restored step 6.
  def movement(run):
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("movement/")}
            for r in train_logging.read_jsonl_metrics(run, "train")}
  pod, single = movement(model_dir), movement(reference)
  for step in range(1, preempted_at + 1):
    assert pod[step].keys() == single[step].keys() and "movement/encoder/mlp" in pod[step]
    for name, value in single[step].items():
      np.testing.assert_allclose(pod[step][name], value, rtol=1e-3, err_msg=f"{step} {name}")
  assert {pod[step]["movement/reference_step"]
          for step in range(preempted_at + 1, STEPS + 1)} == {preempted_at}
