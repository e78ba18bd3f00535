"""Orbax checkpoints for training: periodic saves, keep-last-K plus keep-best, resume.

One step directory holds two items:
  state/   the sharded TrainState (ocp.args.StandardSave), restored straight into the
           target shardings, so a run saved on one mesh resumes on any other;
  data/    the input position as JSON (ocp.args.JsonSave): how many training examples
           the run has consumed, with the seed and mixture that define the stream.

Why the data position is a count and not a tf.data iterator checkpoint: our input stream
is a pure function of (mixture, seed), so "skip the first N examples" rebuilds the exact
iterator on any host count or batch size, and it works for every SeqIO source (iterator
checkpoints fail on sources built from Python generators and tie the file to one host
layout). The price is that resuming re-reads N examples; at our sizes that is seconds.

Retention. Orbax's `best_fn` option turns the whole manager into "keep the top K by the
metric", dropping recency. The installed orbax (0.12) has composable preservation
policies, so one manager keeps a checkpoint when ANY of these wants it:
  LatestN(keep_last)                          the most recent ones, for resuming;
  BestN(metric, keep_best, only with metrics) the best ones by a validation metric.
A checkpoint saved without eval metrics competes only under LatestN.

Corruption. A step whose files are truncated or missing fails to restore; we log a
warning naming the step and the directory and try the next older step. The bad newer
steps are then moved aside into `<directory>.corrupt/` (never deleted: a person may want
to look), because training on from the older step will want to save those step numbers
again. If checkpoints exist but none restores, `CheckpointError` says so and nothing is
moved, so a run never silently starts over.

Several hosts restore one step. Each host reading the bucket for itself could see another
listing (a step still being committed) or meet a transient read error the others do not,
and then train on from a different step than its peers, and wait at a move-aside barrier
the others never reach. So process 0's listing of the steps is broadcast, every host tries
the steps in that order, and after each try the hosts share whether it failed anywhere: a
step is used only if it restored on every host, and every newer step that failed on any
host is moved aside by process 0 (then one barrier). All hosts end on the same step.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp

from gensar_jax import io_utils
from gensar_jax.errors import CheckpointError

logger = logging.getLogger(__name__)

STATE_ITEM = "state"
DATA_ITEM = "data"


@dataclasses.dataclass(frozen=True)
class RestoredCheckpoint:
  step: int
  state: Any                        # the TrainState, placed with the target shardings
  data_position: Dict[str, Any]     # what `save` was given as data_position
  skipped: Tuple[Tuple[int, str], ...] = ()   # (step, reason) of newer steps that failed


def abstract_state(shapes: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings: what orbax restores into."""
  return jax.tree.map(
      lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype,
                                                   sharding=sharding),
      shapes, shardings)


def _metric_value(metrics: Optional[Mapping[str, Any]], name: str, mode: str) -> float:
  """The ranking value of one checkpoint; missing or NaN metrics rank worst."""
  worst = -math.inf if mode == "max" else math.inf
  value = (metrics or {}).get(name)
  if value is None or not math.isfinite(float(value)):
    return worst
  return float(value)


def _json_metrics(metrics: Mapping[str, Any]) -> Dict[str, float]:
  return {str(k): float(v) for k, v in metrics.items()}


