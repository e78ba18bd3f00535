"""TensorFlow preprocessors: prepared examples -> {"inputs", "targets"} strings of each task.

Everything runs inside tf.data (no Python per example):
  * item id -> identifier string through one `tf.lookup.StaticHashTable` per identifier
    space, built when a dataset is requested;
  * the history slot is rendered with vectorised string ops (docs/method.md section 2):
    rec events "<rec_item>" + CID, search events "<src_query> " + query + "<src_item>" +
    SID, oldest first, joined with "; ";
  * the instruction template is drawn per example with a stateless uniform draw from the
    per-example seed SeqIO hands to `map_over_dataset(num_seeds=1)` preprocessors (so a
    seeded `get_dataset` is reproducible, and repeated epochs draw afresh); examples of the
    validation and test splits always use template 0. The template is rendered with a
    `tf.switch_case` over the templates of gensar_jax/prompts.py.

Prompt budget. Given the task's input length (SeqIO's `sequence_length`), a prompt is made
to fit *before* it is rendered, so SeqIO's trim-from-the-end never cuts what matters most:
history prompts drop their oldest events first (the instruction and the search query stay
whole), item prompts cut the item text (the instruction stays whole). Token counts come
from the task's own vocabulary; `prompt_shortened` (int32, 0/1) records whether anything
was dropped, and `python -m gensar_tasks.show` reports the share. Without a length (sequence_length
None, e.g. inspection) prompts are rendered whole.

Besides "inputs" and "targets" (strings here; tokenized by `seqio.preprocessors.tokenize`)
each example keeps a few features for evaluation and inspection; the feature converters
and mixtures drop them:
  template                int32, the template index used
  prompt_shortened        int32, 1 if the prompt budget dropped history events or item text
  target_item             the target's item id
  rec/search/query tasks: user_id, timestamp, history_item, history_timestamp
  rec/search tasks:       candidate_items [c] and candidate_identifiers [c]: the candidates'
                          item ids and their full identifier strings, behaviour token
                          included (what the decoder may generate; empty in train)
  alignment tasks:        space ("sid" or "cid")
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from gensar_jax.vocabulary import REC_ITEM, SRC_ITEM, SRC_QUERY
from gensar_jax import prompts
from gensar_tasks.sources import SPLIT, TRAIN

Preprocessor = Callable[[tf.data.Dataset], tf.data.Dataset]


@dataclasses.dataclass
class IdentifierStrings:
  """Identifier strings per space, keyed by item id, and which space each task uses.

  Attributes:
    item_ids: the catalogue's item ids (strings).
    by_space: {"sid" | "cid": identifier string per item, e.g. "<m0_1><m1_2><s0_3><s1_4>"}.
    rec_space: the space of recommendation targets and rec history events ("cid" unless
      the table has only SIDs or a single-identifier ablation is asked for).
    search_space: the space of search targets and search history events.
  """
  item_ids: List[str]
  by_space: Dict[str, List[str]]
  rec_space: str
  search_space: str

  def __post_init__(self):
    for space in (self.rec_space, self.search_space):
      if space not in self.by_space:
        raise ValueError(f"identifier space {space!r} is not in the table "
                         f"(has {sorted(self.by_space)})")
    self._keys = np.asarray([i.encode("utf-8") for i in self.item_ids], dtype=object)
    self._values = {s: np.asarray([v.encode("utf-8") for v in values], dtype=object)
                    for s, values in self.by_space.items()}

  @property
  def spaces(self) -> List[str]:
    """The spaces in use (alignment rows are made for each), SID first."""
    return [s for s in ("sid", "cid") if s in (self.rec_space, self.search_space)]

  def tables(self) -> Dict[str, tf.lookup.StaticHashTable]:
    """One item id -> identifier table per space in use (create inside get_dataset)."""
    keys = tf.constant(self._keys, dtype=tf.string)
    return {space: tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(keys, tf.constant(self._values[space],
                                                              dtype=tf.string)),
        default_value="") for space in self.spaces}


def render_template(task: str, index: tf.Tensor, slots: Mapping[str, tf.Tensor]) -> tf.Tensor:
  """The prompt of template `index` (a scalar int32 tensor) with its slots filled."""

  def branch(i: int):
    def render():
      parts = []
      for literal, field in prompts.segments(task, i):
        if literal:
          parts.append(tf.constant(literal))
        if field is not None:
          parts.append(slots[field])
      return tf.strings.join(parts)
    return render

  return tf.switch_case(index, [branch(i) for i in range(prompts.num_templates(task))])


def template_index(task: str, split: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Uniform over the task's templates in train, 0 otherwise (int32 scalar).

  The task's position in TASK_KINDS is folded into the seed: SeqIO starts every task of a
  mixture from the same map seed, and the tasks' template sequences should not move in
  lockstep.
  """
  seed = tf.random.experimental.stateless_fold_in(
      tf.cast(seed, tf.int64), prompts.TASK_KINDS.index(task))
  drawn = tf.random.stateless_uniform([], seed=seed, minval=0,
                                      maxval=prompts.num_templates(task), dtype=tf.int32)
  return tf.where(tf.equal(split, TRAIN), drawn, tf.constant(0, tf.int32))


