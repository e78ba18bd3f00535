"""Joining the hosts of a multi-host TPU slice into one JAX runtime.

On a pod slice every host runs the same training command. Before any of them touches a
device they must agree on how many processes there are and which one is process 0;
otherwise each host builds a mesh of its own 4 chips and silently trains a separate model.
A single-process run (a laptop, one TPU VM, CI) must not try: the distributed runtime would
wait for a coordinator and for peers that never come.

Whether to initialise is decided, first match wins, by
  1. `initialize_distributed.enabled` (gin) when it is True or False,
  2. the GENSAR_DISTRIBUTED environment variable (`1`/`0`); launch/tpu_pod.py sets it to 1
     on every worker of a multi-host slice, so no detection is needed there,
  3. detection: JAX_COORDINATOR_ADDRESS is set, or a TPU worker list (TPU_WORKER_HOSTNAMES
     or TPU_PROCESS_ADDRESSES, set on GKE) names more than one host,
and otherwise it is a no-op. `jax.distributed.initialize()` then finds the pod topology
itself on Cloud TPU (from the TPU VM metadata). For a local simulation with several CPU
processes, give JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT plus GENSAR_NUM_PROCESSES and
GENSAR_PROCESS_ID (or the gin arguments of the same meaning).

The launcher also sets GENSAR_EXPECTED_PROCESSES to the slice's worker count; a host that
ends up in a job of another size stops with an error instead of training on its own.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable, Mapping, Optional, Tuple, TypeVar

import gin

T = TypeVar("T")

ENV_ENABLE = "GENSAR_DISTRIBUTED"
ENV_NUM_PROCESSES = "GENSAR_NUM_PROCESSES"
ENV_PROCESS_ID = "GENSAR_PROCESS_ID"
ENV_EXPECTED_PROCESSES = "GENSAR_EXPECTED_PROCESSES"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


@dataclasses.dataclass(frozen=True)
class ProcessTopology:
  """Where this process sits in the job; what every host logs first so mismatches show."""
  process_index: int
  process_count: int
  local_device_count: int
  global_device_count: int
  platform: str
  distributed: bool  # whether jax.distributed.initialize() ran in this process

  def describe(self) -> str:
    mode = "distributed" if self.distributed else "single process"
    return (f"process {self.process_index} of {self.process_count} ({mode}): "
            f"{self.local_device_count} local / {self.global_device_count} global "
            f"{self.platform} devices")


def _parse_bool(name: str, value: str) -> bool:
  lowered = value.strip().lower()
  if lowered in _TRUE:
    return True
  if lowered in _FALSE:
    return False
  raise ValueError(f"environment variable {name}={value!r}: expected 1/0 (or true/false)")


def _parse_int(name: str, value: Optional[str]) -> Optional[int]:
  if value is None or value.strip() == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r}: expected an integer") from None


def should_initialize(enabled: Optional[bool],
                      environ: Mapping[str, str]) -> Tuple[bool, str]:
  """(initialise?, why), from the explicit setting, then the launcher's flag, then env."""
  if enabled is not None:
    return bool(enabled), f"initialize_distributed.enabled={enabled}"
  if ENV_ENABLE in environ:
    on = _parse_bool(ENV_ENABLE, environ[ENV_ENABLE])
    return on, f"{ENV_ENABLE}={environ[ENV_ENABLE]}"
  if environ.get("JAX_COORDINATOR_ADDRESS"):
    return True, "JAX_COORDINATOR_ADDRESS is set"
  for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
    hosts = [h for h in environ.get(name, "").split(",") if h.strip()]
    if len(hosts) > 1:
      return True, f"{name} names {len(hosts)} hosts"
  return False, "no multi-host environment detected"


def _use_cpu_collectives() -> None:
  """Cross-process CPU arrays need a collectives backend (gloo); harmless on TPU."""
  import jax
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except (AttributeError, ValueError):  # renamed or removed in a later JAX: its default
    pass


def _already_initialized() -> bool:
  import jax
  is_initialized = getattr(jax.distributed, "is_initialized", None)
  return bool(is_initialized and is_initialized())


