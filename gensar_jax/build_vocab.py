"""Stage 3a: train the model's SentencePiece vocabulary with every identifier token whole.

  python -m gensar_jax.build_vocab --gin_file=gin/runs/build_vocab.gin \
      --gin.PREPARED_DIR="'runs/ml100k/data'" \
      --gin.IDENTIFIERS_DIRS="['runs/ml100k/identifiers']" \
      --gin.VOCAB_PATH="'runs/ml100k/vocab/gensar.model'"

The corpus is the prepared dataset's text as the tasks render it (gensar_jax/vocab_corpus.py). The
special tokens are the three behaviour tokens plus the full token inventory (every code of
every level) of each identifier table given, so one vocabulary can serve several tables of
the same dataset (e.g. the dual table and its ablations). Tables not built yet can be
covered with `extra_levels` + `codebook_size` (e.g. levels s2, s3 of a sid_only table).

To start training from a pretrained T5 (gensar_jax/pretrained/, docs/pretrained.md), set
`base_vocabulary_path` to the checkpoint's own SentencePiece model (e.g. the Hugging Face
folder's spiece.model): nothing is trained, the special tokens are appended to that model
with every old piece keeping its id (`vocabulary.extend_vocabulary`).
Prints a summary: size, special tokens, and how the corpus tokenizes.
"""
from __future__ import annotations

if __name__ == "__main__":  # one gin registration: run as the importable module
  import gensar_jax.gin_utils as _gin_utils
  _gin_utils.run_module("gensar_jax.build_vocab")

import os
from typing import Dict, Optional, Sequence, Union

import gin
import numpy as np

from gensar_jax import vocabulary as vocab_lib
from gensar_jax.identifiers.table import load_identifier_table
from gensar_jax.vocab_corpus import vocabulary_corpus


def identifier_tokens(identifier_dirs: Sequence[str], extra_levels: Sequence[str] = (),
                      codebook_size: Optional[int] = None):
  """The union of the tables' token inventories plus the extra levels' tokens."""
  tokens = []
  sizes = set()
  for d in identifier_dirs:
    table = load_identifier_table(d)
    tokens.extend(table.vocabulary())
    sizes.add(int(table.stats["codebook_size"]))
  if extra_levels:
    if codebook_size is None:
      if len(sizes) != 1:
        raise ValueError("extra_levels needs codebook_size (no single table size to copy)")
      codebook_size = sizes.pop()
    tokens.extend(vocab_lib.identifier_token_inventory(extra_levels, codebook_size))
  if not tokens:
    raise ValueError("no identifier tokens: give at least one identifier table or "
                     "extra_levels with codebook_size")
  return list(dict.fromkeys(tokens))


@gin.configurable
def build_vocab(prepared_dir: str = gin.REQUIRED,
                identifier_dirs: Union[str, Sequence[str]] = gin.REQUIRED,
                output_path: str = gin.REQUIRED, vocab_size: int = vocab_lib.DEFAULT_VOCAB_SIZE,
                pseudo_queries_path: Optional[str] = None, extra_levels: Sequence[str] = (),
                codebook_size: Optional[int] = None, renders_per_template: int = 20,
                model_type: str = "bpe",
                seed: int = 0, overwrite: bool = False,
                base_vocabulary_path: Optional[str] = None) -> Dict:
  """Builds the vocabulary; returns a summary dict (also printed by the CLI).

  With `base_vocabulary_path` (a pretrained checkpoint's SentencePiece model) the special
  tokens are appended to it instead (vocab_size and model_type are then unused).
  """
  if isinstance(identifier_dirs, str):
    identifier_dirs = [identifier_dirs]
  tokens = identifier_tokens(identifier_dirs, extra_levels, codebook_size)
  corpus = vocabulary_corpus(prepared_dir, pseudo_queries_path,
                             renders_per_template=renders_per_template, seed=seed)
  if base_vocabulary_path:
    vocab_lib.extend_vocabulary(base_vocabulary_path, output_path, tokens,
                                overwrite=overwrite)
    model_type = f"extended {base_vocabulary_path}"
  else:
    vocab_lib.train_vocabulary(corpus, output_path, tokens, vocab_size=vocab_size,
                               model_type=model_type, overwrite=overwrite)
  vocab = vocab_lib.load_vocabulary(output_path)
  vocab_lib.require_tokens(vocab, [*vocab_lib.BEHAVIOUR_TOKENS, *tokens], "special tokens")
  lengths = np.asarray([len(vocab.encode(line)) for line in corpus])
  chars = np.asarray([len(line) for line in corpus])
  special = len(vocab_lib.user_defined_tokens(vocab))
  byte_pieces = sum(vocab.tokenizer.is_byte(i) for i in range(vocab.vocab_size))
  return {
      "path": os.path.abspath(output_path),
      "model_type": model_type,
      "vocab_size": vocab.vocab_size,
      "special_tokens": special,
      "identifier_tokens": len(tokens),
      "text_pieces": vocab.vocab_size - special - 3 - byte_pieces,
      "corpus_lines": len(corpus),
      "corpus_tokens_per_line": float(lengths.mean()),
      "corpus_chars_per_token": float(chars.sum() / max(lengths.sum(), 1)),
  }


def format_summary(summary: Dict) -> str:
  lines = ["vocabulary", "-" * 48]
  for key, value in summary.items():
    value = f"{value:.2f}" if isinstance(value, float) else value
    lines.append(f"{key:<28} {value}")
  return "\n".join(lines)


def main() -> None:
  print(format_summary(build_vocab()))

