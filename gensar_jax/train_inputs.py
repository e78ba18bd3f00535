"""The input pipeline of training: SeqIO mixture -> feature converter -> host numpy batches.

Training stream. `seqio.get_dataset(..., shuffle=True, seed=seed, num_epochs=None)`
trims every example to the task feature lengths; `EncDecFeatureConverter` then either pads
each example to those lengths (no packing) or packs several examples into rows of the
`pack_lengths` (T5X-style packing: segment ids and positions per token, which the model
turns into attention masks). Either way the stream is a pure function of (mixture,
lengths, pack lengths, seed): every process builds the same *global* row stream, skips
the rows already consumed (the position saved in checkpoints), batches it into global
batches and keeps only its own rows (`Partitioner.per_host_batch_slice`). Because the
position is counted in rows of the global stream, a run resumes exactly on another host
count, mesh or even batch size.

Target-length buckets. GenSAR's identifier targets are 6 tokens, but the few text targets
(item texts of id_to_item, queries) need 32, and one padded shape makes every example pay
for 32. With `target_buckets` (e.g. [8]) each example goes to the shortest bucket that
holds its target, batches are formed per bucket (`group_by_window`), and a batch's target
features are cut to its bucket's length: a second compiled shape, and about 1.7x the
examples/s of the mini model on 2 CPU cores (README, launch/bench/bench_train_mixture.py).
Batches then hold one bucket each (on ML-100K about 98% of examples share the short
one); the resume position is counted in whole batches of the bucketed stream.

Packing (`pack_lengths`) is the T5X answer to the same waste and the model honours it
(segment ids -> attention masks), but on the GenSAR mixture the history prompts already
fill 79% of a 144-token row, so longer packed rows trade the target padding for quadratic
attention over the row: measured, no faster than padded rows on the CPU.

Input shards. With one input shard (one process) the stream above is read whole. With
`num_input_shards` N > 1 (train.py's default: one per process) the sources are split into
N disjoint SeqIO shards and each feeds its own block of every global batch, so each host
reads and tokenises only its own rows; the batches then depend on N, not on the host
count, and resume exactly whenever N is kept (see train_batches).

Eval batches. A fixed number of batches from the start of each member task's validation
split (unshuffled, packed like training when training packs), built once and kept on the
host, so every evaluation scores the same examples. A short last batch is filled up by
repeating its rows with zero loss weights, keeping one compiled shape without changing the
loss.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from gensar_jax.data.schema import DataError

Batch = Dict[str, np.ndarray]
LOSS_WEIGHTS = "decoder_loss_weights"
SEGMENT_IDS = "decoder_segment_ids"


def feature_converter(pack: bool = False) -> seqio.FeatureConverter:
  return seqio.EncDecFeatureConverter(pack=pack)


def check_pack_lengths(task_feature_lengths: Mapping[str, int],
                       pack_lengths: Optional[Mapping[str, int]]) -> Optional[Dict[str, int]]:
  """None (no packing) or row lengths that can hold at least one example of each feature."""
  if pack_lengths is None:
    return None
  pack_lengths = dict(pack_lengths)
  for feature in ("inputs", "targets"):
    value = pack_lengths.get(feature)
    if not isinstance(value, int) or value < task_feature_lengths[feature]:
      raise DataError(f"PACK_LENGTHS['{feature}']={value!r} must be an int >= "
                      f"TASK_FEATURE_LENGTHS['{feature}']={task_feature_lengths[feature]} "
                      "(a row must hold at least one whole example)")
  return pack_lengths


def converted_dataset(name: str, task_feature_lengths: Mapping[str, int],
                      pack_lengths: Optional[Mapping[str, int]], split: str, shuffle: bool,
                      num_epochs: Optional[int], seed: Optional[int] = None,
                      shard_info: Optional[seqio.ShardInfo] = None) -> tf.data.Dataset:
  """Model-feature rows of a task or mixture: examples trimmed to `task_feature_lengths`,
  then padded to them (pack_lengths None) or packed into rows of `pack_lengths`.
  `shard_info`: only that shard of every member task's source (SeqIO shards by file when a
  source has enough files, else by example)."""
  ds = seqio.get_dataset(name, dict(task_feature_lengths),
                         feature_converter=seqio.PassThroughFeatureConverter(),
                         dataset_split=split, shuffle=shuffle, num_epochs=num_epochs,
                         seed=seed, shard_info=shard_info, verbose=False)
  ds = ds.map(lambda ex: {"inputs": ex["inputs"], "targets": ex["targets"]},
              num_parallel_calls=tf.data.AUTOTUNE)
  if pack_lengths is None:
    return feature_converter(pack=False)(ds, dict(task_feature_lengths))
  return feature_converter(pack=True)(ds, dict(pack_lengths))


def examples_in(batch: Batch) -> int:
  """Examples in a batch of rows: one per row unpacked, one per segment packed."""
  if SEGMENT_IDS in batch:
    return int(np.asarray(batch[SEGMENT_IDS]).max(axis=1).sum())  # segments are 1..n
  return int(np.sum(np.asarray(batch[LOSS_WEIGHTS]).sum(axis=1) > 0))


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


def check_target_buckets(task_feature_lengths: Mapping[str, int],
                         target_buckets: Optional[Sequence[int]]) -> Optional[List[int]]:
  """None, or the sorted bucket lengths, the full target length last."""
  if not target_buckets:
    return None
  full = int(task_feature_lengths["targets"])
  buckets = sorted(set(target_buckets))
  if not all(isinstance(b, int) and 1 <= b <= full for b in buckets):
    raise DataError(f"TARGET_BUCKETS={list(target_buckets)!r} must be ints in 1.."
                    f"TASK_FEATURE_LENGTHS['targets']={full}")
  return buckets if buckets[-1] == full else [*buckets, full]


TARGET_FEATURES = ("decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
                   "decoder_segment_ids", "decoder_positions")


def bucketed_batches(ds: tf.data.Dataset, buckets: Sequence[int],
                     batch_size: int) -> tf.data.Dataset:
  """Padded rows -> batches of one target-length bucket each, target features cut to it."""
  lengths = tf.constant(list(buckets), tf.int32)

  def bucket_of(row):
    used = tf.reduce_sum(tf.cast(row["decoder_target_tokens"] > 0, tf.int32))
    return tf.cast(tf.argmax(tf.cast(lengths >= used, tf.int32)), tf.int64)

  def cut(key, window):
    length = tf.gather(lengths, key)
    return window.batch(batch_size, drop_remainder=True).map(
        lambda batch: {k: (v[:, :length] if k in TARGET_FEATURES else v)
                       for k, v in batch.items()})

  return ds.group_by_window(bucket_of, cut, window_size=batch_size)


def input_shards_of(global_batch_size: int, host_rows: slice,
                    num_input_shards: int) -> range:
  """The input shards that make up this process's rows: shard k feeds rows
  [k * B / N, (k + 1) * B / N) of every global batch of B rows."""
  if num_input_shards < 1 or global_batch_size % num_input_shards:
    raise DataError(f"INPUT_SHARDS={num_input_shards} must be >= 1 and divide BATCH_SIZE="
                    f"{global_batch_size} (each shard feeds an equal block of every batch)")
  block = global_batch_size // num_input_shards
  start, stop = host_rows.start or 0, host_rows.stop
  if start % block or stop % block:
    raise DataError(f"INPUT_SHARDS={num_input_shards}: this process owns rows {start}:{stop} "
                    f"of the batch of {global_batch_size}, not whole blocks of {block}; use a "
                    "multiple of the process count")
  return range(start // block, stop // block)


def _pad_targets(block: Batch, length: int) -> Batch:
  """A block's target features zero-padded to `length` (padding carries no loss)."""
  out = {}
  for key, value in block.items():
    if key in TARGET_FEATURES and value.shape[1] < length:
      value = np.pad(value, [(0, 0), (0, length - value.shape[1])])
    out[key] = value
  return out


