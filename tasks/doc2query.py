"""The doc2query task: item text -> a query that found it (docs/method.md section 3).

GenSAR's ad-hoc search task needs queries for items nobody searched for. The published
recipe trains the same encoder-decoder on (item text, query) pairs from the search training
split and samples one pseudo-query per item. This module registers that training task:

  {prefix}_doc2query   "Doc2query: ... {item}." -> "<query text>"   train / validation / test

Rows are the prepared search samples (one per search interaction, so a query that found an
item many times is seen many times, as in the published code); the target is the plain
query text, without `<src_query>`: the pseudo-query file stores text, and the ad-hoc task
adds the behaviour token itself. `gensar_jax.prompts.doc2query_prompt` renders the same
prompt in Python for generating pseudo-queries for every catalogue item.
"""
from __future__ import annotations

from typing import Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from gensar_jax import vocabulary as vocab_lib
from gensar_jax.data.prepared import load_prepared
from gensar_tasks import preprocessors as pp
from gensar_jax import prompts
from gensar_tasks import sources

PREFIX = prompts.DOC2QUERY_PREFIX
INSTRUCTION = prompts.DOC2QUERY_INSTRUCTION



def _doc2query_preprocessor(item_ids: Sequence[str], item_texts: Sequence[str]):
  keys = np.asarray([i.encode("utf-8") for i in item_ids], dtype=object)
  values = np.asarray([t.encode("utf-8") for t in item_texts], dtype=object)
  head, tail = INSTRUCTION.split("{item}")

  def preprocess(ds: tf.data.Dataset) -> tf.data.Dataset:
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(keys), tf.constant(values)),
        default_value="")
    ds = ds.filter(lambda ex: tf.equal(ex["kind"], "search"))

    def build(ex):
      text = pp.item_slot(table.lookup(ex["target_item"]))
      return {"inputs": tf.strings.join([f"{PREFIX}: {head}", text, tail]),
              "targets": ex["query"], "target_item": ex["target_item"]}

    return ds.map(build, num_parallel_calls=tf.data.AUTOTUNE)

  return preprocess


@gin.configurable
def register_doc2query(prepared_dir: str = gin.REQUIRED, vocab_path: str = gin.REQUIRED,
                       prefix: str = "gensar") -> str:
  """Registers `{prefix}_doc2query` (replacing an earlier one); returns its name."""
  prepared = load_prepared(prepared_dir)
  vocabulary = vocab_lib.load_vocabulary(vocab_path)
  item_ids = [str(i) for i in prepared.items["item_id"]]
  rows = prepared.stats["rows"]["search"]
  source = sources.PreparedExampleSource(
      prepared.path, num_input_examples={s: int(rows[s]) for s in ("train", "validation",
                                                                   "test")})
  features = {
      "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=True),
      "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=True),
  }
  name = f"{prefix}_doc2query"
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name, source=source, output_features=features,
      preprocessors=[_doc2query_preprocessor(item_ids, prepared.item_texts()),
                     *pp.standard_postprocessing()])
  return name
