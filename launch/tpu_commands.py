"""What tpu_pod.py runs: the gcloud command lines, the scripts the workers run, and the runner.

Building every command as an argv list here, apart from the launch flow that decides which
to run, and sending each through one CommandRunner is what makes --dry_run honest: it
prints exactly the commands a real launch executes, one copy-pasteable line each, and runs
nothing. Standard library only: this runs on a laptop that has gcloud, not the training
dependencies.

Training runs detached from ssh on every worker (`setsid nohup`), so it outlives the
launcher's connection (a laptop that sleeps, a dropped VPN): `start_script` stops a stale
run (TERM to its process group, `stop_wait_s` for it to save and exit, then KILL), waits
until no process holds the TPU devices, and starts the trainer in the background with its
output appended to `<remote_dir>/.run/train.log` and its exit code written to
`.run/exit` when it ends. `status_script` reports one line per worker, which the launcher
polls until every worker has an exit code.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import time
from typing import List, Optional, Sequence, Tuple

from tpu_slices import LaunchError, SliceShape

# The trainer's exit code after a preemption (gensar_jax/errors.py PREEMPTED_EXIT_CODE,
# repeated here because the launcher does not import the package): the step it was at is
# saved, so the launcher reruns the same command (recreating the slice if it is gone).
PREEMPTED_EXIT_CODE = 75
RUN_DIR = ".run"        # on each worker, under remote_dir: pid, exit code, train.log
STATUS_TAG = "GENSAR_STATUS"
# apt on a fresh TPU VM meets unattended-upgrades holding the dpkg lock: wait for it.
APT = "sudo apt-get -o DPkg::Lock::Timeout=600"


@dataclasses.dataclass
class Result:
  """A command's exit code and, when captured, its output (empty in a dry run)."""
  returncode: int
  stdout: str = ""
  stderr: str = ""


class CommandRunner:
  """Runs (or, dry, only prints) commands; the single place where anything is executed."""

  def __init__(self, dry_run: bool, out=None, poll_seconds: float = 60.0):
    self.dry_run = dry_run
    self.out = out or sys.stdout
    self.poll_seconds = poll_seconds

  def note(self, text: str) -> None:
    print(f"# {text}", file=self.out if self.dry_run else sys.stderr, flush=True)

  def run(self, argv: Sequence[str], capture: bool = False, quiet: bool = False) -> Result:
    line = shlex.join(argv)
    if self.dry_run:
      print(line, file=self.out, flush=True)
      return Result(0)
    if not quiet:
      print(f"+ {line}", file=sys.stderr, flush=True)
    try:
      done = subprocess.run(list(argv), capture_output=capture, text=True, check=False)
    except FileNotFoundError:
      raise LaunchError(f"{argv[0]}: command not found (install the Google Cloud CLI and "
                        "run `gcloud auth login`)") from None
    return Result(done.returncode, done.stdout or "", done.stderr or "")

  def wait(self) -> None:
    self.sleep(self.poll_seconds)

  def sleep(self, seconds: float) -> None:
    if not self.dry_run:
      time.sleep(seconds)


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
  """Everything one launch needs, fixed once the flags are parsed."""
  name: str
  zone: str
  project: Optional[str]
  shape: SliceShape
  runtime: str
  spot: bool
  preemptible: bool
  train_flags: Tuple[str, ...]  # gin flags, verbatim, mesh file included
  train_module: str
  remote_dir: str
  python: str
  jax_requirement: str
  archive_path: str
  git_ref: str
  install: bool
  watch: bool
  max_restarts: int
  max_wait_polls: int
  teardown: bool = False  # delete the slice and do nothing else
  constraints: str = "constraints-py312.txt"  # pip constraints file, in the repository
  stop_wait_s: int = 120        # a stale run's time to save after TERM, before KILL
  tpu_free_wait_s: int = 120    # how long to wait for the TPU devices to be released
  max_create_attempts: int = 30  # creating the slice, on capacity errors (--watch)
  backoff_s: float = 60.0       # first wait after a capacity error; doubles up to ...
  max_backoff_s: float = 1800.0


def gcloud_tpu(spec: LaunchSpec, verb: str, *args: str) -> List[str]:
  where = [f"--zone={spec.zone}"] + ([f"--project={spec.project}"] if spec.project else [])
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, *where]


def create_command(spec: LaunchSpec) -> List[str]:
  argv = gcloud_tpu(spec, "create", spec.name, f"--accelerator-type={spec.shape.accelerator_type}",
                    f"--version={spec.runtime}")
  return argv + (["--spot"] if spec.spot else []) + (["--preemptible"] if spec.preemptible else [])


def ssh_all(spec: LaunchSpec, remote_command: str) -> List[str]:
  return gcloud_tpu(spec, "ssh", spec.name, "--worker=all", f"--command={remote_command}")


