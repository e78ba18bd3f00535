"""SeqIO data sources of the GenSAR tasks.

* `PreparedExampleSource`: the prepared dataset's TFRecord shards (gensar_jax/data/records.py)
  read by `seqio.TFExampleDataSource`, splits train/validation/test. It adds one feature,
  `split`, so the preprocessors can tell training (sampled template) from evaluation
  (template 0) without a second copy of every task.
* `item_rows_source`: the catalogue, one row per (item, identifier space), for the two
  alignment tasks. The catalogue is small (tens of thousands of rows), so it is held in
  memory and served with `seqio.FunctionDataSource`; train split only.
* `pseudo_query_source`: (item, pseudo-query) pairs for ad-hoc search, read when the dataset
  is built, not when the task is registered: the doc2query stage writes them after the
  tasks exist. A missing or empty file is an error naming the path, so a mixture that
  includes the task can never train on nothing.

Pseudo-queries file (the contract with the doc2query stage): JSON lines, one object per
item, `{"item_id": "...", "queries": ["...", ...]}` (or `"query": "..."` for one query).
Item ids are those of the prepared dataset's items.jsonl.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from gensar_jax.data import records
from gensar_jax.data.pseudo_queries import (PseudoQueriesMissingError,  # noqa: F401  (re-raised to task users)
                                             read_pseudo_queries)

SPLIT = "split"  # the feature the sources add
TRAIN = "train"
EVAL_SPLITS = ("validation", "test")


class PreparedExampleSource(seqio.TFExampleDataSource):
  """The prepared samples (both kinds), each example tagged with its split name."""

  def __init__(self, prepared_dir: str,
               num_input_examples: Optional[Mapping[str, int]] = None):
    patterns = records.split_to_filepattern(prepared_dir)
    for split, pattern in patterns.items():
      if not tf.io.gfile.glob(pattern):
        raise FileNotFoundError(f"{prepared_dir}: no TFRecord shards for split {split!r} "
                                f"({pattern}); run `python -m gensar_jax.prepare` first")
    super().__init__(patterns, records.FEATURE_DESCRIPTION,
                     num_input_examples=num_input_examples)

  def get_dataset(self, split: str = TRAIN, shuffle: bool = True,
                  seed: Optional[int] = None, shard_info=None, **kwargs) -> tf.data.Dataset:
    ds = super().get_dataset(split=split, shuffle=shuffle, seed=seed,
                             shard_info=shard_info, **kwargs)
    return ds.map(lambda ex: {**ex, SPLIT: tf.constant(split)},
                  num_parallel_calls=tf.data.AUTOTUNE)


def _in_memory(columns: Dict[str, np.ndarray], split: str, shuffle: bool,
               seed: Optional[int]) -> tf.data.Dataset:
  n = len(next(iter(columns.values())))
  ds = tf.data.Dataset.from_tensor_slices({k: tf.constant(v) for k, v in columns.items()})
  ds = ds.map(lambda ex: {**ex, SPLIT: tf.constant(split)})
  if shuffle and n > 1:
    ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
  return ds


def item_rows_source(item_ids: Sequence[str], item_texts: Sequence[str],
                     spaces: Sequence[str]) -> seqio.FunctionDataSource:
  """One row per item and identifier space: features item_id, item_text, space.

  With two spaces, an item's SID row and CID row are adjacent ("alternating").
  """
  if not len(item_ids) or len(item_ids) != len(item_texts) or not spaces:
    raise ValueError(f"item_rows_source needs one text per item and at least one space; got "
                     f"{len(item_ids)} ids, {len(item_texts)} texts, spaces {list(spaces)}")
  encode = lambda values: np.asarray([str(v).encode("utf-8") for v in values], dtype=object)
  columns = {
      "item_id": np.repeat(encode(item_ids), len(spaces)),
      "item_text": np.repeat(encode(item_texts), len(spaces)),
      "space": np.tile(encode(spaces), len(item_ids)),
  }
  n = len(columns["item_id"])

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None):
    return _in_memory(columns, split, shuffle_files, seed)

  return seqio.FunctionDataSource(dataset_fn, splits=(TRAIN,),
                                  num_input_examples={TRAIN: n})


def pseudo_query_source(path: Optional[str], known_items: Sequence[str]
                        ) -> seqio.FunctionDataSource:
  """(item_id, query) rows from the doc2query file, read when a dataset is requested."""
  known = set(known_items)

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None):
    pairs = read_pseudo_queries(path)
    unknown = [i for i, _ in pairs if i not in known]
    if unknown:
      raise ValueError(f"{path}: {len(unknown)} pseudo-queries name items that are not in "
                       f"the prepared dataset (e.g. {unknown[0]!r})")
    columns = {"item_id": np.asarray([i.encode("utf-8") for i, _ in pairs], dtype=object),
               "query": np.asarray([q.encode("utf-8") for _, q in pairs], dtype=object)}
    return _in_memory(columns, split, shuffle_files, seed)

  return seqio.FunctionDataSource(dataset_fn, splits=(TRAIN,))
