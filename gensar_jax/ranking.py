"""Ranking evaluation of a generative model, the paper's protocol and the serving one.

For each eval example of the next-rec-item and next-search-item tasks:
  * candidates (docs/evaluation.md): constrained beam search over a trie of the
    example's own 100 candidates (target + 99 negatives), beam 30; the target's position
    among the returned beams gives HR@{1,5,10} and NDCG@{5,10};
  * catalogue (beyond the paper): the same search over a trie of every item in the task's
    identifier space (all SIDs for search, all CIDs for recommendation), which is what
    serving does and what sampled metrics can hide.
Scores and ranks use gensar_jax/metrics.py, the definition every baseline shares.

Identifier token ids come from the identifier table and the vocabulary, never from
decoding generated text: a beam is a path in the trie, so it names an item exactly.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import gin
import jax
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import seqio
import tensorflow as tf
from tqdm import tqdm

from gensar_jax import distributed
from gensar_jax import metrics as metrics_lib
from gensar_jax import partitioning
from gensar_jax import vocabulary as vocab_lib
from gensar_jax.decoding import build_candidate_tries, build_trie, decode_identifiers
from gensar_jax.decoding import trie as trie_lib
from gensar_jax.identifiers.table import IdentifierTable
from gensar_jax import prompts

# Task key -> (results key, behaviour token).
RANKING_TASKS = {prompts.NEXT_REC_ITEM: ("rec", vocab_lib.REC_ITEM),
                 prompts.NEXT_SEARCH_ITEM: ("search", vocab_lib.SRC_ITEM)}


class IdentifierTokens:
  """Token ids of every item's identifier in one space: [items, L] = behaviour + codes + EOS.

  Rows follow `item_ids` (the prepared dataset's catalogue order).
  """

  def __init__(self, table: IdentifierTable, vocabulary: seqio.Vocabulary, space: str,
               behaviour: str, item_ids: Sequence[str]):
    tokens = table.sid_tokens if space == "sid" else table.cid_tokens
    if tokens is None:
      raise ValueError(f"the identifier table has no {space.upper()}s")
    by_item = {str(i): t for i, t in zip(table.item_ids, tokens)}
    missing = [i for i in item_ids if str(i) not in by_item]
    if missing:
      raise ValueError(f"{len(missing)} catalogue items have no identifier (e.g. "
                       f"{missing[0]!r}): the table was built for another dataset")
    pieces = sorted({p for t in tokens for p in t})
    piece_id = {p: vocab_lib.token_id(vocabulary, p) for p in pieces}
    eos = 1 if vocabulary.eos_id is None else int(vocabulary.eos_id)
    behaviour_id = vocab_lib.token_id(vocabulary, behaviour)
    self.item_ids = [str(i) for i in item_ids]
    self.row = {item: r for r, item in enumerate(self.item_ids)}
    self.tokens = np.asarray([[behaviour_id, *(piece_id[p] for p in by_item[item]), eos]
                              for item in self.item_ids], np.int32)  # [items, L]
    self.space = space

  @property
  def length(self) -> int:
    return self.tokens.shape[1]

  def rows(self, items: np.ndarray) -> np.ndarray:
    """Item ids (any shape, str or bytes) -> catalogue rows."""
    flat = [self.row[i.decode() if isinstance(i, bytes) else str(i)]
            for i in np.asarray(items).ravel()]
    return np.asarray(flat, np.int64).reshape(np.shape(items))


@dataclasses.dataclass
class EvalBatch:
  encoder_input_tokens: np.ndarray  # [batch, input_length] int32
  candidate_rows: np.ndarray        # [batch, candidates] catalogue rows, target first
  target_rows: np.ndarray           # [batch]
  valid: np.ndarray                 # [batch] bool; False rows pad the last batch


def sampled_users(task: seqio.Task, split: str, max_examples: int, seed: int):
  """A seeded uniform sample of `max_examples` of the split's users (sorted), or None when
  the split has no more users than that.

  Held-out splits hold one example per user and task kind, and are written in user order:
  their first N examples are the N smallest user ids, not a sample. The same seed picks
  the same users for the rec and the search task.
  """
  users = sorted({u for u in task.source.get_dataset(split, shuffle=False)
                  .map(lambda ex: ex["user_id"]).as_numpy_iterator()})
  if len(users) <= max_examples:
    return None
  rng = np.random.default_rng([seed, max_examples])
  return sorted(users[i] for i in rng.choice(len(users), max_examples, replace=False))


def eval_examples(task_name: str, split: str, input_length: int,
                  max_examples: Optional[int] = None, sample_seed: int = 0) -> tf.data.Dataset:
  """The examples a ranking evaluation reads, in order: the whole split, or with
  `max_examples` those of a seeded random sample of that many users. Everything that
  walks an evaluation's examples beside its batches (infer's metadata) reads this."""
  task = seqio.get_mixture_or_task(task_name)
  ds = task.get_dataset({"inputs": input_length, "targets": 8}, split=split, shuffle=False,
                        num_epochs=1, use_cached=False)
  if max_examples is not None:
    users = sampled_users(task, split, max_examples, sample_seed)
    if users is not None:
      keep = tf.constant(users)
      ds = ds.filter(lambda ex: tf.reduce_any(tf.equal(ex["user_id"], keep)))
    ds = ds.take(max_examples)
  return ds


def eval_batches(task_name: str, split: str, input_length: int, batch_size: int,
                 index: IdentifierTokens, max_examples: Optional[int] = None,
                 sample_seed: int = 0) -> Iterator[EvalBatch]:
  """Fixed-shape batches of a ranking task's split (the last one padded and masked);
  with `max_examples`, the examples of a seeded random sample of that many users."""
  ds = eval_examples(task_name, split, input_length, max_examples, sample_seed)
  rows: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = []

  def flush():
    n = len(rows)
    inputs = np.zeros((batch_size, input_length), np.int32)
    width = len(rows[0][1])
    cands = np.repeat(rows[0][1][None], batch_size, axis=0)
    targets = np.full((batch_size,), rows[0][2], np.int64)
    for i, (tokens, cand, target) in enumerate(rows):
      inputs[i, :len(tokens)] = tokens
      if len(cand) != width:
        raise ValueError(f"{task_name}/{split}: examples have {width} and {len(cand)} "
                         "candidates; the prepared data should give every example the same")
      cands[i], targets[i] = cand, target
    for i in range(n, batch_size):
      inputs[i] = inputs[0]
    return EvalBatch(inputs, cands, targets, np.arange(batch_size) < n)

  for ex in ds.as_numpy_iterator():
    cand = index.rows(ex["candidate_items"])
    target = int(index.rows(np.asarray([ex["target_item"]]))[0])
    rows.append((ex["inputs"][:input_length], cand, target))
    if len(rows) == batch_size:
      yield flush()
      rows = []
  if rows:
    yield flush()


def _rows_over_data(params, tokens: np.ndarray):
  """The batch as one global array split over the 'data' axis of the params' mesh.

  Every process reads the same eval examples, so each can hand its devices their rows;
  the search then runs once over all devices of all processes (each decodes its rows),
  which a jit over parameters spread across processes needs in any case. Parameters not
  placed on a mesh with a 'data' axis (a plain single-device tree) take the batch as is.
  """
  sharding = getattr(jax.tree_util.tree_leaves(params)[0], "sharding", None)
  if not isinstance(sharding, NamedSharding) or \
      partitioning.DATA_AXIS not in sharding.mesh.axis_names:
    return tokens
  mesh = sharding.mesh
  spec = partitioning.fit_spec_to_shape(mesh, PartitionSpec(partitioning.DATA_AXIS),
                                        tokens.shape, what="decode batch")
  return jax.make_array_from_callback(tokens.shape, NamedSharding(mesh, spec),
                                      lambda index: tokens[index])


def decode_batch(model, params, encoder_input_tokens: np.ndarray,
                 trie: trie_lib.TrieArrays, num_beams: int) -> Tuple[np.ndarray, np.ndarray]:
  """(items [b, beams], scores [b, beams]) of a constrained search, on every process.

  The one decode of evaluate, infer and the eval hook: rows split over the mesh's data
  axis, results gathered, so a multi-host job decodes each example once and every host
  ends up with all of them (the same numbers one process gets).
  """
  out = decode_identifiers(model, params, _rows_over_data(params, encoder_input_tokens),
                           trie, num_beams)
  return distributed.to_host((out.items, out.scores))


@dataclasses.dataclass
class RankingResult:
  candidates: Dict[str, float]
  catalogue: Optional[Dict[str, float]]
  num_examples: int
  # Per example: target row, ranked candidate rows and catalogue rows (best first, -1 empty).
  predictions: List[Dict]


def evaluate_ranking_task(model, params, task_name: str, split: str, index: IdentifierTokens,
                          input_length: int, batch_size: int = 16, num_beams: int = 30,
                          catalogue: bool = True, catalogue_beams: Optional[int] = None,
                          max_examples: Optional[int] = None,
                          progress: bool = True, sample_seed: int = 0) -> RankingResult:
  """The candidate and (optionally) catalogue metrics of one ranking task's split
  (of a seeded random sample of `max_examples` users, if given)."""
  catalogue_beams = catalogue_beams or num_beams
  catalogue_trie = build_trie(index.tokens) if catalogue else None
  cand_ranks, cat_ranks, predictions = [], [], []
  batches = eval_batches(task_name, split, input_length, batch_size, index, max_examples,
                         sample_seed)
  for batch in tqdm(batches, desc=f"eval {task_name}/{split}", unit=" batch",
                    disable=not progress, leave=False):
    trie = build_candidate_tries(index.tokens[batch.candidate_rows])  # [b, c, L] paths
    # Compiled once per (model, beams, shape) and reused by every later evaluation.
    picked, _ = decode_batch(model, params, batch.encoder_input_tokens, trie,
                             num_beams)                                # [b, beams]
    ranked = np.where(picked >= 0, np.take_along_axis(
        batch.candidate_rows, np.maximum(picked, 0), axis=1), -1)      # [b, beams] rows
    ranks = metrics_lib.target_ranks(ranked, batch.target_rows)
    if catalogue:
      cat, _ = decode_batch(model, params, batch.encoder_input_tokens, catalogue_trie,
                            catalogue_beams)                           # [b, beams]
      cat_rank = metrics_lib.target_ranks(cat, batch.target_rows)
    for i in np.flatnonzero(batch.valid):
      cand_ranks.append(ranks[i])
      row = {"target": index.item_ids[batch.target_rows[i]],
             "candidates": [index.item_ids[r] for r in ranked[i] if r >= 0]}
      if catalogue:
        cat_ranks.append(cat_rank[i])
        row["catalogue"] = [index.item_ids[r] for r in cat[i] if r >= 0]
      predictions.append(row)
  if not cand_ranks:
    raise ValueError(f"{task_name}/{split} has no examples to evaluate")
  cat_metrics = None
  if catalogue:
    full = metrics_lib.ranking_metrics(np.asarray(cat_ranks))
    cat_metrics = {k: v for k, v in full.items() if k in ("HR@10", "NDCG@10")}
  return RankingResult(candidates=metrics_lib.ranking_metrics(np.asarray(cand_ranks)),
                       catalogue=cat_metrics, num_examples=len(cand_ranks),
                       predictions=predictions)


def ranking_indices(table: IdentifierTable, vocabulary: seqio.Vocabulary,
                    item_ids: Sequence[str], rec_space: str, search_space: str
                    ) -> Dict[str, IdentifierTokens]:
  """The identifier token index of each ranking task ('rec', 'search')."""
  return {"rec": IdentifierTokens(table, vocabulary, rec_space, vocab_lib.REC_ITEM, item_ids),
          "search": IdentifierTokens(table, vocabulary, search_space, vocab_lib.SRC_ITEM,
                                     item_ids)}


def evaluate_model(model, params, task_names: Mapping[str, str],
                   indices: Mapping[str, IdentifierTokens], split: str, input_length: int,
                   **kwargs) -> Dict[str, RankingResult]:
  """Both ranking tasks: {'rec': RankingResult, 'search': RankingResult} (those given)."""
  return {key: evaluate_ranking_task(model, params, task_names[key], split, indices[key],
                                     input_length, **kwargs)
          for key in ("rec", "search") if key in task_names}


def mean_ndcg5(results: Mapping[str, RankingResult]) -> float:
  """The checkpoint-selection metric of the paper: mean validation NDCG@5 of both tasks
  (of the one task, for a single-task model)."""
  return float(np.mean([r.candidates["NDCG@5"] for r in results.values()]))


# ----------------------------------------------------------------------------- wiring


# Mixture variants that train one ranking task: only that task is evaluated.
SINGLE_TASK_VARIANTS = {"rec_only": ("rec",), "search_only": ("search",)}


@dataclasses.dataclass
class RankingSetup:
  """What a ranking evaluation of one trained variant needs, built from the gin config."""
  task_names: Dict[str, str]                 # {'rec': seqio task, 'search': seqio task}
  indices: Dict[str, IdentifierTokens]
  dataset: str                               # the prepared dataset's name (results files)
  vocabulary: seqio.Vocabulary
  identifiers_dir: str = ""                  # where `indices` came from


@gin.configurable
def ranking_setup(prepared_dir: str = gin.REQUIRED, identifiers_dir: str = gin.REQUIRED,
                  variant: str = "all",
                  register_tasks: Callable[[], Any] = gin.REQUIRED) -> RankingSetup:
  """Registers the tasks and indexes the identifiers.

  `register_tasks` registers the SeqIO tasks and returns their registration (gin:
  `@register_gensar`, from gensar_tasks): the library reaches the tasks only through gin,
  as T5X's does, so it never imports the tasks package.

  `variant` is the trained mixture variant: "single_id" evaluates the single-identifier
  tasks (both item tasks in one space); "rec_only" / "search_only" evaluate only the task
  they train (a single-task model is not scored, nor its checkpoint chosen, on a task it
  never saw); every other variant both dual tasks.
  """
  from gensar_jax.data.prepared import load_prepared
  from gensar_jax.identifiers.table import load_identifier_table
  registration = register_tasks()
  if variant == "single_id":
    if registration.single_id is None:
      raise ValueError("variant 'single_id' needs a table with both SIDs and CIDs")
    registration = registration.single_id
  prepared = load_prepared(prepared_dir)
  table = load_identifier_table(identifiers_dir)
  item_ids = [str(i) for i in prepared.items["item_id"]]
  indices = ranking_indices(table, registration.vocabulary, item_ids, registration.rec_space,
                            registration.search_space)
  names = {"rec": registration.tasks[prompts.NEXT_REC_ITEM],
           "search": registration.tasks[prompts.NEXT_SEARCH_ITEM]}
  names = {k: v for k, v in names.items() if k in SINGLE_TASK_VARIANTS.get(variant, names)}
  return RankingSetup(task_names=names, indices=indices,
                      dataset=str(prepared.stats.get("name", os.path.basename(prepared_dir))),
                      vocabulary=registration.vocabulary, identifiers_dir=identifiers_dir)


@gin.configurable
class RankingEvalHook:
  """The training loop's eval hook: HR/NDCG on validation candidates, for keep-best.

  Reports `{rec,search}_ndcg@5`, `{rec,search}_ndcg@10`, `{rec,search}_hr@10` and
  `mean_ndcg@5` (the paper's
  checkpoint-selection metric; bind `TrainCheckpoints.best_metric = "eval/mean_ndcg@5"`
  with `best_mode = "max"`). `max_examples` bounds the cost per evaluation: every
  evaluation scores the same seeded random sample of that many users (`sample_seed`).
  """

  def __init__(self, task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
               split: str = "validation",
               max_examples: Optional[int] = 256, num_beams: int = 30,
               batch_size: int = 16, sample_seed: int = 0):
    self.input_length = int(task_feature_lengths["inputs"])
    self.split = split
    self.max_examples = max_examples
    self.num_beams = num_beams
    self.batch_size = batch_size
    self.sample_seed = sample_seed
    self._setup: Optional[RankingSetup] = None

  def __call__(self, *, step: int, params, model, trainer=None) -> Dict[str, float]:
    if self._setup is None:
      self._setup = ranking_setup()
    results = evaluate_model(model, params, self._setup.task_names, self._setup.indices,
                             self.split, self.input_length, batch_size=self.batch_size,
                             num_beams=self.num_beams, catalogue=False,
                             max_examples=self.max_examples, progress=False,
                             sample_seed=self.sample_seed)
    out = {}
    for key, result in results.items():
      out[f"{key}_ndcg@5"] = result.candidates["NDCG@5"]
      out[f"{key}_ndcg@10"] = result.candidates["NDCG@10"]
      out[f"{key}_hr@10"] = result.candidates["HR@10"]
    out["mean_ndcg@5"] = mean_ndcg5(results)
    return out
