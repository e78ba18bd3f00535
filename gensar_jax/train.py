"""Stage 4: train the GenSAR encoder-decoder on a SeqIO mixture (the T5X train binary).

  python -m gensar_jax.train --gin_file=gin/runs/train.gin --gin_file=gin/models/tiny.gin \
      --gin.MODEL_DIR="'runs/tiny'" --gin.TRAIN_STEPS=100 \
      --gin.PREPARED_DIR="'runs/ml100k/data'" --gin.IDENTIFIERS_DIR="'runs/ml100k/identifiers'" \
      --gin.VOCAB_PATH="'runs/ml100k/vocab/gensar.model'"

Run it again with the same MODEL_DIR and it resumes from the newest restorable checkpoint
(state, step and input position), continuing exactly as if it had never stopped. On SIGTERM
(a spot preemption; on a pod, JAX's preemption sync point) it saves the step it is at,
waits for the save and exits 75, so a rerun loses nothing (docs/preemption.md).

MODEL_DIR afterwards:
  checkpoints/<step>/      orbax steps (the last KEEP_CHECKPOINTS, plus the best ones by
                           TrainCheckpoints.best_metric); checkpoints.corrupt/ if any broke
  train/, eval/            TensorBoard event files
  metrics.jsonl            one line per logged step and per evaluation
  param_movement.json      how far each parameter group moved (gensar_jax/param_movement.py)
  config.gin               the operative gin config
  trainer.lock             while a trainer runs: who it is (gensar_jax/run_lock.py); a
                           second trainer on the directory stops with exit code 2

The loop, top to bottom: build the model from the mixture's vocabulary, the partitioner
and the trainer; restore or initialise the sharded state; then per step: one host batch ->
`Trainer.train_step`; every LOG_PERIOD steps write token-weighted averages of the steps
since the last log; every EVAL_PERIOD steps (and at the end) score fixed validation batches
of each task plus the optional `eval_hook`; every CHECKPOINT_PERIOD steps, after every
evaluation when a best metric is tracked, and at the end, save. With
`report_param_movement`, every log also carries movement/* metrics (how far each parameter
group moved from the start, or from the restored step of a resumed run), and the end of
training prints them as a table and writes them to param_movement.json.
"""
from __future__ import annotations

if __name__ == "__main__" or __import__("sys").argv[:1] == ["gensar train"]:
  # A second trainer on a busy MODEL_DIR stops here, in a second, before the heavy imports
  # below (run_lock.refuse_early). `gensar train` (commands.py) sets argv[0] to that name;
  # its import runs with stderr silenced (gin_utils._import_quietly), so the line is
  # printed at exit, once stderr is back.
  import atexit as _atexit
  import os as _os
  import sys as _sys
  from gensar_jax import run_lock as _run_lock
  try:
    _run_lock.refuse_early(_sys.argv[1:], root=_os.path.dirname(_os.path.dirname(
        _os.path.abspath(__file__))))
  except _run_lock.RunInUseError as _error:
    _atexit.register(print, f"error: {_error}", file=_sys.stderr, flush=True)
    raise SystemExit(2) from None

if __name__ == "__main__":  # one gin registration: run as the importable module
  import gensar_jax.gin_utils as _gin_utils
  _gin_utils.run_module("gensar_jax.train")

import dataclasses
import errno
import logging
import os
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol

import gin
import jax
import numpy as np
import tqdm

from gensar_jax import checkpoints as checkpoints_lib
from gensar_jax import gin_utils
from gensar_jax import io_utils
from gensar_jax import optimizers as optimizers_lib
from gensar_jax import param_movement
from gensar_jax import partitioning as partitioning_lib
from gensar_jax import preemption
from gensar_jax import run_lock
from gensar_jax import train_inputs
from gensar_jax import train_logging
from gensar_jax import trainer as trainer_lib
from gensar_jax.data.schema import DataError
from gensar_jax.errors import PREEMPTED_EXIT_CODE, DiskFullError
from gensar_jax.models import encoder_decoder
from gensar_jax.restore import CHECKPOINTS_SUBDIR, TRAINED_CONFIG

logger = logging.getLogger(__name__)

EVAL_PREFIX = "eval/"


