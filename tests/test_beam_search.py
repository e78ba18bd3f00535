"""Constrained and free beam search: validity, exactness, isolation, sharding, real model."""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gensar_jax.decoding import beam_search as bs
from gensar_jax.decoding import candidate_tries, trie as trie_lib

EOS = 1
VOCAB = 48
LENGTH = 6
HASH_BUCKETS = 257


class ToyDecoder:
  """A decoder whose logits depend on the whole prefix, via a per-row hash in the cache.

  The hash lives in a [rows] cache leaf, so a wrong beam gather changes later logits; the
  step index is a scalar leaf, like a KV cache's cache_index.
  """

  def __init__(self, seed: int, vocab: int = VOCAB, length: int = LENGTH, scale: float = 3.0):
    rng = np.random.default_rng(seed)
    self.table = jnp.asarray(rng.normal(size=(length, HASH_BUCKETS, vocab)) * scale, jnp.float32)

  def init_cache(self, rows: int):
    return {"hash": jnp.zeros((rows,), jnp.int32), "index": jnp.array(0, jnp.int32)}

  def tokens_to_logits(self, tokens, cache):
    hashed = (cache["hash"] * 31 + tokens[:, 0] + 1) % HASH_BUCKETS       # [rows]
    index = jnp.minimum(cache["index"], self.table.shape[0] - 1)
    logits = self.table[index][hashed]                                    # [rows, vocab]
    return logits, {"hash": hashed, "index": cache["index"] + 1}

  def score(self, sequences: np.ndarray, tokens_to_logits=None) -> np.ndarray:
    """Teacher-forced sum of log-softmax of each sequence [n, L]."""
    tokens_to_logits = tokens_to_logits or self.tokens_to_logits
    sequences = jnp.asarray(sequences)
    cache = self.init_cache(sequences.shape[0])
    last = jnp.zeros((sequences.shape[0], 1), jnp.int32)
    total = jnp.zeros(sequences.shape[0])
    for t in range(sequences.shape[1]):
      logits, cache = tokens_to_logits(last, cache)
      log_probs = jax.nn.log_softmax(logits, -1)
      total += jnp.take_along_axis(log_probs, sequences[:, t:t + 1], -1)[:, 0]
      last = sequences[:, t:t + 1]
    return np.asarray(total)


def random_ids(rng, n, codes=4, base=8):
  """[n, 6] unique IDs over a tiny code range, so long shared prefixes are frequent."""
  out = set()
  while len(out) < n:
    out.add((int(rng.choice([5, 6])),) + tuple(int(base + level * codes + rng.integers(codes))
                                              for level in range(4)) + (EOS,))
  return np.array(sorted(out), np.int32)[rng.permutation(n)]


@functools.partial(jax.jit, static_argnames=("seed", "batch", "beams"))
def run_constrained(trie, seed, batch, beams):
  decoder = ToyDecoder(seed)
  return bs.beam_search(decoder.tokens_to_logits, decoder.init_cache(batch * beams), batch,
                        beams, LENGTH, trie)


def test_shared_trie_returns_members_and_matches_exhaustive_ranking():
  rng = np.random.default_rng(0)
  for seed in range(2):
    ids = random_ids(rng, 40)
    trie = trie_lib.build_trie(ids)
    batch, beams = 2, 48                                     # beams >= candidates: exact
    out = run_constrained(trie, seed, batch, beams)
    items, scores = np.asarray(out.items), np.asarray(out.scores)
    expected_scores = ToyDecoder(seed).score(ids)
    expected_order = np.argsort(-expected_scores, kind="stable")
    for b in range(batch):
      valid = items[b] >= 0
      assert valid.sum() == len(ids)
      np.testing.assert_array_equal(items[b][valid], expected_order)
      np.testing.assert_allclose(scores[b][valid], expected_scores[expected_order], atol=1e-5)
      np.testing.assert_array_equal(np.asarray(out.sequences)[b][valid], ids[items[b][valid]])
      assert np.all(np.isneginf(scores[b][~valid])) and np.all(items[b][~valid] == -1)


def test_small_beams_stay_inside_the_trie_and_are_distinct():
  rng = np.random.default_rng(1)
  for seed in range(3):
    ids = random_ids(rng, 60)
    members = {tuple(r) for r in ids.tolist()}
    out = run_constrained(trie_lib.build_trie(ids, num_dense_levels=seed % 3), seed, 3, 5)
    items, seqs = np.asarray(out.items), np.asarray(out.sequences)
    assert (items >= 0).all()
    for b in range(3):
      assert len(set(items[b].tolist())) == 5
      assert all(tuple(s) in members for s in seqs[b].tolist())
      np.testing.assert_array_equal(seqs[b], ids[items[b]])
      assert np.all(np.diff(np.asarray(out.scores)[b]) <= 0)      # best first
      np.testing.assert_allclose(np.asarray(out.scores)[b], ToyDecoder(seed).score(seqs[b]),
                                 atol=1e-5)


