"""Files of a sweep: the local point files and summary, and MODEL_DIRs that may be gs://.

The run loop (launch/sweep.py) and the summary (launch/sweep_summary.py) both read a point's
metrics and write files that a later invocation trusts, so both go through these helpers:
writes are atomic (an interrupted sweep leaves no half-written sweep_done.json to be taken
as finished), and a gs:// MODEL_DIR (--launcher=tpu) is read with TensorFlow's gfile,
imported only then, so local sweeps need nothing beyond the standard library.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional


def join(path: str, name: str) -> str:
  """path/name for a local path or a URL such as gs://bucket/dir."""
  return f"{path.rstrip('/')}/{name}" if "://" in path else os.path.join(path, name)


def write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def read_json(path: str) -> Optional[Dict]:
  """A local JSON file, or None when it is missing or unreadable (not written yet)."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def read_text(path: str) -> Optional[str]:
  """A local or gs:// file's text, None when it does not exist."""
  if "://" in path:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  # only for gs:// runs
    if not tf.io.gfile.exists(path):
      return None
    with tf.io.gfile.GFile(path) as f:
      return f.read()
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return f.read()
