"""gensar_jax/run_lock.py: one trainer per run directory, stale locks taken over."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from gensar_jax import run_lock
from gensar_jax.run_lock import LOCK_NAME, RunInUseError, RunLock


def _write_lock(model_dir, **fields):
  record = {"host": socket.gethostname(), "pid": os.getpid(), "token": "other",
            "started": time.time(), "heartbeat": time.time(), **fields}
  os.makedirs(model_dir, exist_ok=True)
  with open(os.path.join(model_dir, LOCK_NAME), "w") as f:
    json.dump(record, f)


def _dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_second_lock_on_a_directory_is_refused_until_the_first_is_released(tmp_path):
  first = RunLock(str(tmp_path), stale_after_s=60, heartbeat_s=0.05)
  first.acquire()
  with pytest.raises(RunInUseError, match=rf"in use by another trainer: pid {os.getpid()}"):
    RunLock(str(tmp_path)).acquire()
  time.sleep(0.2)  # a few heartbeats: the owner's record is rewritten, still its own
  assert run_lock.read_owner(str(tmp_path / LOCK_NAME)).token == first.owner.token
  first.release()
  assert not (tmp_path / LOCK_NAME).exists()
  with RunLock(str(tmp_path)):
    assert (tmp_path / LOCK_NAME).exists()
  assert not (tmp_path / LOCK_NAME).exists()


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
  _write_lock(str(tmp_path), pid=_dead_pid())
  lock = RunLock(str(tmp_path))
  owner = lock.acquire()
  assert run_lock.read_owner(str(tmp_path / LOCK_NAME)).token == owner.token
  assert "is no longer running" in caplog.text
  lock.release()


def test_other_host_lock_is_held_while_its_heartbeat_is_fresh(tmp_path):
  _write_lock(str(tmp_path), host="worker-elsewhere", pid=1, heartbeat=time.time() - 30)
  with pytest.raises(RunInUseError, match="host worker-elsewhere"):
    RunLock(str(tmp_path), stale_after_s=120).acquire()
  _write_lock(str(tmp_path), host="worker-elsewhere", pid=1, heartbeat=time.time() - 600)
  lock = RunLock(str(tmp_path), stale_after_s=120)
  lock.acquire()
  lock.release()


def test_unreadable_lock_is_judged_by_its_age(tmp_path):
  path = tmp_path / LOCK_NAME
  path.write_text('{"host": "half-writ')
  with pytest.raises(RunInUseError, match="unreadable lock file"):
    RunLock(str(tmp_path), stale_after_s=120).acquire()
  old = time.time() - 600
  os.utime(path, (old, old))
  lock = RunLock(str(tmp_path), stale_after_s=120)
  lock.acquire()
  lock.release()


def test_a_lock_taken_over_stops_its_old_holder(tmp_path):
  lock = RunLock(str(tmp_path), stale_after_s=60, heartbeat_s=0.05)
  lock.acquire()
  _write_lock(str(tmp_path), token="usurper")  # as a takeover by another trainer would
  time.sleep(0.3)
  with pytest.raises(RunInUseError, match="taken over"):
    lock.assert_held()
  lock.release()
  assert run_lock.read_owner(str(tmp_path / LOCK_NAME)).token == "usurper"  # not removed


# ------------------------------------------------- refused before the trainer's imports

_HEAVY = ("jax", "tensorflow", "seqio", "flax", "orbax.checkpoint", "gensar_jax.models")
_CLI_CHILD = """
import json, runpy, sys
entry, argv = sys.argv[1], sys.argv[2:]
code = None
try:
  if entry == "module":
    sys.argv = ["gensar_jax/train.py", *argv]
    runpy.run_module("gensar_jax.train", run_name="__main__", alter_sys=True)
  else:
    from gensar_jax import commands
    commands.main(["train", *argv])
except SystemExit as e:
  code = e.code
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}))
""" % (_HEAVY,)


@pytest.mark.parametrize("entry", ["module", "gensar"])
def test_a_busy_model_dir_is_refused_before_the_trainers_heavy_imports(tmp_path, entry):
  """`python -m gensar_jax.train` and `gensar train`: exit 2 and one line, with none of
  JAX, TensorFlow, SeqIO, Flax, orbax or the model imported (they took 20 s before)."""
  model_dir = str(tmp_path / "run")
  _write_lock(model_dir)  # this test process: alive, on this host, fresh heartbeat
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("GENSAR_", "JAX_COORDINATOR", "TPU_"))}
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), env.get("PYTHONPATH", "")])
  done = subprocess.run([sys.executable, "-c", _CLI_CHILD, entry,
                         "--gin_file=gin/runs/train.gin", f"--gin.MODEL_DIR='{model_dir}'",
                         "--gin.TRAIN_STEPS=5"], capture_output=True, text=True, env=env,
                        timeout=300)
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result == {"code": 2, "heavy": []}, (result, done.stderr[-2000:])
  lines = [line for line in done.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith(f"error: {model_dir} is in use by another "
                                                 f"trainer: pid {os.getpid()}"), done.stderr


def test_model_dir_is_read_from_flags_and_gin_files_in_gin_order(tmp_path):
  config = tmp_path / "run.gin"
  config.write_text("MODEL_DIR = 'from/file'  # a comment\nTRAIN_STEPS = 3\n")
  read = run_lock.model_dir_from_flags
  assert read([f"--gin_file={config}"]) == "from/file"
  assert read([f"--gin_file={config}", "--gin.MODEL_DIR='from/flag'"]) == "from/flag"
  assert read(["--gin_file", str(config), "--gin_bindings", "MODEL_DIR = 'b'"]) == "b"
  assert read(["--gin.MODEL_DIR=%OTHER_MACRO"]) is None  # not a literal: left to gin
  assert read(["--gin.TRAIN_STEPS=3"]) is None


def test_early_refusal_only_where_this_is_process_0(tmp_path):
  """A worker of a multi-host job that cannot tell its index must not refuse: the lock it
  sees may be its own job's process 0's."""
  _write_lock(str(tmp_path))
  flags = [f"--gin.MODEL_DIR='{tmp_path}'"]
  with pytest.raises(RunInUseError):
    run_lock.refuse_early(flags, environ={})
  with pytest.raises(RunInUseError):
    run_lock.refuse_early(flags, environ={"GENSAR_DISTRIBUTED": "1", "GENSAR_PROCESS_ID": "0"})
  run_lock.refuse_early(flags, environ={"GENSAR_DISTRIBUTED": "1", "GENSAR_PROCESS_ID": "1"})
  run_lock.refuse_early(flags, environ={"GENSAR_DISTRIBUTED": "1"})
  _write_lock(str(tmp_path), pid=_dead_pid())  # stale: left to RunLock.acquire to take over
  run_lock.refuse_early(flags, environ={})
