#!/usr/bin/env python3
"""Train gensar-jax on a Cloud TPU VM slice with one command, or print what that would run.

  python launch/tpu_pod.py --name=gensar-v5p --accelerator_type=v5p-64 --zone=us-east5-a \
      --project=my-project --spot --watch \
      --gin_file=gin/runs/train.gin --gin_file=gin/models/small.gin \
      --gin.MODEL_DIR="'gs://my-bucket/gensar/small'" --dry_run

It describes the slice and creates it if missing, ships a `git archive` of this repository to
every worker and installs it there (Python 3.12, constraints-py312.txt, an exact `jax[tpu]`
pin), then starts the same training command on all workers at once, detached from ssh, and
polls until every worker has finished; jax.distributed.initialize() on each of them finds
the pod. With --watch, a trainer that exits with the preemption code (75: it saved the step
it was at) or a slice that was preempted is answered by rerunning the same command, on a
recreated slice if the old one is gone (creation retried with back-off while the zone has
no capacity): the trainer resumes from the latest checkpoint in MODEL_DIR. Every command
goes through one runner, so --dry_run prints exactly what a real launch runs (one
copy-pasteable line each) and runs nothing. Only the standard library is used: this runs on
a laptop that has gcloud, not the training dependencies.

This file is the launch flow and the command line; the slice table is
launch/tpu_slices.py, the gcloud commands, worker scripts and the runner
launch/tpu_commands.py, and the gin-flag handling shared with sweep.py launch/gin_flags.py.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from typing import Dict, Optional, Sequence, Tuple

# The helper modules sit next to this file: `python launch/tpu_pod.py` (and tpu_pod.sh) put
# launch/ on sys.path by itself, loading this file by its path (the tests) does not.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)

from gin_flags import split_gin_flags, unquote_gin_string  # noqa: E402
from tpu_commands import (PREEMPTED_EXIT_CODE, CommandRunner, LaunchSpec,  # noqa: E402
                          create_command, gcloud_tpu, install_script, parse_status,
                          ssh_all, start_script, status_script)
from tpu_slices import MESH_GIN_FILES, LaunchError, slice_shape  # noqa: E402

REPO_ROOT = os.path.dirname(_HERE)
# States in which a slice will never run again: it must be deleted and created anew.
DEAD_STATES = ("PREEMPTED", "TERMINATED")
# States that turn into READY (or DEAD) by themselves if we wait.
TRANSIENT_STATES = ("CREATING", "STARTING", "RESTARTING", "REPAIRING")
SSH_FAILURE_EXIT_CODE = 255  # ssh itself lost the connection: rerun if the slice is READY
# Words of gcloud's errors when the zone has no TPUs to give right now (spot stock-outs are
# normal): creation is retried with back-off. Quota or permission errors are not.
CAPACITY_ERRORS = ("resource_exhausted", "no more capacity", "stockout", "out of capacity",
                   "insufficient capacity", "zone_resource_pool_exhausted",
                   "not enough resources")


def describe_state(spec: LaunchSpec, runner: CommandRunner) -> Optional[str]:
  """The slice's state (READY, PREEMPTED, ...), None when it does not exist."""
  result = runner.run(gcloud_tpu(spec, "describe", spec.name, "--format=value(state)"),
                      capture=True)
  if runner.dry_run:
    return "UNKNOWN"
  if result.returncode == 0:
    return result.stdout.strip() or "UNKNOWN"
  if "NOT_FOUND" in result.stderr or "not found" in result.stderr.lower():
    return None
  raise LaunchError(f"describing TPU {spec.name!r} failed (exit {result.returncode}): "
                    f"{result.stderr.strip()}")


def _checked(runner: CommandRunner, argv: Sequence[str], what: str) -> None:
  result = runner.run(argv)
  if result.returncode != 0:
    raise LaunchError(f"{what} failed with exit code {result.returncode}: {shlex.join(argv)}")


def wait_until_ready(spec: LaunchSpec, runner: CommandRunner) -> None:
  for _ in range(spec.max_wait_polls):
    state = describe_state(spec, runner)
    if state == "READY":
      return
    if state is None or state in DEAD_STATES or state not in TRANSIENT_STATES:
      raise LaunchError(f"TPU {spec.name!r} is {state or 'gone'} while waiting for READY")
    runner.wait()
  raise LaunchError(f"TPU {spec.name!r} not READY after {spec.max_wait_polls} polls")


