"""Processes that a test starts together on this machine: a loopback JAX cluster of CPU
processes, or one process beside a reference run.

One place for what every multi-process test needs: a free port for the coordinator, an
environment with its own simulated device count, and a wait that kills the rest when one
fails or hangs (a process left waiting at a barrier would hold a CPU until the session
ends), then asserts each exited 0 with the tail of its log.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def cpu_env(device_count: int, keep_xla_flags: bool = True) -> Dict[str, str]:
  """This environment with `device_count` simulated CPU devices and the repository on the
  path; `keep_xla_flags` keeps conftest.py's other XLA flags (the fast compile)."""
  env = dict(os.environ)
  flags = ([f for f in os.environ.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
           if keep_xla_flags else [])
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={device_count}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
  return env


def run_together(commands: Sequence[Sequence[str]], envs: Sequence[Dict[str, str]],
                 timeout_s: float, log_tail: int = 3000) -> List[str]:
  """Starts every command (`python <args>`) at once, waits for all, returns their logs.

  All must exit 0: a failure or a timeout kills the others and fails the test with the
  log tail of each process that did not exit 0.
  """
  procs = [subprocess.Popen([sys.executable, *command], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for command, env in zip(commands, envs)]
  logs: List[Optional[str]] = [None] * len(procs)
  try:
    for index, proc in enumerate(procs):
      logs[index] = proc.communicate(timeout=timeout_s)[0]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for index, (proc, log) in enumerate(zip(procs, logs)):
    assert proc.returncode == 0, f"process {index} exited {proc.returncode}:\n{log[-log_tail:]}"
  return logs


def read_json(paths: Sequence[str]) -> List[dict]:
  results = []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      results.append(json.load(f))
  return results
