"""One trainer per MODEL_DIR: a lock file with a heartbeat.

Two trainers on one run directory (a relaunch while the old job still runs, two hosts that
each think they are alone) would delete each other's unfinished checkpoints and interleave
`metrics.jsonl`. So process 0 of a trainer holds `MODEL_DIR/trainer.lock` for as long as it
trains: created exclusively (`O_EXCL`, so of two simultaneous starts exactly one wins),
holding who owns it, and rewritten every `heartbeat_s` seconds by a background thread.

A lock left behind by a trainer that died (SIGKILL, a preempted VM) must not block the
relaunch, so a lock counts as stale, and is taken over with a warning, when
  - its owner ran on this host and that process no longer exists, or
  - its heartbeat is older than `stale_after_s` (an owner on another host cannot be asked).
Otherwise the new trainer stops at once with RunInUseError (exit code 2 in the CLI), naming
the owner and what to do. A lock file that cannot be parsed (a writer killed mid-write) is
judged by its modification time in the same way.

The trainer checks `assert_held()` as it trains: if another process has taken the lock
over (this one was presumed dead), it stops instead of writing on.

On a bucket (`gs://` MODEL_DIR) there is no O_EXCL through the filesystem layer, so the
lock is taken by writing the owner record, waiting `settle_s`, and reading it back: of two
trainers that start within the same moment, only the one whose record survived goes on
(object writes are last-writer-wins). That is best effort, not a consensus protocol; it
catches the cases that happen (a relaunch while the old job runs, a second launch).

`refuse_early` is the same judgement made before the trainer imports anything heavy
(TensorFlow, SeqIO, Flax: twenty seconds and more): the CLI reads MODEL_DIR from its gin
flags and stops with exit code 2 if a live trainer holds the directory. It only looks; the
lock is still taken, race-free, by `RunLock.acquire` once training starts.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from typing import List, Mapping, Optional, Sequence

import gin

from gensar_jax import io_utils
from gensar_jax.errors import DataError  # not gensar_jax.data: that imports pandas

logger = logging.getLogger(__name__)

LOCK_NAME = "trainer.lock"


class RunInUseError(DataError):
  """Another trainer holds this MODEL_DIR (exit code 2 in CLIs)."""


@dataclasses.dataclass(frozen=True)
class LockOwner:
  host: str
  pid: int
  token: str
  started: float
  heartbeat: float

  def describe(self) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
    return (f"pid {self.pid} on host {self.host} (started {started}, last heartbeat "
            f"{time.time() - self.heartbeat:.0f} s ago)")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def read_owner(path: str) -> Optional[LockOwner]:
  """The lock's owner, or None if the file is missing or unreadable."""
  try:
    record = json.loads(io_utils.read_text(path))
    return LockOwner(host=str(record["host"]), pid=int(record["pid"]),
                     token=str(record["token"]), started=float(record["started"]),
                     heartbeat=float(record["heartbeat"]))
  except (OSError, ValueError, KeyError, TypeError):
    return None


