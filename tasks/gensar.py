"""Registration of the GenSAR tasks and mixtures with SeqIO.

    from gensar_tasks import register_gensar
    reg = register_gensar(prepared_dir, identifiers_dir, vocab_path,
                          pseudo_queries_path=None, prefix="gensar")
    seqio.get_mixture_or_task(reg.mixtures["all"]).get_dataset(...)

Tasks (`{prefix}_{key}`; docs/method.md section 3):
  next_rec_item     history -> "<rec_item>" + CID            train / validation / test
  next_search_item  history + query -> "<src_item>" + SID    train / validation / test
  next_query        history -> "<src_query> " + query text   train / validation / test
  adhoc_search      "<src_query> " + pseudo-query -> "<src_item>" + SID            train
  item_to_id        item text -> SID or CID (one row per item and space)            train
  id_to_item        SID or CID -> item text                                          train
The history tasks read the prepared TFRecord shards; the per-item tasks read the catalogue
(and the doc2query file) in memory. Eval splits carry candidate ids and identifiers and
have metric functions: ranking metrics for the two item tasks, exact match for queries.

Mixtures (`{prefix}{suffix}`; keys of `GensarRegistration.mixtures`):
  all            ""               all six tasks
  no_adhoc       "_no_adhoc"      all but ad-hoc search (trainable before doc2query)
  no_alignment   "_no_alignment"  without item_to_id / id_to_item (ablation)
  rec_only       "_rec_only"      next_rec_item alone
  search_only    "_search_only"   next_search_item alone
  single_id      "_single_id"     all six tasks, both item tasks in ONE identifier space
                                  (`single_id_space`, SID by default): the "no dual
                                  identifiers" ablation. Registered only when the table
                                  has both spaces; its tasks are `{prefix}_single_id_*`.
A table with a single space (RQ-VAE mode sid_only / cid_only) is used for both tasks; the
behaviour tokens still tell recommendation from search.

Rates (`mixture_rates`, gin-configurable) default to the published rows per epoch: all
rec train rows, 100,000 search rows, 1,000 next-query rows, 1,000 ad-hoc rows, 1,000 rows
per identifier space for each alignment direction; each is capped by the rows the task
actually has where that is known at registration.

Registering again under the same prefix replaces the earlier tasks and mixtures (tests and
pipelines re-register after rebuilding an input).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Optional

import gin
import seqio

from gensar_jax.data.prepared import load_prepared
from gensar_jax.identifiers.table import load_identifier_table
from gensar_jax import vocabulary as vocab_lib
from gensar_tasks import metrics as metrics_lib
from gensar_tasks import preprocessors as pp
from gensar_jax import prompts
from gensar_tasks import sources

EVAL_SPLITS = sources.EVAL_SPLITS
MIXTURE_SUFFIXES = prompts.MIXTURE_SUFFIXES
MIXTURE_TASKS = {
    "all": prompts.TASK_KINDS,
    "no_adhoc": tuple(k for k in prompts.TASK_KINDS if k != prompts.ADHOC),
    "no_alignment": (prompts.NEXT_REC_ITEM, prompts.NEXT_SEARCH_ITEM, prompts.QUERY, prompts.ADHOC),
    "rec_only": (prompts.NEXT_REC_ITEM,),
    "search_only": (prompts.NEXT_SEARCH_ITEM,),
}
_NAME = re.compile(r"^[\w\d\.\:_#]+$")


@dataclasses.dataclass(frozen=True)
class GensarRegistration:
  """What `register_gensar` registered.

  Attributes:
    prefix: the name prefix.
    tasks: task key (gensar_jax/prompts.py TASK_KINDS) -> registered task name.
    mixtures: mixture key ("all", "no_adhoc", ...) -> registered mixture name.
    rates: task key -> mixing rate used in the mixtures.
    rec_space, search_space: identifier space of recommendation / search targets.
    vocabulary: the shared input/target vocabulary.
    single_id: the registration of the single-identifier ablation, if any.
  """
  prefix: str
  tasks: Dict[str, str]
  mixtures: Dict[str, str]
  rates: Dict[str, float]
  rec_space: str
  search_space: str
  vocabulary: seqio.Vocabulary
  single_id: Optional["GensarRegistration"] = None


@gin.configurable
def mixture_rates(stats: Dict, num_items: int, num_spaces: int,
                  rec_rows: Optional[int] = None, search_rows: int = 100_000,
                  query_rows: int = 1_000, adhoc_rows: int = 1_000,
                  alignment_rows_per_space: int = 1_000) -> Dict[str, float]:
  """Mixing rates per task key: the published rows per epoch, capped by what exists.

  Args:
    stats: the prepared dataset's stats.json (rows per kind and split).
    num_items: catalogue size (rows of each alignment task per space).
    num_spaces: identifier spaces in use (2 for dual identifiers).
    rec_rows: rec rows per epoch; None = all rec train rows (published).
    search_rows, query_rows, adhoc_rows: rows per epoch (published 100,000 / 1,000 / 1,000).
    alignment_rows_per_space: rows per epoch of each alignment direction per space
      (published 1,000, i.e. 2 x 1,000 with SIDs and CIDs).
  """
  rec_train = int(stats["rows"]["rec"]["train"])
  search_train = int(stats["rows"]["search"]["train"])
  alignment = min(alignment_rows_per_space, num_items) * num_spaces
  rates = {
      prompts.NEXT_REC_ITEM: rec_train if rec_rows is None else min(rec_rows, rec_train),
      prompts.NEXT_SEARCH_ITEM: min(search_rows, search_train),
      prompts.QUERY: min(query_rows, search_train),
      prompts.ADHOC: adhoc_rows,
      prompts.ITEM_TO_ID: alignment,
      prompts.ID_TO_ITEM: alignment,
  }
  for key, rate in rates.items():
    if rate < 0:
      raise ValueError(f"mixing rate of {key} is negative: {rate}")
  return {k: float(v) for k, v in rates.items()}


def _identifier_strings(table, item_ids: List[str], single_space: Optional[str]
                        ) -> pp.IdentifierStrings:
  """Per-space identifier strings in prepared item order; checks the table covers them."""
  table_ids = [str(i) for i in table.item_ids]
  if sorted(table_ids) != sorted(item_ids):
    missing = sorted(set(item_ids) - set(table_ids))
    extra = sorted(set(table_ids) - set(item_ids))
    raise ValueError(
        f"the identifier table does not match the prepared dataset: {len(missing)} items "
        f"without identifiers (e.g. {missing[:3]}), {len(extra)} unknown items "
        f"(e.g. {extra[:3]}); build the identifiers from this prepared dataset")
  row = {item: i for i, item in enumerate(table_ids)}
  by_space = {}
  for space, tokens in (("sid", table.sid_tokens), ("cid", table.cid_tokens)):
    if tokens is not None:
      by_space[space] = ["".join(tokens[row[item]]) for item in item_ids]
  if not by_space:
    raise ValueError("the identifier table has neither SIDs nor CIDs")
  if single_space is not None:
    if single_space not in by_space:
      raise ValueError(f"single_space={single_space!r} but the table has {sorted(by_space)}")
    rec_space = search_space = single_space
  else:
    rec_space = "cid" if "cid" in by_space else "sid"
    search_space = "sid" if "sid" in by_space else "cid"
  return pp.IdentifierStrings(item_ids=item_ids, by_space=by_space, rec_space=rec_space,
                              search_space=search_space)


def _table_tokens(table) -> List[str]:
  used = set()
  for tokens in (table.sid_tokens, table.cid_tokens):
    for row in tokens or ():
      used.update(row)
  declared = []
  if {"sid_levels", "cid_levels", "codebook_size"} <= set(table.stats):
    declared = table.vocabulary()
  return list(dict.fromkeys([*declared, *sorted(used)]))


def _replace_task(name: str, **kwargs) -> seqio.Task:
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(name, **kwargs)


def _replace_mixture(name: str, tasks) -> None:
  seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, tasks)


def _register(prefix: str, prepared, strings: pp.IdentifierStrings,
              vocabulary: seqio.Vocabulary, pseudo_queries_path: Optional[str],
              rates: Optional[Dict[str, float]]) -> GensarRegistration:
  features = {
      "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=True),
      "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=True),
  }
  post = pp.standard_postprocessing()
  stats = prepared.stats
  rows = stats["rows"]
  examples = {split: int(rows["rec"][split]) + int(rows["search"][split])
              for split in ("train", *EVAL_SPLITS)}
  history_source = sources.PreparedExampleSource(prepared.path, num_input_examples=examples)
  item_ids = strings.item_ids
  item_texts = prepared.item_texts()
  item_source = sources.item_rows_source(item_ids, item_texts, strings.spaces)
  names = {key: f"{prefix}_{key}" for key in prompts.TASK_KINDS}

  ranking = [metrics_lib.ranking_metrics]
  _replace_task(names[prompts.NEXT_REC_ITEM], source=history_source, output_features=features,
                preprocessors=[pp.history_task(prompts.NEXT_REC_ITEM, strings), *post],
                postprocess_fn=metrics_lib.postprocess_identifier, metric_fns=ranking)
  _replace_task(names[prompts.NEXT_SEARCH_ITEM], source=history_source, output_features=features,
                preprocessors=[pp.history_task(prompts.NEXT_SEARCH_ITEM, strings), *post],
                postprocess_fn=metrics_lib.postprocess_identifier, metric_fns=ranking)
  _replace_task(names[prompts.QUERY], source=history_source, output_features=features,
                preprocessors=[pp.history_task(prompts.QUERY, strings), *post],
                postprocess_fn=metrics_lib.postprocess_query,
                metric_fns=[metrics_lib.query_exact_match])
  _replace_task(names[prompts.ADHOC],
                source=sources.pseudo_query_source(pseudo_queries_path, item_ids),
                output_features=features, preprocessors=[pp.adhoc_search(strings), *post],
                postprocess_fn=metrics_lib.postprocess_identifier)
  _replace_task(names[prompts.ITEM_TO_ID], source=item_source, output_features=features,
                preprocessors=[pp.item_to_id(strings), *post],
                postprocess_fn=metrics_lib.postprocess_identifier)
  _replace_task(names[prompts.ID_TO_ITEM], source=item_source, output_features=features,
                preprocessors=[pp.id_to_item(strings), *post])

  if rates is None:
    rates = mixture_rates(stats, num_items=len(item_ids), num_spaces=len(strings.spaces))
  missing = [k for k in prompts.TASK_KINDS if k not in rates]
  if missing:
    raise ValueError(f"rates lack task keys {missing}")
  mixtures = {}
  for key, suffix in MIXTURE_SUFFIXES.items():
    members = [(names[k], rates[k]) for k in MIXTURE_TASKS[key] if rates[k] > 0]
    if not members:
      continue
    mixtures[key] = f"{prefix}{suffix}"
    _replace_mixture(mixtures[key], members)
  return GensarRegistration(prefix=prefix, tasks=names, mixtures=mixtures, rates=dict(rates),
                            rec_space=strings.rec_space, search_space=strings.search_space,
                            vocabulary=vocabulary)


@gin.configurable
def register_gensar(prepared_dir: str = gin.REQUIRED, identifiers_dir: str = gin.REQUIRED,
                    vocab_path: str = gin.REQUIRED, pseudo_queries_path: Optional[str] = None,
                    prefix: str = "gensar", single_id_space: Optional[str] = "sid",
                    rates: Optional[Dict[str, float]] = None) -> GensarRegistration:
  """Registers the six tasks and the mixtures for one dataset and identifier table.

  Args:
    prepared_dir: output of `python -m gensar_jax.prepare`.
    identifiers_dir: output of `python -m gensar_jax.identify` (its items must be the
      prepared dataset's items).
    vocab_path: the SentencePiece model of `python -m gensar_jax.build_vocab`; it must hold
      every identifier token of the table as one piece.
    pseudo_queries_path: the doc2query file for ad-hoc search (see tasks/sources.py); may
      be None or not exist yet, in which case building that task's dataset (alone or in a
      mixture) raises an error naming the file.
    prefix: task and mixture name prefix, so several datasets and ablations coexist.
    single_id_space: "sid" or "cid": also register the `{prefix}_single_id` ablation with
      both item tasks in this space (only when the table has both spaces); None skips it.
    rates: task key -> mixing rate; default `mixture_rates(...)` (gin-configurable).

  Returns:
    The names registered (GensarRegistration).
  """
  if not _NAME.match(prefix):
    raise ValueError(f"prefix {prefix!r} is not a valid SeqIO name")
  prepared = load_prepared(prepared_dir)
  table = load_identifier_table(identifiers_dir)
  vocabulary = vocab_lib.load_vocabulary(vocab_path)
  vocab_lib.require_tokens(vocabulary, vocab_lib.BEHAVIOUR_TOKENS, "behaviour tokens")
  vocab_lib.require_tokens(vocabulary, _table_tokens(table),
                           f"identifier tokens of {identifiers_dir}")
  item_ids = [str(i) for i in prepared.items["item_id"]]
  strings = _identifier_strings(table, item_ids, single_space=None)
  registration = _register(prefix, prepared, strings, vocabulary, pseudo_queries_path, rates)
  if single_id_space is not None and len(strings.by_space) == 2:
    single = _register(f"{prefix}_single_id", prepared,
                       _identifier_strings(table, item_ids, single_space=single_id_space),
                       vocabulary, pseudo_queries_path, rates)
    mixtures = {**registration.mixtures, "single_id": single.mixtures["all"]}
    registration = dataclasses.replace(registration, mixtures=mixtures, single_id=single)
  return registration


@gin.configurable
def gensar_mixture(variant: str = "all") -> str:
  """Registers (with the gin bindings of `register_gensar`) and returns a mixture name.

  For T5X-style gin files: `MIXTURE_OR_TASK_NAME = @gensar_mixture()`.
  """
  registration = register_gensar()
  if variant not in registration.mixtures:
    raise ValueError(f"unknown mixture variant {variant!r}; have "
                     f"{sorted(registration.mixtures)}")
  return registration.mixtures[variant]