def per_example_candidates(rng, batch, n):
  """Disjoint candidate sets: example b's codes start at a different base."""
  return np.stack([random_ids(rng, n, base=8 + 40 * b, codes=3) for b in range(batch)])


def test_per_example_tries_do_not_leak_and_rank_exactly():
  rng = np.random.default_rng(2)
  batch, n, beams = 4, 10, 12
  candidates = per_example_candidates(rng, batch, n)          # [4, 10, 6], vocab < 8+160+12
  tries = candidate_tries.build_candidate_tries(candidates)
  decoder = ToyDecoder(7, vocab=192)

  @jax.jit
  def search(t):
    return bs.beam_search(decoder.tokens_to_logits, decoder.init_cache(batch * beams), batch,
                          beams, LENGTH, t)

  out = search(tries)
  items, scores = np.asarray(out.items), np.asarray(out.scores)
  for b in range(batch):
    valid = items[b] >= 0
    assert valid.sum() == n and (items[b][~valid] == -1).all()
    np.testing.assert_array_equal(np.asarray(out.sequences)[b][valid],
                                  candidates[b][items[b][valid]])
    expected = ToyDecoder(7, vocab=192).score(candidates[b])
    np.testing.assert_array_equal(items[b][valid], np.argsort(-expected, kind="stable"))
    np.testing.assert_allclose(scores[b][valid], np.sort(expected)[::-1], atol=1e-5)


def test_beams_beyond_valid_items_are_marked_invalid():
  rng = np.random.default_rng(3)
  ids = random_ids(rng, 3)
  ids[:, 0] = 5
  ids[:, 1] = ids[0, 1]                       # 3 items sharing the first code
  ids = np.unique(ids, axis=0)
  out = run_constrained(trie_lib.build_trie(ids), 0, 1, 8)
  items = np.asarray(out.items)[0]
  valid = items >= 0
  assert valid.sum() == len(ids) and len(set(items[valid].tolist())) == len(ids)
  assert (items[len(ids):] == -1).all() and np.isneginf(np.asarray(out.scores)[0, len(ids):]).all()
  assert (np.asarray(out.sequences)[0, len(ids):] == 0).all()


def reference_beam_search(decoder, ids, beams):
  """NumPy beam search: each step extends every live beam by the next tokens that the
  identifier list itself allows (no trie), scored with a full log-softmax over the vocab.
  Returns (sequences [beams, L], scores [beams]), best first, -inf / PAD where none is left."""
  table = np.asarray(decoder.table, np.float64)
  live = [((), 0.0, (0 * 31 + 0 + 1) % HASH_BUCKETS)]            # (prefix, score, hash)
  for step in range(ids.shape[1]):
    extended = []
    for prefix, score, hashed in live:
      logits = table[step, hashed]
      log_probs = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
      matching = ids[(ids[:, :step] == prefix).all(axis=1)] if step else ids
      for token in sorted(set(matching[:, step].tolist())):
        extended.append((prefix + (token,), score + log_probs[token],
                         (hashed * 31 + token + 1) % HASH_BUCKETS))
    live = sorted(extended, key=lambda e: -e[1])[:beams]
  sequences = np.zeros((beams, ids.shape[1]), np.int32)
  scores = np.full(beams, -np.inf)
  for i, (prefix, score, _) in enumerate(live):
    sequences[i], scores[i] = prefix, score
  return sequences, scores


@pytest.mark.parametrize("num_dense_levels", [0, 2, 6])
def test_pruned_search_equals_a_numpy_beam_search_over_the_identifier_list(num_dense_levels):
  """Small beams prune at every level, so a wrong candidate set or a wrong top-k at any
  level (each level has its own width) changes the result."""
  rng = np.random.default_rng(8)
  ids = random_ids(rng, 120, codes=5)
  trie = trie_lib.build_trie(ids, num_dense_levels)
  for seed, beams in [(0, 3), (1, 7), (2, 20)]:
    out = run_constrained(trie, seed, 1, beams)
    want_sequences, want_scores = reference_beam_search(ToyDecoder(seed), ids, beams)
    np.testing.assert_array_equal(np.asarray(out.sequences)[0], want_sequences)
    np.testing.assert_allclose(np.asarray(out.scores)[0], want_scores, atol=1e-4)
    found = np.asarray(out.items)[0]
    np.testing.assert_array_equal(ids[found[found >= 0]], want_sequences[np.isfinite(want_scores)])


