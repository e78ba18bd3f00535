"""Temperature sampling (optional top-k / top-p) on the beam search's step machinery.

Free-text tasks (e.g. query generation) want diverse samples rather than the most likely
beams. Samples reuse the beam search's decoder step and cache layout: `num_samples` rows per
example play the role of beams, but are never reordered, so the cache needs no gather. With a
trie constraint, each sample draws among the trie's allowed continuations only, which gives
diverse but always valid identifiers.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from gensar_jax.decoding import trie as trie_lib
from gensar_jax.decoding.beam_search import (NEG_INF, BeamSearchResult, TokensToLogits,
                                             step_log_probs, write_position)
from gensar_jax.token_ids import EOS_ID, PAD_ID


def filter_logits(logits: jax.Array, topk: int = 0, topp: float = 0.0) -> jax.Array:
  """Sets logits outside the top-k and/or the top-p nucleus to -inf (last axis).

  topk 0 and topp 0 (or >= 1) disable the respective filter. The most likely token always
  survives, so the distribution never becomes empty.
  """
  if topk > 0 and topk < logits.shape[-1]:
    kth = jax.lax.top_k(logits, topk)[0][..., -1:]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if 0.0 < topp < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]                 # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs                     # exclusive cumsum
    keep_sorted = mass_before < topp                                     # first always kept
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, NEG_INF, logits)
  return logits


def temperature_sample(tokens_to_logits: TokensToLogits, initial_cache: Any, batch_size: int,
                       num_samples: int, decode_length: int, rng: jax.Array, *,
                       temperature: float = 1.0, topk: int = 0, topp: float = 0.0,
                       eos_id: int = EOS_ID,
                       constraint: Optional[trie_lib.TrieArrays] = None) -> BeamSearchResult:
  """Draws `num_samples` sequences per example (cache rows batch * num_samples).

  Without a constraint, a sample stops at eos_id (later positions are PAD) or at
  decode_length. With one, exactly decode_length tokens are drawn along the trie and `items`
  names the sampled item. Scores are the untempered log-probs of the drawn tokens, summed.
  temperature 0 picks the most likely (allowed) token: greedy decoding.
  """
  if num_samples < 1 or decode_length < 1:
    raise ValueError(f"num_samples ({num_samples}) and decode_length ({decode_length}) "
                     "must be >= 1")
  if constraint is not None and decode_length != constraint.num_levels:
    raise ValueError(f"decode_length {decode_length} != identifier length "
                     f"{constraint.num_levels} of the constraint trie")
  b, s = batch_size, num_samples

  def choose(logits, log_probs, key):
    """Draws one index per row from logits [b, s, n]; returns (index, its log-prob)."""
    if temperature == 0.0:
      index = jnp.argmax(logits, axis=-1)
    else:
      tempered = filter_logits(logits / temperature, topk, topp)
      index = jax.random.categorical(key, tempered, axis=-1)
    return index, jnp.take_along_axis(log_probs, index[..., None], axis=-1)[..., 0]

  def body(carry):
    step, sequences, scores, last, done, state, cache, key = carry
    key, draw_key = jax.random.split(key)
    log_probs, logits, cache = step_log_probs(tokens_to_logits, last, cache)  # [b, s, vocab]
    if constraint is None:
      token, token_lp = choose(logits, log_probs, draw_key)               # [b, s]
      token = jnp.where(done, PAD_ID, token)
      scores = scores + jnp.where(done, 0.0, token_lp)
      done = done | (token == eos_id)
    else:
      tokens, nxt, valid = trie_lib.step_candidates(constraint, step, state)  # [b, s, width]
      allowed_logits = jnp.where(valid, jnp.take_along_axis(logits, tokens, -1), NEG_INF)
      allowed_lp = jnp.take_along_axis(log_probs, tokens, -1)
      index, token_lp = choose(allowed_logits, allowed_lp, draw_key)     # [b, s]
      token = jnp.take_along_axis(tokens, index[..., None], -1)[..., 0]
      state = jnp.take_along_axis(nxt, index[..., None], -1)[..., 0]
      scores = scores + token_lp
    sequences = write_position(sequences, step, token)
    return step + 1, sequences, scores, token, done, state, cache, key

  def cond(carry):
    step, done = carry[0], carry[4]
    return (step < decode_length) & ~jnp.all(done)

  carry = (jnp.int32(0), jnp.zeros((b, s, decode_length), jnp.int32), jnp.zeros((b, s)),
           jnp.full((b, s), PAD_ID, jnp.int32), jnp.zeros((b, s), bool),
           jnp.zeros((b, s), jnp.int32), initial_cache, rng)
  _, sequences, scores, _, _, state, _, _ = jax.lax.while_loop(cond, body, carry)
  items = None
  if constraint is not None:
    items = trie_lib.leaf_items(constraint, state)
  return BeamSearchResult(sequences=sequences, scores=scores, items=items)