def _sharded_train_batches(mixture_or_task_name, task_feature_lengths, global_batch_size,
                           shards: range, num_input_shards: int, seed: int,
                           examples_to_skip: int, pack_lengths, buckets,
                           agree_target_length: Optional[Callable[[int], int]]
                           ) -> Iterator[Batch]:
  """This process's rows from its own input shards, block by block (see train_batches)."""
  if examples_to_skip % global_batch_size:
    raise DataError(f"the input position ({examples_to_skip} rows) is not a whole number of "
                    f"batches of {global_batch_size}: a run on INPUT_SHARDS > 1 resumes with "
                    "the BATCH_SIZE it was trained with")
  block = global_batch_size // num_input_shards
  streams = []
  for shard in shards:
    ds = converted_dataset(mixture_or_task_name, task_feature_lengths, pack_lengths, "train",
                           shuffle=True, num_epochs=None, seed=seed,
                           shard_info=seqio.ShardInfo(shard, num_input_shards))
    ds = (bucketed_batches(ds, buckets, block) if buckets
          else ds.batch(block, drop_remainder=True))
    ds = ds.skip(examples_to_skip // global_batch_size).prefetch(tf.data.AUTOTUNE)
    streams.append(ds.as_numpy_iterator())
  for blocks in zip(*streams):
    if buckets:  # every block of a step, on every process, at one target length
      length = max(b["decoder_target_tokens"].shape[1] for b in blocks)
      if agree_target_length is not None:
        length = agree_target_length(length)
      blocks = [_pad_targets(b, length) for b in blocks]
    yield {key: np.concatenate([b[key] for b in blocks]) for key in blocks[0]}


def train_batches(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                  global_batch_size: int, host_rows: slice, seed: int,
                  examples_to_skip: int = 0,
                  pack_lengths: Optional[Mapping[str, int]] = None,
                  target_buckets: Optional[Sequence[int]] = None,
                  num_input_shards: int = 1,
                  agree_target_length: Optional[Callable[[int], int]] = None
                  ) -> Iterator[Batch]:
  """Endless host batches (this process's rows of each global batch), as numpy.

  `examples_to_skip` counts rows of the converted stream (packed rows when packing); with
  target buckets it must be a whole number of batches, which are skipped after bucketing.

  `num_input_shards` N > 1 splits the input into N disjoint SeqIO shards (`shard_info`),
  shard k feeding block k of every global batch, and this process reads only the shards of
  its own rows, so no host reads or tokenises another host's examples. The batches are a
  pure function of N (not of the process count): the same N resumes exactly on any number
  of processes that divides it. With target buckets, a step's blocks are padded to the
  longest bucket among them; `agree_target_length` (the maximum over processes) makes
  every process pad to the same length.
  """
  if global_batch_size < 1:
    raise DataError(f"BATCH_SIZE must be >= 1, got {global_batch_size}")
  get_provider(mixture_or_task_name)
  pack_lengths = check_pack_lengths(task_feature_lengths, pack_lengths)
  buckets = check_target_buckets(task_feature_lengths, target_buckets)
  if buckets and pack_lengths:
    raise DataError("TARGET_BUCKETS and PACK_LENGTHS are two answers to the same padding; "
                    "set one of them")
  if num_input_shards != 1:
    shards = input_shards_of(global_batch_size, host_rows, num_input_shards)
    return _sharded_train_batches(mixture_or_task_name, task_feature_lengths,
                                  global_batch_size, shards, num_input_shards, seed,
                                  int(examples_to_skip), pack_lengths, buckets,
                                  agree_target_length)
  ds = converted_dataset(mixture_or_task_name, task_feature_lengths, pack_lengths, "train",
                         shuffle=True, num_epochs=None, seed=seed)
  if buckets:
    ds = bucketed_batches(ds, buckets, global_batch_size)
    ds = ds.skip(int(examples_to_skip) // global_batch_size)
  else:
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
                 split: str = "validation",
                 pack_lengths: Optional[Mapping[str, int]] = None) -> Dict[str, List[Batch]]:
  """{task name: up to `num_batches` host batches of its `split`} (tasks without it skipped)."""
  out: Dict[str, List[Batch]] = {}
  pack_lengths = check_pack_lengths(task_feature_lengths, pack_lengths)
  for task in member_tasks(mixture_or_task_name):
    if split not in task.splits:
      continue
    ds = converted_dataset(task.name, task_feature_lengths, pack_lengths, split,
                           shuffle=False, num_epochs=1)
    batches = []
    for rows in ds.batch(global_batch_size).take(num_batches).as_numpy_iterator():
      full = _fill_batch(rows, global_batch_size)
      batches.append({k: v[host_rows] for k, v in full.items()})
    if batches:
      out[task.name] = batches
  return out
