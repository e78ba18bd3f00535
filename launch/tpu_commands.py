"""What tpu_pod.py runs: the gcloud command lines, the scripts the workers run, and the runner.

Building every command as an argv list here, apart from the launch flow that decides which
to run, and sending each through one CommandRunner is what makes --dry_run honest: it
prints exactly the commands a real launch executes, one copy-pasteable line each, and runs
nothing. Standard library only: this runs on a laptop that has gcloud, not the training
dependencies.
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

  def run(self, argv: Sequence[str], capture: bool = False) -> Result:
    line = shlex.join(argv)
    if self.dry_run:
      print(line, file=self.out, flush=True)
      return Result(0)
    print(f"+ {line}", file=sys.stderr, flush=True)
    try:
      done = subprocess.run(list(argv), capture_output=capture, text=True, check=False)
    except FileNotFoundError:
      raise LaunchError(f"{argv[0]}: command not found (install the Google Cloud CLI and "
                        "run `gcloud auth login`)") from None
    return Result(done.returncode, done.stdout or "", done.stderr or "")

  def wait(self) -> None:
    if not self.dry_run:
      time.sleep(self.poll_seconds)


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
  """Unpacks the archive over the old checkout (keeping its .venv) and pip-installs it."""
  d, py, archive = shlex.quote(spec.remote_dir), shlex.quote(spec.python), shlex.quote(
      os.path.basename(spec.archive_path))
  return " && ".join([
      "set -e",
      f"(command -v {py} >/dev/null || (sudo apt-get update -q && "
      f"sudo apt-get install -y -q {py} {py}-venv))",
      f"mkdir -p {d}",
      f"find {d} -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {{}} +",
      f"tar -xzf {archive} -C {d}",
      f"cd {d}",
      f"([ -x .venv/bin/python ] || {py} -m venv .venv)",
      ".venv/bin/pip install -q --upgrade pip",
      f".venv/bin/pip install -q -e . {shlex.quote(spec.jax_requirement)}",
  ])


def train_script(spec: LaunchSpec) -> str:
  """The command every worker runs; a stale run from an earlier attempt is stopped first."""
  env = [f"GENSAR_EXPECTED_PROCESSES={spec.shape.workers}"]
  if spec.shape.workers > 1:
    env.insert(0, "GENSAR_DISTRIBUTED=1")
  train = ["exec", "env", *env, ".venv/bin/python", "-m", spec.train_module, *spec.train_flags]
  stale = ('if [ -f .train.pid ] && ps -p "$(cat .train.pid)" -o args= | grep -q '
           f'{shlex.quote(spec.train_module)}; then kill "$(cat .train.pid)"; sleep 5; fi')
  return (f"cd {shlex.quote(spec.remote_dir)} && {{ {stale}; }} && echo $$ > .train.pid && "
          + shlex.join(train))
