"""The Cloud TPU launcher (dry run and a real run against a fake gcloud), the mesh gin files,
and joining processes with gensar_jax.distributed (two real CPU processes on loopback)."""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import socket
import subprocess
import sys
import textwrap
import time

import gin
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "launch", "tpu_pod.py")


def _load_launcher():
  spec = importlib.util.spec_from_file_location("tpu_pod", LAUNCHER)
  module = importlib.util.module_from_spec(spec)
  sys.modules["tpu_pod"] = module  # dataclasses look their module up by name
  spec.loader.exec_module(module)
  return module


tpu_pod = _load_launcher()

MODEL_DIR_FLAG = "--gin.MODEL_DIR='gs://my-bucket/runs/t5 small'"  # a space inside quotes
QUOTED_FLAG = "--gin.RUN_NOTE=\"it's a \\\"test\\\" $HOME\""         # both quote kinds, a $
GIN_FLAGS = ["--gin_file=gin/tasks.gin", "--gin_file", "gin/runs/identify.gin",
             MODEL_DIR_FLAG, QUOTED_FLAG, "--gin_bindings=TRAIN_STEPS = 100"]
V5P_ARGS = ["--name=gensar-v5p", "--accelerator_type=v5p-64", "--zone=us-east5-a",
            "--project=my-project", "--spot"]


def _run_launcher(args, env=None, cwd=REPO):
  return subprocess.run([sys.executable, LAUNCHER, *args], capture_output=True, text=True,
                        env=env, cwd=cwd, timeout=120)


def _commands(stdout):
  """Printed command lines (comments dropped), each split the way a shell would."""
  return [shlex.split(line) for line in stdout.splitlines()
          if line.strip() and not line.startswith("#")]


def _remote_command(argv):
  [flag] = [a for a in argv if a.startswith("--command=")]
  return flag[len("--command="):]


def _train_words(start_script):
  """The trainer's argv inside the worker start script (`bash -c '<train>; ...'`)."""
  words = shlex.split(start_script)
  wrapped = words[words.index("-c", words.index("setsid")) + 1]
  return shlex.split(wrapped.split("; code=$?")[0])


def _start_command(stdout):
  return next(_remote_command(c) for c in _commands(stdout)
              if c[0] == "gcloud" and c[4] == "ssh" and "gensar_jax.train" in _remote_command(c))


# --- slice table ------------------------------------------------------------------------


@pytest.mark.parametrize("accelerator_type, normalised, chips, workers, runtime", [
    ("v4-8", "v4-8", 4, 1, "tpu-ubuntu2204-base"),
    ("v4-32", "v4-32", 16, 4, "tpu-ubuntu2204-base"),
    ("v5litepod-8", "v5litepod-8", 8, 1, "v2-alpha-tpuv5-lite"),
    ("v5litepod-16", "v5litepod-16", 16, 4, "v2-alpha-tpuv5-lite"),
    ("v5e-16", "v5litepod-16", 16, 4, "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v5p-8", 4, 1, "v2-alpha-tpuv5"),
    ("v5p-64", "v5p-64", 32, 8, "v2-alpha-tpuv5"),
    ("v6e-256", "v6e-256", 256, 64, "v2-alpha-tpuv6e"),
])
def test_slice_shape_from_accelerator_type(accelerator_type, normalised, chips, workers,
                                           runtime):
  shape = tpu_pod.slice_shape(accelerator_type)
  assert (shape.accelerator_type, shape.chips, shape.workers, shape.runtime) == (
      normalised, chips, workers, runtime)


@pytest.mark.parametrize("bad, says", [("v5p-63", "sizes"), ("v9-8", "unknown TPU"),
                                       ("tpu-v4", "expected GENERATION-SIZE")])
def test_bad_accelerator_type_is_a_launch_error(bad, says):
  with pytest.raises(tpu_pod.LaunchError, match=says):
    tpu_pod.slice_shape(bad)


def test_no_gin_file_is_a_launch_error_even_with_the_slices_mesh_file():
  # The launcher adds gin/mesh/v5p_64.gin itself; that alone must not count as a run config.
  with pytest.raises(tpu_pod.LaunchError, match="no --gin_file given"):
    tpu_pod.parse_args([*V5P_ARGS, MODEL_DIR_FLAG])


