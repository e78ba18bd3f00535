"""`load_pretrained` and `PretrainedT5Init`: a fresh training run that starts from T5 weights.

`train.initialise_params = @PretrainedT5Init()` (gin/runs/train.gin) replaces the random
parameters of a fresh run, never a resumed one, with a Hugging Face or T5X checkpoint's.
The run's vocabulary must be the checkpoint's own SentencePiece model extended by our
behaviour and identifier tokens (`build_vocab.base_vocabulary_path`, gensar_jax/vocabulary.py
`extend_vocabulary`): its first pieces are the checkpoint's, with the same ids, so their
embedding rows (and output columns) are copied; the appended tokens' rows start at the
mean pretrained row (gensar_jax/pretrained/params.py `fit_vocabulary` says why). The
checkpoint's ids past its own pieces (T5's 100 sentinels and padding) are not used.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import flax
import gin
import jax
import numpy as np

from gensar_jax import vocabulary as vocab_lib
from gensar_jax.checkpoints import CheckpointError
from gensar_jax.models.t5_config import T5Config
from gensar_jax.pretrained import hf, t5x
from gensar_jax.pretrained.params import (EMBEDDING, OUTPUT_KERNEL, Path, assemble,
                                          fit_vocabulary, parameter_shapes)

logger = logging.getLogger(__name__)
FORMATS = {"hf": hf, "t5x": t5x}


def t5_config_from_hf(folder: str, **overrides: Any) -> T5Config:
  """The T5Config of a Hugging Face folder, vocab_size = its embedding rows."""
  config = hf.read_config(folder)
  fields = hf.hf_config_fields(config, os.path.join(folder, hf.CONFIG_FILE))
  return T5Config(**{**fields, "vocab_size": int(config["vocab_size"]), **overrides})


def _check_hf_config(folder: str, config: T5Config) -> None:
  """Refuses a config.json that differs from the configured model, naming the field."""
  file = os.path.join(folder, hf.CONFIG_FILE)
  for name, value in hf.hf_config_fields(hf.read_config(folder), file).items():
    ours = getattr(config, name)
    equal = np.isclose(ours, value) if isinstance(value, float) else ours == value
    if not equal:
      raise CheckpointError(f"{file}: the checkpoint has {name}={value!r} but the configured "
                            f"T5Config.{name}={ours!r}; use a gin model file matching it "
                            "(gin/models/t5_v1_0_small.gin, t5_v1_1_small.gin)")


def _read(path: str, format: str) -> Tuple[Dict[str, np.ndarray], str]:
  if format not in FORMATS:
    raise CheckpointError(f"{path}: unknown pretrained format {format!r} (one of "
                          f"{sorted(FORMATS)})")
  if format == "hf":
    return hf.read_tensors(path)
  return t5x.read_target(path)


def _map(path: str, format: str, expected_with_vocab: Mapping[Path, Tuple[int, ...]],
         tied: bool) -> Dict[Path, np.ndarray]:
  """Reads the checkpoint and fills every path of `expected_with_vocab`, whose vocabulary
  axis is replaced by the checkpoint's row count."""
  tensors, file = _read(path, format)
  module = FORMATS[format]
  sources = {p: module.source(p, tensors) for p in expected_with_vocab}
  embedding_name = sources[EMBEDDING][0]
  if embedding_name not in tensors:
    raise CheckpointError(f"{file}: no tensor {embedding_name!r} (the token embedding)")
  rows = int(tensors[embedding_name].shape[0])
  expected = dict(expected_with_vocab)
  expected[EMBEDDING] = (rows,) + tuple(expected[EMBEDDING][1:])
  if OUTPUT_KERNEL in expected:
    expected[OUTPUT_KERNEL] = (expected[OUTPUT_KERNEL][0], rows)
  ignorable = hf.ignorable(tensors, tied) if format == "hf" else ()
  return assemble(tensors, sources, expected, file, ignorable)


