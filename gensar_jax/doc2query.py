"""Doc2query: a text -> query model, and one sampled pseudo-query per catalogue item.

GenSAR's ad-hoc search task (docs/method.md section 3) teaches the model to find items
from queries alone, including items no user ever searched for. The pseudo-queries come
from the same encoder-decoder architecture trained on (item text, query) pairs of the
search training split (tasks/doc2query.py), then sampled for every item. The pipeline runs
the training with `python -m gensar_jax.train` machinery inside the gin scope "doc2query",
so an experiment file binds e.g. `doc2query/train.train_steps` without touching GenSAR's.

Generation here: the prompt of every item, one compiled temperature-sampling loop over
fixed-shape batches (gensar_jax/decoding/sampling.py), special tokens (identifier and
behaviour pieces) and the vocabulary's padding ids masked so a query is plain text. Output
is the pseudo-queries file the ad-hoc task reads (tasks/sources.py), written atomically,
plus statistics including how often a pseudo-query merely copies its item's text.
"""
from __future__ import annotations

if __name__ == "__main__":  # one gin registration: run as the importable module
  import gensar_jax.gin_utils as _gin_utils
  _gin_utils.run_module("gensar_jax.doc2query")

import json
import os
import uuid
from typing import Dict, List, Sequence, Union

import gin
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from gensar_jax import restore
from gensar_jax import vocabulary as vocab_lib
from gensar_jax.data.prepared import load_prepared
from gensar_jax.decoding.beam_search import model_tokens_to_logits
from gensar_jax.decoding.sampling import temperature_sample
from gensar_jax.models.encoder_decoder import build_model
from gensar_jax.prompts import doc2query_prompt


def _normalise(text: str) -> str:
  return " ".join(text.lower().split())


def copy_rate(queries: Sequence[str], item_texts: Sequence[str]) -> float:
  """Share of pseudo-queries that are the item's text or a verbatim piece of it of 4+ words.

  Short overlaps are expected (a query naming the genre); a long verbatim span means the
  model learned to copy rather than to ask.
  """
  copies = 0
  for query, text in zip(queries, item_texts):
    q, t = _normalise(query), _normalise(text)
    copies += bool(q) and (q == t or (len(q.split()) >= 4 and q in t))
  return copies / max(len(queries), 1)


def _sampler(model, vocabulary, num_samples: int, max_length: int, temperature: float,
             topk: int, topp: float):
  banned = np.zeros((model.module.config.require_vocab_size(),), bool)
  banned[vocabulary.vocab_size:] = True   # padding ids past the real vocabulary
  banned[list(vocab_lib.special_token_ids(vocabulary).values())] = True
  banned = jnp.asarray(banned)

  def sample(params, tokens, rng):
    to_logits, init_cache = model_tokens_to_logits(model, params, tokens, num_samples)

    def masked(last, cache):
      logits, cache = to_logits(last, cache)
      return jnp.where(banned, -1e9, logits), cache   # [batch * samples, vocab]

    return temperature_sample(masked, init_cache(max_length), tokens.shape[0], num_samples,
                              max_length, rng, temperature=temperature, topk=topk,
                              topp=topp).sequences   # [batch, samples, length]

  return jax.jit(sample)


@gin.configurable
def generate_pseudo_queries(model_dir: str = gin.REQUIRED, prepared_dir: str = gin.REQUIRED,
                            vocab_path: str = gin.REQUIRED, output_path: str = gin.REQUIRED,
                            queries_per_item: int = 1, input_length: int = 64,
                            max_query_length: int = 16, temperature: float = 1.0,
                            topk: int = 0, topp: float = 0.9, batch_size: int = 64,
                            checkpoint: Union[str, int] = "best", seed: int = 0,
                            progress: bool = True) -> Dict:
  """Samples pseudo-queries for every item; returns statistics (also in `<output>.stats`)."""
  if queries_per_item < 1:
    raise ValueError(f"queries_per_item must be >= 1, got {queries_per_item}")
  prepared = load_prepared(prepared_dir)
  vocabulary = vocab_lib.load_vocabulary(vocab_path)
  model = build_model(vocabulary)
  params, step = restore.load_params(model_dir, model, checkpoint)
  item_ids = [str(i) for i in prepared.items["item_id"]]
  texts = prepared.item_texts()
  eos = 1 if vocabulary.eos_id is None else int(vocabulary.eos_id)
  prompts = np.zeros((len(texts), input_length), np.int32)   # [items, input_length]
  for i, text in enumerate(texts):
    ids = list(vocabulary.encode(doc2query_prompt(text)))[:input_length - 1] + [eos]
    prompts[i, :len(ids)] = ids
  sample = _sampler(model, vocabulary, queries_per_item, max_query_length, temperature,
                    topk, topp)
  rng = jax.random.PRNGKey(seed)
  generated: List[List[str]] = []
  for lo in tqdm(range(0, len(texts), batch_size), desc="pseudo-queries", unit=" batch",
                 disable=not progress):
    chunk = prompts[lo:lo + batch_size]
    rows = chunk.shape[0]
    if rows < batch_size:   # one compiled shape: pad the last batch
      chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - rows, axis=0)])
    sequences = np.asarray(sample(params, chunk, jax.random.fold_in(rng, lo)))
    for row in sequences[:rows]:
      generated.append([vocabulary.decode([int(t) for t in s if t > 0]).strip()
                        for s in row])
  lines, flat, flat_texts, empty = [], [], [], 0
  for item, text, queries in zip(item_ids, texts, generated):
    kept = [q for q in queries if q]
    empty += len(queries) - len(kept)
    if kept:
      lines.append(json.dumps({"item_id": item, "queries": kept}, ensure_ascii=False))
      flat.extend(kept)
      flat_texts.extend([text] * len(kept))
  if not flat:
    raise ValueError(f"the doc2query model in {model_dir} generated only empty queries; "
                     "train it longer")
  train_queries = {_normalise(q) for q in prepared.queries["text"]}
  stats = {
      "items": len(item_ids),
      "items_with_queries": len(lines),
      "pseudo_queries": len(flat),
      "empty_samples": empty,
      "distinct_queries": len({_normalise(q) for q in flat}),
      "seen_in_training_queries": float(np.mean([_normalise(q) in train_queries
                                                 for q in flat])),
      "copy_rate": copy_rate(flat, flat_texts),
      "mean_words": float(np.mean([len(q.split()) for q in flat])),
      "checkpoint_step": int(step),
      "examples": [{"item": t, "query": q} for t, q in list(zip(flat_texts, flat))[:3]],
  }
  parent = os.path.dirname(os.path.abspath(output_path))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(output_path)}.tmp-{uuid.uuid4().hex[:8]}")
  with open(tmp, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(tmp, output_path)
  with open(output_path + ".stats.json", "w", encoding="utf-8") as f:
    json.dump(stats, f, indent=2)
  return stats


def format_stats(stats: Dict) -> str:
  lines = ["pseudo-queries (doc2query)", "-" * 48]
  for key in ("items", "items_with_queries", "pseudo_queries", "distinct_queries",
              "seen_in_training_queries", "copy_rate", "mean_words"):
    value = stats[key]
    lines.append(f"{key:<28} {value:.3f}" if isinstance(value, float)
                 else f"{key:<28} {value:,}")
  for ex in stats.get("examples", []):
    lines.append(f"  {ex['item'][:60]!r} -> {ex['query']!r}")
  return "\n".join(lines)


def main() -> None:
  print(format_stats(generate_pseudo_queries()))

