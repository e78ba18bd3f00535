"""Prompt templates of the six GenSAR tasks, and how a prompt is rendered (no TensorFlow).

Each task has a fixed prefix that names it ("Recommendation: ...") followed by one of ten
paraphrased instructions, written for this project. Training samples an instruction
uniformly per example; validation and test always use instruction 0, so evaluation is
deterministic and comparable across checkpoints.

Slots (filled by tasks/preprocessors.py in TensorFlow, by `render` here in Python):
  {history}     the user's earlier events, oldest first, joined with "; ":
                  rec event     "<rec_item>" + CID tokens
                  search event  "<src_query> " + query + "<src_item>" + SID tokens
  {query}       "<src_query> " + the query text
  {item}        item title + description, without a final "." (the template adds one)
  {identifier}  "<src_item>" + SID tokens or "<rec_item>" + CID tokens
  {space}       "search" (SID) or "recommendation" (CID): the identifier space asked for

Whitespace follows the vocabulary's convention (gensar_jax/vocabulary.py): words are
preceded by a space, identifier tokens are glued to each other, and the query text starts
with a space after `<src_query>` so its first word is the same piece as anywhere else.
"""
from __future__ import annotations

import string
from typing import Dict, List, Optional, Sequence, Tuple

from gensar_jax.vocabulary import REC_ITEM, SRC_ITEM, SRC_QUERY

# Task keys, in the order of docs/method.md section 3.
NEXT_REC_ITEM = "next_rec_item"
NEXT_SEARCH_ITEM = "next_search_item"
QUERY = "next_query"
ADHOC = "adhoc_search"
ITEM_TO_ID = "item_to_id"
ID_TO_ITEM = "id_to_item"
TASK_KINDS = (NEXT_REC_ITEM, NEXT_SEARCH_ITEM, QUERY, ADHOC, ITEM_TO_ID, ID_TO_ITEM)
# The mixture variants tasks/gensar.py registers, as `<prefix><suffix>`; the
# ablations name the variant they train by its key.
MIXTURE_SUFFIXES = {
    "all": "",
    "no_adhoc": "_no_adhoc",
    "no_alignment": "_no_alignment",
    "rec_only": "_rec_only",
    "search_only": "_search_only",
}

HISTORY_SEPARATOR = "; "
SPACE_NAMES = {"sid": "search", "cid": "recommendation"}
BEHAVIOUR_OF_SPACE = {"sid": SRC_ITEM, "cid": REC_ITEM}

# The prefix that names the task; every input starts with it.
PREFIXES: Dict[str, str] = {
    NEXT_REC_ITEM: "Recommendation",
    NEXT_SEARCH_ITEM: "Search",
    QUERY: "Query prediction",
    ADHOC: "Ad-hoc search",
    ITEM_TO_ID: "Item to identifier",
    ID_TO_ITEM: "Identifier to item",
}

INSTRUCTIONS: Dict[str, Tuple[str, ...]] = {
    NEXT_REC_ITEM: (
        "The user's recent activity, oldest first: {history}. Which item will the user "
        "engage with next?",
        "Here is what this user did lately: {history}. Recommend the item they are most "
        "likely to pick next.",
        "Given the interaction history {history}, predict the next item for this user.",
        "A user browsed and searched as follows: {history}. Suggest the next item to show "
        "them.",
        "History of the user from earliest to latest: {history}. What should be "
        "recommended next?",
        "Based on these past events: {history}, choose the item this user will consume "
        "next.",
        "Past behaviour: {history}. Name the next item this person is likely to interact "
        "with.",
        "This is a sequence of clicks and searches by one user: {history}. Recommend one "
        "item to follow it.",
        "Considering the activity {history}, which item fits this user next?",
        "Use this user's history {history} to forecast the item they will want next.",
    ),
    NEXT_SEARCH_ITEM: (
        "The user's recent activity, oldest first: {history}. The user now searches for "
        "{query}. Which item will the user click?",
        "Here is what this user did lately: {history}. They type the query {query}. Find "
        "the item they are looking for.",
        "Given the interaction history {history} and the new query {query}, predict the "
        "clicked item.",
        "A user with the history {history} issues the search {query}. Return the most "
        "relevant item for this user.",
        "History of the user from earliest to latest: {history}. Current query: {query}. "
        "Which result will be chosen?",
        "Personalised search. Past events: {history}. Query: {query}. Pick the item that "
        "answers it for this user.",
        "Past behaviour: {history}. Search request: {query}. Name the item the user "
        "will open.",
        "After the activity {history}, the user looks for {query}. Which item satisfies "
        "the search?",
        "Considering the history {history}, retrieve the item this user wants for the "
        "query {query}.",
        "For the query {query} from a user whose history is {history}, which item is the "
        "best match?",
    ),
    QUERY: (
        "The user's recent activity, oldest first: {history}. What will the user search "
        "for next?",
        "Here is what this user did lately: {history}. Predict their next search query.",
        "Given the interaction history {history}, write the query this user is likely to "
        "type next.",
        "A user browsed and searched as follows: {history}. Guess the next thing they "
        "will look for.",
        "History of the user from earliest to latest: {history}. Which query comes next?",
        "Based on these past events: {history}, suggest a search this user would run "
        "next.",
        "Past behaviour: {history}. Complete the user's next search.",
        "This is a sequence of clicks and searches by one user: {history}. What do they "
        "search for after it?",
        "Considering the activity {history}, anticipate the user's next query.",
        "Use this user's history {history} to propose their upcoming search.",
    ),
    ADHOC: (
        "A user searches for {query}. Which item matches this search?",
        "Find the item that best answers the query {query}.",
        "Query: {query}. Return the most relevant item.",
        "Someone types {query}. Which item are they looking for?",
        "Retrieve the item described by the search {query}.",
        "Which item should be the top result for {query}?",
        "Given the search request {query}, name the matching item.",
        "Search the catalogue for {query} and give the best item.",
        "The query is {query}. Pick the item it refers to.",
        "Match this search to one item: {query}.",
    ),
    ITEM_TO_ID: (
        "Item: {item}. Give the {space} identifier of this item.",
        "What is the {space} identifier of the item {item}?",
        "Write the {space} identifier for this item: {item}.",
        "Here is an item description: {item}. Return its {space} identifier.",
        "Map the item {item} to its {space} identifier.",
        "Which {space} identifier belongs to the item {item}?",
        "Encode this item as a {space} identifier: {item}.",
        "Item details: {item}. Output the matching {space} identifier.",
        "Look up the {space} identifier of {item}.",
        "Translate the item text {item} into a {space} identifier.",
    ),
    ID_TO_ITEM: (
        "Identifier: {identifier}. Describe the item it stands for.",
        "Which item has the identifier {identifier}?",
        "Give the title and description of the item {identifier}.",
        "Here is an item identifier: {identifier}. Write out the item.",
        "Decode the identifier {identifier} into item text.",
        "What item does {identifier} refer to?",
        "Tell me about the item with identifier {identifier}.",
        "Name and describe the item behind {identifier}.",
        "Expand the identifier {identifier} into the item's title and description.",
        "The identifier {identifier} belongs to which item?",
    ),
}

