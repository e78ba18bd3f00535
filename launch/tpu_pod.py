#!/usr/bin/env python3
"""Train gensar-jax on a Cloud TPU VM slice with one command, or print what that would run.

  python launch/tpu_pod.py --name=gensar-v5p --accelerator_type=v5p-64 --zone=us-east5-a \
      --project=my-project --spot --watch \
      --gin_file=gin/runs/train.gin --gin_file=gin/models/small.gin \
      --gin.MODEL_DIR="'gs://my-bucket/gensar/small'" --dry_run

It describes the slice and creates it if missing, ships a `git archive` of this repository to
every worker and installs it there (with `jax[tpu]`), then starts the same training command
on all workers at once; jax.distributed.initialize() on each of them finds the pod. With
--watch, a spot/preemptible slice that was preempted is deleted, recreated and the same
command rerun: the trainer resumes from the latest checkpoint in MODEL_DIR. Every command
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
from tpu_commands import (CommandRunner, LaunchSpec, create_command, gcloud_tpu,  # noqa: E402
                          install_script, ssh_all, train_script)
from tpu_slices import MESH_GIN_FILES, LaunchError, slice_shape  # noqa: E402

REPO_ROOT = os.path.dirname(_HERE)
# States in which a slice will never run again: it must be deleted and created anew.
DEAD_STATES = ("PREEMPTED", "TERMINATED")
# States that turn into READY (or DEAD) by themselves if we wait.
TRANSIENT_STATES = ("CREATING", "STARTING", "RESTARTING", "REPAIRING")
SSH_FAILURE_EXIT_CODE = 255  # ssh itself lost the connection: rerun if the slice is READY


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


def recreate(spec: LaunchSpec, runner: CommandRunner, state: Optional[str]) -> None:
  if state is not None:
    _checked(runner, gcloud_tpu(spec, "delete", spec.name, "--quiet"), "deleting the slice")
  _checked(runner, create_command(spec), "creating the slice")
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


def launch(spec: LaunchSpec, runner: CommandRunner) -> int:
  """Slice, code, training; with --watch, again after every preemption. Exit code."""
  created = ensure_slice(spec, runner)
  restarts = 0
  install = spec.install  # once per launch; afterwards only onto a fresh slice
  while True:
    if install or created:
      install_code(spec, runner)
    install = False
    rc = runner.run(ssh_all(spec, train_script(spec))).returncode
    if runner.dry_run and spec.watch:
      runner.note("--watch: if training exits non-zero and describe says PREEMPTED, "
                  "TERMINATED or NOT_FOUND, recreate, reinstall and rerun (it resumes from "
                  "MODEL_DIR):")
      describe_state(spec, runner)
      recreate(spec, runner, "PREEMPTED")
      install_code(spec, runner)
      runner.run(ssh_all(spec, train_script(spec)))
      return 0
    if rc == 0 or not spec.watch:
      return rc
    state = describe_state(spec, runner)
    if state == "READY" and rc != SSH_FAILURE_EXIT_CODE:
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
  p.add_argument("--python", default="python3.11", help="interpreter on the workers")
  p.add_argument("--jax_requirement", default="jax[tpu]>=0.10,<0.12")
  p.add_argument("--train_module", default="gensar_jax.train")
  p.add_argument("--archive_dir", default=tempfile.gettempdir())
  p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  p.add_argument("--teardown", action="store_true",
                 help="delete the slice (its local disks go with it; MODEL_DIR on the bucket "
                 "stays) and do nothing else")
  args = p.parse_args(own)
  shape = slice_shape(args.accelerator_type)
  if args.teardown:
    if gin_flags:
      raise LaunchError("--teardown deletes the slice only: drop the gin flags")
    spec = LaunchSpec(
        name=args.name, zone=args.zone, project=args.project, shape=shape,
        runtime=args.version or shape.runtime, spot=args.spot, preemptible=args.preemptible,
        train_flags=(), train_module=args.train_module, remote_dir=args.remote_dir,
        python=args.python, jax_requirement=args.jax_requirement, archive_path="",
        git_ref=args.git_ref, install=False, watch=False, max_restarts=0,
        max_wait_polls=args.max_wait_polls, teardown=True)
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
      max_restarts=args.max_restarts, max_wait_polls=args.max_wait_polls)
  return spec, args.dry_run, args.poll_seconds


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
