"""The Engine over a loaded artifact: prompts -> tokens -> exported search -> ranked hits.

It reads only the artifact (gensar_jax/serving/artifact.py): no gin, no orbax, no Flax
module, no TensorFlow. The prompt templates come from the artifact's metadata (written by
the exporter from gensar_jax/prompts.py), so a server renders exactly the prompts its model
was evaluated with; tokenisation is SentencePiece on the copied model file.
"""
from __future__ import annotations

import logging
import math
import os
import re
import threading
from typing import List, Optional, Sequence, Tuple

import jax
import numpy as np

from gensar_jax.serving import artifact as artifact_lib
from gensar_jax.serving.app import Event, Hit, Query

logger = logging.getLogger(__name__)

# The model's control vocabulary is angle-bracketed words: behaviour tokens (<rec_item>,
# <src_query>, <src_item>), identifier tokens (<m0_12>, <s1_7>), </s>. SentencePiece matches
# user-defined pieces anywhere in raw text, so user text is unwrapped before tokenising:
# "<m0_12>" in a query is read as the plain text "m0_12" and cannot steer the decoder.
_RESERVED_FORM = re.compile(r"<(/?[A-Za-z0-9_]+)>")


def user_text(text: str) -> str:
  """Text from a request with every angle-bracketed control form unwrapped."""
  previous = None
  while previous != text:  # "<<m0_1>>" unwraps to "<m0_1>" first: repeat until stable
    previous, text = text, _RESERVED_FORM.sub(r"\1", text)
  return text


