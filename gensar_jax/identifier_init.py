"""Identifier token embeddings that start from the items they name.

Why: a model trained from scratch meets each of the ~1,500 identifier tokens only a few dozen
times in a short run, and with random embeddings it must learn from those alone that
`<m0_12>` and `<m0_40>` name similar items. The identifiers stage already knows which items
share a code and what those items are (the sentence embedding of their text and the SASRec
embedding of their place in users' sequences). `IdentifierEmbeddingInit` gives each
identifier token's input embedding row and output-layer column a direction made from the
mean embedding of the items whose SID or CID uses that token, mixed with the random
direction it had, at the norm a random initialisation gives. Nothing else changes: the
vocabulary, the identifiers and the model's shapes are those of a run without it, and a
resumed run keeps its checkpoint (this applies to a fresh initialisation only).

Item features: each space's embeddings are centred and scaled to unit total variance
(so 384-d text and 64-d SASRec vectors weigh the same), concatenated, and projected to the
model width by a fixed Gaussian matrix (seeded): nearby items stay nearby, the width is the
model's. A token no item uses keeps its random row.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Tuple

import gin
import flax
import jax
import jax.numpy as jnp
import numpy as np
import seqio

from gensar_jax import vocabulary as vocab_lib
from gensar_jax.identifiers import table as table_lib

SEMANTIC_FILE = "semantic_embeddings.npy"
COLLABORATIVE_FILE = "collaborative_embeddings.npy"
# The parameters it sets (gensar_jax/models/t5.py): the shared input embedding and the
# untied output layer (a tied model, T5 v1.0, has only the embedding).
EMBEDDING = ("token_embedder", "embedding")
OUTPUT_KERNEL = ("decoder", "logits_dense", "kernel")


def _standardised(x: np.ndarray) -> np.ndarray:
  """[items, d] -> centred, with unit total variance over the d dimensions."""
  x = np.asarray(x, np.float64)
  x = x - x.mean(axis=0, keepdims=True)
  total = float(np.sum(x.var(axis=0)))
  return x / np.sqrt(total) if total > 0 else x


def item_features(identifiers_dir: str) -> np.ndarray:
  """[items, d] the identifiers stage's item embeddings, each space weighed equally, in the
  table's item order (the order `identify` saves them in)."""
  spaces = []
  for name in (SEMANTIC_FILE, COLLABORATIVE_FILE):
    path = os.path.join(identifiers_dir, name)
    if os.path.exists(path):
      spaces.append(_standardised(np.load(path)))
  if not spaces:
    raise FileNotFoundError(f"{identifiers_dir}: neither {SEMANTIC_FILE} nor "
                            f"{COLLABORATIVE_FILE}; rerun the identifiers stage")
  return np.concatenate(spaces, axis=1)


def token_features(table: table_lib.IdentifierTable, features: np.ndarray
                   ) -> Dict[str, np.ndarray]:
  """Identifier token -> mean feature [d] of the items whose SID or CID holds it (a shared
  token counts each item once)."""
  if features.shape[0] != len(table):
    raise ValueError(f"{features.shape[0]} item embeddings for {len(table)} identifier table "
                     "rows: the embeddings and the table come from different runs")
  sums: Dict[str, np.ndarray] = {}
  counts: Dict[str, int] = {}
  for row in range(len(table)):
    tokens = set()
    for space in (table.sid_tokens, table.cid_tokens):
      if space is not None:
        tokens.update(space[row])
    for token in tokens:
      sums[token] = sums.get(token, 0.0) + features[row]
      counts[token] = counts.get(token, 0) + 1
  return {t: sums[t] / counts[t] for t in sums}


def _unit_rows(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def mixed_rows(random_rows, item_rows, item_weight: float):
  """[n, d] rows whose direction is item_weight parts item direction and (1 - item_weight)
  parts random direction, each row at the norm of its random row."""
  norms = jnp.linalg.norm(random_rows, axis=-1, keepdims=True)
  direction = _unit_rows(item_weight * _unit_rows(item_rows)
                         + (1.0 - item_weight) * _unit_rows(random_rows))
  return (direction * norms).astype(random_rows.dtype)


@gin.configurable
class IdentifierEmbeddingInit:
  """Called by `train` on a freshly initialised state: params -> params with the
  identifier tokens' embedding rows and output columns set from their items."""

  def __init__(self, identifiers_dir: str = gin.REQUIRED, item_weight: float = 0.5,
               seed: int = 0):
    if not 0.0 <= item_weight <= 1.0:
      raise ValueError(f"IdentifierEmbeddingInit.item_weight must be in [0, 1], got "
                       f"{item_weight}")
    self.identifiers_dir = identifiers_dir
    self.item_weight = item_weight
    self.seed = seed

  def token_directions(self, vocabulary: seqio.Vocabulary, width: int
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """(token ids [n], item directions [n, width]) of every identifier token items use."""
    table = table_lib.load_identifier_table(self.identifiers_dir)
    by_token = token_features(table, item_features(self.identifiers_dir))
    tokens = sorted(by_token)
    ids = np.asarray([vocab_lib.token_id(vocabulary, t) for t in tokens], np.int32)
    feats = np.stack([by_token[t] for t in tokens])                       # [n, d]
    feats = feats - feats.mean(axis=0, keepdims=True)
    projection = np.random.default_rng(self.seed).normal(
        size=(feats.shape[1], width)) / np.sqrt(feats.shape[1])         # [d, width]
    return ids, feats @ projection                                       # [n, width]

  def __call__(self, params: Dict[str, Any], vocabulary: seqio.Vocabulary) -> Dict[str, Any]:
    width = flax.traverse_util.flatten_dict(params)[EMBEDDING].shape[1]
    ids, directions = self.token_directions(vocabulary, width)
    directions = directions.astype(np.float32)

    def update(p):  # inside jit: sharded (also multi-host) parameters are never gathered
      flat = flax.traverse_util.flatten_dict(p)
      embedding = flat[EMBEDDING]                                         # [vocab, embed]
      flat[EMBEDDING] = embedding.at[ids].set(
          mixed_rows(embedding[ids], directions, self.item_weight))
      if OUTPUT_KERNEL in flat:  # absent when the output is tied (logits_via_embedding)
        kernel = flat[OUTPUT_KERNEL]                                      # [embed, vocab]
        flat[OUTPUT_KERNEL] = kernel.at[:, ids].set(
            mixed_rows(kernel[:, ids].T, directions, self.item_weight).T)
      return flax.traverse_util.unflatten_dict(flat)

    shardings = jax.tree.map(lambda x: x.sharding, params)
    return jax.jit(update, out_shardings=shardings)(params)