def test_mesh_files_match_their_slices_and_parse():
  from gensar_jax import partitioning
  for accelerator_type, path in tpu_pod.MESH_GIN_FILES.items():
    gin.clear_config()
    gin.parse_config_file(os.path.join(REPO, path))
    data = gin.query_parameter("create_mesh.data")
    model = gin.query_parameter("create_mesh.model")
    assert data * model == tpu_pod.slice_shape(accelerator_type).chips, path
  gin.clear_config()
  gin.parse_config_file(os.path.join(REPO, "gin/mesh/cpu_8.gin"))
  try:
    mesh = partitioning.create_mesh()  # 8 simulated CPU devices (tests/conftest.py)
    assert dict(mesh.shape) == {"data": 4, "model": 2}
    assert partitioning.Partitioner(mesh=mesh).fsdp is False
  finally:
    gin.clear_config()


# --- dry run ----------------------------------------------------------------------------


def test_dry_run_multi_worker_prints_every_command_and_runs_none(tmp_path):
  fake_bin = _fake_gcloud(tmp_path)
  env = dict(os.environ, PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
             FAKE_GCLOUD_DIR=str(tmp_path))
  done = _run_launcher([*V5P_ARGS, "--watch", "--dry_run", *GIN_FLAGS], env=env)
  assert done.returncode == 0, done.stderr
  assert not (tmp_path / "gcloud.log").exists()  # nothing was executed
  commands = _commands(done.stdout)
  verbs = [c[4] if c[0] == "gcloud" else c[0] for c in commands]
  assert verbs == ["describe", "create", "delete", "git", "scp", "ssh", "ssh", "ssh",
                   # --watch: the recovery path after a preemption
                   "describe", "delete", "create", "git", "scp", "ssh", "ssh", "ssh"]
  create = commands[1]
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "gensar-v5p"]
  for flag in ("--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5", "--zone=us-east5-a",
               "--project=my-project", "--spot"):
    assert flag in create
  assert "--preemptible" not in create
  for scp_or_ssh in (c for c in commands if c[0] == "gcloud" and c[4] in ("scp", "ssh")):
    assert "--worker=all" in scp_or_ssh
  install = _remote_command(commands[5])
  assert "'jax[tpu]==0.11.2'" in install and "-c constraints-py312.txt" in install
  assert "python3.12 -m venv" in install and "ppa:deadsnakes/ppa" in install
  assert "python3.11" not in install
  # apt waits for the dpkg lock (unattended-upgrades on a fresh VM) at every call.
  assert install.count("apt-get") == install.count("apt-get -o DPkg::Lock::Timeout=600") == 4
  start = _remote_command(commands[6])
  assert "setsid nohup bash -c" in start and ".run/train.log" in start
  train = _train_words(start)
  assert "GENSAR_DISTRIBUTED=1" in train and "GENSAR_EXPECTED_PROCESSES=8" in train
  assert "GENSAR_STATUS" in _remote_command(commands[7])
  flags = train[train.index("gensar_jax.train") + 1:]
  assert flags == ["--gin_file=gin/tasks.gin", "--gin_file=gin/runs/identify.gin",
                   "--gin_file=gin/mesh/v5p_64.gin", MODEL_DIR_FLAG, QUOTED_FLAG,
                   "--gin_bindings=TRAIN_STEPS = 100"]
  assert "v5p-64: 32 chips on 8 worker(s)" in done.stdout