def test_sharded_search_matches_unsharded():
  devices = np.array(jax.devices())
  assert len(devices) == 8
  mesh = Mesh(devices, ("data",))
  rng = np.random.default_rng(4)
  batch, beams = 8, 6
  candidates = per_example_candidates(rng, batch, 9) % 200
  tries = candidate_tries.build_candidate_tries(candidates)
  decoder = ToyDecoder(11, vocab=200)

  def search(t, hashes):
    cache = {"hash": hashes, "index": jnp.array(0, jnp.int32)}
    return bs.beam_search(decoder.tokens_to_logits, cache, batch, beams, LENGTH, t)

  hashes = jnp.asarray(np.repeat(rng.integers(0, 50, batch), beams), jnp.int32)
  expected = jax.jit(search)(tries, hashes)
  data = NamedSharding(mesh, P("data"))
  sharded_tries = jax.device_put(tries, data)
  sharded_hashes = jax.device_put(hashes, data)
  got = jax.jit(search, in_shardings=(data, data), out_shardings=data)(sharded_tries,
                                                                       sharded_hashes)
  assert got.items.sharding.spec == P("data")
  np.testing.assert_array_equal(got.items, expected.items)
  np.testing.assert_array_equal(got.sequences, expected.sequences)
  np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-6)
  assert (np.asarray(expected.items) >= 0).all()


def test_free_beam_search_finds_every_eos_sequence_in_order():
  vocab, length, beams = 4, 3, 20
  decoder = ToyDecoder(5, vocab=vocab, length=length, scale=1.0)
  out = jax.jit(lambda: bs.beam_search(decoder.tokens_to_logits, decoder.init_cache(beams),
                                       1, beams, length))()
  # Brute force: every sequence that ends at its first EOS within `length` tokens.
  ended = []
  for n in range(1, length + 1):
    for body in itertools.product([t for t in range(vocab) if t != EOS], repeat=n - 1):
      ended.append(list(body) + [EOS] + [0] * (length - n))
  ended = np.array(ended, np.int32)
  scores = np.array([decoder.score(s[None, :list(s).index(EOS) + 1])[0] for s in ended])
  order = np.argsort(-scores, kind="stable")
  got_scores = np.asarray(out.scores)[0]
  found = np.isfinite(got_scores)
  assert found.sum() == len(ended)
  np.testing.assert_array_equal(np.asarray(out.sequences)[0][found], ended[order])
  np.testing.assert_allclose(got_scores[found], scores[order], atol=1e-5)


def test_free_beam_search_length_penalty_and_fallback_to_alive():
  vocab = 6
  decoder = ToyDecoder(8, vocab=vocab, length=4, scale=1.0)
  # EOS can never be produced: logits of EOS are -inf, so every beam runs to max length.
  def no_eos(tokens, cache):
    logits, cache = decoder.tokens_to_logits(tokens, cache)
    return logits.at[:, EOS].set(-jnp.inf), cache
  out = jax.jit(lambda: bs.beam_search(no_eos, decoder.init_cache(3), 1, 3, 4, alpha=0.6))()
  seqs = np.asarray(out.sequences)[0]
  assert (seqs != EOS).all() and (seqs != 0).any()
  raw = decoder.score(seqs, no_eos)
  np.testing.assert_allclose(np.asarray(out.scores)[0], raw / ((5 + 4) / 6) ** 0.6, atol=1e-5)


def test_decode_length_must_match_the_trie():
  trie = trie_lib.build_trie(random_ids(np.random.default_rng(5), 5))
  decoder = ToyDecoder(0)
  with pytest.raises(ValueError, match="identifier length 6"):
    bs.beam_search(decoder.tokens_to_logits, decoder.init_cache(2), 1, 2, 5, trie)


@functools.lru_cache(maxsize=None)
def _tiny_t5(vocab_size: int = 128):
  """(model, params) of a randomly initialised 2+2-layer T5 with embed 32."""
  import seqio
  from gensar_jax.models import encoder_decoder, t5, t5_config
  from flax.core import meta

  config = t5_config.T5Config(vocab_size=vocab_size, emb_dim=32, num_heads=2, head_dim=16,
                              mlp_dim=64, num_encoder_layers=2, num_decoder_layers=2)
  model = encoder_decoder.EncoderDecoderModel(t5.Transformer(config),
                                              seqio.PassThroughVocabulary(vocab_size, eos_id=EOS))
  shapes = {"encoder_input_tokens": (2, 7), "decoder_input_tokens": (2, 6)}
  params = jax.jit(lambda key: meta.unbox(model.get_initial_variables(key, shapes)["params"]))(
      jax.random.PRNGKey(0))
  return model, params