@gin.configurable
class RunLock:
  """The lock of one run directory, held by this process while it trains."""

  def __init__(self, model_dir: str, stale_after_s: float = 120.0, heartbeat_s: float = 20.0,
               settle_s: float = 2.0):
    if heartbeat_s <= 0 or stale_after_s <= 2 * heartbeat_s:
      raise ValueError(f"RunLock: need 0 < heartbeat_s ({heartbeat_s}) and stale_after_s "
                       f"({stale_after_s}) > 2 x heartbeat_s, or a live owner looks stale")
    self.path = io_utils.join(model_dir, LOCK_NAME)
    self.settle_s = settle_s
    self.stale_after_s = stale_after_s
    self.heartbeat_s = heartbeat_s
    self.owner: Optional[LockOwner] = None
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self._lost: Optional[str] = None

  # ------------------------------------------------------------------ acquiring

  def _stale_reason(self, owner: Optional[LockOwner]) -> Optional[str]:
    """Why the existing lock may be taken over, or None if its owner may be alive."""
    if owner is None:
      try:
        age = time.time() - io_utils.mtime(self.path)
      except FileNotFoundError:
        return "it disappeared"
      return (f"it is unreadable and {age:.0f} s old" if age > self.stale_after_s else None)
    if owner.host == socket.gethostname() and not _pid_alive(owner.pid):
      return f"its owner {owner.describe()} is no longer running"
    if time.time() - owner.heartbeat > self.stale_after_s:
      return f"its owner {owner.describe()} stopped its heartbeat"
    return None

  def busy_reason(self) -> Optional[str]:
    """Who holds the lock, when a live trainer does; None when it is free or stale."""
    if not io_utils.exists(self.path):
      return None
    current = read_owner(self.path)
    if self._stale_reason(current) is not None:
      return None
    held_by = current.describe() if current else "an unreadable lock file"
    return (f"{os.path.dirname(self.path)} is in use by another trainer: {held_by}. "
            f"Stop that run first, or train into another MODEL_DIR; if no trainer is "
            f"running, remove {self.path}")

  def _record(self, owner: LockOwner) -> str:
    return json.dumps(dataclasses.asdict(owner)) + "\n"

  def acquire(self) -> LockOwner:
    """Takes the lock (a stale one is taken over); raises RunInUseError if it is held."""
    io_utils.makedirs(os.path.dirname(self.path) or ".")
    now = time.time()
    owner = LockOwner(host=socket.gethostname(), pid=os.getpid(), token=uuid.uuid4().hex,
                      started=now, heartbeat=now)
    for attempt in range(2):
      if self._create(owner):
        break
      current = read_owner(self.path)
      reason = self._stale_reason(current)
      if reason is None or attempt:
        raise RunInUseError(self.busy_reason() or
                            f"{os.path.dirname(self.path)} is in use by another trainer")
      logger.warning("taking over the lock %s: %s", self.path, reason)
      io_utils.remove(self.path)
    self.owner = owner
    self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat",
                                    daemon=True)
    self._thread.start()
    return owner

  def _create(self, owner: LockOwner) -> bool:
    """Creates the lock file holding `owner` unless a lock exists; True if created."""
    if not io_utils.is_remote(self.path):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(self._record(owner))
      return True
    if io_utils.exists(self.path):
      return False
    io_utils.write_text(self.path, self._record(owner))
    time.sleep(self.settle_s)  # let a simultaneous writer's record land, then compare
    current = read_owner(self.path)
    return current is not None and current.token == owner.token

  # ------------------------------------------------------------------ holding

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      current = read_owner(self.path)
      if current is None or current.token != self.owner.token:
        self._lost = (f"{self.path} was taken over by "
                      f"{current.describe() if current else 'another process'}")
        logger.error("%s; this trainer stops", self._lost)
        return
      owner = dataclasses.replace(self.owner, heartbeat=time.time())
      io_utils.write_text(self.path, self._record(owner))
      self.owner = owner

  def assert_held(self) -> None:
    """Raises RunInUseError once another process has taken this lock over."""
    if self._lost:
      raise RunInUseError(f"{self._lost} while this trainer was running (it was presumed "
                          "dead); stopping without writing further")

  def release(self) -> None:
    """Stops the heartbeat and removes the lock if it is still this process's."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    current = read_owner(self.path)
    if self.owner is not None and current is not None and current.token == self.owner.token:
      io_utils.remove(self.path)
    self.owner = None

  def __enter__(self) -> "RunLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


# ---------------------------------------------------------------------- before imports


def _gin_value(text: str) -> Optional[str]:
  try:
    value = ast.literal_eval(text.strip())
  except (ValueError, SyntaxError):
    return None
  return value if isinstance(value, str) else None


def model_dir_from_flags(argv: Sequence[str], root: str = ".") -> Optional[str]:
  """MODEL_DIR as the gin flags set it (gin files in order, then bindings; later wins),
  read without gin or the trainer's modules; None when it cannot be told this way."""
  model_dir: Optional[str] = None
  files: List[str] = []
  bindings: List[str] = []
  args = list(argv)
  for i, arg in enumerate(args):
    name, eq, value = arg.partition("=")
    if not eq and name in ("--gin_file", "--gin_bindings") and i + 1 < len(args):
      value = args[i + 1]
    if name == "--gin_file":
      files.append(value)
    elif name == "--gin_bindings":
      bindings.append(value)
    elif name == "--gin.MODEL_DIR":
      bindings.append(f"MODEL_DIR = {value}")
  for path in files:
    for base in ("", root):
      full = os.path.join(base, path)
      if os.path.isfile(full):
        with open(full, encoding="utf-8") as f:
          for line in f:
            match = re.match(r"\s*MODEL_DIR\s*=\s*(.+?)\s*(#.*)?$", line)
            if match and _gin_value(match.group(1)) is not None:
              model_dir = _gin_value(match.group(1))
        break
  for binding in bindings:
    match = re.match(r"\s*MODEL_DIR\s*=\s*(.+?)\s*$", binding)
    if match:
      model_dir = _gin_value(match.group(1))
  return model_dir or None


def _is_process_0(environ: Mapping[str, str]) -> bool:
  """Whether this process will be process 0, as far as the environment tells before JAX
  starts; a host of a multi-host job that cannot tell says False (and leaves the check
  to RunLock.acquire): its own job's process 0 may already hold the lock."""
  from gensar_jax import distributed  # pylint: disable=g-import-not-at-top  # light: gin only
  try:
    multi, _ = distributed.should_initialize(None, environ)
  except ValueError:
    return False
  if not multi:
    return True
  for name in (distributed.ENV_PROCESS_ID, "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID"):
    if environ.get(name, "").strip():
      return environ[name].strip() == "0"
  return False


def refuse_early(argv: Sequence[str], root: str = ".",
                 environ: Optional[Mapping[str, str]] = None) -> None:
  """Raises RunInUseError when the MODEL_DIR of these flags is held by a live trainer.

  Called by the train CLI before its heavy imports, so a second trainer is refused in a
  second, not after building a model. Default staleness settings: gin is not parsed yet.
  """
  environ = os.environ if environ is None else environ
  model_dir = model_dir_from_flags(argv, root)
  if not model_dir or not _is_process_0(environ):
    return
  try:
    reason = RunLock(model_dir).busy_reason()
  except OSError:
    return  # unreadable here: RunLock.acquire will say what is wrong
  if reason is not None:
    raise RunInUseError(reason)