def test_remote_training_command_reaches_python_verbatim(tmp_path):
  """Runs the printed --command= string in a real shell, with a fake worker checkout."""
  done = _run_launcher([*V5P_ARGS, "--dry_run", *GIN_FLAGS])
  assert done.returncode == 0, done.stderr
  remote = _start_command(done.stdout)
  venv_bin = tmp_path / "gensar-jax" / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  fake_python = venv_bin / "python"
  fake_python.write_text(textwrap.dedent(f"""\
      #!{sys.executable}
      import json, os, sys
      json.dump({{"argv": sys.argv[1:], "expected": os.environ.get("GENSAR_EXPECTED_PROCESSES"),
                 "distributed": os.environ.get("GENSAR_DISTRIBUTED")}},
                open(os.path.join(os.path.dirname(os.getcwd()), "got.json"), "w"))
      """))
  fake_python.chmod(0o755)
  env = dict(os.environ, GENSAR_TPU_DEVICES=str(tmp_path / "no-such-device"))
  subprocess.run(["bash", "-c", remote], cwd=tmp_path, check=True, timeout=60, env=env)
  _wait_for(lambda: (tmp_path / "gensar-jax" / ".run" / "exit").exists())
  assert (tmp_path / "gensar-jax" / ".run" / "exit").read_text().strip() == "0"
  got = json.loads((tmp_path / "got.json").read_text())
  assert got["argv"][:2] == ["-m", "gensar_jax.train"]
  assert MODEL_DIR_FLAG in got["argv"] and QUOTED_FLAG in got["argv"]
  assert (got["expected"], got["distributed"]) == ("8", "1")


@pytest.mark.parametrize("args, says", [
    (["--accelerator_type=v5p-63"], "v5p comes in sizes"),
    (["--accelerator_type=tpu"], "expected GENERATION-SIZE"),
    (["--gin.MODEL_DIR='/home/me/model'"], "not a gs:// path: the slice has 8 workers"),
    (["--gin.MODEL_DIR=runs/model"], "not a gs:// path"),
    (["--gin.MODEL_DIR=None", "--gin.MODEL_DIR=''"], "MODEL_DIR is not set"),
    (["--accelerator_type=v4-32", "--gin.MODEL_DIR='gs://b/m'"], "no mesh gin file for v4-32"),
    (["--gin_file=gin/does_not_exist.gin", "--gin.MODEL_DIR='gs://b/m'"], "not found"),
    (["--gin_file=/etc/hosts", "--gin.MODEL_DIR='gs://b/m'"], "inside the repository"),
])
def test_bad_launches_fail_clearly(args, says):
  base = ["--name=t", "--zone=z", "--accelerator_type=v5p-64", "--gin_file=gin/tasks.gin"]
  done = _run_launcher([*base, *args, "--dry_run"])
  assert done.returncode == 2
  assert says in done.stderr, done.stderr
  assert not done.stdout.strip() or all(line.startswith("#") for line in
                                        done.stdout.splitlines())


def test_single_host_allows_local_model_dir_unless_watching():
  base = ["--name=t", "--zone=z", "--accelerator_type=v4-8", "--gin_file=gin/tasks.gin",
          "--gin.MODEL_DIR='runs/local'", "--dry_run"]
  done = _run_launcher(base)
  assert done.returncode == 0, done.stderr
  train = _train_words(_start_command(done.stdout))
  assert "GENSAR_DISTRIBUTED=1" not in train and "GENSAR_EXPECTED_PROCESSES=1" in train
  assert "--gin_file=gin/mesh/v4_8.gin" in train
  watched = _run_launcher([*base, "--watch"])
  assert watched.returncode == 2 and "loses its local disk" in watched.stderr


def test_spot_and_preemptible_are_exclusive():
  done = _run_launcher([*V5P_ARGS, "--preemptible", "--dry_run", *GIN_FLAGS])
  assert done.returncode == 2 and "not allowed with argument" in done.stderr


# --- a real run against a fake gcloud ---------------------------------------------------