def load_pretrained(path: str, format: str, config: T5Config) -> Dict[str, Any]:
  """The checkpoint as our parameter tree (numpy float32), with the checkpoint's own
  vocabulary rows; `config`'s vocab_size is ignored. Raises CheckpointError."""
  if format == "hf":
    _check_hf_config(path, config)
  shapes = parameter_shapes(dataclasses.replace(config, vocab_size=config.vocab_size or 1))
  flat = _map(path, format, shapes, config.logits_via_embedding)
  return flax.traverse_util.unflatten_dict(flat)


def base_piece_count(vocabulary: Any, base_vocabulary_path: str) -> int:
  """The checkpoint vocabulary's piece count, after checking that `vocabulary` starts
  with exactly those pieces (i.e. was extended from it, not trained anew)."""
  import sentencepiece as spm

  if not os.path.isfile(base_vocabulary_path):
    raise CheckpointError(f"{base_vocabulary_path}: no SentencePiece model; give the "
                          "checkpoint's own (PretrainedT5Init.vocabulary_path)")
  base = spm.SentencePieceProcessor(model_file=base_vocabulary_path)
  tokenizer = getattr(vocabulary, "tokenizer", None)
  if tokenizer is None:
    raise vocab_lib.VocabularyError(f"the run's vocabulary {vocabulary!r} is not a "
                                    "SentencePiece model extended from "
                                    f"{base_vocabulary_path}")
  size = base.get_piece_size()
  if tokenizer.get_piece_size() < size or any(
      tokenizer.id_to_piece(i) != base.id_to_piece(i) for i in range(size)):
    raise vocab_lib.VocabularyError(
        f"{getattr(vocabulary, 'sentencepiece_model_file', 'the run vocabulary')} does not "
        f"start with the {size} pieces of {base_vocabulary_path}: build it with "
        "build_vocab.base_vocabulary_path set to the checkpoint's spiece.model")
  return size


@gin.configurable
class PretrainedT5Init:
  """Called by `train` on a fresh state: params -> the checkpoint's parameters, with the
  vocabulary rows fitted to the run's extended vocabulary.

  Args:
    path: a Hugging Face folder (config.json, model.safetensors) or a T5X checkpoint
      (model directory, checkpoint_<step> directory or its `checkpoint` file).
    format: "hf" or "t5x".
    vocabulary_path: the checkpoint's own SentencePiece model, which the run's vocabulary
      must extend; default the folder's spiece.model (required for T5X).
    config: the model's T5Config, compared with config.json; default the gin-bound one.
  """

  def __init__(self, path: str = gin.REQUIRED, format: str = "hf",
               vocabulary_path: Optional[str] = None, config: Optional[T5Config] = None):
    if format not in FORMATS:
      raise CheckpointError(f"PretrainedT5Init.format must be one of {sorted(FORMATS)}, got "
                            f"{format!r}")
    if vocabulary_path is None:
      if format != "hf":
        raise CheckpointError("PretrainedT5Init.vocabulary_path is required for a T5X "
                              "checkpoint (it holds no SentencePiece model)")
      vocabulary_path = os.path.join(path, hf.SPIECE_FILE)
    self.path = path
    self.format = format
    self.vocabulary_path = vocabulary_path
    self.config = config

  def __call__(self, params: Dict[str, Any], vocabulary: Any) -> Dict[str, Any]:
    target = flax.traverse_util.flatten_dict(params)
    if self.format == "hf":
      _check_hf_config(self.path, self.config or T5Config())
    base = base_piece_count(vocabulary, self.vocabulary_path)
    shapes = {p: tuple(x.shape) for p, x in target.items()}
    flat = _map(self.path, self.format, shapes, OUTPUT_KERNEL not in target)
    flat = fit_vocabulary(flat, base, shapes[EMBEDDING][0])
    logger.info("parameters from %s (%s): %d tensors; ids %d-%d start at the mean row",
                self.path, self.format, len(flat), base, shapes[EMBEDDING][0] - 1)

    def placed(p: Path, x: jax.Array) -> jax.Array:
      host = np.asarray(flat[p], x.dtype)
      # Each device (and host) takes its own shard of the full host array.
      return jax.make_array_from_callback(x.shape, x.sharding, lambda index: host[index])

    return flax.traverse_util.unflatten_dict({p: placed(p, x) for p, x in target.items()})