class EvalHook(Protocol):
  """Extra evaluation run beside the eval loss, e.g. the ranking metrics (HR/NDCG).

  Returns {name: value}; names are reported under `eval/` (TensorBoard eval/ directory and
  the JSONL eval lines), so a hook metric such as "ndcg@10" can drive keep-best with
  `TrainCheckpoints.best_metric = "eval/ndcg@10"`.
  """

  def __call__(self, *, step: int, params: Any, model: Any,
               trainer: trainer_lib.Trainer) -> Mapping[str, float]:
    ...


@dataclasses.dataclass(frozen=True)
class TrainSummary:
  start_step: int                   # 0 for a fresh run, else the restored step
  final_step: int
  train_metrics: Dict[str, float]   # the last logged training metrics
  eval_metrics: Dict[str, float]    # the last evaluation ({} if none ran)
  checkpoint_steps: List[int]       # kept after the run
  # param_movement.json's record (MovementTracker.report); {} when not reported.
  param_movement: Dict[str, Any] = dataclasses.field(default_factory=dict)
  # True when the run stopped at final_step because of a preemption (SIGTERM, or JAX's
  # preemption notice on a pod) after saving that step; the CLI exits PREEMPTED_EXIT_CODE.
  preempted: bool = False


def _required(value: Any, macro: str, kind: type) -> Any:
  if value is gin.REQUIRED or value is None:
    raise DataError(f"{macro} is required: pass --gin.{macro}=... (see gin/runs/train.gin)")
  if not isinstance(value, kind) or isinstance(value, bool):
    raise DataError(f"{macro}={value!r} must be a {kind.__name__}")
  return value


def _positive(value: int, macro: str, allow_zero: bool = False) -> int:
  _required(value, macro, int)
  if value < (0 if allow_zero else 1):
    raise DataError(f"{macro}={value} must be {'>= 0' if allow_zero else '>= 1'}")
  return value


def _write_config(model_dir: str) -> None:
  if jax.process_index() != 0:
    return
  io_utils.write_text(io_utils.join(model_dir, TRAINED_CONFIG), gin.operative_config_str())


def _max_over_processes(value: int) -> int:
  """The largest `value` any process has (every process calls it at the same point)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def _lock_run(model_dir: str) -> Optional[run_lock.RunLock]:
  """Process 0 takes MODEL_DIR's trainer lock; every process stops if it could not."""
  lock, error = None, None
  if jax.process_index() == 0:
    lock = run_lock.RunLock(model_dir)
    try:
      lock.acquire()
    except run_lock.RunInUseError as e:
      lock, error = None, e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    refused = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if refused and error is None:
      error = run_lock.RunInUseError(f"{model_dir} is in use by another trainer (process "
                                     "0's log names it)")
  if error is not None:
    raise error
  return lock


def _token_weighted(metrics: List[Mapping[str, Any]]) -> Dict[str, float]:
  """Loss and accuracy over several steps or batches, weighted by their target tokens."""
  weights = np.array([float(m["weight_sum"]) for m in metrics])
  total = max(weights.sum(), 1e-8)
  return {"loss": float(sum(float(m["loss"]) * w for m, w in zip(metrics, weights)) / total),
          "accuracy": float(sum(float(m["accuracy"]) * w
                                for m, w in zip(metrics, weights)) / total),
          "target_tokens": float(weights.sum())}


def evaluate(trainer: trainer_lib.Trainer, params: Any,
             batches_by_task: Mapping[str, List[Mapping[str, np.ndarray]]]
             ) -> Dict[str, float]:
  """eval/loss and eval/accuracy over all tasks' batches, and eval/<task>/... per task."""
  per_task = {task: [trainer.eval_step(params, batch) for batch in batches]
              for task, batches in batches_by_task.items()}
  per_task = jax.device_get(per_task)
  out: Dict[str, float] = {}
  everything = []
  for task, metrics in per_task.items():
    everything.extend(metrics)
    summary = _token_weighted(metrics)
    out[f"{EVAL_PREFIX}{task}/loss"] = summary["loss"]
    out[f"{EVAL_PREFIX}{task}/accuracy"] = summary["accuracy"]
  if everything:
    summary = _token_weighted(everything)
    out[f"{EVAL_PREFIX}loss"] = summary["loss"]
    out[f"{EVAL_PREFIX}accuracy"] = summary["accuracy"]
  return out


