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