def is_capacity_error(text: str) -> bool:
  lowered = text.lower()
  return any(words in lowered for words in CAPACITY_ERRORS) and "quota" not in lowered


def create_slice(spec: LaunchSpec, runner: CommandRunner) -> None:
  """Creates the slice; with --watch, a capacity error is retried after a back-off that
  doubles from `backoff_s` up to `max_backoff_s`, `max_create_attempts` times in all (a
  failed creation that left a slice behind is deleted first)."""
  delay = spec.backoff_s
  for attempt in range(1, spec.max_create_attempts + 1):
    result = runner.run(create_command(spec), capture=True)
    if result.returncode == 0:
      return
    text = (result.stdout + result.stderr).strip()
    sys.stderr.write(text + "\n" if text else "")
    if not (spec.watch and is_capacity_error(text)):
      raise LaunchError(f"creating the slice failed with exit code {result.returncode}: "
                        f"{text.splitlines()[-1] if text else shlex.join(create_command(spec))}")
    if attempt == spec.max_create_attempts:
      break
    runner.note(f"no capacity for {spec.shape.accelerator_type} in {spec.zone} (attempt "
                f"{attempt} of {spec.max_create_attempts}); retrying in {delay:.0f} s")
    if describe_state(spec, runner) is not None:
      _checked(runner, gcloud_tpu(spec, "delete", spec.name, "--quiet"),
               "deleting the slice a failed creation left")
    runner.sleep(delay)
    delay = min(delay * 2, spec.max_backoff_s)
  raise LaunchError(f"no capacity for {spec.shape.accelerator_type} in {spec.zone} after "
                    f"{spec.max_create_attempts} attempts; try another zone or later")


def recreate(spec: LaunchSpec, runner: CommandRunner, state: Optional[str]) -> None:
  if state is not None:
    _checked(runner, gcloud_tpu(spec, "delete", spec.name, "--quiet"), "deleting the slice")
  create_slice(spec, runner)
  if not runner.dry_run:
    wait_until_ready(spec, runner)


def ensure_slice(spec: LaunchSpec, runner: CommandRunner) -> bool:
  """Makes the slice READY; True when it was (re)created and so has no code on it."""
  state = describe_state(spec, runner)
  if runner.dry_run:
    runner.note("if describe says NOT_FOUND, create the slice:")
    runner.run(create_command(spec))
    runner.note(f"if it says {' or '.join(DEAD_STATES)}, delete it, then create it as above:")
    runner.run(gcloud_tpu(spec, "delete", spec.name, "--quiet"))
    return True
  if state == "READY":
    return False
  if state in TRANSIENT_STATES:
    wait_until_ready(spec, runner)
    return False
  if state is None or state in DEAD_STATES:
    recreate(spec, runner, state)
    return True
  raise LaunchError(f"TPU {spec.name!r} is {state}; expected READY, a preempted slice or "
                    "none (start or delete it by hand)")


def warn_if_uncommitted() -> None:
  """`git archive` ships commits only; an edited gin file would silently not take effect."""
  status = subprocess.run(["git", "-C", REPO_ROOT, "status", "--porcelain", "--", "gin",
                           "gensar_jax", "tasks", "setup.py"],
                          capture_output=True, text=True, check=False)
  if status.returncode == 0 and status.stdout.strip():
    print("warning: uncommitted changes under gin/, gensar_jax/, tasks/ or setup.py are "
          "not shipped to the workers (git archive of --git_ref)", file=sys.stderr)


def install_code(spec: LaunchSpec, runner: CommandRunner) -> None:
  if not runner.dry_run:
    os.makedirs(os.path.dirname(spec.archive_path) or ".", exist_ok=True)
    warn_if_uncommitted()
  _checked(runner, ["git", "-C", REPO_ROOT, "archive", "--format=tar.gz",
                    f"--output={spec.archive_path}", spec.git_ref], "git archive")
  _checked(runner, gcloud_tpu(spec, "scp", spec.archive_path,
                              f"{spec.name}:{os.path.basename(spec.archive_path)}",
                              "--worker=all"), "copying the code to the workers")
  _checked(runner, ssh_all(spec, install_script(spec)), "installing on the workers")


