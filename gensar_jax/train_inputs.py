"""The input pipeline of training: SeqIO mixture -> feature converter -> host numpy batches.

Training stream. `seqio.get_dataset(..., shuffle=True, seed=seed, num_epochs=None)`
through `EncDecFeatureConverter(pack=False)` is a pure function of (mixture, lengths,
seed): every process builds the same *global* example stream, skips the examples already
consumed (the position saved in checkpoints), batches it into global batches and keeps
only its own rows (`Partitioner.per_host_batch_slice`). Because the position is counted
in examples of the global stream, a run resumes exactly on another host count, mesh or
even batch size. (Every host reads and tokenises the whole global batch; for a pod with
a heavy input pipeline, sharding the sources with `shard_info` is the next step, at the
price of tying the position to the host count.)

Eval batches. A fixed number of batches from the start of each member task's validation
split (unshuffled), built once and kept on the host, so every evaluation scores the same
examples. A short last batch is filled up by repeating its rows with zero loss weights,
keeping one compiled shape without changing the loss.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Mapping

import numpy as np
import seqio
import tensorflow as tf

from gensar_jax.data.schema import DataError

Batch = Dict[str, np.ndarray]
LOSS_WEIGHTS = "decoder_loss_weights"


def feature_converter() -> seqio.FeatureConverter:
  return seqio.EncDecFeatureConverter(pack=False)


def get_provider(name: str) -> seqio.DatasetProviderBase:
  """The registered task or mixture, or a DataError listing what is registered."""
  if not isinstance(name, str) or not name:
    raise DataError(f"MIXTURE_OR_TASK_NAME must be a task or mixture name, got {name!r}")
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    known = sorted(set(seqio.MixtureRegistry.names()) | set(seqio.TaskRegistry.names()))
    raise DataError(f"MIXTURE_OR_TASK_NAME={name!r}: no SeqIO task or mixture of that name "
                    f"is registered (registered: {known})") from None


def member_tasks(name: str) -> List[seqio.Task]:
  provider = get_provider(name)
  return list(provider.tasks) if isinstance(provider, seqio.Mixture) else [provider]


def train_batches(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                  global_batch_size: int, host_rows: slice, seed: int,
                  examples_to_skip: int = 0) -> Iterator[Batch]:
  """Endless host batches (this process's rows of each global batch), as numpy."""
  if global_batch_size < 1:
    raise DataError(f"BATCH_SIZE must be >= 1, got {global_batch_size}")
  get_provider(mixture_or_task_name)
  ds = seqio.get_dataset(mixture_or_task_name, dict(task_feature_lengths),
                         feature_converter=feature_converter(), dataset_split="train",
                         shuffle=True, num_epochs=None, seed=seed, verbose=False)
  ds = ds.skip(int(examples_to_skip))
  ds = ds.batch(global_batch_size, drop_remainder=True)
  start, stop = host_rows.start or 0, host_rows.stop
  ds = ds.map(lambda batch: {k: v[start:stop] for k, v in batch.items()})
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return ds.as_numpy_iterator()


def _fill_batch(rows: Batch, batch_size: int) -> Batch:
  """Repeats the rows of a short batch up to `batch_size`; the copies get zero weight."""
  n = len(next(iter(rows.values())))
  if n == batch_size:
    return rows
  take = np.arange(batch_size) % n
  out = {k: v[take] for k, v in rows.items()}
  weights = out[LOSS_WEIGHTS].copy()
  weights[n:] = 0
  out[LOSS_WEIGHTS] = weights
  return out


def eval_batches(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                 global_batch_size: int, host_rows: slice, num_batches: int,
                 split: str = "validation") -> Dict[str, List[Batch]]:
  """{task name: up to `num_batches` host batches of its `split`} (tasks without it skipped)."""
  out: Dict[str, List[Batch]] = {}
  for task in member_tasks(mixture_or_task_name):
    if split not in task.splits:
      continue
    ds = seqio.get_dataset(task.name, dict(task_feature_lengths),
                           feature_converter=feature_converter(), dataset_split=split,
                           shuffle=False, num_epochs=1, verbose=False)
    batches = []
    for rows in ds.batch(global_batch_size).take(num_batches).as_numpy_iterator():
      full = _fill_batch(rows, global_batch_size)
      batches.append({k: v[host_rows] for k, v in full.items()})
    if batches:
      out[task.name] = batches
  return out
