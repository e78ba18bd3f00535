"""Stage 5: predictions of a trained run, one JSON line per example of a task split.

  python -m gensar_jax.infer --gin_file=gin/runs/train.gin --gin_file=gin/models/tiny.gin \
      --gin_file=gin/runs/infer.gin --gin.MODEL_DIR="'runs/tiny'" ... (task macros) \
      --gin.INFER_TASK="'next_search_item'" --gin.INFER_CONSTRAINT="'candidates'"

Each line: the prompt (the model reads its first TASK_FEATURE_LENGTHS["inputs"] tokens), the
user, the true target, and the top-k items of a constrained beam search, best first, with
their log-probability scores, identifiers and titles. The search is constrained to a trie of
either the whole catalogue (every item of the task's identifier space, what serving does) or
the example's own candidates (the evaluation protocol), so every returned beam names exactly
one item.

The pieces are those of the ranking evaluation (gensar_jax/ranking.py): the same task
registration, identifier index and fixed-shape batches, and the compiled search of
gensar_jax/decoding (`decode_identifiers`, compiled once per model, beams and shape),
through `ranking.decode_batch`, which splits a batch over the hosts of a multi-host job
and gathers the results; only process 0 writes the file.

A checkpoint that does not belong to the vocabulary or identifiers given fails before any
decoding, with exit code 2 (CheckpointError): a model whose embedding size differs from
the vocabulary's, a run whose config.gin names a vocabulary or identifier table with other
contents, identifier tokens missing from the vocabulary, or no checkpoint at all.
"""
from __future__ import annotations

if __name__ == "__main__":  # one gin registration: run as the importable module
  import gensar_jax.gin_utils as _gin_utils
  _gin_utils.run_module("gensar_jax.infer")

import dataclasses
import logging
from typing import Dict, Iterator, List, Mapping, Optional, Union

import gin
import numpy as np
import seqio
from tqdm import tqdm

from gensar_jax import distributed
from gensar_jax import ranking
from gensar_jax import io_utils
from gensar_jax import restore
# The run's own gin files come first on the command line; gin/runs/train.gin binds `train`.
from gensar_jax import train as _train_configurables  # noqa: F401  # pylint: disable=unused-import
from gensar_jax.data.prepared import load_prepared
from gensar_jax.data.schema import DataError
from gensar_jax.decoding import build_candidate_tries, build_trie
from gensar_jax import prompts

logger = logging.getLogger(__name__)

CONSTRAINTS = ("catalogue", "candidates")
# Accepted task names -> the key ranking.RankingSetup uses.
RANKING_TASK_OF = {prompts.NEXT_REC_ITEM: "rec", prompts.NEXT_SEARCH_ITEM: "search",
                   "rec": "rec", "search": "search"}


@dataclasses.dataclass(frozen=True)
class InferSummary:
  output_path: str
  num_examples: int
  checkpoint_step: int
  task: str            # the registered SeqIO task decoded
  constraint: str


# ----------------------------------------------------------------------------- checks


# ----------------------------------------------------------------------------- decoding


def _example_metadata(task_name: str, split: str, input_length: int,
                      max_examples: Optional[int]) -> Iterator[Dict[str, np.ndarray]]:
  """The text features of the examples `ranking.eval_batches` batches, in its order."""
  ds = ranking.eval_examples(task_name, split, input_length, max_examples)
  for ex in ds.as_numpy_iterator():
    yield {k: ex[k] for k in ("inputs_pretokenized", "user_id", "target_item")}


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _identifier_strings(index: ranking.IdentifierTokens,
                        vocabulary: seqio.Vocabulary) -> List[str]:
  """Each catalogue row's identifier as generated (behaviour + codes, EOS left out)."""
  sp = vocabulary.tokenizer
  return ["".join(sp.id_to_piece(int(t)) for t in row[:-1]) for row in index.tokens]