def _restore_or_init(trainer: trainer_lib.Trainer, checkpoints: checkpoints_lib.TrainCheckpoints,
                     input_shapes: Mapping[str, Any], data_identity: Mapping[str, Any],
                     initialise_params: Optional[Callable[[Any, Any], Any]] = None):
  """(state, rows consumed, restored step or None, data position)."""
  trainer.set_input_shapes(input_shapes)
  target = checkpoints_lib.abstract_state(trainer.state_shape, trainer.state_shardings)
  restored = checkpoints.restore_latest(target)
  if restored is None:
    state = trainer.init_state(input_shapes)
    if initialise_params is not None:
      state = state.replace(params=initialise_params(state.params, trainer.model.vocabulary))
    return state, 0, None, {}
  state_step = int(jax.device_get(restored.state.step))
  if state_step != restored.step:
    raise checkpoints_lib.CheckpointError(
        f"{checkpoints.step_path(restored.step)}: directory says step {restored.step} but "
        f"the saved TrainState.step is {state_step}")
  position = restored.data_position
  if "examples_consumed" not in position:
    raise checkpoints_lib.CheckpointError(
        f"{checkpoints.step_path(restored.step)}/data: no 'examples_consumed' in {position}")
  for key, value in data_identity.items():
    if key in position and position[key] != value:
      logger.warning("checkpoint step %d was trained with %s=%r, this run has %r: the "
                     "input stream continues at example %d of the new stream",
                     restored.step, key, position[key], value, position["examples_consumed"])
  logger.info("resuming from step %d (%s)", restored.step,
              checkpoints.step_path(restored.step))
  return restored.state, int(position["examples_consumed"]), restored.step, position


def _movement_tracker(params: Any, restored_step: Optional[int], vocabulary: Any,
                      partitioner: partitioning_lib.Partitioner
                      ) -> param_movement.MovementTracker:
  """The reference for movement metrics: these params, of step 0 or of the restored step."""
  if restored_step:
    logger.info("parameter movement is relative to the restored step %d: a resumed run "
                "has no step-0 parameters", restored_step)
  return param_movement.MovementTracker(params, param_movement.token_groups(vocabulary),
                                        restored_step or 0, partitioner.replicated)


def _final_movement(tracker: param_movement.MovementTracker, params: Any, step: int,
                    model_dir: str) -> Dict[str, Any]:
  """Measures once more at the last step, writes param_movement.json, prints the table."""
  report = tracker.report(step, tracker.measure(params))
  param_movement.write_report(model_dir, report)
  if jax.process_index() == 0:
    print(param_movement.format_table(report), flush=True)
  return report


class EarlyStopping:
  """Counts evaluations without improvement of the keep-best metric; restart-safe (its state
  rides in the checkpoint's data position)."""

  def __init__(self, patience: Optional[int], metric: Optional[str], mode: str,
               position: Mapping[str, Any]):
    if patience is not None and (not isinstance(patience, int) or patience < 1):
      raise DataError(f"train.early_stopping_evals={patience!r} must be None or an int >= 1")
    if patience is not None and metric is None:
      raise DataError("train.early_stopping_evals needs TrainCheckpoints.best_metric: the "
                      "metric whose improvement it waits for")
    self.patience, self.metric, self.mode = patience, metric, mode
    self.best = position.get("early_stopping_best")
    self.evals_since_best = int(position.get("early_stopping_evals_since_best", 0))

  @property
  def stopped(self) -> bool:
    return self.patience is not None and self.evals_since_best >= self.patience

  def update(self, evaluated: Mapping[str, float]) -> bool:
    """Records one evaluation; True when it is the one that stops training."""
    if self.patience is None:
      return False
    value = evaluated.get(self.metric)
    better = value is not None and np.isfinite(value) and (
        self.best is None or (value > self.best if self.mode == "max" else value < self.best))
    if better:
      self.best, self.evals_since_best = float(value), 0
    else:
      self.evals_since_best += 1
    return self.stopped

  def state(self) -> Dict[str, Any]:
    if self.patience is None:
      return {}
    return {"early_stopping_best": self.best,
            "early_stopping_evals_since_best": self.evals_since_best}