class ServingEngine:
  """Implements gensar_jax.serving.app.Engine over an exported artifact directory."""

  def __init__(self, artifact_dir: str, max_batch_size: Optional[int] = None):
    if max_batch_size is not None and max_batch_size < 1:
      raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    art = artifact_lib.read_artifact(artifact_dir)
    try:
      self._load(art, max_batch_size)
    except artifact_lib.ArtifactError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # metadata or blobs that lie
      raise artifact_lib.ArtifactError(
          f"{art.directory}: the files do not fit together ({type(e).__name__}: "
          f"{str(e)[:200]}); re-export the artifact") from None

  def _load(self, art: artifact_lib.Artifact, max_batch_size: Optional[int]) -> None:
    import sentencepiece

    meta = art.metadata
    self.metadata = meta
    self.directory = art.directory
    self.buckets = sorted(art.buckets)                       # e.g. [1, 8, 32]
    largest = self.buckets[-1]
    self.max_batch_size = min(max_batch_size or largest, largest)
    self.max_k = art.num_beams
    self.input_length = int(meta["feature_lengths"]["inputs"])
    self.eos_id = int(meta["eos_id"])
    self.pad_id = int(meta["pad_id"])
    self.max_history = {"rec": int(meta["history"]["rec"]),
                        "search": int(meta["history"]["search"])}
    self._prompts = dict(meta["prompts"])
    with artifact_lib.reading(art.vocab_path, "a SentencePiece model"):
      self._tokenizer = sentencepiece.SentencePieceProcessor(model_file=art.vocab_path)
    self.item_ids = [str(row["item_id"]) for row in art.items]
    self.titles = [str(row["title"]) for row in art.items]
    self._row = {item: r for r, item in enumerate(self.item_ids)}
    # Identifier text per task space, for history events ("<m0_1><m1_2>...").
    self._identifier_text = {task: [row["identifiers"][task] for row in art.items]
                             for task in meta["tasks"]}
    self._params = jax.device_put(art.params)
    self._tries = {task: jax.device_put(leaves) for task, leaves in art.trie_leaves.items()}
    self._functions = {}
    for (task, bucket), blob in art.functions.items():
      path = os.path.join(art.directory, artifact_lib.function_file(task, bucket))
      with artifact_lib.reading(path, "a serialized JAX function"):
        exported = jax.export.deserialize(bytearray(blob))
      artifact_lib.check_function(exported, path, art, task, bucket)
      self._functions[(task, bucket)] = jax.jit(exported.call)
    # One device call at a time, whoever calls (batcher threads, warm-up, tests).
    self._lock = threading.Lock()

  # --------------------------------------------------------------------------- requests

  def unknown_items(self, item_ids: Sequence[str]) -> List[str]:
    return list(dict.fromkeys(i for i in item_ids if i not in self._row))

  def _recent(self, history: Sequence[Event]) -> List[Event]:
    """The last `max_history[kind]` events of each kind, still oldest first (as trained)."""
    keep, seen = [], {"rec": 0, "search": 0}
    for event in reversed(history):
      if seen[event.kind] < self.max_history[event.kind]:
        seen[event.kind] += 1
        keep.append(event)
    return keep[::-1]

  def history_text(self, history: Sequence[Event]) -> str:
    parts = []
    for e in self._recent(history):
      row = self._row[e.item_id]
      if e.kind == "rec":
        parts.append(self._prompts["rec_event"].format(
            identifier=self._identifier_text["recommend"][row]))
      else:
        parts.append(self._prompts["search_event"].format(
            query=user_text(e.query), identifier=self._identifier_text["search"][row]))
    return self._prompts["history_separator"].join(parts)

  def prompt(self, task: str, query: Query) -> str:
    """The eval-template prompt of one request (search when task == "search")."""
    slots = {"history": self.history_text(query.history)}
    if task == "search":
      if query.query is None:
        raise ValueError("a search request needs a query")
      slots["query"] = self._prompts["query"].format(query=user_text(query.query))
    return self._prompts[task].format(**slots)

  def encode(self, text: str) -> np.ndarray:
    """[input_length] int32: SeqIO's tokenize + append_eos_after_trim + padding."""
    ids = self._tokenizer.encode(text)[:self.input_length - 1] + [self.eos_id]
    out = np.full((self.input_length,), self.pad_id, np.int32)
    out[:len(ids)] = ids
    return out

  # --------------------------------------------------------------------------- device

  def _bucket(self, n: int) -> int:
    return next(b for b in self.buckets if b >= n)

  def run_tokens(self, task: str, tokens: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """tokens [n, input_length] -> (item rows [n, K] (-1: none), scores [n, K]).

    Chunks of the largest bucket, each padded (with copies of its first row) up to the
    smallest bucket that holds it; padded rows are dropped from the result.
    """
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[1] != self.input_length:
      raise ValueError(f"tokens must be [n, {self.input_length}], got {tokens.shape}")
    rows, scores = [], []
    for start in range(0, tokens.shape[0], self.buckets[-1]):
      chunk = tokens[start:start + self.buckets[-1]]            # [n, L]
      n = chunk.shape[0]
      bucket = self._bucket(n)
      padded = np.concatenate([chunk, np.repeat(chunk[:1], bucket - n, axis=0)])  # [B, L]
      with self._lock:
        items, beam_scores = self._functions[(task, bucket)](
            self._params, self._tries[task], padded)
        items, beam_scores = np.asarray(items), np.asarray(beam_scores)   # [B, K] each
      rows.append(items[:n])
      scores.append(beam_scores[:n])
    return np.concatenate(rows), np.concatenate(scores)

  def _rank(self, task: str, queries: Sequence[Query]) -> List[List[Hit]]:
    if not queries:
      return []
    tokens = np.stack([self.encode(self.prompt(task, q)) for q in queries])  # [n, L]
    rows, scores = self.run_tokens(task, tokens)
    results = []
    for q, item_rows, item_scores in zip(queries, rows, scores):
      hits = [Hit(item_id=self.item_ids[r], title=self.titles[r], score=float(s))
              for r, s in zip(item_rows, item_scores) if r >= 0 and math.isfinite(s)]
      results.append(hits[:q.k])
    return results

  def search(self, queries: Sequence[Query]) -> List[List[Hit]]:
    return self._rank("search", queries)

  def recommend(self, queries: Sequence[Query]) -> List[List[Hit]]:
    return self._rank("recommend", queries)

  def warm_up(self) -> None:
    """Compiles every (task, bucket) function once, so no request pays for compilation."""
    for task in self._tries:
      for bucket in self.buckets:
        tokens = np.zeros((bucket, self.input_length), np.int32)
        tokens[:, 0] = self.eos_id
        self.run_tokens(task, tokens)
    logger.info("warmed up %d functions", len(self._functions))