def _fake_gcloud(tmp_path):
  """A gcloud that logs its argv and plays a slice: NOT_FOUND, then READY, preempted once."""
  fake_bin = tmp_path / "bin"
  fake_bin.mkdir()
  script = fake_bin / "gcloud"
  script.write_text(textwrap.dedent(f"""\
      #!{sys.executable}
      import json, os, sys
      d = os.environ["FAKE_GCLOUD_DIR"]
      args = sys.argv[1:]
      with open(os.path.join(d, "gcloud.log"), "a") as f:
        f.write(json.dumps(args) + "\\n")
      state_file = os.path.join(d, "state")
      verb = args[3]
      if verb == "describe":
        if not os.path.exists(state_file):
          sys.stderr.write("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: x\\n")
          sys.exit(1)
        print(open(state_file).read())
      elif verb == "create":
        failures = os.path.join(d, "create_failures")
        left = int(open(failures).read()) if os.path.exists(failures) else 0
        if left:
          open(failures, "w").write(str(left - 1))
          sys.stderr.write(os.environ.get("FAKE_CREATE_ERROR", "ERROR: (gcloud) "
                           "RESOURCE_EXHAUSTED: There is no more capacity in the zone") + "\\n")
          sys.exit(1)
        open(state_file, "w").write("READY")
      elif verb == "delete":
        os.remove(state_file)
      elif verb == "ssh":
        command = next(a for a in args if a.startswith("--command="))
        runs = os.path.join(d, "train_runs")
        if "gensar_jax.train" in command:  # the start script: returns at once (detached)
          n = int(open(runs).read()) + 1 if os.path.exists(runs) else 1
          open(runs, "w").write(str(n))
          open(os.path.join(d, "polls"), "w").write("0")
        elif "GENSAR_STATUS" in command:  # the status poll: running once, then the outcome
          polls = int(open(os.path.join(d, "polls")).read()) + 1
          open(os.path.join(d, "polls"), "w").write(str(polls))
          n = int(open(runs).read())
          outcome = os.environ["FAKE_TRAIN_OUTCOMES"].split(",")[n - 1]
          if polls == 1:
            state = "running"
          elif outcome == "preempted":  # the VMs are gone: ssh cannot connect
            open(state_file, "w").write("PREEMPTED")
            sys.exit(255)
          else:
            state = "exit " + outcome
          for worker in range(int(os.environ.get("FAKE_WORKERS", "8"))):
            print("GENSAR_STATUS w%d %s" % (worker, state))
      """))
  script.chmod(0o755)
  return fake_bin


def _fake_env(tmp_path, outcomes, create_failures=0):
  fake_bin = tmp_path / "bin" if (tmp_path / "bin").exists() else _fake_gcloud(tmp_path)
  (tmp_path / "create_failures").write_text(str(create_failures))
  return dict(os.environ, PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
              FAKE_GCLOUD_DIR=str(tmp_path), FAKE_TRAIN_OUTCOMES=outcomes)


def _wait_for(condition, timeout=30.0):
  deadline = time.time() + timeout
  while not condition():
    assert time.time() < deadline, "timed out"
    time.sleep(0.05)


def _logged_verbs(tmp_path):
  lines = (tmp_path / "gcloud.log").read_text().splitlines()
  return [json.loads(line)[3] for line in lines], [json.loads(line) for line in lines]


def test_watch_recreates_a_preempted_slice_and_reruns_the_same_command(tmp_path):
  env = _fake_env(tmp_path, "preempted,0")
  done = _run_launcher([*V5P_ARGS, "--watch", "--poll_seconds=0",
                        f"--archive_dir={tmp_path}", *GIN_FLAGS], env=env)
  assert done.returncode == 0, done.stderr
  verbs, calls = _logged_verbs(tmp_path)
  assert verbs == ["describe", "create", "describe", "scp", "ssh", "ssh", "ssh", "ssh",
                   "describe", "delete", "create", "describe", "scp", "ssh", "ssh", "ssh",
                   "ssh"]
  trains = [c for c in calls if c[3] == "ssh" and "gensar_jax.train" in " ".join(c)]
  assert len(trains) == 2 and trains[0] == trains[1]  # the very same command again
  assert "--spot" in calls[1] and "--spot" in calls[10]
  assert (tmp_path / "gensar-jax-gensar-v5p.tar.gz").stat().st_size > 1000  # git archive ran
  assert "restart 1 of 20" in done.stderr


def test_failure_on_a_healthy_slice_is_not_retried(tmp_path):
  env = _fake_env(tmp_path, "3")
  (tmp_path / "state").write_text("READY")  # reuse an existing slice
  done = _run_launcher([*V5P_ARGS, "--watch", "--poll_seconds=0",
                        f"--archive_dir={tmp_path}", *GIN_FLAGS], env=env)
  assert done.returncode == 3
  verbs, _ = _logged_verbs(tmp_path)
  assert verbs == ["describe", "scp", "ssh", "ssh", "ssh", "ssh", "describe"]
  assert "not a preemption" in done.stderr


