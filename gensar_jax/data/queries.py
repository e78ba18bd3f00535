"""Semi-synthetic search, the Amazon product-search convention (Ai et al., SIGIR 2017).

An item's category path becomes a query: its words lower-cased, punctuation dropped,
stop-words and repeated words removed, one-level paths ignored ("Electronics" alone says
nothing a user would search for). A user's interaction with an item carrying such a query
becomes a search session {query, clicked item, time}; the interaction stays a
recommendation event too. Queries are kept as text and numbered in order of first use.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence

import gin
import numpy as np
import pandas as pd

from gensar_jax.data.schema import SEARCH, SearchRecLog

# The classic English stop-word list (NLTK's), written out so no corpus download is needed.
STOP_WORDS = frozenset("""
a about above after again against ain all am an and any are aren aren't as at be because
been before being below between both but by can couldn couldn't d did didn didn't do does
doesn doesn't doing don don't down during each few for from further had hadn hadn't has
hasn hasn't have haven haven't having he her here hers herself him himself his how i if in
into is isn isn't it it's its itself just ll m ma me mightn mightn't more most mustn
mustn't my myself needn needn't no nor not now o of off on once only or other our ours
ourselves out over own re s same shan shan't she she's should should've shouldn shouldn't
so some such t than that that'll the their theirs them themselves then there these they
this those through to too under until up ve very was wasn wasn't we were weren weren't
what when where which while who whom why will with won won't wouldn wouldn't y you you'd
you'll you're you've your yours yourself yourselves
""".split())

_WORD = re.compile(r"[a-z0-9]+")


def category_path_to_query(path: Sequence[str]) -> Optional[str]:
  """"Electronics > Computers & Accessories > Cables" -> "electronics computers accessories
  cables"; None for one-level paths or paths with no content words."""
  if len(path) < 2:
    return None
  words, seen = [], set()
  for level in path:
    for word in _WORD.findall(level.lower()):
      if word in STOP_WORDS or word in seen:
        continue
      seen.add(word)
      words.append(word)
  return " ".join(words) if words else None


def item_queries(categories: Sequence[Sequence[Sequence[str]]]) -> List[List[str]]:
  """Distinct queries of each item, in category-path order."""
  out = []
  for paths in categories:
    queries = []
    for path in paths:
      query = category_path_to_query(path)
      if query is not None and query not in queries:
        queries.append(query)
    out.append(queries)
  return out


@gin.configurable
def add_semi_synthetic_search(log: SearchRecLog, seed: int = 0) -> SearchRecLog:
  """Adds a search session for every rec interaction whose item carries a query.

  An item with several category paths has several queries; each interaction picks one with a
  generator seeded by `seed`, so the result is the same on every run.
  """
  queries = item_queries(log.items["categories"])
  per_item: Dict[str, List[str]] = dict(zip(log.items["item_id"], queries))
  rec = log.events[log.events["kind"] != SEARCH]
  options = [per_item[i] for i in rec["item_id"]]
  has_query = np.array([len(o) > 0 for o in options], dtype=bool)
  rng = np.random.default_rng(seed)
  draws = rng.random(len(options))  # one draw per interaction, used or not: stable
  chosen = [o[int(d * len(o))] for o, d, h in zip(options, draws, has_query) if h]
  search = rec[has_query].copy()
  search["kind"] = SEARCH
  search["query"] = chosen
  events = pd.concat([log.events, search], ignore_index=True)
  return SearchRecLog(items=log.items, events=events, items_path=log.items_path,
                      events_path=log.events_path)


def normalise_query(text: str) -> str:
  """Whitespace-normalised, lower-cased query text: the key that gives a query its id."""
  return " ".join(str(text).lower().split())