@gin.configurable
def infer(model_dir: str = gin.REQUIRED, prepared_dir: str = gin.REQUIRED,
          identifiers_dir: str = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
          task: str = prompts.NEXT_REC_ITEM, split: str = "test", output_path: Optional[str] = None,
          checkpoint: Union[str, int] = "best", constraint: str = "catalogue",
          num_beams: int = 30, top_k: int = 10, batch_size: int = 16,
          max_examples: Optional[int] = None, progress: bool = True) -> InferSummary:
  """Writes the top-k predictions of `task` on `split` as JSONL; returns a summary.

  Args:
    model_dir: the trained run (checkpoints/, config.gin).
    prepared_dir: the prepared dataset (item titles; `ranking_setup` reads it too).
    identifiers_dir: the identifier table the run was trained with.
    task_feature_lengths: {"inputs": n, ...}; prompts are cut to n tokens as in training.
    task: "next_rec_item" or "next_search_item" ("rec" / "search" also accepted).
    split: "train", "validation" or "test" ("candidates" needs validation or test).
    output_path: default MODEL_DIR/predictions_<rec|search>_<split>.jsonl.
    checkpoint: "best", "latest" or a step number.
    constraint: "catalogue" (a trie of every item) or "candidates" (each example's own).
    num_beams: beam width; top_k <= num_beams of the beams are written.
    batch_size: examples per compiled search (the last batch is padded, not recompiled).
    max_examples: decode only the examples of a seeded random sample of n users (the
      same users evaluate and the eval hook pick for that n).
  """
  for value, macro in ((model_dir, "MODEL_DIR"), (prepared_dir, "PREPARED_DIR"),
                       (identifiers_dir, "IDENTIFIERS_DIR")):
    if not isinstance(value, str) or not value:
      raise DataError(f"infer: {macro} is required (--gin.{macro}=...)")
  if task not in RANKING_TASK_OF:
    raise DataError(f"infer.task={task!r}: expected {prompts.NEXT_REC_ITEM!r} or "
                    f"{prompts.NEXT_SEARCH_ITEM!r}")
  if constraint not in CONSTRAINTS:
    raise DataError(f"infer.constraint={constraint!r}: expected one of {CONSTRAINTS}")
  if not 1 <= top_k <= num_beams:
    raise DataError(f"infer: top_k={top_k} must be between 1 and num_beams={num_beams}")
  if batch_size < 1:
    raise DataError(f"infer.batch_size={batch_size} must be >= 1")
  key = RANKING_TASK_OF[task]

  run = restore.load_run(model_dir, checkpoint, "infer")
  setup, model, params, step = run.setup, run.model, run.params, run.step
  if key not in setup.task_names:
    trained = ", ".join(sorted(setup.task_names.values()))
    raise DataError(f"infer.task={task!r}: the run's mixture variant trains only {trained}; "
                    "a model is not decoded on a task it never saw (set MIXTURE_VARIANT to "
                    "the variant the run was trained with)")

  task_name = setup.task_names[key]
  index = setup.indices[key]
  input_length = int(task_feature_lengths["inputs"])
  items = load_prepared(prepared_dir).items
  titles = dict(zip((str(i) for i in items["item_id"]), (str(t) for t in items["title"])))
  identifiers = _identifier_strings(index, setup.vocabulary)
  catalogue_trie = build_trie(index.tokens) if constraint == "catalogue" else None
  output_path = output_path or io_utils.join(model_dir, f"predictions_{key}_{split}.jsonl")

  def rows() -> Iterator[Dict]:
    metadata = _example_metadata(task_name, split, input_length, max_examples)
    batches = ranking.eval_batches(task_name, split, input_length, batch_size, index,
                                      max_examples)
    bar = tqdm(desc=f"infer {task_name}/{split}", unit=" ex", disable=not progress)
    number = 0
    for batch in batches:
      if catalogue_trie is not None:
        trie = catalogue_trie
      elif batch.candidate_rows.shape[1] == 0:
        raise DataError(f"{task_name}/{split} has no candidates (the train split never "
                        "does); use infer.constraint='catalogue'")
      else:
        trie = build_candidate_tries(index.tokens[batch.candidate_rows])  # [b, c, L] paths
      picked, scores = ranking.decode_batch(model, params, batch.encoder_input_tokens,
                                               trie, num_beams)          # [b, beams] each
      scores = scores.astype(np.float64)
      if catalogue_trie is None:                                         # -> catalogue rows
        picked = np.where(picked >= 0, np.take_along_axis(
            batch.candidate_rows, np.maximum(picked, 0), axis=1), -1)
      order = np.argsort(-np.where(picked >= 0, scores, -np.inf), axis=1, kind="stable")
      for i in np.flatnonzero(batch.valid):
        meta = next(metadata)
        target = _text(meta["target_item"])
        if index.row[target] != batch.target_rows[i]:
          raise RuntimeError(f"{task_name}/{split}: example {number} read in another order "
                             "than the batches (target mismatch)")
        ranked = [int(b) for b in order[i] if picked[i, b] >= 0][:top_k]
        yield {"index": number, "task": task_name, "user_id": _text(meta["user_id"]),
               "input": _text(meta["inputs_pretokenized"]), "target": target,
               "items": [{"item_id": index.item_ids[picked[i, b]],
                          "score": float(scores[i, b]),
                          "title": titles.get(index.item_ids[picked[i, b]], ""),
                          "identifier": identifiers[picked[i, b]]} for b in ranked]}
        number += 1
        bar.update(1)
    bar.close()

  collected = list(rows())
  if not collected:
    raise DataError(f"{task_name}/{split} has no examples to decode")
  distributed.write_once(f"infer predictions to {output_path}",
                         lambda: io_utils.write_jsonl(output_path, collected))
  return InferSummary(output_path=output_path, num_examples=len(collected),
                      checkpoint_step=step, task=task_name, constraint=constraint)


def main() -> None:
  summary = infer()
  print(f"wrote {summary.num_examples} predictions of {summary.task} ({summary.constraint} "
        f"trie, checkpoint step {summary.checkpoint_step}) to {summary.output_path}",
        flush=True)

