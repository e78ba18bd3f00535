"""The serving artifact: everything a server needs, readable without gin, orbax or Flax.

One directory, written atomically by gensar_jax/export.py:

  metadata.json          format version, model config (a dict), feature lengths, beams,
                         batch buckets, behaviour token ids, prompt templates, the trie
                         layouts, the source checkpoint step, the exported function files
  params.msgpack         the parameters (flax.serialization msgpack of a nested dict)
  vocab.model            the SentencePiece model (copied from the run's vocabulary)
  items.jsonl            one row per catalogue item, in row order: item_id, title, and the
                         item's identifier text in each task space (for history prompts)
  identifiers.npz        identifier token ids per task space: {task}: [items, L] int32
  tries.npz              the catalogue trie of each task space as TrieArrays leaves
  fn_{task}_b{B}.jaxexport   jax.export serialisation of the compiled constrained search
                         for batch bucket B: (params, trie leaves, tokens [B, L]) ->
                         (item rows [B, K], scores [B, K])

Why fixed batch buckets rather than a symbolic batch dim: the beam search sizes its cache
and reshapes by batch * beams, and a bucket per size keeps every exported function a plain
static-shape XLA program that any JAX (0.10 or 0.11) can call without shape-polymorphism
support; the server pads a batch to the smallest bucket that holds it.

The tasks are "search" (the SID space, behaviour token <src_item>) and "recommend" (the CID
space, <rec_item>) for the dual identifier mode; a single-identifier run uses one space for
both and the artifact records whichever it was given.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any, Dict, Iterator, List, Mapping, Sequence, Tuple

import numpy as np

from gensar_jax.errors import GensarError

FORMAT_VERSION = 2  # 2: tries store local codes and no CSR next states

METADATA_FILE = "metadata.json"
PARAMS_FILE = "params.msgpack"
VOCAB_FILE = "vocab.model"
ITEMS_FILE = "items.jsonl"
IDENTIFIERS_FILE = "identifiers.npz"
TRIES_FILE = "tries.npz"


class ArtifactError(GensarError):
  """The directory is not a complete serving artifact of a format this code reads."""


def function_file(task: str, bucket: int) -> str:
  return f"fn_{task}_b{bucket}.jaxexport"


# ----------------------------------------------------------------------------- tries as npz


def trie_layout(trie) -> Dict[str, Any]:
  """The static part of a TrieArrays (level kinds, max_branch): what npz cannot hold."""
  from gensar_jax.decoding.trie import level_kind
  return {"levels": [level_kind(level) for level in trie.levels],
          "max_branch": [int(b) for b in trie.max_branch]}


def _level_fields(kind: str) -> Tuple[str, ...]:
  # Field order of the level's dataclass, which is also its pytree leaf order.
  from gensar_jax.decoding.trie import LEVEL_TYPES
  if kind not in LEVEL_TYPES:
    raise ArtifactError(f"unknown trie level kind {kind!r} (this version reads "
                        f"{sorted(LEVEL_TYPES)})")
  return tuple(f.name for f in dataclasses.fields(LEVEL_TYPES[kind]))


def trie_arrays_dict(task: str, trie, layout: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """Named arrays of one trie ("{task}/level{d}/{field}", "{task}/leaf_items")."""
  out = {}
  for d, (kind, level) in enumerate(zip(layout["levels"], trie.levels)):
    for field in _level_fields(kind):
      out[f"{task}/level{d}/{field}"] = np.asarray(getattr(level, field))
  out[f"{task}/leaf_items"] = np.asarray(trie.leaf_items)
  return out


def trie_leaves(arrays: Mapping[str, np.ndarray], task: str,
                layout: Mapping[str, Any]) -> List[np.ndarray]:
  """The trie's pytree leaves in TrieArrays order: the exported function's trie argument."""
  leaves = []
  for d, kind in enumerate(layout["levels"]):
    for field in _level_fields(kind):
      key = f"{task}/level{d}/{field}"
      if key not in arrays:
        raise ArtifactError(f"{TRIES_FILE} lacks {key!r}")
      leaves.append(np.asarray(arrays[key]))
  key = f"{task}/leaf_items"
  if key not in arrays:
    raise ArtifactError(f"{TRIES_FILE} lacks {key!r}")
  leaves.append(np.asarray(arrays[key]))
  return leaves


def trie_from_leaves(leaves: Sequence[Any], layout: Mapping[str, Any]):
  """Rebuilds the TrieArrays (inside the exported function, or for checks)."""
  from gensar_jax.decoding.trie import LEVEL_TYPES, TrieArrays
  leaves = list(leaves)
  levels = []
  for kind in layout["levels"]:
    cls = LEVEL_TYPES[kind]
    fields = _level_fields(kind)
    levels.append(cls(**dict(zip(fields, leaves[:len(fields)]))))
    leaves = leaves[len(fields):]
  if len(leaves) != 1:
    raise ArtifactError(f"trie leaves do not match the layout {layout} "
                        f"({len(leaves)} left over instead of leaf_items)")
  return TrieArrays(levels=tuple(levels), leaf_items=leaves[0],
                    max_branch=tuple(layout["max_branch"]))


# ----------------------------------------------------------------------------- params


def params_to_bytes(params: Any) -> bytes:
  """msgpack of the parameters as a plain nested dict of host arrays."""
  from flax import serialization
  import jax
  state = serialization.to_state_dict(params)
  return serialization.msgpack_serialize(jax.tree.map(np.asarray, state))


def params_from_bytes(blob: bytes) -> Dict[str, Any]:
  from flax import serialization
  return serialization.msgpack_restore(blob)


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass
class Artifact:
  """A loaded artifact, host arrays only (the engine moves them to the device)."""
  directory: str
  metadata: Dict[str, Any]
  params: Dict[str, Any]
  items: List[Dict[str, Any]]
  identifier_tokens: Dict[str, np.ndarray]   # task -> [items, L]
  trie_leaves: Dict[str, List[np.ndarray]]   # task -> TrieArrays leaves
  functions: Dict[Tuple[str, int], bytes]    # (task, bucket) -> serialized jax.export

  @property
  def vocab_path(self) -> str:
    return os.path.join(self.directory, VOCAB_FILE)

  @property
  def buckets(self) -> List[int]:
    return list(self.metadata["batch_buckets"])

  @property
  def num_beams(self) -> int:
    return int(self.metadata["num_beams"])


def check_function(exported, where: str, art: "Artifact", task: str, bucket: int) -> None:
  """Raises ArtifactError unless a deserialised `jax.export` function fits its artifact.

  The metadata says what the server feeds a function and reads back (tokens [bucket,
  input length], beams per request); the function's own signature says what it was
  compiled for. An artifact whose files disagree (an edited or mixed-up metadata.json, a
  function file from another export) would load, answer /healthz, and then fail every
  query with a shape error, so it is refused at load time, naming the first difference.
  """
  import jax
  input_length = int(art.metadata["feature_lengths"]["inputs"])
  tokens = jax.ShapeDtypeStruct((bucket, input_length), np.int32)
  expected = ((art.params, list(art.trie_leaves[task]), tokens), {})
  fix = "; re-export the artifact"
  if exported.in_tree != jax.tree.structure(expected):
    raise ArtifactError(f"{where}: does not take (params, trie leaves, tokens) of this "
                        f"artifact ({PARAMS_FILE} or {TRIES_FILE} has a different "
                        f"structure){fix}")
  names = {0: PARAMS_FILE, 1: TRIES_FILE, 2: f"{METADATA_FILE} (tokens [batch bucket "
                                               "{bucket}, feature_lengths.inputs])"}
  for (path, leaf), aval in zip(jax.tree_util.tree_flatten_with_path(expected[0])[0],
                                exported.in_avals):
    shape, dtype = tuple(np.shape(leaf)), np.dtype(leaf.dtype)
    if shape != tuple(aval.shape) or dtype != np.dtype(aval.dtype):
      name = names[path[0].idx].format(bucket=bucket)
      raise ArtifactError(f"{where}: compiled for {aval.dtype}{list(aval.shape)} at "
                          f"{jax.tree_util.keystr(path[1:]) or 'tokens'}, but {name} gives "
                          f"{dtype}{list(shape)}{fix}")
  beams = art.num_beams
  for aval in exported.out_avals:
    if tuple(aval.shape) != (bucket, beams):
      raise ArtifactError(f"{where}: returns {list(aval.shape)} (batch, beams), but "
                          f"{METADATA_FILE} says batch bucket {bucket} and num_beams "
                          f"{beams}{fix}")


def _need(directory: str, name: str) -> str:
  path = os.path.join(directory, name)
  if not os.path.isfile(path):
    raise ArtifactError(f"{directory}: missing {name}; export a complete artifact with "
                        "`python -m gensar_jax.export`")
  return path


@contextlib.contextmanager
def reading(path: str, what: str) -> Iterator[None]:
  """Turns any failure to parse one file into an ArtifactError naming the file."""
  try:
    yield
  except ArtifactError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # corrupt bytes fail in many ways
    raise ArtifactError(f"{path}: cannot be read as {what} ({type(e).__name__}: "
                        f"{str(e)[:200]}); re-export the artifact") from None


def read_metadata(directory: str) -> Dict[str, Any]:
  path = _need(directory, METADATA_FILE)
  with reading(path, "JSON metadata"):
    with open(path, encoding="utf-8") as f:
      metadata = json.load(f)
    if not isinstance(metadata, dict):
      raise ValueError("not a JSON object")
  version = metadata.get("format_version")
  if version != FORMAT_VERSION:
    raise ArtifactError(f"{directory}: artifact format version {version!r}, this code reads "
                        f"version {FORMAT_VERSION}; re-export it")
  return metadata


def read_items(directory: str) -> List[Dict[str, Any]]:
  path = _need(directory, ITEMS_FILE)
  with reading(path, "JSON lines of items"):
    with open(path, encoding="utf-8") as f:
      return [json.loads(line) for line in f if line.strip()]


def read_artifact(directory: str) -> Artifact:
  """Loads and cross-checks every file; raises ArtifactError naming what is wrong."""
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise ArtifactError(f"{directory}: no such artifact directory")
  metadata = read_metadata(directory)
  _need(directory, VOCAB_FILE)
  path = _need(directory, PARAMS_FILE)
  with reading(path, "msgpack parameters"):
    with open(path, "rb") as f:
      params = params_from_bytes(f.read())
    if not isinstance(params, dict) or not params:
      raise ValueError("no parameter tree")
  items = read_items(directory)
  meta_path = os.path.join(directory, METADATA_FILE)
  path = _need(directory, IDENTIFIERS_FILE)
  with reading(path, f"identifier arrays for the tasks of {meta_path}"):
    with np.load(path) as z:
      identifier_tokens = {task: np.asarray(z[task]) for task in metadata["tasks"]}
  path = _need(directory, TRIES_FILE)
  with reading(path, f"trie arrays for the tries of {meta_path}"):
    with np.load(path) as z:
      arrays = {k: z[k] for k in z.files}
    leaves = {task: trie_leaves(arrays, task, metadata["tries"][task])
              for task in metadata["tasks"]}
  for task, tokens in identifier_tokens.items():
    if tokens.shape[0] != len(items):
      raise ArtifactError(f"{directory}: {IDENTIFIERS_FILE}[{task}] has {tokens.shape[0]} "
                          f"rows but {ITEMS_FILE} has {len(items)} items")
  functions = {}
  for task in metadata["tasks"]:
    for bucket in metadata["batch_buckets"]:
      with open(_need(directory, function_file(task, bucket)), "rb") as f:
        functions[(task, int(bucket))] = f.read()
  return Artifact(directory=directory, metadata=metadata, params=params, items=items,
                  identifier_tokens=identifier_tokens, trie_leaves=leaves,
                  functions=functions)
