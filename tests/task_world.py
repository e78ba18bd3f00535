"""The helpers the tests share (one module; test modules import from here).

The tiny model (`tiny_model`, `input_shapes`, `synthetic_batch`: the trainer, partitioning
and multi-process tests, and tests/multiprocess_worker.py, the script the multi-process
test starts), a teacher-forced forward pass compiled once per config (`jitted_forward`),
and a small synthetic GenSAR world: a prepared dataset, identifier tables, a SentencePiece
vocabulary and registered SeqIO tasks, all built with the real stage functions.

One log of 10 users x 10-13 events over 30 items (real search sessions, distinct timestamps
per user); identifier tables are written by hand (a dual one and a SID-only one) and the
vocabulary is built with `build_vocab` from gin/runs/build_vocab.gin. Shared by test modules that
need real tasks (tests/test_tasks.py, tests/test_train.py) and the CLI tests that train a
tiny model on it first (test_evaluate_cli, test_infer, test_export: `world_flags`,
`under_gin`), and the serving tests' artifact of a freshly initialised tiny model
(`random_artifact`: test_serve, test_saved_model).
"""
import functools
import json
import os
import pathlib
from typing import Dict

import gin
import numpy as np
import pandas as pd

from gensar_jax import build_vocab as build_vocab_lib
from gensar_jax import gin_utils
from gensar_jax import prepare as prepare_lib
from gensar_tasks import gensar

REPO = gin_utils.REPO_ROOT
NUM_NEGATIVES = 5
NUM_ITEMS = 30
QUERIES = ["wireless headphones", "coffee maker", "camera lens", "travel mug", "usb cable",
           "café grinder"]
LENGTHS = {"inputs": 48, "targets": 12}
DUAL_LEVELS = {"sid": ["m0", "m1", "s0", "s1"], "cid": ["m0", "m1", "c0", "c1"]}
SID_ONLY_LEVELS = {"sid": ["s0", "s1", "s2", "s3"], "cid": None}
CODEBOOK = 8

TINY_VOCAB = 128
INPUT_LENGTH = 12
TARGET_LENGTH = 6


# --------------------------------------------------------------------------- tiny model


def tiny_model(dropout_rate: float = 0.0, dtype: str = "float32", z_loss: float = 1e-4):
  """A 1+1-layer T5 with widths divisible by a model axis of 2 (vocab 128, heads 2)."""
  import seqio
  from gensar_jax.models.encoder_decoder import EncoderDecoderModel
  from gensar_jax.models.t5 import Transformer
  from gensar_jax.models.t5_config import T5Config
  config = T5Config(vocab_size=TINY_VOCAB, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=64,
                    num_encoder_layers=1, num_decoder_layers=1, dropout_rate=dropout_rate,
                    dtype=dtype)
  vocabulary = seqio.PassThroughVocabulary(size=TINY_VOCAB, eos_id=1)
  return EncoderDecoderModel(Transformer(config), vocabulary, z_loss=z_loss)


def input_shapes(batch_size: int) -> Dict[str, tuple]:
  return {"encoder_input_tokens": (batch_size, INPUT_LENGTH),
          "decoder_input_tokens": (batch_size, TARGET_LENGTH)}


def synthetic_batch(seed: int, batch_size: int) -> Dict[str, np.ndarray]:
  """A learnable batch: the target is the reversed prefix of the input, then EOS and PAD.

  Targets have varying lengths so microbatches carry different token weights, which is
  what makes exact gradient accumulation non-trivial.
  """
  rng = np.random.default_rng(seed)
  inputs = rng.integers(2, TINY_VOCAB, size=(batch_size, INPUT_LENGTH), dtype=np.int32)
  lengths = rng.integers(1, TARGET_LENGTH, size=batch_size)  # tokens before EOS
  targets = np.zeros((batch_size, TARGET_LENGTH), np.int32)
  weights = np.zeros((batch_size, TARGET_LENGTH), np.int32)
  for row, n in enumerate(lengths):
    targets[row, :n] = inputs[row, :n][::-1]
    targets[row, n] = 1
    weights[row, :n + 1] = 1
  decoder_inputs = np.zeros_like(targets)
  decoder_inputs[:, 1:] = targets[:, :-1]
  return {"encoder_input_tokens": inputs, "decoder_input_tokens": decoder_inputs,
          "decoder_target_tokens": targets, "decoder_loss_weights": weights}