def combined_exit_code(states: Sequence[Tuple[str, str]]) -> Optional[int]:
  """The job's exit code from every worker's state; None while any worker still runs.
  A preempted worker (75) makes the job preempted; a lost one (no process, no exit code)
  counts as a lost connection (255), which the launcher checks against the slice state."""
  if any(state == "running" for _, state in states):
    return None
  if any(state == "lost" for _, state in states):
    return SSH_FAILURE_EXIT_CODE
  codes = [int(state) if state.lstrip("-").isdigit() else 1 for _, state in states]
  if PREEMPTED_EXIT_CODE in codes:
    return PREEMPTED_EXIT_CODE
  return next((code for code in codes if code != 0), 0)


def run_training(spec: LaunchSpec, runner: CommandRunner) -> int:
  """Starts the trainer detached on every worker, then polls each `poll_seconds` until all
  have exited; returns the job's exit code (255 when a worker could not be reached)."""
  started = runner.run(ssh_all(spec, start_script(spec)))
  if runner.dry_run:
    runner.note(f"then every --poll_seconds, until every worker reports an exit code "
                f"(training logs: ~/{spec.remote_dir}/.run/train.log on each worker):")
    runner.run(ssh_all(spec, status_script(spec)))
    return 0
  if started.returncode != 0:
    return started.returncode
  first = True
  while True:
    runner.wait()
    result = runner.run(ssh_all(spec, status_script(spec)), capture=True, quiet=not first)
    first = False
    if result.returncode != 0:
      return SSH_FAILURE_EXIT_CODE
    states = parse_status(result.stdout)
    if len(states) < spec.shape.workers:
      return SSH_FAILURE_EXIT_CODE
    code = combined_exit_code(states)
    if code is not None:
      runner.note("training ended: " + ", ".join(f"{host} {state}" for host, state in states))
      return code


def launch(spec: LaunchSpec, runner: CommandRunner) -> int:
  """Slice, code, training; with --watch, again after every preemption. Exit code."""
  created = ensure_slice(spec, runner)
  restarts = 0
  install = spec.install  # once per launch; afterwards only onto a fresh slice
  while True:
    if install or created:
      install_code(spec, runner)
    install = False
    rc = run_training(spec, runner)
    if runner.dry_run and spec.watch:
      runner.note(f"--watch: if training exits {PREEMPTED_EXIT_CODE} (preempted, its step "
                  "saved) or fails and describe says PREEMPTED, TERMINATED or NOT_FOUND, "
                  "recreate (retrying on capacity errors), reinstall and rerun (it resumes "
                  "from MODEL_DIR):")
      describe_state(spec, runner)
      recreate(spec, runner, "PREEMPTED")
      install_code(spec, runner)
      run_training(spec, runner)
      return 0
    if rc == 0 or not spec.watch:
      return rc
    state = describe_state(spec, runner)
    if state == "READY" and rc not in (SSH_FAILURE_EXIT_CODE, PREEMPTED_EXIT_CODE):
      print(f"training failed (exit {rc}) on a READY slice: not a preemption, not retrying",
            file=sys.stderr)
      return rc
    restarts += 1
    if restarts > spec.max_restarts:
      print(f"giving up after {spec.max_restarts} restarts", file=sys.stderr)
      return rc
    runner.note(f"slice {state or 'gone'} after exit {rc}: restart {restarts} of "
                f"{spec.max_restarts}, resuming from the latest checkpoint in MODEL_DIR")
    if state == "READY":
      created = False
    elif state in TRANSIENT_STATES:
      wait_until_ready(spec, runner)
      created = False
    elif state is None or state in DEAD_STATES:
      recreate(spec, runner, state)
      created = True
    else:
      raise LaunchError(f"TPU {spec.name!r} is {state} after training exited {rc}; "
                        "not touching it (start or delete it by hand)")


# --- flags ------------------------------------------------------------------------------


def gin_macro_values(gin_flags: Sequence[str]) -> Dict[str, str]:
  """Macro values the trainer will see: gin files first, then bindings (later ones win)."""
  values: Dict[str, str] = {}
  for flag in gin_flags:
    if flag.startswith("--gin_file="):
      path = flag.split("=", 1)[1]
      full = os.path.normpath(os.path.join(REPO_ROOT, path))
      if os.path.relpath(full, REPO_ROOT).startswith(os.pardir) or os.path.isabs(path):
        raise LaunchError(f"--gin_file={path}: must be a path inside the repository, "
                          f"relative to {REPO_ROOT} (that is all the workers receive)")
      if not os.path.isfile(full):
        raise LaunchError(f"--gin_file={path}: not found under {REPO_ROOT} (workers get a "
                          "git archive of this repository, so gin files must be committed)")
      with open(full, encoding="utf-8") as f:
        for line in f:
          m = re.match(r"\s*([A-Z][A-Z0-9_]*)\s*=\s*(.+?)\s*(#.*)?$", line)
          if m and "gin.REQUIRED" not in m.group(2):
            values[m.group(1)] = unquote_gin_string(m.group(2))
  for flag in gin_flags:
    if flag.startswith("--gin."):
      name, value = flag[len("--gin."):].split("=", 1)
    elif flag.startswith("--gin_bindings="):
      name, _, value = flag.split("=", 1)[1].partition("=")
    else:
      continue
    values[name.strip()] = unquote_gin_string(value)
  return values


