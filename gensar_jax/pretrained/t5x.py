"""T5X checkpoints in T5X's own (legacy, pre-Orbax) layout.

A T5X run writes `model_dir/checkpoint_<step>/checkpoint`: a msgpack (flax.serialization)
of the train state, `{'version': 3, 'optimizer': {'target': params, 'state': ...}}` (or
`{'target': ..., 'state': ...}` at the top level), in which each parameter is either the
array itself or, for the partitioned ones, the tensorstore spec of a zarr array written
beside the file (`checkpoint_<step>/target.encoder.layers_0.attention.query.kernel/`, the
spec's kvstore path relative to the step directory). `read_target` returns the target's
arrays by '/'-joined name (`encoder/layers_0/attention/query/kernel`).

T5X names match ours except the layer norms (`pre_attention_layer_norm` for our
`pre_attention_norm`, ...); kernels are already [in, out] and relative position tables
[heads, buckets]. A T5X checkpoint carries no config: the gin model file must describe it
(gin/models/t5_v1_0_small.gin, t5_v1_1_small.gin); `assemble` refuses shapes or tensors
that do not fit it.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from gensar_jax.checkpoints import CheckpointError
from gensar_jax.pretrained.params import Path, Source, same

CHECKPOINT_FILE = "checkpoint"
_STEP_DIR = re.compile(r"^checkpoint_(\d+)$")


def find_checkpoint_file(path: str) -> str:
  """The msgpack file of `path`: the file itself, a checkpoint_<step> directory, or a
  model directory (its highest step)."""
  if os.path.isfile(path):
    return path
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: no such T5X checkpoint (file or directory)")
  if os.path.isfile(os.path.join(path, CHECKPOINT_FILE)):
    return os.path.join(path, CHECKPOINT_FILE)
  steps = sorted((int(m.group(1)), name) for name in os.listdir(path)
                 if (m := _STEP_DIR.match(name))
                 and os.path.isfile(os.path.join(path, name, CHECKPOINT_FILE)))
  if not steps:
    hint = (" (it looks like an Orbax checkpoint, which this reader does not handle)"
            if os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA")) else "")
    raise CheckpointError(f"{path}: no {CHECKPOINT_FILE} file and no checkpoint_<step>/"
                          f"{CHECKPOINT_FILE} inside{hint}")
  return os.path.join(path, steps[-1][1], CHECKPOINT_FILE)


def _is_spec(x: Any) -> bool:
  return isinstance(x, dict) and "driver" in x and ("kvstore" in x or "path" in x)


def _read_zarr(spec: Dict[str, Any], directory: str, name: str, file: str) -> np.ndarray:
  """A tensorstore placeholder -> its array, the kvstore path taken relative to the
  checkpoint directory (as T5X writes it)."""
  import tensorstore as ts

  spec = dict(spec)
  if "kvstore" in spec and isinstance(spec["kvstore"], dict):
    kvstore = dict(spec["kvstore"])
    if kvstore.get("driver") not in ("file", "gfile"):
      raise CheckpointError(f"{file}: {name!r} is stored with kvstore driver "
                            f"{kvstore.get('driver')!r}; copy the checkpoint to a local "
                            "directory first")
    kvstore["driver"] = "file"
    kvstore["path"] = os.path.join(directory, kvstore["path"])
    spec["kvstore"] = kvstore
  else:  # tensorstore < 0.1.14 specs keep the path at the top
    spec["path"] = os.path.join(directory, spec["path"])
  try:
    return np.asarray(ts.open(spec, open=True).result().read().result())
  except Exception as e:  # tensorstore raises ValueError / its own status errors
    raise CheckpointError(f"{file}: cannot read {name!r} from its zarr array "
                          f"({str(e).splitlines()[0]})") from None


def read_target(path: str) -> Tuple[Dict[str, np.ndarray], str]:
  """({'/'-joined parameter name: array} of the checkpoint's target, the msgpack file)."""
  from flax import serialization

  file = find_checkpoint_file(path)
  directory = os.path.dirname(file)
  with open(file, "rb") as f:
    try:
      state = serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises several unrelated types
      raise CheckpointError(f"{file}: not a T5X msgpack checkpoint ({e})") from None
  tree = state.get("optimizer", state) if isinstance(state, dict) else None
  if not isinstance(tree, dict) or not isinstance(tree.get("target"), dict):
    raise CheckpointError(f"{file}: no 'target' parameters (expected T5X's "
                          "{'optimizer': {'target': ...}} or {'target': ...})")
  out: Dict[str, np.ndarray] = {}

  def walk(node: Mapping[str, Any], prefix: str) -> None:
    for key, value in node.items():
      name = f"{prefix}{key}"
      if _is_spec(value):
        out[name] = _read_zarr(value, directory, name, file)
      elif isinstance(value, dict):
        walk(value, f"{name}/")
      else:
        out[name] = np.asarray(value)

  walk(tree["target"], "")
  return out, file


def source(path: Path, tensors: Mapping[str, np.ndarray]) -> Source:
  """The T5X tensor that fills our parameter `path` (layer norms renamed, else equal)."""
  del tensors
  parts = [re.sub(r"^(pre_\w+)_norm$", r"\1_layer_norm", p) for p in path]
  return "/".join(parts), same