def history_events(kinds: tf.Tensor, items: tf.Tensor, queries: tf.Tensor,
                   rec_table: tf.lookup.StaticHashTable,
                   search_table: tf.lookup.StaticHashTable) -> tf.Tensor:
  """[h] history events -> [h] event strings, oldest first."""
  rec = tf.strings.join([REC_ITEM, rec_table.lookup(items)])  # [h]
  search = tf.strings.join([SRC_QUERY, " ", queries, SRC_ITEM,
                            search_table.lookup(items)])  # [h]
  return tf.where(tf.equal(kinds, "rec"), rec, search)  # [h]


def _token_count(vocabulary: seqio.Vocabulary, text: tf.Tensor) -> tf.Tensor:
  return tf.size(vocabulary.encode_tf(text), out_type=tf.int32)


def input_budget(sequence_length: Optional[Mapping[str, int]]) -> Optional[int]:
  """Tokens a prompt may have before EOS, or None (no length: render whole)."""
  if not sequence_length or not sequence_length.get("inputs"):
    return None
  return int(sequence_length["inputs"]) - 1


def budgeted_history(task: str, index: tf.Tensor, slots: Mapping[str, tf.Tensor],
                     events: tf.Tensor, vocabulary: seqio.Vocabulary, budget: int):
  """(prompt, events dropped): the newest events that fit `budget` tokens with the rest of
  the prompt whole. Event costs are estimated from each event's own tokens, then the
  rendered prompt is checked exactly (and one more event dropped while it does not fit)."""
  num_events = tf.size(events)
  fixed = _token_count(vocabulary, render_template(task, index, {**slots,
                                                                 "history": tf.constant("")}))
  costs = vocabulary.encode_tf(
      tf.strings.join([prompts.HISTORY_SEPARATOR, events])).row_lengths()  # [h]
  newest_first = tf.cumsum(tf.reverse(tf.cast(costs, tf.int32), [0]))    # [h]
  estimate = tf.reduce_sum(tf.cast(newest_first <= budget - fixed, tf.int32))

  def prompt(keep):
    history = tf.strings.reduce_join(events[num_events - keep:],
                                     separator=prompts.HISTORY_SEPARATOR)
    return render_template(task, index, {**slots, "history": history})

  keep = tf.while_loop(
      lambda keep: (keep > 0) & (_token_count(vocabulary, prompt(keep)) > budget),
      lambda keep: [keep - 1], [estimate])
  keep = keep[0] if isinstance(keep, (list, tuple)) else keep
  return prompt(keep), num_events - keep


def budgeted_item_text(task: str, index: tf.Tensor, slots: Mapping[str, tf.Tensor],
                       item: tf.Tensor, vocabulary: seqio.Vocabulary, budget: int):
  """(item slot, cut): the item text cut to the tokens the rest of the prompt leaves."""
  fixed = _token_count(vocabulary, render_template(task, index, {**slots,
                                                                 "item": tf.constant("")}))
  tokens = vocabulary.encode_tf(item)
  room = tf.maximum(budget - fixed, 0)
  cut = tf.size(tokens, out_type=tf.int32) > room
  text = tf.cond(cut, lambda: vocabulary.decode_tf(tokens[:room]), lambda: item)
  return text, cut


def item_slot(text: tf.Tensor) -> tf.Tensor:
  """TF twin of prompts.item_slot: drop one trailing period."""
  return tf.strings.regex_replace(text, r"\.$", "")


def _behaviour_and_space(space: tf.Tensor):
  is_sid = tf.equal(space, "sid")
  return (tf.where(is_sid, SRC_ITEM, REC_ITEM),
          tf.where(is_sid, prompts.SPACE_NAMES["sid"], prompts.SPACE_NAMES["cid"]))


def _lookup_in_space(tables, space: tf.Tensor, item: tf.Tensor) -> tf.Tensor:
  if len(tables) == 1:
    return next(iter(tables.values())).lookup(item)
  return tf.where(tf.equal(space, "sid"), tables["sid"].lookup(item),
                  tables["cid"].lookup(item))