@functools.lru_cache(maxsize=None)
def jitted_forward(config):
  """Teacher-forced logits `f(params, encoder_tokens, decoder_inputs)` of a T5Config's
  Transformer, jitted once per config (compiling dominates the model tests' time)."""
  import jax
  from gensar_jax.models.t5 import Transformer
  module = Transformer(config)
  return jax.jit(lambda p, e, d: module.apply({"params": p}, e, d))


# --------------------------------------------------------------------------- synthetic world


def synthetic_log(seed=0):
  rng = np.random.default_rng(seed)
  nouns = ["headphones", "coffee maker", "camera lens", "travel mug", "usb cable", "grinder"]
  items = pd.DataFrame({
      "item_id": [f"I{i:02d}" for i in range(NUM_ITEMS)],
      "title": [f"{['Black', 'Compact', 'Naïve'][i % 3]} {nouns[i % 6]} {i}"
                for i in range(NUM_ITEMS)],
      "description": [f"A {nouns[(i + 1) % 6]} for the road." if i % 4 else ""
                      for i in range(NUM_ITEMS)],
      "categories": [f"Home > {nouns[i % 6].title()}" for i in range(NUM_ITEMS)],
  })
  events = []
  for u in range(10):
    n = 10 + u % 4
    chosen = rng.choice(NUM_ITEMS, size=n, replace=False)
    for k, item in enumerate(chosen):
      kind = ["rec", "search"][k % 2] if k < 2 else ["rec", "search"][rng.integers(2)]
      query = QUERIES[rng.integers(len(QUERIES))] if kind == "search" else ""
      events.append({"user_id": f"U{u}", "timestamp": 1_600_000_000 + 1000 * u + 10 * k,
                     "item_id": f"I{item:02d}", "kind": kind, "query": query})
  order = rng.permutation(len(events))
  return items, pd.DataFrame([events[i] for i in order])