@gin.configurable
class TrainCheckpoints:
  """The checkpoints of one run directory.

  Args:
    directory: where step directories live (MODEL_DIR/checkpoints in train.py).
    keep_last: how many of the most recent checkpoints to keep (>= 1).
    best_metric: name of an eval metric (a key of the `metrics` given to `save`, e.g.
      "eval/accuracy") whose best `keep_best` checkpoints are also kept; None keeps
      only the most recent ones.
    best_mode: "max" or "min": whether a larger `best_metric` is better.
    keep_best: how many best checkpoints to keep besides the recent ones.
    async_save: write in a background thread while training continues (`save` still
      blocks on the previous write first, so at most one is in flight).
  """

  def __init__(self, directory: str, keep_last: int = 3, best_metric: Optional[str] = None,
               best_mode: str = "max", keep_best: int = 1, async_save: bool = True):
    if keep_last < 1:
      raise ValueError(f"keep_last must be >= 1 (got {keep_last}): the latest checkpoint "
                       "is what a restart resumes from")
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    if best_metric is not None and keep_best < 1:
      raise ValueError(f"keep_best must be >= 1 when best_metric is set (got {keep_best})")
    self.directory = directory if io_utils.is_remote(directory) else os.path.abspath(directory)
    self.best_metric = best_metric
    self.best_mode = best_mode
    policies: List[Any] = [ocp.checkpoint_managers.LatestN(n=keep_last)]
    best_fn = None
    if best_metric is not None:
      best_fn = lambda m: _metric_value(m, best_metric, best_mode)  # pylint: disable=unnecessary-lambda-assignment
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=best_fn, reverse=(best_mode == "min"), n=keep_best,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        # Retention is the policy above; best_fn is set only because orbax writes the
        # metrics into the step directory (so BestN still ranks after a restart) only
        # when it is.
        best_fn=best_fn, best_mode=best_mode,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # a save killed half-way leaves only a tmp dir
        create=True)
    self._manager = ocp.CheckpointManager(self.directory, item_names=(STATE_ITEM, DATA_ITEM),
                                          options=options)

  # ------------------------------------------------------------------------ queries

  def all_steps(self) -> List[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def metrics(self, step: int) -> Optional[Dict[str, float]]:
    return self._manager.metrics(step)

  def best_step(self) -> Optional[int]:
    """The kept step with the best `best_metric` (None without one or without metrics)."""
    if self.best_metric is None:
      return None
    scored = [(step, self.metrics(step)) for step in self.all_steps()]
    scored = [(s, m) for s, m in scored if m and self.best_metric in m]
    if not scored:
      return None
    sign = 1.0 if self.best_mode == "max" else -1.0
    return max(scored, key=lambda sm: (sign * _metric_value(sm[1], self.best_metric,
                                                            self.best_mode), sm[0]))[0]

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def complete_steps_on_disk(self) -> List[int]:
    """Steps whose save was finalised, read from the directory itself (not the manager's
    cache), so it can be asked after a failed save: orbax writes a step under a temporary
    name and gives it its number only once complete."""
    try:
      names = io_utils.listdir(self.directory)
    except OSError:
      return []
    return sorted(int(name) for name in names if name.isdigit())

  # ------------------------------------------------------------------------ save

  def save(self, step: int, state: Any, data_position: Mapping[str, Any],
           metrics: Optional[Mapping[str, Any]] = None) -> bool:
    """Saves `state` and the input position at `step`; False if that step exists."""
    if step in self._manager.all_steps():
      return False
    args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state),
                                 DATA_ITEM: ocp.args.JsonSave(dict(data_position))})
    return self._manager.save(step, args=args, force=True,
                              metrics=None if metrics is None else _json_metrics(metrics))

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  # ------------------------------------------------------------------------ restore

  def restore(self, step: int, target: Any) -> RestoredCheckpoint:
    """Restores one step into `target` (an `abstract_state` tree); raises on failure."""
    args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target),
                                 DATA_ITEM: ocp.args.JsonRestore()})
    restored = self._manager.restore(step, args=args)
    data = restored[DATA_ITEM]
    if not isinstance(data, dict):
      raise CheckpointError(f"{self.step_path(step)}/{DATA_ITEM}: expected a JSON object, "
                            f"got {type(data).__name__}")
    return RestoredCheckpoint(step=step, state=restored[STATE_ITEM], data_position=data)

  def restore_latest(self, target: Any) -> Optional[RestoredCheckpoint]:
    """The newest restorable checkpoint, falling back past broken ones; None if none exist.

    Raises:
      CheckpointError: checkpoints exist but not one of them can be restored.
    """
    self.wait_until_finished()
    self._manager.reload()
    steps = _steps_of_process_0(self.all_steps())
    failures: List[Tuple[int, str]] = []
    for step in reversed(steps):
      reason = None
      try:
        restored = self.restore(step, target)
      except Exception as e:  # pylint: disable=broad-except  # any failure means "broken"
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        logger.warning("checkpoint at step %d (%s) cannot be restored (%s); falling back "
                       "to an earlier checkpoint", step, self.step_path(step), reason)
      failed_on = _processes_where(reason is not None)
      if failed_on:
        if reason is None:
          reason = f"failed to restore on process(es) {failed_on}"
          logger.warning("checkpoint at step %d (%s) restored here but not on process(es) "
                         "%s; all processes fall back to an earlier checkpoint", step,
                         self.step_path(step), failed_on)
        failures.append((step, reason))
        continue
      self._move_aside([bad_step for bad_step, _ in failures])
      if failures:
        self._manager.reload()
        logger.warning("resumed from step %d; broken newer checkpoints %s moved to %s",
                       step, [s for s, _ in failures], self._corrupt_dir())
      return dataclasses.replace(restored, skipped=tuple(failures))
    if failures:
      detail = "; ".join(f"step {s} ({self.step_path(s)}): {r}" for s, r in failures)
      raise CheckpointError(
          f"{self.directory}: {len(failures)} checkpoint(s) exist but none can be restored "
          f"({detail}). Refusing to start from scratch over them: move the directory away "
          "to start a new run.")
    return None

  def _corrupt_dir(self) -> str:
    return f"{self.directory}.corrupt"

  def _move_aside(self, steps: List[int]) -> None:
    """Moves broken steps out of the managed directory (kept for inspection): process 0
    moves, every process then waits at one barrier (every process has the same `steps`)."""
    if not steps:
      return
    if jax.process_index() == 0:
      for step in steps:
        destination = io_utils.join(self._corrupt_dir(), f"{step}-{int(time.time())}")
        io_utils.move(self.step_path(step), destination)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("checkpoints_move_aside_" + "_".join(map(str, steps)))


def _steps_of_process_0(steps: List[int]) -> List[int]:
  """Process 0's list of steps, on every process (the list itself on a single one)."""
  if jax.process_count() == 1:
    return list(steps)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  count = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
  if count == 0:
    return []
  mine = np.zeros((count,), np.int32)
  if jax.process_index() == 0:
    mine[:] = steps
  return [int(s) for s in multihost_utils.broadcast_one_to_all(mine)]


def _processes_where(flag: bool) -> List[int]:
  """The indices of the processes on which `flag` is True (every process calls it)."""
  if jax.process_count() == 1:
    return [0] if flag else []
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = np.asarray(multihost_utils.process_allgather(np.int32(flag))).reshape(-1)
  return [int(i) for i in np.flatnonzero(flags)]