# The slots each task's templates must use (checked at import time).
SLOTS: Dict[str, Tuple[str, ...]] = {
    NEXT_REC_ITEM: ("history",),
    NEXT_SEARCH_ITEM: ("history", "query"),
    QUERY: ("history",),
    ADHOC: ("query",),
    ITEM_TO_ID: ("item", "space"),
    ID_TO_ITEM: ("identifier",),
}


def num_templates(task: str) -> int:
  return len(INSTRUCTIONS[task])


def template(task: str, index: int) -> str:
  """The full template (prefix + instruction) of one task."""
  return f"{PREFIXES[task]}: {INSTRUCTIONS[task][index]}"


def segments(task: str, index: int) -> List[Tuple[str, Optional[str]]]:
  """A template as (literal, slot-or-None) pairs, for rendering with tf.strings.join."""
  out = []
  for literal, field, spec, conversion in string.Formatter().parse(template(task, index)):
    if spec or conversion:
      raise ValueError(f"{task} template {index}: slots take no format spec: {field}")
    out.append((literal, field))
  return out


def render(task: str, index: int, **slots: str) -> str:
  """A prompt in Python (the TF renderer gives the same string; tests check it)."""
  return template(task, index).format(**slots)


def history_text(events: Sequence[Tuple[str, str, str]]) -> str:
  """The {history} slot from (kind, identifier tokens, query) events, oldest first.

  `identifier tokens` is the item's identifier in the space of its kind, without the
  behaviour token ("<m0_1><m1_2><c0_3><c1_4>").
  """
  parts = []
  for kind, identifier, query in events:
    if kind == "rec":
      parts.append(f"{REC_ITEM}{identifier}")
    elif kind == "search":
      parts.append(f"{SRC_QUERY} {query}{SRC_ITEM}{identifier}")
    else:
      raise ValueError(f"unknown history event kind {kind!r}")
  return HISTORY_SEPARATOR.join(parts)


def query_text(query: str) -> str:
  """The {query} slot and the next-query target."""
  return f"{SRC_QUERY} {query}"


def item_slot(text: str) -> str:
  """The {item} slot: item text without one trailing period (templates punctuate)."""
  return text[:-1] if text.endswith(".") else text


def identifier_text(space: str, identifier: str) -> str:
  """Behaviour token of the space + identifier tokens: an identifier target."""
  return f"{BEHAVIOUR_OF_SPACE[space]}{identifier}"


def _check_templates() -> None:
  for task in TASK_KINDS:
    if not 8 <= len(INSTRUCTIONS[task]) <= 12:
      raise AssertionError(f"{task}: expected about ten templates")
    if len(set(INSTRUCTIONS[task])) != len(INSTRUCTIONS[task]):
      raise AssertionError(f"{task}: duplicate templates")
    for i in range(len(INSTRUCTIONS[task])):
      fields = [f for _, f in segments(task, i) if f is not None]
      if sorted(set(fields)) != sorted(SLOTS[task]) or len(fields) != len(set(fields)):
        raise AssertionError(f"{task} template {i} uses slots {fields}, expected each of "
                             f"{SLOTS[task]} once")


_check_templates()


# The doc2query model's prompt (tasks/doc2query.py trains on it, gensar_jax/doc2query.py
# samples with it): item text -> a query a user might type.
DOC2QUERY_PREFIX = "Doc2query"
DOC2QUERY_INSTRUCTION = (
    "Write a short search query that a user would type to find this item: {item}.")


def doc2query_prompt(item_text: str) -> str:
  """The doc2query input for one item (Python twin of the TF preprocessor)."""
  return f"{DOC2QUERY_PREFIX}: " + DOC2QUERY_INSTRUCTION.format(item=item_slot(item_text))
