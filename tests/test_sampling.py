"""Temperature sampling: filters, greedy limit, EOS handling, constrained distribution."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gensar_jax.decoding import sampling, trie as trie_lib

EOS = 1
HASH_BUCKETS = 101


class ToyDecoder:
  """Logits depend on the prefix through a per-row hash kept in the cache."""

  def __init__(self, seed, vocab, length, scale=2.0):
    rng = np.random.default_rng(seed)
    self.table = jnp.asarray(rng.normal(size=(length, HASH_BUCKETS, vocab)) * scale, jnp.float32)

  def init_cache(self, rows):
    return {"hash": jnp.zeros((rows,), jnp.int32), "index": jnp.array(0, jnp.int32)}

  def tokens_to_logits(self, tokens, cache):
    hashed = (cache["hash"] * 31 + tokens[:, 0] + 1) % HASH_BUCKETS
    index = jnp.minimum(cache["index"], self.table.shape[0] - 1)
    return self.table[index][hashed], {"hash": hashed, "index": cache["index"] + 1}

  def step_logits(self, prefixes):
    """Logits after each prefix [n, t] (t may be 0), by teacher forcing."""
    prefixes = jnp.asarray(prefixes, jnp.int32)
    cache = self.init_cache(prefixes.shape[0])
    logits, cache = self.tokens_to_logits(jnp.zeros((prefixes.shape[0], 1), jnp.int32), cache)
    for t in range(prefixes.shape[1]):
      logits, cache = self.tokens_to_logits(prefixes[:, t:t + 1], cache)
    return np.asarray(logits)


def log_softmax(x):
  return np.asarray(jax.nn.log_softmax(jnp.asarray(x), -1))


def test_filter_logits_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.05, 0.3, 0.15]]))
  kept = lambda out: np.isfinite(np.asarray(out))[0].tolist()
  assert kept(sampling.filter_logits(logits, topk=2)) == [True, False, True, False]
  assert kept(sampling.filter_logits(logits, topp=0.5)) == [True, False, False, False]
  assert kept(sampling.filter_logits(logits, topp=0.7)) == [True, False, True, False]
  assert kept(sampling.filter_logits(logits, topp=0.85)) == [True, False, True, True]
  assert kept(sampling.filter_logits(logits)) == [True] * 4


def test_zero_temperature_is_greedy_and_stops_at_eos():
  vocab, length, batch = 7, 6, 3
  decoder = ToyDecoder(0, vocab, length)
  out = jax.jit(lambda key: sampling.temperature_sample(
      decoder.tokens_to_logits, decoder.init_cache(batch * 2), batch, 2, length, key,
      temperature=0.0))(jax.random.PRNGKey(0))
  seqs = np.asarray(out.sequences)
  assert (seqs == seqs[:1, :1]).all()              # greedy: identical rows, same toy input
  expected, total = [], 0.0
  for _ in range(length):
    lp = log_softmax(decoder.step_logits(np.array([expected], np.int32)))[0]
    token = int(np.argmax(lp))
    expected.append(token)
    total += lp[token]
    if token == EOS:
      break
  expected += [0] * (length - len(expected))
  np.testing.assert_array_equal(seqs[0, 0], expected)
  np.testing.assert_allclose(np.asarray(out.scores)[0, 0], total, atol=1e-5)


def test_samples_after_eos_are_padding_and_scores_are_log_probs():
  vocab, length, batch, samples = 5, 5, 2, 16
  decoder = ToyDecoder(1, vocab, length, scale=1.0)
  out = jax.jit(lambda key: sampling.temperature_sample(
      decoder.tokens_to_logits, decoder.init_cache(batch * samples), batch, samples, length,
      key, temperature=1.0))(jax.random.PRNGKey(3))
  seqs = np.asarray(out.sequences).reshape(-1, length)
  scores = np.asarray(out.scores).reshape(-1)
  assert len({tuple(s) for s in seqs.tolist()}) > 4                  # actually random
  for seq, score in zip(seqs, scores):
    ends = np.nonzero(seq == EOS)[0]
    stop = ends[0] + 1 if len(ends) else length
    assert (seq[stop:] == 0).all()
    expected = sum(log_softmax(decoder.step_logits(seq[None, :t]))[0, seq[t]] for t in range(stop))
    np.testing.assert_allclose(score, expected, atol=1e-4)


def test_constrained_samples_follow_the_renormalised_trie_distribution():
  ids = np.array([[5, 10, 20, 30, EOS], [5, 10, 20, 31, EOS], [5, 10, 21, 30, EOS],
                  [6, 11, 20, 30, EOS]], np.int32)
  trie = trie_lib.build_trie(ids)
  vocab, length, samples = 40, 5, 4000
  decoder = ToyDecoder(2, vocab, length, scale=1.0)
  out = jax.jit(lambda key: sampling.temperature_sample(
      decoder.tokens_to_logits, decoder.init_cache(samples), 1, samples, length, key,
      constraint=trie))(jax.random.PRNGKey(4))
  items, seqs = np.asarray(out.items)[0], np.asarray(out.sequences)[0]
  assert (items >= 0).all()
  np.testing.assert_array_equal(seqs, ids[items])
  # Exact probability: product over steps of p(token) renormalised over the allowed tokens.
  expected = np.ones(len(ids))
  for i, row in enumerate(ids):
    for t in range(length):
      allowed = sorted({int(r[t]) for r in ids if (r[:t] == row[:t]).all()})
      lp = log_softmax(decoder.step_logits(row[None, :t]))[0]
      expected[i] *= np.exp(lp[row[t]]) / np.exp(lp[allowed]).sum()
  frequency = np.bincount(items, minlength=len(ids)) / samples
  np.testing.assert_allclose(frequency, expected, atol=0.03)
  # Scores are full-vocabulary log-probs of the drawn tokens (not the renormalised ones).
  full = [sum(log_softmax(decoder.step_logits(row[None, :t]))[0, row[t]] for t in range(length))
          for row in ids]
  np.testing.assert_allclose(np.asarray(out.scores)[0], np.array(full)[items], atol=1e-4)