@gin.configurable
def train(model_dir: str = gin.REQUIRED,
          mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
          train_steps: int = gin.REQUIRED,
          batch_size: int = gin.REQUIRED,
          eval_period: int = 1000,
          eval_batches: int = 20,
          checkpoint_period: int = 1000,
          keep_checkpoints: int = 3,
          log_period: int = 100,
          data_seed: int = 0,
          pack_lengths: Optional[Mapping[str, int]] = None,
          target_buckets: Optional[List[int]] = None,
          early_stopping_evals: Optional[int] = None,
          input_shards: Optional[int] = None,
          build_model_fn: Callable[[Any], Any] = encoder_decoder.build_model,
          optimizer: Optional[optimizers_lib.Optimizer] = None,
          partitioner: Optional[partitioning_lib.Partitioner] = None,
          eval_hook: Optional[EvalHook] = None,
          initialise_params: Optional[Callable[[Any, Any], Any]] = None,
          report_param_movement: bool = True) -> TrainSummary:
  """Trains (or resumes) a run in `model_dir` up to `train_steps`.

  Args:
    model_dir: the run directory (layout in the module docstring).
    mixture_or_task_name: a registered SeqIO mixture or task (`@gensar_mixture()` in gin).
    task_feature_lengths: {"inputs": n, "targets": m} token lengths, EOS included.
    train_steps: total optimiser steps of the run (a resumed run stops at the same step).
    batch_size: global batch size (examples per step over all processes).
    eval_period: evaluate every this many steps and at the end; 0 disables evaluation.
    eval_batches: global batches per task taken from the validation split.
    checkpoint_period: save every this many steps (and at the end).
    keep_checkpoints: the most recent checkpoints kept (TrainCheckpoints.keep_last).
    log_period: write training metrics every this many steps (and at the end).
    data_seed: seed of the input stream's shuffling, mixing and template sampling.
    pack_lengths: None trains on one example per row, padded to `task_feature_lengths`;
      {"inputs": n, "targets": m} packs examples (each still trimmed to
      `task_feature_lengths`) into rows of these lengths, T5X-style, and `batch_size`
      counts rows. Evaluation batches are packed the same way.
    target_buckets: shorter target lengths (e.g. [8]) to batch examples with short targets
      at, each batch in one bucket (gensar_jax/train_inputs.py); None: every batch at
      TASK_FEATURE_LENGTHS. Not together with pack_lengths.
    early_stopping_evals: stop once this many evaluations in a row have not improved
      `TrainCheckpoints.best_metric` (train "until validation NDCG stops improving"); the
      count survives a restart. None trains to `train_steps`.
    input_shards: disjoint SeqIO shards of the input, each feeding an equal block of every
      batch, each process reading only its own (train_inputs.train_batches). None: one per
      process, so no host reads another's examples; a resumed run keeps its shard count
      only if it is given explicitly (set INPUT_SHARDS before changing the host count).
    build_model_fn: vocabulary -> EncoderDecoderModel (gin: `@build_model`).
    optimizer: default `create_optimizer()` (gin-configurable).
    partitioner: default `Partitioner()` (gin-configurable mesh and rules).
    eval_hook: optional extra metrics at each evaluation (see EvalHook).
    initialise_params: (params, vocabulary) -> params, applied once to a fresh
      initialisation (never to a restored checkpoint), e.g.
      `@IdentifierEmbeddingInit()` (gensar_jax/identifier_init.py).
    report_param_movement: log movement/* metrics (||theta - theta_0|| / ||theta_0|| per
      parameter group, gensar_jax/param_movement.py) at every log, and print and write
      them to MODEL_DIR/param_movement.json at the end. theta_0 is the state training
      starts from: the (initialised) step 0, or the restored step of a resumed run. Costs
      one more copy of the parameters on the devices.
  """
  model_dir = _required(model_dir, "MODEL_DIR", str)
  mixture_or_task_name = _required(mixture_or_task_name, "MIXTURE_OR_TASK_NAME", str)
  task_feature_lengths = dict(_required(task_feature_lengths, "TASK_FEATURE_LENGTHS",
                                        Mapping))
  train_steps = _positive(train_steps, "TRAIN_STEPS")
  batch_size = _positive(batch_size, "BATCH_SIZE")
  eval_period = _positive(eval_period, "EVAL_PERIOD", allow_zero=True)
  checkpoint_period = _positive(checkpoint_period, "CHECKPOINT_PERIOD")
  log_period = _positive(log_period, "LOG_PERIOD")
  keep_checkpoints = _positive(keep_checkpoints, "KEEP_CHECKPOINTS")
  eval_batches = _positive(eval_batches, "EVAL_BATCHES")
  for feature in ("inputs", "targets"):
    _positive(task_feature_lengths.get(feature), f"TASK_FEATURE_LENGTHS['{feature}']")
  pack_lengths = train_inputs.check_pack_lengths(task_feature_lengths, pack_lengths)
  target_buckets = train_inputs.check_target_buckets(task_feature_lengths, target_buckets)
  row_lengths = pack_lengths or task_feature_lengths
  input_shards = jax.process_count() if input_shards is None else _positive(
      input_shards, "INPUT_SHARDS")

  provider = train_inputs.get_provider(mixture_or_task_name)
  io_utils.makedirs(model_dir)
  # Before any heavy set-up (the model, the mesh, the input pipeline), so that a second
  # trainer on a busy directory is refused at once; and before the checkpoint manager,
  # which cleans up unfinished saves it finds: another trainer's, if one were running here.
  lock = _lock_run(model_dir)
  try:
    model = build_model_fn(provider.output_features["targets"].vocabulary)
    partitioner = partitioner or partitioning_lib.Partitioner()
    optimizer = optimizer or optimizers_lib.create_optimizer()
    trainer = trainer_lib.Trainer(model=model, partitioner=partitioner, optimizer=optimizer)
    logger.info("training %s on %s", mixture_or_task_name, partitioner.describe())
    checkpoints = checkpoints_lib.TrainCheckpoints(
        os.path.join(model_dir, CHECKPOINTS_SUBDIR), keep_last=keep_checkpoints)
  except BaseException:
    if lock is not None:
      lock.release()
    raise
  input_shapes = {"encoder_input_tokens": (batch_size, row_lengths["inputs"]),
                  "decoder_input_tokens": (batch_size, row_lengths["targets"])}
  data_identity = {"mixture_or_task_name": mixture_or_task_name, "seed": data_seed,
                   "task_feature_lengths": task_feature_lengths,
                   "pack_lengths": pack_lengths, "target_buckets": target_buckets,
                   "input_shards": input_shards}
  writer = None
  # Installed before the (long) restore and input set-up, so that a SIGTERM arriving then
  # is not the default kill: the first step trained is saved and the run stops.
  watch = preemption.PreemptionWatch()
  finished = False
  quiet_disk_full = _DiskFullRecords()
  logging.getLogger("absl").addFilter(quiet_disk_full)
  try:
    watch.__enter__()
    state, examples_consumed, restored_step, position = _restore_or_init(
        trainer, checkpoints, input_shapes, data_identity, initialise_params)
    # Older checkpoints did not count examples apart from rows (one per row, unpacked).
    examples_seen = int(position.get("examples_seen", examples_consumed))
    stopper = EarlyStopping(early_stopping_evals, checkpoints.best_metric,
                            checkpoints.best_mode, position)
    start_step = restored_step or 0
    writer = train_logging.MetricWriter(model_dir, resume_step=start_step)
    host_rows = partitioner.per_host_batch_slice(batch_size)
    batches = train_inputs.train_batches(mixture_or_task_name, task_feature_lengths,
                                         batch_size, host_rows, seed=data_seed,
                                         examples_to_skip=examples_consumed,
                                         pack_lengths=pack_lengths,
                                         target_buckets=target_buckets,
                                         num_input_shards=input_shards,
                                         agree_target_length=(
                                             _max_over_processes
                                             if jax.process_count() > 1 else None))
    eval_data = None
    train_metrics: Dict[str, float] = {}
    eval_metrics: Dict[str, float] = {}
    pending: List[Mapping[str, Any]] = []
    # Examples (not rows: a packed row holds several) trained on, counted on this host's
    # rows and scaled to the global batch; restored from the checkpoint when resuming.
    pending_examples = 0
    last_log_time = time.time()
    progress = tqdm.tqdm(total=train_steps, initial=start_step, unit="step", desc="train",
                         disable=jax.process_index() != 0, dynamic_ncols=True)
    _write_config(model_dir)
    final_step = max(start_step, train_steps)
    if stopper.stopped:
      logger.info("early stopping already reached at step %d: nothing to train", start_step)
      final_step = start_step
    tracker = None
    if report_param_movement and final_step > start_step:
      tracker = _movement_tracker(state.params, restored_step, model.vocabulary, partitioner)
    trained_step = start_step
    preempted = False
    for step in range(start_step + 1, train_steps + 1):
      if stopper.stopped:
        break
      batch = next(batches)
      state, metrics = trainer.train_step(state, batch)
      trained_step = step
      examples_consumed += batch_size  # rows of the global stream: the resume position
      pending_examples += train_inputs.examples_in(batch) * jax.process_count()
      pending.append(metrics)
      progress.update(1)
      last = step == train_steps
      # Asked at every step on every process (JAX's sync point requires it); at the last
      # step the run ends and saves anyway, so a preemption then is an ordinary finish.
      preempted = watch.reached(step) and not last

      if step % log_period == 0 or last or preempted:
        if lock is not None:
          lock.assert_held()
        fetched = jax.device_get(pending)
        now = time.time()
        elapsed = max(now - last_log_time, 1e-9)
        train_metrics = _token_weighted(fetched)
        examples_seen += pending_examples
        train_metrics.update({
            "z_loss": float(np.mean([m["z_loss"] for m in fetched])),
            "grad_norm": float(np.mean([m["grad_norm"] for m in fetched])),
            "learning_rate": float(fetched[-1]["learning_rate"]),
            "examples_per_sec": pending_examples / elapsed,
            "rows_per_sec": batch_size * len(fetched) / elapsed,
            "steps_per_sec": len(fetched) / elapsed,
            "examples_seen": float(examples_seen),
        })
        if tracker is not None:
          train_metrics.update(tracker.measure(state.params))
        pending_examples = 0
        writer.write("train", step, train_metrics)
        progress.set_postfix(loss=f"{train_metrics['loss']:.4f}",
                             ex_s=f"{train_metrics['examples_per_sec']:.1f}")
        pending, last_log_time = [], now

      evaluated = None
      # Not on a preemption: the grace period before the VM goes is for the save.
      if eval_period and (step % eval_period == 0 or last) and not preempted:
        if eval_data is None:
          eval_data = train_inputs.eval_batches(mixture_or_task_name, task_feature_lengths,
                                                batch_size, host_rows, eval_batches,
                                                pack_lengths=pack_lengths)
        evaluated = evaluate(trainer, state.params, eval_data)
        if eval_hook is not None:
          extra = eval_hook(step=step, params=state.params, model=model, trainer=trainer)
          evaluated.update({k if k.startswith(EVAL_PREFIX) else EVAL_PREFIX + k: float(v)
                            for k, v in extra.items()})
        writer.write("eval", step, {**{k[len(EVAL_PREFIX):]: v for k, v in evaluated.items()},
                                    "examples_seen": float(examples_seen + pending_examples)})
        if stopper.update(evaluated):
          logger.info("early stopping at step %d: %s has not improved for %d evaluations "
                      "(best %.4f)", step, stopper.metric, stopper.evals_since_best,
                      stopper.best)
          final_step = step
        eval_metrics = evaluated
        last_log_time = time.time()  # evaluation time is not training throughput

      tracks_best = evaluated is not None and checkpoints.best_metric is not None
      if (step % checkpoint_period == 0 or last or tracks_best or stopper.stopped
          or preempted):
        checkpoints.save(step, state, {**data_identity, "examples_consumed": examples_consumed,
                                       "examples_seen": examples_seen + pending_examples,
                                       **stopper.state()},
                         metrics=evaluated)
      if preempted:
        logger.warning("preemption (%s) at step %d: saving it and stopping; rerun the same "
                       "command to resume", watch.signal_name or watch.mechanism, step)
        final_step = step
        break
    progress.close()
    movement = {}
    if tracker is not None and trained_step > start_step and not preempted:
      movement = _final_movement(tracker, state.params, trained_step, model_dir)
    checkpoints.wait_until_finished()  # a preempted run exits only once its step is saved
    _write_config(model_dir)
    summary = TrainSummary(start_step=start_step, final_step=final_step,
                           train_metrics=train_metrics, eval_metrics=eval_metrics,
                           checkpoint_steps=checkpoints.all_steps(), param_movement=movement,
                           preempted=preempted)
    finished = True
    return summary
  except Exception as e:  # pylint: disable=broad-except
    if _disk_full(e):
      raise DiskFullError(_disk_full_message(model_dir, checkpoints)) from None
    raise
  finally:
    watch.__exit__()
    _close_quietly(checkpoints.close, finished)
    logging.getLogger("absl").removeFilter(quiet_disk_full)
    if writer is not None:
      _close_quietly(writer.close, finished)
    if lock is not None:
      lock.release()