def test_without_watch_a_preemption_just_returns_the_exit_code(tmp_path):
  env = _fake_env(tmp_path, "preempted")
  (tmp_path / "state").write_text("READY")
  done = _run_launcher([*V5P_ARGS, "--skip_install", "--poll_seconds=0", *GIN_FLAGS],
                       env=env)
  assert done.returncode == 255  # the workers could not be reached
  verbs, _ = _logged_verbs(tmp_path)
  assert verbs == ["describe", "ssh", "ssh", "ssh"]  # --skip_install on a READY slice: no copy


def test_preempted_exit_on_a_ready_slice_reruns_the_same_command_without_recreating(tmp_path):
  """Exit 75: the trainer saved the step it was at (SIGTERM, e.g. a maintenance event) and
  the slice is still READY: rerun the same command at once, which resumes from that step."""
  env = _fake_env(tmp_path, "75,0")
  (tmp_path / "state").write_text("READY")
  done = _run_launcher([*V5P_ARGS, "--watch", "--skip_install", "--poll_seconds=0",
                        *GIN_FLAGS], env=env)
  assert done.returncode == 0, done.stderr
  verbs, calls = _logged_verbs(tmp_path)
  assert verbs == ["describe", "ssh", "ssh", "ssh", "describe", "ssh", "ssh", "ssh"]
  trains = [c for c in calls if c[3] == "ssh" and "gensar_jax.train" in " ".join(c)]
  assert len(trains) == 2 and trains[0] == trains[1]
  assert "slice READY after exit 75: restart 1 of 20" in done.stderr


def test_preempted_exit_without_watch_is_returned(tmp_path):
  env = _fake_env(tmp_path, "75")
  (tmp_path / "state").write_text("READY")
  done = _run_launcher([*V5P_ARGS, "--skip_install", "--poll_seconds=0", *GIN_FLAGS], env=env)
  assert done.returncode == tpu_pod.PREEMPTED_EXIT_CODE == 75


def test_the_launchers_preemption_code_is_the_trainers():
  from gensar_jax import errors
  assert tpu_pod.PREEMPTED_EXIT_CODE == errors.PREEMPTED_EXIT_CODE


def test_watch_retries_creation_with_back_off_while_the_zone_has_no_capacity(tmp_path):
  env = _fake_env(tmp_path, "preempted,0", create_failures=0)
  done = _run_launcher([*V5P_ARGS, "--watch", "--poll_seconds=0", "--backoff_seconds=0",
                        f"--archive_dir={tmp_path}", *GIN_FLAGS], env=dict(env))
  assert done.returncode == 0, done.stderr
  # Now the preempted slice's recreation meets a stock-out twice.
  for name in ("gcloud.log", "train_runs", "state"):
    if (tmp_path / name).exists():
      (tmp_path / name).unlink()
  (tmp_path / "create_failures").write_text("2")
  done = _run_launcher([*V5P_ARGS, "--watch", "--poll_seconds=0", "--backoff_seconds=0",
                        f"--archive_dir={tmp_path}", *GIN_FLAGS], env=env)
  assert done.returncode == 0, done.stderr
  verbs, _ = _logged_verbs(tmp_path)
  assert verbs[:6] == ["describe", "create", "describe", "create", "describe", "create"]
  assert verbs.count("create") == 4  # 2 refused + 1 at start + 1 after the preemption
  assert done.stderr.count("no capacity for v5p-64 in us-east5-a") == 2
  assert "attempt 2 of 30); retrying in 0 s" in done.stderr


@pytest.mark.parametrize("watch, error, says", [
    (True, "ERROR: (gcloud) Quota 'TPUV5P' exceeded. RESOURCE_EXHAUSTED", "Quota"),
    (True, "ERROR: (gcloud) PERMISSION_DENIED: tpu.nodes.create", "PERMISSION_DENIED"),
    (False, "ERROR: (gcloud) RESOURCE_EXHAUSTED: no more capacity", "no more capacity"),
])
def test_other_creation_errors_and_runs_without_watch_are_not_retried(tmp_path, watch, error,
                                                                      says):
  env = dict(_fake_env(tmp_path, "0", create_failures=5), FAKE_CREATE_ERROR=error)
  done = _run_launcher([*V5P_ARGS, *(["--watch"] if watch else []), "--poll_seconds=0",
                        "--backoff_seconds=0", f"--archive_dir={tmp_path}", *GIN_FLAGS], env=env)
  assert done.returncode == 2
  assert says in done.stderr.splitlines()[-1] and "creating the slice failed" in done.stderr
  verbs, _ = _logged_verbs(tmp_path)
  assert verbs == ["describe", "create"]


