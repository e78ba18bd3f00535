"""Where training metrics go: TensorBoard event files and one JSONL log per run.

  MODEL_DIR/train/events.out.tfevents.*   scalars of the training steps (tf.summary)
  MODEL_DIR/eval/events.out.tfevents.*    scalars of the periodic evaluations
  MODEL_DIR/metrics.jsonl                 {"step", "split", <metric>: value, ...} per line

The JSONL log is for scripts and tests (no TensorFlow needed to read it). After a restart
from step s, lines with step > s are dropped from it, so the log reads as one run; the
event files keep the abandoned points (TensorBoard shows the newest per step).

Only process 0 writes; on other processes the writer is a no-op, so callers need no
`if jax.process_index() == 0` of their own.

MODEL_DIR may be on a bucket: the JSONL log goes through `io_utils`, and the event files
are written by tf.summary into a local staging directory and uploaded whole after every
flush, so the same code runs against a GCS emulator in the tests and against GCS on a pod.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Dict, Mapping, Optional

import jax

from gensar_jax import io_utils

JSONL_NAME = "metrics.jsonl"
SPLITS = ("train", "eval")


def json_number(value: float) -> Optional[float]:
  """NaN and infinities are not JSON; write them as null rather than break the line."""
  value = float(value)
  return value if math.isfinite(value) else None


def truncate_jsonl_after(path: str, step: int) -> int:
  """Drops lines with step > `step` (atomically); returns how many were dropped."""
  if not io_utils.exists(path):
    return 0
  lines = [line for line in io_utils.read_text(path).splitlines() if line.strip()]
  keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
  if len(keep) == len(lines):
    return 0
  io_utils.write_text(path, "".join(line + "\n" for line in keep))
  return len(lines) - len(keep)


class MetricWriter:
  """Writes scalars of one split (train or eval) to TensorBoard and the JSONL log."""

  def __init__(self, model_dir: str, resume_step: Optional[int] = None):
    self.model_dir = model_dir
    self.jsonl_path = io_utils.join(model_dir, JSONL_NAME)
    self.enabled = jax.process_index() == 0
    self._tf_writers: Dict[str, object] = {}
    # Event files are written here; for a bucket MODEL_DIR, a local directory uploaded
    # after each flush (tf.summary's own GCS client cannot be pointed at an emulator).
    self._event_root = model_dir
    self._staging: Optional[str] = None
    if not self.enabled:
      return
    io_utils.makedirs(model_dir)
    if io_utils.is_remote(model_dir):
      self._staging = tempfile.mkdtemp(prefix="gensar-events-")
      self._event_root = self._staging
    if resume_step is not None:
      truncate_jsonl_after(self.jsonl_path, resume_step)
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  # heavy; only here
    from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
    self._tf = tf
    # tf.summary.scalar lives in the tensorboard package, which we do not depend on; the
    # core tf.summary.write with the scalars plugin tag writes the same event, and
    # TensorBoard (wherever it runs) shows it as a scalar.
    self._scalar_metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
    ).SerializeToString()
    for split in SPLITS:
      self._tf_writers[split] = tf.summary.create_file_writer(
          os.path.join(self._event_root, split))

  def write(self, split: str, step: int, scalars: Mapping[str, float]) -> None:
    """One JSONL line and one TensorBoard point per scalar, for `split` at `step`."""
    if split not in SPLITS:
      raise ValueError(f"MetricWriter: unknown split {split!r}; expected one of {SPLITS}")
    if not self.enabled:
      return
    values = {name: float(v) for name, v in scalars.items()}
    with self._tf_writers[split].as_default(step=int(step)):
      for name, value in values.items():
        self._tf.summary.write(name, self._tf.constant(value, self._tf.float32),
                               metadata=self._scalar_metadata)
    self._tf_writers[split].flush()
    self._upload_events(split)
    record = {"step": int(step), "split": split}
    record.update({name: json_number(v) for name, v in values.items()})
    io_utils.append_text(self.jsonl_path, json.dumps(record) + "\n")

  def _upload_events(self, split: str) -> None:
    if self._staging is None:
      return
    local = os.path.join(self._staging, split)
    if os.path.isdir(local):
      io_utils.copytree(local, io_utils.join(self.model_dir, split))

  def close(self) -> None:
    for split, writer in self._tf_writers.items():
      writer.close()
      self._upload_events(split)
    self._tf_writers.clear()
    if self._staging is not None:
      shutil.rmtree(self._staging, ignore_errors=True)
      self._staging = None


def read_jsonl_metrics(model_dir: str, split: Optional[str] = None) -> list:
  """The JSONL records of a run, optionally of one split, in file order."""
  records = io_utils.read_jsonl(io_utils.join(model_dir, JSONL_NAME))
  return [r for r in records if split is None or r.get("split") == split]