def _disk_full(error: BaseException) -> bool:
  """Whether `error`, or an error it was raised from, is a full disk (ENOSPC). Orbax and
  TensorStore re-raise a failed background write as their own exception types, with the
  operating system's words in the message, so both the errno and the words count."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return True
    if "No space left on device" in str(error) or "ENOSPC" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


class _DiskFullRecords(logging.Filter):
  """Drops orbax's log records of a write that failed on a full disk. Each failed save is
  logged by several of its threads, each with the whole traceback (hundreds of lines);
  the trainer then stops with one line that says the same and what was kept."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return not ((error is not None and _disk_full(error))
                or "No space left on device" in record.getMessage())


def _disk_full_message(model_dir: str, checkpoints: checkpoints_lib.TrainCheckpoints) -> str:
  """One line: what happened, what was kept, what to do."""
  kept = checkpoints.complete_steps_on_disk()
  if kept:
    what = (f"kept: the checkpoint of step {kept[-1]} ({checkpoints.step_path(kept[-1])}), "
            "the last complete one")
  else:
    what = "no checkpoint was completed"
  return (f"{model_dir}: no space left on device; {what}. Free space (or move MODEL_DIR to "
          "a larger disk) and rerun the same command to resume")


def _close_quietly(close: Callable[[], None], raise_errors: bool) -> None:
  """Closes a writer; while another error is on its way out, a second one from closing
  (orbax re-raising the same failed save) is logged in one line instead of replacing it."""
  try:
    close()
  except Exception as e:  # pylint: disable=broad-except
    if raise_errors:
      raise
    logger.warning("while stopping: %s: %s", type(e).__name__, str(e).splitlines()[0]
                   if str(e) else "")


def main() -> None:
  summary = train()
  if summary.preempted:
    print(f"preempted: saved step {summary.final_step} (trained steps "
          f"{summary.start_step + 1}-{summary.final_step}); exit {PREEMPTED_EXIT_CODE}: rerun "
          "the same command to resume from it", file=sys.stderr, flush=True)
    raise SystemExit(PREEMPTED_EXIT_CODE)
  if summary.start_step >= summary.final_step:
    print(f"nothing to do: the run is already at step {summary.start_step}")
    return
  parts = [f"trained steps {summary.start_step + 1}-{summary.final_step}"]
  if summary.train_metrics:
    parts.append(f"loss {summary.train_metrics['loss']:.4f}")
  if "eval/loss" in summary.eval_metrics:
    parts.append(f"eval loss {summary.eval_metrics['eval/loss']:.4f}, eval accuracy "
                 f"{summary.eval_metrics['eval/accuracy']:.4f}")
  parts.append(f"checkpoints {summary.checkpoint_steps}")
  print("; ".join(parts))


def cli(argv: Optional[List[str]] = None) -> None:
  """The entry point (`python -m gensar_jax.train` reaches it through gin_utils.run_module,
  which also ends a failed process at once)."""
  gin_utils.run(main, argv, devices=True)