def _loop_operand_shapes(jaxpr, primitive: str, inside: bool = False) -> list:
  """Operand shapes of every `primitive` equation inside a loop (scan or while), nested
  jaxprs included."""
  shapes = []
  for eqn in jaxpr.eqns:
    if inside and eqn.primitive.name == primitive:
      shapes.extend(tuple(v.aval.shape) for v in eqn.invars)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if isinstance(sub, jax.extend.core.Jaxpr):
          loop = eqn.primitive.name in ("scan", "while")
          shapes += _loop_operand_shapes(sub, primitive, inside or loop)
  return shapes


def test_model_decoding_projects_cross_attention_kv_once_outside_the_loop():
  model, params = _tiny_t5()
  tries = candidate_tries.build_candidate_tries(per_example_candidates(
      np.random.default_rng(6), 2, 8) % 128)
  inputs = jnp.ones((2, 7), jnp.int32)
  jaxpr = jax.make_jaxpr(lambda p, x, c: bs.identifier_search(model, p, x, c, 4))(
      params, inputs, tries).jaxpr
  greedy = jax.make_jaxpr(lambda p, x: model.predict_batch(
      p, {"encoder_input_tokens": x}, max_decode_length=6))(params, inputs).jaxpr
  for search in (jaxpr, greedy):
    operands = _loop_operand_shapes(search, "dot_general")
    assert operands, "no matmul inside the decode loop: did the jaxpr walk miss it?"
    # The encoder output [batch, input_length, embed] is projected before the loop only.
    assert (2, 7, 32) not in operands, operands


def test_real_tiny_t5_ranking_equals_score_batch():
  model, params = _tiny_t5()
  vocab_size = 128
  rng = np.random.default_rng(6)
  batch, n, beams = 2, 8, 10
  candidates = per_example_candidates(rng, batch, n) % vocab_size
  candidates[candidates < 2] += 2
  candidates[..., -1] = EOS
  tries = candidate_tries.build_candidate_tries(candidates)
  inputs = jnp.asarray(rng.integers(2, vocab_size, size=(batch, 7)), jnp.int32)
  out = bs.decode_identifiers(model, params, inputs, tries, beams)
  # The same search through predict_batch's decode_fn hook (encoder output reused).
  via_predict = jax.jit(lambda p, x, c: model.predict_batch(
      p, {"encoder_input_tokens": x}, decode_fn=bs.constrained_decode_fn, constraint=c,
      num_beams=beams))(params, inputs, tries)
  np.testing.assert_array_equal(via_predict.items, out.items)
  with pytest.raises(ValueError, match="token id 130 but the model has only 128 logits"):
    bs.decode_identifiers(model, params, inputs, candidate_tries.build_candidate_tries(
        np.where(candidates == candidates.max(), 130, candidates)), beams)
  targets = jnp.asarray(candidates.reshape(batch * n, LENGTH))   # teacher-force every candidate
  scored = np.asarray(jax.jit(model.score_batch)(params, {
      "encoder_input_tokens": jnp.repeat(inputs, n, 0),
      "decoder_input_tokens": jnp.pad(targets[:, :-1], ((0, 0), (1, 0))),
      "decoder_target_tokens": targets,
      "decoder_loss_weights": jnp.ones_like(targets)})).reshape(batch, n)
  for b in range(batch):
    items = np.asarray(out.items)[b]
    valid = items >= 0
    assert valid.sum() == n
    np.testing.assert_array_equal(items[valid], np.argsort(-scored[b], kind="stable"))
    np.testing.assert_allclose(np.asarray(out.scores)[b][valid], np.sort(scored[b])[::-1],
                               atol=1e-5)


def test_constrained_step_zero_runs_the_decoder_on_beam_zero_only():
  """Step 0 feeds the decoder one row per example (every beam would see the same PAD token
  and empty cache); the later steps every beam, with beam 0's cache copied to all of them,
  so the ranking still matches the exhaustive one."""
  rng = np.random.default_rng(3)
  ids = random_ids(rng, 40)
  trie = trie_lib.build_trie(ids)
  decoder = ToyDecoder(5)
  rows_seen = []

  def recording(tokens, cache):
    rows_seen.append(tokens.shape[0])  # at trace time: one entry per traced decoder call
    return decoder.tokens_to_logits(tokens, cache)

  batch, beams = 2, 48
  out = jax.jit(lambda t: bs.beam_search(recording, decoder.init_cache(batch * beams), batch,
                                         beams, LENGTH, t))(trie)
  assert sorted(set(rows_seen)) == [batch, batch * beams]
  scores = decoder.score(ids)
  best = np.argsort(-scores)[:beams]
  for b in range(batch):
    np.testing.assert_array_equal(np.asarray(out.items)[b][:len(ids)], best[:len(ids)])
    np.testing.assert_allclose(np.asarray(out.scores)[b][:len(ids)], scores[best], rtol=1e-5)