def install_script(spec: LaunchSpec) -> str:
  """Unpacks the archive over the old checkout (keeping its .venv and .run) and installs it
  with the pinned versions: `python` (3.12 by default, from the deadsnakes PPA where the
  image lacks it: setup.py promises accelerators Python 3.12 and JAX 0.11), the
  constraints file of that Python, and an exact `jax[tpu]` pin. A venv made with another
  Python is replaced."""
  d, py, archive = shlex.quote(spec.remote_dir), shlex.quote(spec.python), shlex.quote(
      os.path.basename(spec.archive_path))
  apt_python = (f"{APT} update -q && {APT} install -y -q software-properties-common && "
                f"sudo add-apt-repository -y ppa:deadsnakes/ppa && {APT} update -q && "
                f"{APT} install -y -q {py} {py}-venv")
  return " && ".join([
      "set -e",
      f"(command -v {py} >/dev/null || ({apt_python}))",
      f"mkdir -p {d}",
      f"find {d} -mindepth 1 -maxdepth 1 ! -name .venv ! -name {RUN_DIR} -exec rm -rf {{}} +",
      f"tar -xzf {archive} -C {d}",
      f"cd {d}",
      f"([ -x .venv/bin/python ] && .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] "
      f"!= tuple(map(int, sys.argv[1].split(\".\"))))' \"$({py} -c 'import sys; "
      f"print(\"%d.%d\" % sys.version_info[:2])')\" || (rm -rf .venv && {py} -m venv .venv))",
      ".venv/bin/pip install -q --upgrade pip",
      f".venv/bin/pip install -q -c {shlex.quote(spec.constraints)} -e . "
      f"{shlex.quote(spec.jax_requirement)}",
  ])


def train_command(spec: LaunchSpec) -> List[str]:
  """The trainer's argv on every worker, its environment first (`env NAME=VALUE ...`)."""
  env = [f"GENSAR_EXPECTED_PROCESSES={spec.shape.workers}"]
  if spec.shape.workers > 1:
    env.insert(0, "GENSAR_DISTRIBUTED=1")
  return ["env", *env, ".venv/bin/python", "-m", spec.train_module, *spec.train_flags]


def start_script(spec: LaunchSpec) -> str:
  """What every worker runs to start training: stop a stale run, wait for the TPU to be
  free, start the trainer detached (it survives the ssh session), and return at once.

  A stale run (an earlier attempt whose launcher died, or a relaunch by hand) gets TERM,
  which the trainer answers by saving its current step and exiting; KILL only after
  `stop_wait_s`. Then the TPU devices (/dev/accel*, /dev/vfio/N) must be released by every
  process before the new trainer starts, or it would fail to open them.
  """
  run = RUN_DIR
  train = shlex.join(train_command(spec))
  wrapped = (f"{train}; code=$?; echo $code > {run}/exit.tmp && mv {run}/exit.tmp {run}/exit")
  stop_stale = (
      f'if [ -f {run}/pid ] && pgrep -g "$(cat {run}/pid)" >/dev/null; then '
      f'pg=$(cat {run}/pid); echo "stopping the stale run (process group $pg): TERM"; '
      f'kill -TERM -- "-$pg" 2>/dev/null || true; i=0; '
      f'while pgrep -g "$pg" >/dev/null && [ $i -lt {int(spec.stop_wait_s)} ]; do sleep 1; '
      f'i=$((i+1)); done; if pgrep -g "$pg" >/dev/null; then echo "still running after '
      f'{int(spec.stop_wait_s)} s: KILL"; kill -KILL -- "-$pg" 2>/dev/null || true; '
      f'sleep 1; fi; fi')
  devices = "${GENSAR_TPU_DEVICES:-/dev/accel* /dev/vfio/[0-9]*}"
  tpu_busy = (f'tpu_users() {{ for dev in {devices}; do [ -e "$dev" ] && '
              f'{{ sudo -n lsof -t -w "$dev" 2>/dev/null || lsof -t -w "$dev" 2>/dev/null; }}; '
              f'done | sort -u; }}')
  wait_free = (f'i=0; while [ -n "$(tpu_users)" ] && [ $i -lt {int(spec.tpu_free_wait_s)} ]; '
               f'do sleep 1; i=$((i+1)); done; if [ -n "$(tpu_users)" ]; then echo "the TPU is '
               f'still in use by process(es) $(tpu_users | tr "\\n" " ")after '
               f'{int(spec.tpu_free_wait_s)} s; not starting" >&2; exit 3; fi')
  start = (f'rm -f {run}/exit; echo "== $(date -u +%FT%TZ) start" >> {run}/train.log; '
           f'setsid nohup bash -c {shlex.quote(wrapped)} >> {run}/train.log 2>&1 < /dev/null & '
           f'echo $! > {run}/pid; echo "training started on $(hostname), log: '
           f'{spec.remote_dir}/{run}/train.log"')
  return (f"cd {shlex.quote(spec.remote_dir)} || exit 1; mkdir -p {run} || exit 1; "
          f"{stop_stale}; {tpu_busy}; {wait_free}; {start}")


def status_script(spec: LaunchSpec) -> str:
  """One line per worker: `GENSAR_STATUS <host> running|exit <code>|lost` (lost: no
  process and no exit code, e.g. the VM was restarted under the trainer)."""
  run = RUN_DIR
  return (f'cd {shlex.quote(spec.remote_dir)} 2>/dev/null; h=$(hostname); '
          f'if [ -f {run}/exit ]; then echo "{STATUS_TAG} $h exit $(cat {run}/exit)"; '
          f'elif [ -f {run}/pid ] && pgrep -g "$(cat {run}/pid)" >/dev/null; then '
          f'echo "{STATUS_TAG} $h running"; else echo "{STATUS_TAG} $h lost"; fi')


def parse_status(stdout: str) -> List[Tuple[str, str]]:
  """(host, state) from the status lines of all workers; state: running, lost or a code."""
  out = []
  for line in stdout.splitlines():
    words = line.split()
    if len(words) >= 3 and words[0] == STATUS_TAG:
      out.append((words[1], words[3] if words[2] == "exit" and len(words) > 3 else words[2]))
  return out
