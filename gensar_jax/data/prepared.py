"""Reading a prepared dataset directory (what `python -m gensar_jax.prepare` writes).

  <dir>/tfds/gensar_search_rec/1.0.0/   TFDS shards: samples with histories and candidates
  <dir>/items.jsonl                     index, item_id, title, description, categories, queries,
                                        text (what the encoder, BM25 and doc2query read)
  <dir>/queries.jsonl                   query_id, text, search_events
  <dir>/users.jsonl                     index, user_id
  <dir>/rec_sequences.jsonl             per user: every rec item in time order, and where
                                        training ends (gensar_jax/data/sequences.py)
  <dir>/stats.json                      the statistics table (also printed by prepare)
  <dir>/config.gin                      the operative gin config that produced it
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List

import pandas as pd

from gensar_jax.data import item_text as item_text_lib
from gensar_jax.data.schema import DataError
from gensar_jax.data import records
from gensar_jax.data.records import TFDS_NAME, TFDS_VERSION
from gensar_jax.io_utils import read_jsonl

REQUIRED_FILES = ("items.jsonl", "queries.jsonl", "users.jsonl", "stats.json")


@dataclasses.dataclass
class PreparedDataset:
  path: str
  items: pd.DataFrame
  queries: pd.DataFrame
  users: pd.DataFrame
  stats: Dict

  @property
  def tfds_name(self) -> str:
    return f"{TFDS_NAME}:{TFDS_VERSION}"

  @property
  def tfds_data_dir(self) -> str:
    return os.path.join(self.path, "tfds")

  def item_texts(self) -> List[str]:
    """The text of every item, in index order (gensar_jax/data/item_text.py): what the
    sentence encoder, BM25 and doc2query read. Written by `prepare`; built again with the
    default settings for a directory prepared before texts were stored."""
    if "text" in self.items:
      return [str(t) for t in self.items["text"]]
    return item_text_lib.build_item_texts(self.items)[0]

  def load_split(self, split: str):
    """The tf.data.Dataset of one split, read through TFDS."""
    import tensorflow_datasets as tfds
    return tfds.builder_from_directory(records.dataset_dir(self.path)).as_dataset(split=split)


def load_prepared(path: str) -> PreparedDataset:
  """Opens a prepared dataset, with a clear error if it is incomplete."""
  missing = [f for f in REQUIRED_FILES if not os.path.exists(os.path.join(path, f))]
  if missing or not os.path.isdir(os.path.join(path, "tfds")):
    raise DataError(f"{path}: not a prepared dataset (missing {missing or ['tfds/']}); run "
                    "`python -m gensar_jax.prepare` first")
  with open(os.path.join(path, "stats.json"), encoding="utf-8") as f:
    stats = json.load(f)
  return PreparedDataset(
      path=path,
      items=pd.DataFrame(read_jsonl(os.path.join(path, "items.jsonl"))),
      queries=pd.DataFrame(read_jsonl(os.path.join(path, "queries.jsonl"))),
      users=pd.DataFrame(read_jsonl(os.path.join(path, "users.jsonl"))),
      stats=stats)
