"""Non-generative baselines scored on exactly the candidates GenSAR ranks.

  popularity  rec and search: how often the item was interacted with in the training period
  bm25        search: lexical match of the query against the item text
  dense       search: MiniLM cosine between the query and the item text
  (SASRec, the rec baseline, is trained by the identifiers stage; `run` reads its metrics.)

Every baseline only turns a held-out sample into one score per candidate; `run` turns the
scores into ranks and metrics with `gensar_jax.metrics`, so ties and cut-offs are treated the
same as for the generative model. The text retrievers read the item text `prepare` stored
(gensar_jax/data/item_text.py), the same text the sentence encoder and doc2query read.
"""
from __future__ import annotations