def check_storage(values: Dict[str, str], workers: int, watch: bool) -> None:
  """MODEL_DIR must be a bucket whenever a local disk would lose or split the checkpoints."""
  model_dir = values.get("MODEL_DIR")
  if workers > 1 or watch:
    why = (f"the slice has {workers} workers and local paths are not shared between them"
           if workers > 1 else "--watch recreates the VM, which loses its local disk")
    if not model_dir:
      raise LaunchError(f"MODEL_DIR is not set: pass --gin.MODEL_DIR=\"'gs://BUCKET/PATH'\" "
                        f"({why})")
    if not model_dir.startswith("gs://"):
      raise LaunchError(f"MODEL_DIR={model_dir!r} is not a gs:// path: {why}; use "
                        "--gin.MODEL_DIR=\"'gs://BUCKET/PATH'\"")
  for name, value in values.items():
    if (workers > 1 and name.endswith("_DIR") and name != "MODEL_DIR" and value
        and "://" not in value):
      print(f"warning: {name}={value!r} is a local path; each worker reads its own copy "
            "(put data on gs:// unless it is in the repository)", file=sys.stderr)


def parse_args(argv: Sequence[str]) -> Tuple[LaunchSpec, bool, float]:
  gin_flags, own = split_gin_flags(argv, error=LaunchError)
  p = argparse.ArgumentParser(
      description="Launch gensar-jax training on a Cloud TPU VM slice. Gin flags "
      "(--gin_file=..., --gin.NAME=VALUE, --gin_bindings=...) go to the trainer verbatim.")
  p.add_argument("--name", required=True, help="TPU VM (slice) name")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", default=None, help="default: gcloud's configured project")
  p.add_argument("--accelerator_type", required=True, help="v4-8, v5litepod-16 (v5e-16), ...")
  p.add_argument("--version", default=None, help="TPU VM runtime; default per generation")
  capacity = p.add_mutually_exclusive_group()
  capacity.add_argument("--spot", action="store_true")
  capacity.add_argument("--preemptible", action="store_true")
  p.add_argument("--mesh_gin", default=None,
                 help="mesh gin file; default chosen from the accelerator type; 'none' to skip")
  p.add_argument("--watch", "--resume_loop", dest="watch", action="store_true",
                 help="recreate a preempted slice and rerun until training succeeds")
  p.add_argument("--max_restarts", type=int, default=20)
  p.add_argument("--poll_seconds", type=float, default=60.0)
  p.add_argument("--max_wait_polls", type=int, default=60)
  p.add_argument("--skip_install", action="store_true",
                 help="reuse the code already on a READY slice (a new slice always gets it)")
  p.add_argument("--git_ref", default="HEAD", help="what to ship (committed code only)")
  p.add_argument("--remote_dir", default="gensar-jax", help="checkout dir under worker $HOME")
  p.add_argument("--python", default="python3.12",
                 help="interpreter on the workers (installed from the deadsnakes PPA if the "
                 "image lacks it)")
  p.add_argument("--constraints", default="constraints-py312.txt",
                 help="pip constraints file of that Python, in the repository")
  p.add_argument("--jax_requirement", default=None,
                 help="default: jax[tpu]==<the jax version of --constraints>")
  p.add_argument("--stop_wait_seconds", type=int, default=120,
                 help="a stale run's time to save and exit after TERM, before KILL")
  p.add_argument("--tpu_free_wait_seconds", type=int, default=120)
  p.add_argument("--backoff_seconds", type=float, default=60.0,
                 help="--watch: first wait after a capacity error (doubles, up to 30 min)")
  p.add_argument("--max_create_attempts", type=int, default=30)
  p.add_argument("--train_module", default="gensar_jax.train")
  p.add_argument("--archive_dir", default=tempfile.gettempdir())
  p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  p.add_argument("--teardown", action="store_true",
                 help="delete the slice (its local disks go with it; MODEL_DIR on the bucket "
                 "stays) and do nothing else")
  args = p.parse_args(own)
  shape = slice_shape(args.accelerator_type)
  if args.jax_requirement is None:
    args.jax_requirement = f"jax[tpu]=={pinned_jax_version(args.constraints)}"
  extra = dict(constraints=args.constraints, stop_wait_s=args.stop_wait_seconds,
               tpu_free_wait_s=args.tpu_free_wait_seconds,
               max_create_attempts=max(1, args.max_create_attempts),
               backoff_s=args.backoff_seconds)
  if args.teardown:
    if gin_flags:
      raise LaunchError("--teardown deletes the slice only: drop the gin flags")
    spec = LaunchSpec(
        name=args.name, zone=args.zone, project=args.project, shape=shape,
        runtime=args.version or shape.runtime, spot=args.spot, preemptible=args.preemptible,
        train_flags=(), train_module=args.train_module, remote_dir=args.remote_dir,
        python=args.python, jax_requirement=args.jax_requirement, archive_path="",
        git_ref=args.git_ref, install=False, watch=False, max_restarts=0,
        max_wait_polls=args.max_wait_polls, teardown=True, **extra)
    return spec, args.dry_run, args.poll_seconds
  # Checked before the slice's mesh file is added: that one alone trains nothing.
  if not any(f.startswith("--gin_file=") for f in gin_flags):
    raise LaunchError("no --gin_file given: pass the run and model gin files, e.g. "
                      "--gin_file=gin/runs/train.gin --gin_file=gin/models/small.gin")
  if args.mesh_gin is None:
    if shape.accelerator_type not in MESH_GIN_FILES:
      raise LaunchError(f"no mesh gin file for {shape.accelerator_type} ({shape.chips} chips);"
                        f" pass --mesh_gin=PATH, or --mesh_gin=none for data parallelism over "
                        f"all chips (shipped: {', '.join(MESH_GIN_FILES)})")
    args.mesh_gin = MESH_GIN_FILES[shape.accelerator_type]
  if args.mesh_gin.lower() != "none":
    # After the user's gin files, so the slice's mesh wins over one set by an experiment.
    last_file = max((i for i, f in enumerate(gin_flags) if f.startswith("--gin_file=")),
                    default=-1)
    gin_flags.insert(last_file + 1, f"--gin_file={args.mesh_gin}")
  check_storage(gin_macro_values(gin_flags), shape.workers, args.watch)
  spec = LaunchSpec(
      name=args.name, zone=args.zone, project=args.project, shape=shape,
      runtime=args.version or shape.runtime, spot=args.spot, preemptible=args.preemptible,
      train_flags=tuple(gin_flags), train_module=args.train_module,
      remote_dir=args.remote_dir, python=args.python, jax_requirement=args.jax_requirement,
      archive_path=os.path.join(args.archive_dir, f"gensar-jax-{args.name}.tar.gz"),
      git_ref=args.git_ref, install=not args.skip_install, watch=args.watch,
      max_restarts=args.max_restarts, max_wait_polls=args.max_wait_polls, **extra)
  return spec, args.dry_run, args.poll_seconds


def pinned_jax_version(constraints: str) -> str:
  """The `jax==X` of a constraints file of this repository (what the workers install)."""
  path = os.path.join(REPO_ROOT, constraints)
  try:
    with open(path, encoding="utf-8") as f:
      for line in f:
        match = re.match(r"\s*jax==([\w.]+)\s*$", line)
        if match:
          return match.group(1)
  except OSError:
    raise LaunchError(f"--constraints={constraints}: not found under {REPO_ROOT}") from None
  raise LaunchError(f"--constraints={constraints}: no jax==VERSION line to pin jax[tpu] to")


def main(argv: Optional[Sequence[str]] = None) -> int:
  try:
    spec, dry_run, poll_seconds = parse_args(sys.argv[1:] if argv is None else argv)
    runner = CommandRunner(dry_run, poll_seconds=poll_seconds)
    if spec.teardown:
      return runner.run(gcloud_tpu(spec, "delete", spec.name, "--quiet")).returncode
    runner.note(f"{spec.shape.accelerator_type}: {spec.shape.chips} chips on "
                f"{spec.shape.workers} worker(s), runtime {spec.runtime}")
    return launch(spec, runner)
  except LaunchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