def write_table(path, item_ids, levels):
  """An identifier table in the format `load_identifier_table` reads."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "identifiers.jsonl"), "w") as f:
    for i, item in enumerate(item_ids):
      codes = {"sid": [i // CODEBOOK, i % CODEBOOK, (3 * i) % CODEBOOK, (5 * i) % CODEBOOK],
               "cid": [i // CODEBOOK, i % CODEBOOK, (7 * i) % CODEBOOK, (i + 1) % CODEBOOK]}
      row = {"item_id": item}
      for space in ("sid", "cid"):
        names = levels[space]
        row[space] = None if names is None else [f"<{n}_{c}>" for n, c in
                                                 zip(names, codes[space])]
        row[f"{space}_codes"] = None if names is None else codes[space]
      f.write(json.dumps(row) + "\n")
  with open(os.path.join(path, "identifier_stats.json"), "w") as f:
    json.dump({"sid_levels": levels["sid"] or [], "cid_levels": levels["cid"] or [],
               "codebook_size": CODEBOOK}, f)
  return path


def parse_and_call(gin_files, bindings, fn):
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings(gin_files, bindings)
    return fn()
  finally:
    gin.clear_config()


def under_gin(argv, fn):
  """fn() under the config of command-line gin flags (`--gin_file=`, `--gin.X=`)."""
  gin.clear_config()
  try:
    gin_utils.parse_gin(argv)
    return fn()
  finally:
    gin.clear_config()


def world_flags(world, prefix, identifiers=None, vocab=None):
  """The gin flags that point a stage at `world` (data, identifiers, vocabulary, tasks)."""
  return [f"--gin.PREPARED_DIR='{world['prepared']}'",
          f"--gin.IDENTIFIERS_DIR='{identifiers or world['dual']}'",
          f"--gin.VOCAB_PATH='{vocab or world['vocab_path']}'", f"--gin.TASK_PREFIX='{prefix}'",
          f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}", "--gin.BATCH_SIZE=8"]


def build_world(root, prefix="t4"):
  """Builds everything under `root`; returns paths, tables and the registration."""
  root = pathlib.Path(root)
  items, events = synthetic_log()
  items.to_csv(root / "items.csv", index=False)
  events.to_csv(root / "events.csv", index=False)
  prepared_dir = str(root / "data")
  parse_and_call(
      [os.path.join(REPO, "gin", "runs", "prepare.gin"),
       os.path.join(REPO, "gin", "data", "generic.gin")],
      [f"PREPARED_DIR = '{prepared_dir}'", f"ITEMS_TABLE = '{root / 'items.csv'}'",
       f"EVENTS_TABLE = '{root / 'events.csv'}'",
       f"make_candidates.num_negatives = {NUM_NEGATIVES}"],
      prepare_lib.prepare)
  item_ids = list(items["item_id"])
  dual = write_table(str(root / "ids_dual"), item_ids, DUAL_LEVELS)
  sid_only = write_table(str(root / "ids_sid_only"), item_ids, SID_ONLY_LEVELS)
  vocab_path = str(root / "vocab" / "gensar.model")
  summary = parse_and_call(
      [os.path.join(REPO, "gin", "runs", "build_vocab.gin")],
      [f"PREPARED_DIR = '{prepared_dir}'", f"IDENTIFIERS_DIRS = ['{dual}', '{sid_only}']",
       f"VOCAB_PATH = '{vocab_path}'", "build_vocab.vocab_size = 900",
       "build_vocab.renders_per_template = 5"],
      build_vocab_lib.build_vocab)
  pseudo = root / "pseudo_queries.jsonl"
  with open(pseudo, "w") as f:
    for i, item in enumerate(item_ids):
      f.write(json.dumps({"item_id": item, "queries": [QUERIES[i % len(QUERIES)]]}) + "\n")
  reg = gensar.register_gensar(prepared_dir, dual, vocab_path, str(pseudo), prefix=prefix)
  return {"root": root, "items": items, "events": events, "prepared": prepared_dir,
          "dual": dual, "sid_only": sid_only, "vocab_path": vocab_path, "summary": summary,
          "pseudo": str(pseudo), "reg": reg}


def random_artifact(root, prefix, num_beams, batch_buckets, **export_kwargs):
  """A serving artifact of a freshly initialised 1+1-layer model over a new world.

  Returns (artifact path, world). `export_kwargs` go to write_serving_artifact.
  """
  import flax.linen as nn
  import jax

  from gensar_jax import ranking
  from gensar_jax import export as export_lib
  from gensar_jax.identifiers.table import load_identifier_table
  from gensar_jax.models.encoder_decoder import build_model
  from gensar_jax.models.t5_config import T5Config
  root = pathlib.Path(root)
  (root / "world").mkdir(parents=True, exist_ok=True)
  world = build_world(root / "world", prefix=prefix)
  vocabulary = world["reg"].vocabulary
  item_ids = [str(i) for i in world["items"]["item_id"]]
  indices = ranking.ranking_indices(load_identifier_table(world["dual"]), vocabulary,
                                       item_ids, "cid", "sid")
  config = T5Config(emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=1,
                    num_decoder_layers=1)
  model = build_model(vocabulary, config=config)
  variables = model.get_initial_variables(jax.random.PRNGKey(0), {
      "encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 8)})
  params = nn.meta.unbox(variables["params"])
  titles = dict(zip(item_ids, world["items"]["title"]))
  path = export_lib.write_serving_artifact(
      str(root / "artifact"), model=model, params=params, indices=indices, titles=titles,
      input_length=LENGTHS["inputs"], num_beams=num_beams, batch_buckets=batch_buckets,
      **export_kwargs)
  return path, world
