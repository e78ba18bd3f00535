"""Beam search that stays on device: trie-constrained for identifiers, free for text.

The published GenSAR code constrains Hugging Face beam search with a Python callback per beam
per step. Here the whole search is one traced loop: the trie state rides beside each beam and
is gathered with it (like the decoder cache), allowed tokens come from table lookups
(trie.level_candidates), and top-k runs over the allowed candidates only
([batch, beams * max_branch[level]] rather than [batch, beams * vocab]); log-probs are
normalised per beam but only read at those candidates, never written for the whole vocab.
Step 0 runs the decoder on beam 0 of each example alone, since every beam starts alike.
Call it inside jax.jit; num_beams and decode_length are static.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Protocol, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gensar_jax.decoding import trie as trie_lib
from gensar_jax.token_ids import EOS_ID, PAD_ID

NEG_INF = -np.inf


class TokensToLogits(Protocol):
  """One decoder step: tokens [batch * beams, 1] -> (logits [batch * beams, vocab], cache)."""

  def __call__(self, tokens: jax.Array, cache: Any) -> Tuple[jax.Array, Any]:
    ...


@struct.dataclass
class BeamSearchResult:
  sequences: jax.Array  # [batch, beams, length] tokens, best beam first
  scores: jax.Array     # [batch, beams] sum of log-softmax over the vocab; -inf if invalid
  items: Optional[jax.Array] = None  # [batch, beams] trie item index, -1 if invalid


# ----------------------------------------------------------------------------- shared machinery


def gather_beams(tree: Any, beam_indices: jax.Array, batch_size: int, num_beams: int) -> Any:
  """Reorders every [batch * old_beams, ...] leaf to the beams in `beam_indices` [batch, new].

  Scalar leaves (e.g. a cache index shared by all beams) pass through unchanged; any other
  leaf must be flattened batch-major like the decoder cache.
  """
  # Row of each picked beam in the flat [batch * old_beams] axis. [batch * new]
  rows = (jnp.arange(batch_size)[:, None] * num_beams + beam_indices).reshape(-1)

  def gather(x):
    x = jnp.asarray(x)
    if x.ndim == 0:
      return x
    if x.shape[0] != batch_size * num_beams:
      raise ValueError(f"cache leaf of shape {x.shape} has leading dim {x.shape[0]}, expected "
                       f"batch * beams = {batch_size * num_beams} (or a scalar)")
    # One row gather; beam indices come from top_k over this batch's beams, so they are in
    # bounds, and promising it spares XLA the out-of-bounds select it would otherwise fuse
    # into every cache leaf's copy (a quarter of the copy's time on CPU).
    return x.at[rows].get(mode="promise_in_bounds")  # [batch * new, ...]

  return jax.tree.map(gather, tree)


def gather_batch_beams(x: jax.Array, beam_indices: jax.Array) -> jax.Array:
  """x [batch, beams, ...] -> [batch, new, ...] picking beam_indices [batch, new]."""
  index = beam_indices.reshape(beam_indices.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def step_log_probs(tokens_to_logits: TokensToLogits, last_tokens: jax.Array, cache: Any):
  """Runs the decoder one step for [batch, beams] last tokens -> log-probs [batch, beams, V]."""
  logits, cache = step_logits(tokens_to_logits, last_tokens, cache)   # [batch, beams, vocab]
  return jax.nn.log_softmax(logits, axis=-1), logits, cache


def write_position(sequences: jax.Array, step: jax.Array, tokens: jax.Array) -> jax.Array:
  """sequences [..., length] with position `step` set to tokens [...] (step may be traced)."""
  at_step = jnp.arange(sequences.shape[-1]) == step          # [length]
  return jnp.where(at_step, tokens[..., None], sequences)


def _first_beam_alive(batch_size: int, num_beams: int) -> jax.Array:
  """[batch, beams] 0 for beam 0 and -inf elsewhere, so identical start beams never duplicate."""
  return jnp.where(jnp.arange(num_beams) == 0, 0.0, NEG_INF)[None].repeat(batch_size, 0)


# ----------------------------------------------------------------------------- constrained


def step_logits(tokens_to_logits: TokensToLogits, last_tokens: jax.Array, cache: Any):
  """Runs the decoder one step for [batch, beams] last tokens -> float32 logits [b, k, V]."""
  batch, beams = last_tokens.shape
  logits, cache = tokens_to_logits(last_tokens.reshape(batch * beams, 1), cache)
  return logits.astype(jnp.float32).reshape(batch, beams, -1), cache


def log_normaliser(logits: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """(max, log-sum-exp of logits - max), each [..., 1], for logits [..., vocab].

  log_softmax(logits)[t] == (logits[t] - max) - lse, computed in the same order as
  jax.nn.log_softmax. The constrained search needs it only at the few allowed tokens, so it
  reduces over the vocabulary without writing a [batch, beams, vocab] log-prob array.
  """
  top = jnp.max(logits, axis=-1, keepdims=True)                          # [..., 1]
  return top, jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1, keepdims=True))


def _expand_level(trie: trie_lib.TrieArrays, level: int, logits, top, lse, scores, state):
  """Best `beams` extensions of every beam at one level (static), from its children only.

  Candidates are max_branch[level] wide, so the top-k runs over beams * (that level's
  branching) rather than beams * vocab or beams * (the widest level's branching).

  Args:
    logits: [b, k, vocab] float32; top, lse: [b, k, 1] from log_normaliser.
    scores: [b, k] running log-probs (-inf for dead beams); state: [b, k] trie states.
  Returns:
    (scores, parent beam, token, next state), each [b, k].
  """
  b, k = scores.shape
  tokens, nxt, valid = trie_lib.level_candidates(trie, level, state)     # [b, k, width]
  width = tokens.shape[-1]
  token_lp = (jnp.take_along_axis(logits, tokens, axis=-1) - top) - lse  # [b, k, width]
  total = jnp.where(valid, scores[..., None] + token_lp, NEG_INF)        # [b, k, width]
  top_scores, flat = jax.lax.top_k(total.reshape(b, k * width), k)      # [b, k]
  new_tokens = jnp.take_along_axis(tokens.reshape(b, k * width), flat, axis=1)
  new_state = jnp.take_along_axis(nxt.reshape(b, k * width), flat, axis=1)
  return top_scores, flat // width, new_tokens, new_state


def _constrained_first_step(tokens_to_logits, cache, b: int, k: int, trie: trie_lib.TrieArrays):
  """Step 0 for beam 0 of each example alone, then its state copied to all k beams.

  Every beam starts from the same PAD token and an empty cache, and only beam 0 is alive
  (the others start at -inf so identical beams never duplicate), so running the decoder on
  all b * k rows at step 0 would compute b * (k - 1) rows nobody reads: a sixth of the
  decoder's work for 6-token identifiers. Here the decoder runs on b rows (the cache's rows
  of beam 0) and its cache is copied to every beam afterwards. Returns (scores, tokens,
  states, cache for b * k rows), like one loop step.
  """
  cache = gather_beams(cache, jnp.zeros((b, 1), jnp.int32), b, k)       # b rows
  logits, cache = step_logits(tokens_to_logits, jnp.full((b, 1), PAD_ID, jnp.int32), cache)
  top, lse = log_normaliser(logits)                                       # [b, 1, 1]
  vocab = logits.shape[-1]
  # Beams 1..k-1 are dead (-inf); their logits are beam 0's, never read into a finite score.
  scores, _, tokens, states = _expand_level(
      trie, 0, jnp.broadcast_to(logits, (b, k, vocab)), jnp.broadcast_to(top, (b, k, 1)),
      jnp.broadcast_to(lse, (b, k, 1)), _first_beam_alive(b, k), jnp.zeros((b, k), jnp.int32))
  cache = gather_beams(cache, jnp.zeros((b, k), jnp.int32), b, 1)         # b * k rows
  return scores, tokens, states, cache


def _constrained_beam_search(tokens_to_logits, initial_cache, batch_size, num_beams,
                             decode_length, trie: trie_lib.TrieArrays) -> BeamSearchResult:
  if decode_length != trie.num_levels:
    raise ValueError(f"decode_length {decode_length} != identifier length {trie.num_levels} "
                     "of the constraint trie")
  b, k = batch_size, num_beams
  # One branch per level after the first, each at its own static width; the decoder stays
  # outside the switch (and the loop is not unrolled), so it is compiled once for b * k rows
  # (and once for the b rows of step 0).
  expand = [functools.partial(_expand_level, trie, level) for level in range(1, decode_length)]

  def body(step, carry):
    sequences, scores, state, last, cache = carry
    logits, cache = step_logits(tokens_to_logits, last, cache)           # [b, k, vocab]
    top, lse = log_normaliser(logits)                                    # [b, k, 1]
    top_scores, beam, new_tokens, new_state = jax.lax.switch(
        step - 1, expand, logits, top, lse, scores, state)               # each [b, k]
    sequences = write_position(gather_batch_beams(sequences, beam), step, new_tokens)
    cache = gather_beams(cache, beam, b, k)
    return sequences, top_scores, new_state, new_tokens, cache

  scores, tokens, state, cache = _constrained_first_step(tokens_to_logits, initial_cache, b, k,
                                                         trie)
  sequences = write_position(jnp.zeros((b, k, decode_length), jnp.int32), 0, tokens)
  carry = (sequences, scores, state, tokens, cache)
  sequences, scores, state, _, _ = jax.lax.fori_loop(1, decode_length, body, carry)
  alive = jnp.isfinite(scores)                                           # [b, k]
  items = jnp.where(alive, trie_lib.leaf_items(trie, jnp.where(alive, state, -1)), -1)
  sequences = jnp.where(alive[..., None], sequences, PAD_ID)
  return BeamSearchResult(sequences=sequences, scores=scores, items=items)


# ----------------------------------------------------------------------------- free text


def length_penalty(length: jax.Array, alpha: float) -> jax.Array:
  """GNMT-style ((5 + length) / 6) ** alpha; alpha 0 ranks by raw log-probability."""
  return ((5.0 + length) / 6.0) ** alpha


def _free_beam_search(tokens_to_logits, initial_cache, batch_size, num_beams, max_length,
                      eos_id: int, alpha: float) -> BeamSearchResult:
  """Keeps `num_beams` alive and `num_beams` finished hypotheses per example.

  Each step takes the top 2 * beams extensions: those ending in EOS compete (length
  normalised) for the finished set, the rest for the alive set, so EOS never starves the
  search. It stops at max_length or once no alive beam can beat the worst finished one.
  """
  b, k = batch_size, num_beams

  def cond(carry):
    step, _, alive_scores, _, finished_scores, _, _ = carry
    best_possible = alive_scores[:, 0] / length_penalty(jnp.float32(max_length), alpha)
    worst_finished = finished_scores[:, -1]
    can_improve = jnp.any(best_possible > worst_finished)
    return (step < max_length) & can_improve

  def body(carry):
    step, alive_seqs, alive_scores, last, finished_scores, finished_seqs, cache = carry
    log_probs, _, cache = step_log_probs(tokens_to_logits, last, cache)   # [b, k, vocab]
    vocab = log_probs.shape[-1]
    total = (alive_scores[..., None] + log_probs).reshape(b, k * vocab)
    top_scores, flat = jax.lax.top_k(total, 2 * k)                      # [b, 2k]
    beam, tokens = flat // vocab, flat % vocab
    extended = write_position(gather_batch_beams(alive_seqs, beam), step, tokens)  # [b, 2k, T]
    ended = tokens == eos_id
    # Finished: merge the previous finished set with the EOS extensions, keep the best k.
    normalised = top_scores / length_penalty((step + 1).astype(jnp.float32), alpha)
    pool_scores = jnp.concatenate([finished_scores, jnp.where(ended, normalised, NEG_INF)], 1)
    pool_seqs = jnp.concatenate([finished_seqs, extended], axis=1)
    finished_scores, keep = jax.lax.top_k(pool_scores, k)
    finished_seqs = gather_batch_beams(pool_seqs, keep)
    # Alive: the best k extensions that did not end.
    alive_scores, keep = jax.lax.top_k(jnp.where(ended, NEG_INF, top_scores), k)
    alive_seqs = gather_batch_beams(extended, keep)
    last = jnp.take_along_axis(tokens, keep, axis=1)
    cache = gather_beams(cache, jnp.take_along_axis(beam, keep, axis=1), b, k)
    return step + 1, alive_seqs, alive_scores, last, finished_scores, finished_seqs, cache

  carry = (jnp.int32(0), jnp.zeros((b, k, max_length), jnp.int32), _first_beam_alive(b, k),
           jnp.full((b, k), PAD_ID, jnp.int32), jnp.full((b, k), NEG_INF),
           jnp.zeros((b, k, max_length), jnp.int32), initial_cache)
  _, alive_seqs, alive_scores, _, finished_scores, finished_seqs, _ = jax.lax.while_loop(
      cond, body, carry)
  # An example whose beams all ran to max_length without EOS returns its alive beams.
  none_finished = ~jnp.isfinite(finished_scores[:, :1])                 # [b, 1]
  alive_normalised = alive_scores / length_penalty(jnp.float32(max_length), alpha)
  sequences = jnp.where(none_finished[..., None], alive_seqs, finished_seqs)
  scores = jnp.where(none_finished, alive_normalised, finished_scores)
  return BeamSearchResult(sequences=sequences, scores=scores)


# ----------------------------------------------------------------------------- entry points


def beam_search(tokens_to_logits: TokensToLogits, initial_cache: Any, batch_size: int,
                num_beams: int, decode_length: int,
                constraint: Optional[trie_lib.TrieArrays] = None, *,
                eos_id: int = EOS_ID, alpha: float = 0.0) -> BeamSearchResult:
  """Beam search over `tokens_to_logits`, returning beams best first.

  Args:
    tokens_to_logits: decoder step; its cache leaves have leading dim batch * beams (beam-major
      within each example, i.e. jnp.repeat(x, beams, axis=0)) or are scalars.
    initial_cache: cache for batch * beams rows; step 0 feeds PAD (0) as the start token.
    batch_size, num_beams, decode_length: static sizes.
    constraint: a TrieArrays (shared, or per-example with trie batch == batch_size). With it,
      exactly decode_length (== identifier length) tokens are generated, every beam is a
      trie path, scores are unnormalised log-probs and `items` names the decoded items;
      beams the trie cannot fill come back with item -1 and score -inf. Without it, free text
      up to decode_length tokens, ending at eos_id, ranked with length penalty `alpha`.
  """
  if num_beams < 1 or decode_length < 1:
    raise ValueError(f"num_beams ({num_beams}) and decode_length ({decode_length}) must be >= 1")
  if constraint is not None:
    return _constrained_beam_search(tokens_to_logits, initial_cache, batch_size, num_beams,
                                    decode_length, constraint)
  return _free_beam_search(tokens_to_logits, initial_cache, batch_size, num_beams,
                           decode_length, eos_id, alpha)


def model_tokens_to_logits(model, params, encoder_input_tokens: jax.Array, copies: int,
                           encoded: Optional[jax.Array] = None,
                           ) -> Tuple[Callable, Callable[[int], Any]]:
  """Returns (tokens_to_logits, init_cache(max_len)) over `copies` rows per example.

  The encoder output (or `encoded`) and its per-layer cross-attention keys/values are
  computed here, once per example, and never repeated: not per step, since every step
  reads the same keys/values, and not per beam, since the decoder's cross-attention groups
  the `copies` beams/samples of an example (batch-major rows) against that example's.
  """
  batch = encoder_input_tokens.shape[0]
  if encoded is None:
    encoded = model.encode(params, encoder_input_tokens)            # [batch, len, embed]
  # One KeyValue per decoder layer, each [batch, heads, len, head_dim]
  cross_kv = model.cross_attention_kv(params, encoded)

  def tokens_to_logits(tokens, cache):                              # tokens [batch * copies, 1]
    return model.decode_step(params, cache, cross_kv, encoder_input_tokens, tokens)

  def init_cache(max_decode_length: int):
    return model.init_decoder_cache(params, batch * copies, max_decode_length)

  return tokens_to_logits, init_cache


def _check_tokens_fit(constraint: trie_lib.TrieArrays, vocab_size: int) -> None:
  """Trie tokens past the logits would be clamped silently by the gathers; refuse them."""
  largest = trie_lib.max_token(constraint)
  if largest is not None and largest >= vocab_size:
    raise ValueError(f"constraint trie uses token id {largest} but the model has only "
                     f"{vocab_size} logits")


def identifier_search(model, params, encoder_input_tokens: jax.Array,
                      constraint: trie_lib.TrieArrays, num_beams: int,
                      encoded: Optional[jax.Array] = None) -> BeamSearchResult:
  """Unjitted body of decode_identifiers, for callers that jit with their own shardings."""
  _check_tokens_fit(constraint, model.module.config.vocab_size)
  batch = encoder_input_tokens.shape[0]
  tokens_to_logits, init_cache = model_tokens_to_logits(model, params, encoder_input_tokens,
                                                        num_beams, encoded)
  length = constraint.num_levels
  return beam_search(tokens_to_logits, init_cache(length), batch, num_beams, length, constraint)


def constrained_decode_fn(*, model, params, encoded, encoder_input_tokens,
                          constraint: trie_lib.TrieArrays, num_beams: int,
                          max_decode_length: Optional[int] = None) -> BeamSearchResult:
  """`decode_fn` for EncoderDecoderModel.predict_batch: reuses its encoder output.

  Pass constraint= and num_beams= through predict_batch's keyword arguments.
  """
  if max_decode_length is not None and max_decode_length != constraint.num_levels:
    raise ValueError(f"max_decode_length {max_decode_length} != identifier length "
                     f"{constraint.num_levels} of the constraint trie")
  return identifier_search(model, params, encoder_input_tokens, constraint, num_beams, encoded)


def decode_compiler_options() -> Optional[dict]:
  """XLA options for compiling a decode for the default backend (pass to jax.jit).

  On CPU, XLA's concurrency-optimised scheduler orders a decode step so that independent
  matmuls run side by side, each on part of the thread pool; with the default
  memory-minimising order each gets every core in turn, and the t5-small constrained decode
  of launch/bench/bench_decode.py ran about 5% faster (0.85 against 0.89 s per batch of 8,
  alternating runs on 2 cores). The train step runs equally fast either way. Other
  backends keep their defaults.
  """
  if jax.default_backend() == "cpu":
    return {"xla_cpu_enable_concurrency_optimized_scheduler": False}
  return None


_JITTED: dict = {}


def decode_identifiers(model, params, encoder_input_tokens: jax.Array,
                       constraint: trie_lib.TrieArrays, num_beams: int) -> BeamSearchResult:
  """Constrained beam search with an EncoderDecoderModel, compiled once per model and shape."""
  _check_tokens_fit(constraint, model.module.config.vocab_size)  # host-side, before tracing
  key = (id(model), num_beams)
  if key not in _JITTED:
    fn = jax.jit(lambda p, x, c: identifier_search(model, p, x, c, num_beams),
                 compiler_options=decode_compiler_options())
    _JITTED[key] = (model, fn)  # holding the model keeps id(model) from being reused
  return _JITTED[key][1](params, encoder_input_tokens, constraint)
