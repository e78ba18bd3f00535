"""Checkpoint tensors -> our parameter tree: names, layouts, shapes, and the vocabulary rows.

Why one module: both readers (Hugging Face, T5X) end the same way. Each names, for every
parameter path of our network (`gensar_jax/models/t5.py`), the checkpoint tensor that
fills it and how to lay it out; `assemble` then takes exactly those tensors, refuses a
missing one, a shape that does not fit and a tensor nothing reads (more layers than the
config, a different MLP), each as one line naming the tensor and the file.

The vocabulary axis is the one shape the checkpoint decides: a T5 checkpoint has 32128
rows (32000 SentencePiece pieces + 100 sentinels, padded). `fit_vocabulary` maps them onto
our vocabulary, whose first pieces are the checkpoint's own (gensar_jax/vocabulary.py
`extend_vocabulary`) and whose later ids are the behaviour and identifier tokens.
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Tuple

import flax
import jax
import numpy as np

from gensar_jax.checkpoints import CheckpointError
from gensar_jax.models.t5 import Transformer
from gensar_jax.models.t5_config import T5Config

Path = Tuple[str, ...]
EMBEDDING: Path = ("token_embedder", "embedding")      # [vocab, embed]
OUTPUT_KERNEL: Path = ("decoder", "logits_dense", "kernel")  # [embed, vocab]
# How a checkpoint tensor becomes our array: (name, layout function).
Source = Tuple[str, Callable[[np.ndarray], np.ndarray]]


def same(x: np.ndarray) -> np.ndarray:
  return x


def transposed(x: np.ndarray) -> np.ndarray:
  """[out, in] (torch Linear, relative bias [buckets, heads]) -> [in, out]."""
  return np.ascontiguousarray(x.T)


def parameter_shapes(config: T5Config) -> Dict[Path, Tuple[int, ...]]:
  """Every parameter path of the network for `config` and its shape (nothing computed)."""
  module = Transformer(config)
  tokens = jax.ShapeDtypeStruct((1, 1), np.int32)
  shapes = jax.eval_shape(lambda t: module.init(jax.random.PRNGKey(0), t, t), tokens)
  params = flax.core.meta.unbox(shapes)["params"]
  return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(params).items()}


def assemble(tensors: Mapping[str, np.ndarray], sources: Mapping[Path, Source],
             expected: Mapping[Path, Tuple[int, ...]], file: str,
             ignorable: Tuple[str, ...] = ()) -> Dict[Path, np.ndarray]:
  """{our path: float32 array} from the checkpoint's {name: array}.

  `sources` names the tensor of every path in `expected`; `ignorable` lists checkpoint
  names that may stay unread (copies of a tied embedding). Raises CheckpointError.
  """
  out: Dict[Path, np.ndarray] = {}
  for path, shape in expected.items():
    name, layout = sources[path]
    if name not in tensors:
      raise CheckpointError(f"{file}: no tensor {name!r} (needed for {'/'.join(path)}); "
                            "is the checkpoint of the architecture the T5Config describes?")
    array = layout(np.asarray(tensors[name]))
    if array.shape != shape and array.ndim == 3 and array.size == int(np.prod(shape)):
      array = array.reshape(shape)  # T5X/flaxformer's [embed, heads, kv] attention kernels
    if array.shape != shape:
      raise CheckpointError(
          f"{file}: tensor {name!r} has shape {tuple(tensors[name].shape)}, which does not "
          f"fit {'/'.join(path)} {shape} of the configured model (check the gin model file "
          "against the checkpoint's sizes)")
    out[path] = np.asarray(array, np.float32)
  used = {name for name, _ in (sources[p] for p in expected)}
  unread = sorted(set(tensors) - used - set(ignorable))
  if unread:
    raise CheckpointError(
        f"{file}: {len(unread)} tensor(s) the configured model has no place for, e.g. "
        f"{unread[0]!r} (more layers or another MLP than the T5Config describes?)")
  return out


def fit_vocabulary(flat: Dict[Path, np.ndarray], base_pieces: int, rows: int
                   ) -> Dict[Path, np.ndarray]:
  """Resizes the vocabulary axis to `rows`: ids below `base_pieces` (the checkpoint's own
  SentencePiece pieces) keep their pretrained rows; every later id (our behaviour and
  identifier tokens, then padding) starts at the mean of those rows.

  The mean, not the checkpoint's sentinel rows (ids 32000-32099 of T5, span-corruption
  markers we never use) nor random rows: it sits where pretrained inputs live (a random
  N(0, 1) row has a norm unlike any trained one), and as an output column it gives a new
  token the average logit, neither favoured nor ruled out before it is trained. Equal
  rows do not stay equal: each token gets its own gradient from the first step.
  """
  embedding = flat[EMBEDDING]
  if embedding.shape[0] < base_pieces:
    raise CheckpointError(f"the checkpoint's embedding has {embedding.shape[0]} rows, fewer "
                          f"than its vocabulary's {base_pieces} pieces")
  out = dict(flat)

  def resized(table):  # [vocab, embed] -> [rows, embed]
    kept = table[:base_pieces]
    new = np.broadcast_to(kept.mean(axis=0, keepdims=True), (rows - base_pieces,) + table.shape[1:])
    return np.concatenate([kept, new], axis=0).astype(np.float32)

  out[EMBEDDING] = resized(embedding)
  if OUTPUT_KERNEL in flat:
    out[OUTPUT_KERNEL] = np.ascontiguousarray(resized(flat[OUTPUT_KERNEL].T).T)
  return out
