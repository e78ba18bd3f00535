"""Fast columnar reads of a prepared split, for stages that need whole columns
(SASRec sequences, baselines) rather than a SeqIO pipeline of examples."""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import tensorflow as tf

from gensar_jax.data import records


def read_columns(prepared_dir: str, split: str, columns: Sequence[str],
                 batch_size: int = 8192) -> Dict[str, np.ndarray]:
  """Reads `columns` of every example of `split`, in file order (shuffled for train).

  Scalars come back as 1-D arrays (strings decoded), list features as object arrays of
  1-D arrays.
  """
  unknown = [c for c in columns if c not in records.FEATURE_DESCRIPTION]
  if unknown:
    raise KeyError(f"unknown column(s) {unknown}; known: {sorted(records.FEATURE_DESCRIPTION)}")
  spec = {c: records.FEATURE_DESCRIPTION[c] for c in columns}
  files = sorted(tf.io.gfile.glob(records.split_to_filepattern(prepared_dir, [split])[split]))
  if not files:
    raise FileNotFoundError(f"{prepared_dir}: no shards for split {split!r}")
  ds = tf.data.TFRecordDataset(files).batch(batch_size).map(
      lambda s: tf.io.parse_example(s, spec))
  parts: Dict[str, list] = {c: [] for c in columns}
  for batch in ds:
    for c in columns:
      value = batch[c]
      if isinstance(value, tf.RaggedTensor):
        parts[c].extend(np.asarray(row) for row in value.numpy())
      else:
        parts[c].append(value.numpy())
  out = {}
  for c in columns:
    if isinstance(spec[c], tf.io.RaggedFeature):
      arr = np.empty(len(parts[c]), dtype=object)
      arr[:] = parts[c]
      out[c] = arr
    else:
      arr = np.concatenate(parts[c]) if parts[c] else np.zeros(0)
      out[c] = (np.array([v.decode("utf-8") for v in arr], dtype=object)
                if arr.dtype == object else arr)
  return out
