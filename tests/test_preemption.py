"""gensar_jax/preemption.py: which mechanism answers "save this step and stop?"."""
import os
import signal

from gensar_jax import preemption


def test_single_process_sigterm_sets_the_flag_read_after_the_step_and_the_handler_goes():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionWatch(process_count=1) as watch:
    assert watch.mechanism == "SIGTERM handler"
    assert not watch.reached(3)
    os.kill(os.getpid(), signal.SIGTERM)  # the process lives on: only a flag is set
    assert watch.reached(4) and watch.signal_name == "SIGTERM"
  assert signal.getsignal(signal.SIGTERM) is before


def test_several_processes_leave_sigterm_to_jax_and_ask_its_sync_point(monkeypatch):
  """A Python handler would replace the one jax.distributed installed, and the other hosts
  would never hear of the notice: the sync point is asked instead, at every step."""
  asked = []
  monkeypatch.setattr(preemption, "_jax_sync_point",
                      lambda: lambda step: asked.append(step) or step == 7)
  before = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionWatch(process_count=2) as watch:
    assert signal.getsignal(signal.SIGTERM) is before
    assert watch.mechanism == "jax preemption sync point"
    assert [watch.reached(step) for step in (5, 6, 7)] == [False, False, True]
  assert asked == [5, 6, 7]


def test_without_the_jax_service_several_processes_fall_back_to_the_handler(monkeypatch):
  def service_off(step):
    raise RuntimeError("Preemption sync manager has not been initialized")

  monkeypatch.setattr(preemption, "_jax_sync_point", lambda: service_off)
  before = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionWatch(process_count=2) as watch:
    assert not watch.reached(1)  # falls back, installs the handler, all-gathers the flag
    assert watch.mechanism == "SIGTERM handler + all-gather"
    watch.notify()
    assert watch.reached(2)
  assert signal.getsignal(signal.SIGTERM) is before


def test_this_jax_has_the_sync_point_and_its_service_is_on():
  assert preemption._jax_sync_point() is not None  # pylint: disable=protected-access
