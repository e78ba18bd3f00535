"""When to stop training because the machine is being taken away (a spot preemption).

Cloud TPU (and most schedulers) announce a preemption with SIGTERM and kill the VM some
seconds later. The trainer then saves the step it is at, waits until that save is complete
and exits with `errors.PREEMPTED_EXIT_CODE` (75), which launch/tpu_pod.py reads as
"recreate the slice and rerun the same command": the rerun resumes from that step, so a
preemption costs at most the step in flight (docs/preemption.md).

Two mechanisms, one question (`PreemptionWatch.reached(step)`, asked after every step):

  multi-process   `jax.distributed.initialize` starts JAX's preemption service, whose C++
                  handler takes SIGTERM (so a Python handler must not be installed: it would
                  replace JAX's and the other hosts would never hear of the notice). The
                  service tells every process and picks one step, the largest step any of
                  them has reported plus one, at which
                  `multihost_utils.reached_preemption_sync_point(step)` is True on all of
                  them: they save the same step together (orbax's save is collective).
  single process  nothing handles SIGTERM (its default kills the process mid-save), so a
                  Python handler sets a flag that the next `reached` returns.

Where the JAX service is missing (disabled with `jax_enable_preemption_service=False`, or a
JAX that no longer has `reached_preemption_sync_point`; it is in jax.experimental), the
multi-process case falls back to the Python handler on each host plus an all-gather of the
flags every step, so that all hosts still stop at the same step.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Callable, Optional

import jax
import numpy as np

logger = logging.getLogger(__name__)


def _jax_sync_point() -> Optional[Callable[[int], bool]]:
  """JAX's `reached_preemption_sync_point`, if this JAX has it and its service is on."""
  if not bool(getattr(jax.config, "jax_enable_preemption_service", True)):
    return None
  try:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return getattr(multihost_utils, "reached_preemption_sync_point", None)


class PreemptionWatch:
  """Answers, once per trained step, whether to save this step and stop.

  Use as a context manager around the training loop: entering installs the SIGTERM handler
  where one is needed, leaving restores the previous handler.
  """

  def __init__(self, process_count: Optional[int] = None):
    self.process_count = jax.process_count() if process_count is None else process_count
    self._flag = threading.Event()
    self._sync = _jax_sync_point() if self.process_count > 1 else None
    self._previous: Any = None
    self._installed = False
    self.signal_name: Optional[str] = None

  @property
  def mechanism(self) -> str:
    if self._sync is not None:
      return "jax preemption sync point"
    return "SIGTERM handler" + (" + all-gather" if self.process_count > 1 else "")

  def _on_signal(self, signum: int, frame: Any) -> None:  # pylint: disable=unused-argument
    del frame
    if not self._flag.is_set():
      self.signal_name = signal.Signals(signum).name
      # Only a flag here: a signal handler must not save (it runs between two bytecodes of
      # whatever the loop is doing, possibly inside a save).
      self._flag.set()

  def __enter__(self) -> "PreemptionWatch":
    if self._sync is None and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
      self._installed = True
    return self

  def __exit__(self, *exc) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous
                    if self._previous is not None else signal.SIG_DFL)
      self._installed = False

  def notify(self) -> None:
    """Marks a preemption as announced (what the SIGTERM handler does)."""
    self._on_signal(signal.SIGTERM, None)

  def reached(self, step: int) -> bool:
    """True when every process should save `step` now and stop (call after every step)."""
    if self._sync is not None:
      try:
        return bool(self._sync(step))
      except RuntimeError as e:  # the service was not started after all
        logger.warning("JAX preemption service unavailable (%s); falling back to a SIGTERM "
                       "handler", e)
        self._sync = None
        self.__enter__()
    local = self._flag.is_set()
    if self.process_count > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return bool(np.max(multihost_utils.process_allgather(np.int32(local))))
    return local