def history_task(task: str, strings: IdentifierStrings) -> Preprocessor:
  """Next rec item, next search item or next query from prepared examples."""
  if task not in (prompts.NEXT_REC_ITEM, prompts.NEXT_SEARCH_ITEM, prompts.QUERY):
    raise ValueError(f"{task} is not a history task")
  kind = "rec" if task == prompts.NEXT_REC_ITEM else "search"

  def preprocess(ds: tf.data.Dataset, sequence_length=None,
                 output_features=None) -> tf.data.Dataset:
    tables = strings.tables()
    rec_table, search_table = tables[strings.rec_space], tables[strings.search_space]
    ds = ds.filter(lambda ex: tf.equal(ex["kind"], kind))
    budget = input_budget(sequence_length)

    @seqio.map_over_dataset(num_seeds=1)
    def build(ex, seed):
      events = history_events(ex["history_kind"], ex["history_item"], ex["history_query"],
                              rec_table, search_table)
      slots = {}
      if task == prompts.NEXT_SEARCH_ITEM:
        slots["query"] = tf.strings.join([SRC_QUERY, " ", ex["query"]])
      index = template_index(task, ex[SPLIT], seed)
      if budget is None:
        inputs = render_template(task, index, {
            **slots, "history": tf.strings.reduce_join(
                events, separator=prompts.HISTORY_SEPARATOR)})
        dropped = tf.constant(0, tf.int32)
      else:
        inputs, dropped = budgeted_history(task, index, slots, events,
                                           output_features["inputs"].vocabulary, budget)
      out = {
          "inputs": inputs,
          "prompt_shortened": tf.cast(dropped > 0, tf.int32),
          "template": index,
          "user_id": ex["user_id"],
          "timestamp": ex["timestamp"],
          "target_item": ex["target_item"],
          "history_item": ex["history_item"],
          "history_timestamp": ex["history_timestamp"],
      }
      if task == prompts.QUERY:
        out["targets"] = tf.strings.join([SRC_QUERY, " ", ex["query"]])
      else:
        behaviour, table = ((REC_ITEM, rec_table) if task == prompts.NEXT_REC_ITEM
                            else (SRC_ITEM, search_table))
        out["targets"] = tf.strings.join([behaviour, table.lookup(ex["target_item"])])
        out["candidate_items"] = ex["candidates"]
        out["candidate_identifiers"] = tf.strings.join(
            [behaviour, table.lookup(ex["candidates"])])  # [c]
      return out

    return build(ds)

  return preprocess


def adhoc_search(strings: IdentifierStrings) -> Preprocessor:
  """(item, pseudo-query) -> "<src_query> query" prompt, "<src_item>" + search ID target."""

  def preprocess(ds: tf.data.Dataset) -> tf.data.Dataset:
    search_table = strings.tables()[strings.search_space]

    @seqio.map_over_dataset(num_seeds=1)
    def build(ex, seed):
      index = template_index(prompts.ADHOC, ex[SPLIT], seed)
      query = tf.strings.join([SRC_QUERY, " ", ex["query"]])
      return {
          "inputs": render_template(prompts.ADHOC, index, {"query": query}),
          "targets": tf.strings.join([SRC_ITEM, search_table.lookup(ex["item_id"])]),
          "template": index,
          "target_item": ex["item_id"],
      }

    return build(ds)

  return preprocess


def item_to_id(strings: IdentifierStrings) -> Preprocessor:
  """Item text -> identifier in the row's space (behaviour token of that space first)."""

  def preprocess(ds: tf.data.Dataset, sequence_length=None,
                 output_features=None) -> tf.data.Dataset:
    tables = strings.tables()
    budget = input_budget(sequence_length)

    @seqio.map_over_dataset(num_seeds=1)
    def build(ex, seed):
      index = template_index(prompts.ITEM_TO_ID, ex[SPLIT], seed)
      behaviour, space_name = _behaviour_and_space(ex["space"])
      identifier = _lookup_in_space(tables, ex["space"], ex["item_id"])
      item, cut = item_slot(ex["item_text"]), tf.constant(False)
      if budget is not None:
        item, cut = budgeted_item_text(prompts.ITEM_TO_ID, index, {"space": space_name},
                                       item, output_features["inputs"].vocabulary, budget)
      return {
          "inputs": render_template(prompts.ITEM_TO_ID, index,
                                    {"item": item, "space": space_name}),
          "prompt_shortened": tf.cast(cut, tf.int32),
          "targets": tf.strings.join([behaviour, identifier]),
          "template": index,
          "target_item": ex["item_id"],
          "space": ex["space"],
      }

    return build(ds)

  return preprocess


def id_to_item(strings: IdentifierStrings) -> Preprocessor:
  """Identifier (behaviour token of its space first) -> item title + description."""

  def preprocess(ds: tf.data.Dataset) -> tf.data.Dataset:
    tables = strings.tables()

    @seqio.map_over_dataset(num_seeds=1)
    def build(ex, seed):
      index = template_index(prompts.ID_TO_ITEM, ex[SPLIT], seed)
      behaviour, _ = _behaviour_and_space(ex["space"])
      identifier = tf.strings.join(
          [behaviour, _lookup_in_space(tables, ex["space"], ex["item_id"])])
      return {
          "inputs": render_template(prompts.ID_TO_ITEM, index, {"identifier": identifier}),
          "targets": ex["item_text"],
          "template": index,
          "target_item": ex["item_id"],
          "space": ex["space"],
      }

    return build(ds)

  return preprocess


def standard_postprocessing() -> Sequence[Preprocessor]:
  """Tokenize (keeping *_pretokenized) and append EOS after trimming."""
  return (seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim)