def test_the_start_script_stops_a_stale_run_term_then_kill_and_waits_for_the_tpu(tmp_path):
  """The worker start script for real: a stale trainer that ignores TERM is killed after
  --stop_wait_seconds, the new one starts only once no process holds the TPU device, and
  it runs detached (the script returns while it still runs), its output in .run/train.log."""
  done = _run_launcher([*V5P_ARGS, "--dry_run", "--stop_wait_seconds=1", *GIN_FLAGS])
  remote = _start_command(done.stdout)
  checkout = tmp_path / "gensar-jax"
  (checkout / ".run").mkdir(parents=True)
  venv_bin = checkout / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "python").write_text(textwrap.dedent(f"""\
      #!/bin/bash
      date +%s.%N > {tmp_path}/trainer_started
      echo "trainer output"
      sleep 1
      exit 75
      """))
  (venv_bin / "python").chmod(0o755)
  stale = subprocess.Popen(["setsid", "bash", "-c",
                            f"trap 'echo TERM >> {tmp_path}/stale_signals' TERM; "
                            "while true; do sleep 0.1; done"])
  (checkout / ".run" / "pid").write_text(str(stale.pid))
  device = tmp_path / "accel0"
  device.write_text("")
  holder = subprocess.Popen(["bash", "-c", f"exec 3<{device}; sleep 3; date +%s.%N > "
                             f"{tmp_path}/device_released"])
  try:
    _wait_for(lambda: subprocess.run(["lsof", "-t", "-w", str(device)],
                                     capture_output=True).stdout.strip() != b"")
    env = dict(os.environ, GENSAR_TPU_DEVICES=str(device))
    started = time.time()
    out = subprocess.run(["bash", "-c", remote], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert time.time() - started < 30
    assert stale.wait(timeout=10) == -9  # KILLed ...
    assert (tmp_path / "stale_signals").read_text().strip() == "TERM"  # ... after a TERM
    assert "TERM" in out.stdout and "KILL" in out.stdout
    _wait_for(lambda: (checkout / ".run" / "exit").exists())
  finally:
    for proc in (stale, holder):
      if proc.poll() is None:
        proc.kill()
  assert float((tmp_path / "trainer_started").read_text()) >= float(
      (tmp_path / "device_released").read_text())
  assert (checkout / ".run" / "exit").read_text().strip() == "75"
  assert "trainer output" in (checkout / ".run" / "train.log").read_text()
  # The status the launcher polls, from the same worker.
  status_script = _remote_command(next(c for c in _commands(done.stdout)
                                       if "GENSAR_STATUS" in " ".join(c)))
  status = subprocess.run(["bash", "-c", status_script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=30).stdout
  assert status.split()[0] == "GENSAR_STATUS" and status.split()[2:] == ["exit", "75"]


# --- gensar_jax.distributed -------------------------------------------------------------


def test_should_initialize_decision_order():
  from gensar_jax.distributed import should_initialize
  assert should_initialize(None, {})[0] is False
  assert should_initialize(None, {"GENSAR_DISTRIBUTED": "1"})[0] is True
  assert should_initialize(None, {"GENSAR_DISTRIBUTED": "0",
                                  "JAX_COORDINATOR_ADDRESS": "10.0.0.1:8476"})[0] is False
  assert should_initialize(False, {"GENSAR_DISTRIBUTED": "1"})[0] is False
  assert should_initialize(None, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:8476"})[0] is True
  assert should_initialize(None, {"TPU_WORKER_HOSTNAMES": "w0"})[0] is False
  assert should_initialize(None, {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == (
      True, "TPU_WORKER_HOSTNAMES names 4 hosts")
  with pytest.raises(ValueError, match="GENSAR_DISTRIBUTED='maybe'"):
    should_initialize(None, {"GENSAR_DISTRIBUTED": "maybe"})


def test_single_process_is_a_no_op_that_reports_devices():
  from gensar_jax.distributed import initialize_distributed
  topology = initialize_distributed(environ={}, verbose=False)
  assert (topology.process_index, topology.process_count, topology.distributed) == (0, 1, False)
  assert topology.local_device_count == topology.global_device_count == 8
  with pytest.raises(RuntimeError, match="1 process.*but 8 were expected"):
    initialize_distributed(environ={"GENSAR_EXPECTED_PROCESSES": "8"}, verbose=False)


_WORKER = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from gensar_jax.distributed import initialize_distributed
from gensar_jax.partitioning import create_mesh
t = initialize_distributed()
mesh = create_mesh()
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")),
                                           np.full((2,), t.process_index + 1.0, np.float32))
total = float(jax.jit(jnp.sum)(x))
print("RESULT " + json.dumps(dict(index=t.process_index, count=t.process_count,
      local=t.local_device_count, global_=t.global_device_count, distributed=t.distributed,
      total=total)))
"""


def test_two_cpu_processes_join_one_runtime():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = []
  for pid in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", GENSAR_NUM_PROCESSES="2",
               GENSAR_PROCESS_ID=str(pid), GENSAR_EXPECTED_PROCESSES="2")
    env.pop("GENSAR_DISTRIBUTED", None)
    procs.append(subprocess.Popen([sys.executable, "-c", _WORKER], env=env, cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  results = []
  for proc in procs:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "[distributed] process" in err
    [line] = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    results.append(json.loads(line[len("RESULT "):]))
  assert sorted(r["index"] for r in results) == [0, 1]
  for r in results:
    assert (r["count"], r["local"], r["global_"], r["distributed"]) == (2, 2, 4, True)
    assert r["total"] == 6.0  # 2 x 1.0 from process 0 + 2 x 2.0 from process 1


# --- the runbook in launch/README.md ------------------------------------------------------


def _runbook_commands():
  """The shell commands of launch/README.md's runbook section, in order."""
  with open(os.path.join(REPO, "launch", "README.md"), encoding="utf-8") as f:
    text = f.read()
  section = text.split("### Runbook", 1)[1].split("\n### ", 1)[0]
  commands, in_block = [], False
  for line in section.splitlines():
    stripped = line.strip()
    if stripped.startswith("```"):
      in_block = not in_block
      continue
    if in_block and stripped:
      commands.append(shlex.split(stripped))
  return commands


def test_every_runbook_command_runs_dry_and_names_one_slice_and_model_dir():
  commands = _runbook_commands()
  launches = [c for c in commands if c[:2] == ["python", "launch/tpu_pod.py"]]
  assert len(launches) == 4 and len(commands) == 6
  names, model_dirs, trains = set(), set(), set()
  for argv in launches:
    flags = argv[2:] + ([] if "--dry_run" in argv else ["--dry_run"])
    done = _run_launcher(flags)
    assert done.returncode == 0, (argv, done.stderr)
    verbs = [c[4] for c in _commands(done.stdout) if c[0] == "gcloud"]
    names.update(a.split("=", 1)[1] for a in argv if a.startswith("--name="))
    model_dirs.update(a.split("=", 1)[1].strip("'") for a in argv
                      if a.startswith("--gin.MODEL_DIR="))
    if "--teardown" in argv:
      assert verbs == ["delete"]
      continue
    assert verbs[:6] == ["describe", "create", "delete", "scp", "ssh", "ssh"]
    trains.add(next(line for line in done.stdout.splitlines() if "gensar_jax.train" in line))
  # Look, launch and resume by hand all run the one training command (so a rerun resumes).
  assert len(trains) == 1
  assert names == {"gensar-v5p"} and len(model_dirs) == 1
  (model_dir,) = model_dirs
  for argv in commands:
    if argv[0] in ("gcloud", "tensorboard"):  # reading results: the run's own MODEL_DIR
      assert any(a.startswith(model_dir) for a in argv), argv
