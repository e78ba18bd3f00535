"""T5X checkpoints: T5X's own (legacy) msgpack layout, and its newer Orbax layout.

A T5X run writes `model_dir/checkpoint_<step>/checkpoint`: a msgpack (flax.serialization)
of the train state, `{'version': 3, 'optimizer': {'target': params, 'state': ...}}` (or
`{'target': ..., 'state': ...}` at the top level), in which each parameter is either the
array itself or, for the partitioned ones, the tensorstore spec of a zarr array written
beside the file (`checkpoint_<step>/target.encoder.layers_0.attention.query.kernel/`, the
spec's kvstore path relative to the step directory). Newer T5X runs write the same state
dict with Orbax's PyTree handler to `checkpoint_<step>/state/`, read here with Orbax.
`read_target` returns the target's arrays by '/'-joined name
(`encoder/layers_0/attention/query/kernel`).

T5X names match ours except the layer norms (`pre_attention_layer_norm` for our
`pre_attention_norm`, ...); kernels are already [in, out] and relative position tables
[heads, buckets]. A T5X checkpoint carries no config: the gin model file must describe it
(gin/models/t5_v1_0_small.gin, t5_v1_1_small.gin); `assemble` refuses shapes or tensors
that do not fit it.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from gensar_jax.checkpoints import CheckpointError
from gensar_jax.pretrained.params import Path, Source, same

CHECKPOINT_FILE = "checkpoint"
STATE_DIR = "state"
_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA")
_STEP_DIR = re.compile(r"^checkpoint_(\d+)$")


def _locate(directory: str) -> Optional[Tuple[str, str]]:
  """("msgpack", file) or ("orbax", directory) of one step directory, or None.

  T5X writes the msgpack at checkpoint_<step>/checkpoint or checkpoint_<step>/state/
  checkpoint, and an Orbax checkpoint (its newer format) at checkpoint_<step>/state/.
  """
  for d in (directory, os.path.join(directory, STATE_DIR)):
    if os.path.isfile(os.path.join(d, CHECKPOINT_FILE)):
      return "msgpack", os.path.join(d, CHECKPOINT_FILE)
    if any(os.path.isfile(os.path.join(d, m)) for m in _ORBAX_MARKERS):
      return "orbax", d
  return None


def find_checkpoint(path: str) -> Tuple[str, str]:
  """(kind, location) of `path`: a msgpack file, a step directory, or a model directory
  (its highest checkpoint_<step>)."""
  if os.path.isfile(path):
    return "msgpack", path
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: no such T5X checkpoint (file or directory)")
  found = _locate(path)
  if found:
    return found
  steps = sorted((int(m.group(1)), name) for name in os.listdir(path)
                 if (m := _STEP_DIR.match(name)) and _locate(os.path.join(path, name)))
  if not steps:
    raise CheckpointError(f"{path}: no T5X checkpoint inside (neither a {CHECKPOINT_FILE} "
                          f"msgpack nor an Orbax {STATE_DIR}/, nor checkpoint_<step>/ "
                          "directories holding one)")
  return _locate(os.path.join(path, steps[-1][1]))


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


def _read_msgpack(file: str) -> Any:
  from flax import serialization

  with open(file, "rb") as f:
    try:
      return serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises several unrelated types
      raise CheckpointError(f"{file}: not a T5X msgpack checkpoint ({e})") from None


def _read_orbax(directory: str) -> Any:
  """The whole saved tree of an Orbax PyTree checkpoint, every array as numpy."""
  import jax
  import orbax.checkpoint as ocp

  checkpointer = ocp.PyTreeCheckpointer()
  try:
    metadata = checkpointer.metadata(directory)
    # Newer Orbax wraps the tree's metadata (StepMetadata.item_metadata.tree).
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(directory, restore_args=args)
  except Exception as e:  # Orbax and tensorstore raise many types
    raise CheckpointError(f"{directory}: cannot read the Orbax checkpoint "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                          ) from None


def read_target(path: str) -> Tuple[Dict[str, np.ndarray], str]:
  """({'/'-joined parameter name: array} of the checkpoint's target, the file or
  directory read)."""
  kind, location = find_checkpoint(path)
  state = _read_msgpack(location) if kind == "msgpack" else _read_orbax(location)
  directory = os.path.dirname(location) if kind == "msgpack" else location
  tree = state.get("optimizer", state) if isinstance(state, dict) else None
  if not isinstance(tree, dict) or not isinstance(tree.get("target"), dict):
    raise CheckpointError(f"{location}: no 'target' parameters (expected T5X's "
                          "{'optimizer': {'target': ...}} or {'target': ...})")
  out: Dict[str, np.ndarray] = {}

  def walk(node: Mapping[str, Any], prefix: str) -> None:
    for key, value in node.items():
      name = f"{prefix}{key}"
      if _is_spec(value):
        out[name] = _read_zarr(value, directory, name, location)
      elif isinstance(value, dict):
        walk(value, f"{name}/")
      else:
        out[name] = np.asarray(value)

  walk(tree["target"], "")
  return out, location


def source(path: Path, tensors: Mapping[str, np.ndarray]) -> Source:
  """The T5X tensor that fills our parameter `path` (layer norms renamed, else equal)."""
  del tensors
  parts = [re.sub(r"^(pre_\w+)_norm$", r"\1_layer_norm", p) for p in path]
  return "/".join(parts), same
