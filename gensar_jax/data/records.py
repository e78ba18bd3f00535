"""The prepared dataset as a TFDS dataset: readable by `tfds.load`, by SeqIO's
`TfdsDataSource`, and straight from a bucket (gs://) on TPU VMs.

One example per sample; the splits are `train`, `validation` and `test`, each holding both
task kinds (filter on `kind`). The train split is written in a seeded random order (so any
window of the stream mixes users); the evaluation splits in (user, time) order. Feature
spec (also in features.json beside the shards):

  user_id            text
  kind               text, "rec" or "search" -- the target's kind
  timestamp          int64, the target's time
  target_item        text, item id of the target
  target_index       int64, its row in items.jsonl
  query              text, the search query ("" for rec targets)
  query_id           int64, its row in queries.jsonl (-1 for rec targets)
  history_kind       [h] text: "rec" or "search", one entry per history event; the history
  history_item       [h] text: item id    is the last 5 rec items and last 5 search
  history_item_index [h] int64            sessions before the target, oldest first
  history_query      [h] text ("" for rec events)
  history_query_id   [h] int64 (-1 for rec events)
  history_timestamp  [h] int64
  candidates         [c] text: item ids, target FIRST, then the negatives (c = 0 in train)
  candidate_indices  [c] int64: the same as rows of items.jsonl

The shards are plain TFRecord files of `tf.train.Example`s written here directly (TFDS's own
per-example encoder runs at ~1k examples/s; this at tens of thousands), with TFDS metadata
written beside them (`tfds.folder_dataset.write_metadata`), so any of these reads them:
  tfds.builder_from_directory(f"{dir}/tfds/gensar_search_rec/1.0.0").as_dataset(split=...)
  seqio.TfdsDataSource(tfds_name="gensar_search_rec:1.0.0", tfds_data_dir=f"{dir}/tfds")
  seqio.TFExampleDataSource(split_to_filepattern(dir), FEATURE_DESCRIPTION)
"""
from __future__ import annotations

import itertools
import math
import os
from typing import Dict, Iterable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tqdm import tqdm

TFDS_NAME = "gensar_search_rec"
TFDS_VERSION = "1.0.0"
EXAMPLES_PER_SHARD = 50_000

SCALAR_STRINGS = ("user_id", "kind", "target_item", "query")
SCALAR_INTS = ("timestamp", "target_index", "query_id")
LIST_STRINGS = ("history_kind", "history_item", "history_query", "candidates")
LIST_INTS = ("history_item_index", "history_query_id", "history_timestamp",
             "candidate_indices")

# What `tf.io.parse_single_example` needs; lists parse to dense 1-D tensors.
FEATURE_DESCRIPTION = {
    **{k: tf.io.FixedLenFeature([], tf.string) for k in SCALAR_STRINGS},
    **{k: tf.io.FixedLenFeature([], tf.int64) for k in SCALAR_INTS},
    **{k: tf.io.RaggedFeature(tf.string) for k in LIST_STRINGS},
    **{k: tf.io.RaggedFeature(tf.int64) for k in LIST_INTS},
}


def feature_spec() -> tfds.features.FeaturesDict:
  """The same features as TFDS connectors (for dataset_info/features.json)."""
  text = tfds.features.Text()
  strings = tfds.features.Tensor(shape=(None,), dtype=np.str_)
  ints = tfds.features.Tensor(shape=(None,), dtype=np.int64)
  return tfds.features.FeaturesDict({
      **{k: text for k in SCALAR_STRINGS},
      **{k: np.int64 for k in SCALAR_INTS},
      **{k: strings for k in LIST_STRINGS},
      **{k: ints for k in LIST_INTS},
  })


def dataset_dir(prepared_dir: str) -> str:
  return os.path.join(prepared_dir, "tfds", TFDS_NAME, TFDS_VERSION)


def split_to_filepattern(prepared_dir: str, splits: Iterable[str] = ("train", "validation",
                                                                        "test")):
  return {s: os.path.join(dataset_dir(prepared_dir), f"{TFDS_NAME}-{s}.tfrecord-*")
          for s in splits}


def serialize(example: Dict) -> bytes:
  """One `tf.train.Example`, serialised deterministically (map entries sorted by key).

  Without `deterministic=True` the feature map's order follows a per-process hash seed, so
  two runs with the same seed would write different shard bytes. The message is filled in
  place (`feature[k].bytes_list.value.extend`) rather than built from nested
  `tf.train.Feature(...)` objects: the same bytes at less than half the time, which is most
  of prepare's time at Amazon-Electronics size (2.9M examples).
  """
  message = tf.train.Example()
  feature = message.features.feature
  for k in SCALAR_STRINGS:
    value = example[k]
    feature[k].bytes_list.value.append(value.encode("utf-8") if isinstance(value, str)
                                       else value)
  for k in SCALAR_INTS:
    feature[k].int64_list.value.append(int(example[k]))
  for k in LIST_STRINGS:
    values = example[k]
    try:  # already bytes (prepare encodes each distinct string once): no per-value work
      feature[k].bytes_list.value.extend(values)
    except TypeError:
      feature[k].bytes_list.value.extend(
          [v.encode("utf-8") if isinstance(v, str) else v for v in values])
  for k in LIST_INTS:
    feature[k].int64_list.value.extend(np.asarray(example[k], dtype=np.int64).tolist())
  return message.SerializeToString(deterministic=True)


def write_split_shards(prepared_dir: str, split_examples: Dict[str, Sequence[Dict]]) -> None:
  """Writes every split as TFRecord shards plus the TFDS metadata that describes them.

  Each split is anything with `len()` that iterates its examples in order: a list, or a
  lazy sequence that builds each example when it is reached (prepare's), so only one
  example at a time is held, not the whole split (2.9M examples at Electronics size).
  """
  out = dataset_dir(prepared_dir)
  os.makedirs(out, exist_ok=True)
  split_infos = []
  for split, examples in split_examples.items():
    num_shards = max(1, math.ceil(len(examples) / EXAMPLES_PER_SHARD))
    lengths, num_bytes, count = [], 0, 0
    bar = tqdm(total=len(examples), desc=f"writing {split}", unit=" examples",
               mininterval=2.0, leave=False)
    stream = iter(examples)
    for shard in range(num_shards):
      chunk = itertools.islice(stream, (shard + 1) * len(examples) // num_shards
                               - shard * len(examples) // num_shards)
      path = os.path.join(
          out, f"{TFDS_NAME}-{split}.tfrecord-{shard:05d}-of-{num_shards:05d}")
      with tf.io.TFRecordWriter(path) as writer:
        for example in chunk:
          record = serialize(example)
          num_bytes += len(record)
          writer.write(record)
          bar.update()
          count += 1
      lengths.append(count - sum(lengths))
    bar.close()
    split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=lengths,
                                           num_bytes=num_bytes))
  tfds.folder_dataset.write_metadata(
      data_dir=out, features=feature_spec(), split_infos=split_infos,
      description="GenSAR search-and-recommendation samples; see gensar_jax/data/records.py.",
      check_data=False)
