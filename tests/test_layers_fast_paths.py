"""The train-step fast paths of gensar_jax/models/layers.py keep the maths they replace.

`add_shared_bias` is `x + bias` with a hand-written gradient (a product instead of a
reduction over the batch), `Dropout` draws 16-bit keep decisions instead of Flax's float
uniforms; `RelativePositionBias` (a one-hot contraction) puts each bucket's value and
gradient where a gather would.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax.core import meta

from gensar_jax.models.layers import (Dropout, RelativePositionBias, add_shared_bias,
                                      relative_position_bucket)


@pytest.mark.parametrize("x_shape,bias_shape", [
    ((4, 3, 1, 5, 6), (1, 3, 1, 5, 6)),   # training: one query group
    ((4, 3, 2, 5, 6), (1, 3, 1, 5, 6)),   # beams grouped per example: broadcast on axis 2 too
    ((7, 5), (1, 5)),
])
def test_add_shared_bias_value_and_gradients_match_plain_addition(x_shape, bias_shape):
  kx, kb, kw = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, x_shape)
  bias = jax.random.normal(kb, bias_shape)
  weights = jax.random.normal(kw, x_shape)  # a non-uniform upstream gradient

  def loss(fn):
    return lambda x, b: jnp.sum(jnp.sin(fn(x, b)) * weights)

  np.testing.assert_array_equal(add_shared_bias(x, bias), x + bias)
  got = jax.jit(jax.grad(loss(add_shared_bias), argnums=(0, 1)))(x, bias)
  want = jax.grad(loss(lambda x, b: x + b), argnums=(0, 1))(x, bias)
  assert got[1].shape == bias.shape
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_relative_position_bias_reads_the_bucket_of_every_pair():
  module = RelativePositionBias(num_heads=3, bidirectional=True, num_buckets=8, max_distance=16)
  q, k = jnp.arange(5), jnp.arange(7)
  params = meta.unbox(module.init(jax.random.PRNGKey(0), q, k))
  table = np.asarray(params["params"]["rel_embedding"])  # [heads, buckets]
  bias = np.asarray(module.apply(params, q, k))  # [1, heads, q, k]
  buckets = np.asarray(relative_position_bucket(k[None, :] - q[:, None], True, 8, 16))
  np.testing.assert_array_equal(bias[0], table[:, buckets])
  # The gradient lands on exactly the buckets used, counted once per (q, k) pair.
  grad = jax.grad(lambda p: jnp.sum(module.apply(p, q, k)))(params)["params"]["rel_embedding"]
  counts = np.bincount(buckets.ravel(), minlength=8).astype(np.float32)
  np.testing.assert_allclose(np.asarray(grad), np.broadcast_to(counts, (3, 8)))


def _apply_dropout(rate, x, seed=0, broadcast_dims=(), deterministic=False):
  return Dropout(rate, broadcast_dims=broadcast_dims).apply(
      {}, x, deterministic=deterministic, rngs={"dropout": jax.random.PRNGKey(seed)})


def test_dropout_keeps_the_requested_share_and_preserves_the_mean():
  x = jnp.ones((64, 257, 33))  # odd sizes: the last 16-bit half is dropped
  rate = 0.1
  out = np.asarray(jax.jit(lambda x: _apply_dropout(rate, x))(x))
  threshold = round((1 - rate) * 65536)
  kept = out != 0
  np.testing.assert_allclose(out[kept], 65536 / threshold, rtol=1e-6)
  n = kept.size
  # Binomial(n, 0.9): 5 standard deviations is about 0.0012 at this size.
  assert abs(kept.mean() - threshold / 65536) < 5 * np.sqrt(0.09 / n)
  assert abs(out.mean() - 1.0) < 0.01


def test_dropout_masks_depend_on_the_key_and_broadcast_where_asked():
  x = jnp.ones((8, 16, 32))
  a, b = _apply_dropout(0.5, x, seed=1), _apply_dropout(0.5, x, seed=2)
  assert not np.array_equal(a, b)
  np.testing.assert_array_equal(a, _apply_dropout(0.5, x, seed=1))
  shared = np.asarray(_apply_dropout(0.5, x, seed=3, broadcast_dims=(-2,)))
  np.testing.assert_array_equal(shared, np.broadcast_to(shared[:, :1], shared.shape))
  assert 0 < (shared == 0).mean() < 1


def test_dropout_off_and_bad_rates():
  x = jnp.arange(12.0).reshape(3, 4)
  np.testing.assert_array_equal(_apply_dropout(0.3, x, deterministic=True), x)
  np.testing.assert_array_equal(_apply_dropout(0.0, x), x)
  with pytest.raises(ValueError, match="rate must be in"):
    _apply_dropout(1.0, x)
