"""The text the vocabulary is trained on: what the model will read and write.

One line per text, drawn from the prepared dataset:
  * every prompt template of every task, rendered `renders_per_template` times with real
    queries and item texts in its slots (so the instruction words, which occur in every
    example, become whole pieces; the history slot holds behaviour tokens and queries);
  * every item text alone (the target of identifier -> item) and every query after
    `<src_query> ` (the next-query target and how queries appear in prompts);
  * pseudo-queries, when a doc2query file is given.
Identifier tokens are left out of the lines: they are user-defined symbols of the model
and never take part in segmentation, so their spelling needs no statistics.
"""
from __future__ import annotations

import random
from typing import List, Optional

from gensar_jax.data.prepared import load_prepared
from gensar_jax import prompts
from gensar_jax.data.pseudo_queries import read_pseudo_queries


def vocabulary_corpus(prepared_dir: str, pseudo_queries_path: Optional[str] = None,
                      renders_per_template: int = 20, seed: int = 0) -> List[str]:
  """The training lines of the vocabulary (deterministic for a seed)."""
  prepared = load_prepared(prepared_dir)
  items = [t for t in prepared.item_texts() if t]
  queries = [q for q in prepared.queries["text"].tolist() if q] if len(prepared.queries) else []
  pseudo = []
  if pseudo_queries_path:
    pseudo = [q for _, q in read_pseudo_queries(pseudo_queries_path)]
  all_queries = queries + pseudo or ["query"]
  rng = random.Random(seed)

  def history() -> str:
    events = []
    for _ in range(rng.randint(2, 6)):
      if rng.random() < 0.5:
        events.append(("rec", "", ""))
      else:
        events.append(("search", "", rng.choice(all_queries)))
    return prompts.history_text(events)

  lines: List[str] = []
  for task in prompts.TASK_KINDS:
    for index in range(prompts.num_templates(task)):
      for _ in range(renders_per_template):
        space = rng.choice(sorted(prompts.SPACE_NAMES))
        slots = {
            "history": history(),
            "query": prompts.query_text(rng.choice(all_queries)),
            "item": prompts.item_slot(rng.choice(items)) if items else "",
            "identifier": prompts.BEHAVIOUR_OF_SPACE[space],
            "space": prompts.SPACE_NAMES[space],
        }
        lines.append(prompts.render(task, index, **{k: slots[k] for k in prompts.SLOTS[task]}))
  lines.extend(items)
  lines.extend(prompts.query_text(q) for q in all_queries)
  return lines