@gin.configurable
def initialize_distributed(enabled: Optional[bool] = None,
                           coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           expected_process_count: Optional[int] = None,
                           initialization_timeout_s: int = 300,
                           environ: Optional[Mapping[str, str]] = None,
                           verbose: bool = True) -> ProcessTopology:
  """Initialises jax.distributed when this is one host of several; prints the topology.

  Must be the first thing an entry point does with JAX: once anything has asked for devices
  the runtime is fixed and every host would see only its own chips. Arguments left None are
  read from the environment (module docstring) or, on Cloud TPU, found by JAX itself.
  Calling it again in the same process is allowed and does nothing new.
  """
  environ = os.environ if environ is None else environ
  initialise, reason = should_initialize(enabled, environ)
  import jax
  if initialise and not _already_initialized():
    if num_processes is None:
      num_processes = _parse_int(ENV_NUM_PROCESSES, environ.get(ENV_NUM_PROCESSES))
    if process_id is None:
      process_id = _parse_int(ENV_PROCESS_ID, environ.get(ENV_PROCESS_ID))
    _use_cpu_collectives()
    try:
      jax.distributed.initialize(coordinator_address=coordinator_address,
                                 num_processes=num_processes, process_id=process_id,
                                 initialization_timeout=initialization_timeout_s)
    except RuntimeError as e:
      if "before any JAX calls" in str(e) or "must be called before" in str(e):
        raise RuntimeError(
            "initialize_distributed() ran after JAX was already used in this process "
            f"({reason}); call it first in main(), before anything creates arrays or asks "
            "for devices") from e
      raise
  topology = ProcessTopology(
      process_index=jax.process_index(), process_count=jax.process_count(),
      local_device_count=jax.local_device_count(),
      global_device_count=jax.device_count(),
      platform=jax.devices()[0].platform,
      distributed=_already_initialized())
  if expected_process_count is None:
    expected_process_count = _parse_int(ENV_EXPECTED_PROCESSES,
                                        environ.get(ENV_EXPECTED_PROCESSES))
  if expected_process_count is not None and topology.process_count != expected_process_count:
    raise RuntimeError(
        f"this job has {topology.process_count} process(es) but {expected_process_count} "
        f"were expected ({ENV_EXPECTED_PROCESSES} or expected_process_count): "
        f"{topology.describe()}; decided by: {reason}")
  if verbose:
    print(f"[distributed] {topology.describe()} ({reason})", file=sys.stderr, flush=True)
  return topology


def to_host(tree):
  """A pytree of arrays as numpy, whole, on every process.

  An array spread over the devices of several processes cannot be read by any one of
  them; it is gathered (a collective: every process must call this). Arrays a process
  can read whole are copied as they are.
  """
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(one, tree)


def write_once(what: str, write: Callable[[], T]) -> Optional[T]:
  """Runs `write` on process 0 only; every process returns once it is done.

  Every host of a job runs the same evaluate, infer or export command and ends up holding
  the same results. If each wrote them, on gs:// each would remove and upload the same
  prefix under the others. So process 0 writes (and logs that it did) and the others wait:
  the outcome is broadcast from process 0, a collective that is also the barrier, so no
  process returns before the output is complete, and a write that fails on process 0
  fails every process instead of leaving them waiting until the runtime times out.
  Returns what `write` returned on process 0, None on the others.
  """
  import jax
  if jax.process_count() == 1:
    return write()
  import numpy as np
  from jax.experimental import multihost_utils
  result, error = None, None
  if jax.process_index() == 0:
    try:
      result = write()
    except Exception as e:  # pylint: disable=broad-except  # re-raised after the barrier
      error = e
  failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
  if error is not None:
    raise error
  if failed:
    raise RuntimeError(f"process 0 failed to write {what}; its log says why")
  if jax.process_index() == 0:
    print(f"[distributed] process 0 of {jax.process_count()} wrote {what}", file=sys.stderr,
          flush=True)
  return result
