"""K-means in JAX, used to initialise every RQ-VAE codebook on the first batch.

Randomly initialised codebooks leave most codes dead: the encoder output occupies a small
region and argmin keeps picking the same few codes. Seeding each level's codebook with
k-means centroids of that level's residuals on the first batch (as the published RQ-VAE
does) starts every code where data actually lies. The whole routine is one jitted
function: k-means++ seeding and Lloyd iterations both run under `lax.fori_loop`.
"""
from __future__ import annotations

import functools
from typing import Tuple

import jax
import jax.numpy as jnp


def squared_distances(x: jax.Array, centroids: jax.Array) -> jax.Array:
  """Squared Euclidean distances by the matmul expansion (no [n, k, d] intermediate).

  Args:
    x: [n, d] points.
    centroids: [k, d] centres.

  Returns:
    [n, k] squared distances, clipped at 0 against rounding.
  """
  x_sq = jnp.sum(x * x, axis=-1, keepdims=True)  # [n, 1]
  c_sq = jnp.sum(centroids * centroids, axis=-1)  # [k]
  cross = x @ centroids.T  # [n, k]
  return jnp.maximum(x_sq - 2.0 * cross + c_sq[None, :], 0.0)


def _kmeans_plus_plus(x: jax.Array, key: jax.Array, k: int) -> jax.Array:
  """k-means++ seeding: each new centre is drawn with probability proportional to D^2.

  Draws use inverse-CDF sampling on k uniforms generated up front (one random call, not
  one per centre, which keeps the compiled program small). When every point already
  coincides with a centre (fewer distinct points than k), the draw falls back to
  uniform, so duplicate centres appear instead of NaNs.
  """
  n, d = x.shape
  uniforms = jax.random.uniform(key, (k,))  # [k]
  first = jnp.minimum((uniforms[0] * n).astype(jnp.int32), n - 1)
  centroids = jnp.zeros((k, d), x.dtype).at[0].set(x[first])  # [k, d]
  min_d2 = squared_distances(x, x[first][None, :])[:, 0]  # [n]

  def body(i, carry):
    centroids, min_d2 = carry
    weights = jnp.where(jnp.sum(min_d2) > 0.0, min_d2, 1.0)  # [n]
    cdf = jnp.cumsum(weights)  # [n]
    idx = jnp.searchsorted(cdf, uniforms[i] * cdf[-1], side="right")
    idx = jnp.minimum(idx, n - 1)
    centroids = centroids.at[i].set(x[idx])
    min_d2 = jnp.minimum(min_d2, squared_distances(x, x[idx][None, :])[:, 0])
    return centroids, min_d2

  centroids, _ = jax.lax.fori_loop(1, k, body, (centroids, min_d2))
  return centroids


@functools.partial(jax.jit, static_argnames=("k", "iterations"))
def kmeans(x: jax.Array, key: jax.Array, k: int,
           iterations: int = 25) -> Tuple[jax.Array, jax.Array]:
  """Clusters `x` into `k` groups: k-means++ seeding, then `iterations` Lloyd steps.

  An empty cluster keeps its previous centre (it cannot be averaged), which also makes
  the routine well defined when n < k.

  Args:
    x: [n, d] points.
    key: PRNG key for the seeding.
    k: number of clusters (static).
    iterations: Lloyd iterations (static).

  Returns:
    centroids [k, d] and assignments [n] (index of the nearest final centroid).
  """
  x = x.astype(jnp.float32)
  centroids = _kmeans_plus_plus(x, key, k)  # [k, d]

  def lloyd(_, centroids):
    assign = jnp.argmin(squared_distances(x, centroids), axis=-1)  # [n]
    one_hot = jax.nn.one_hot(assign, k, dtype=x.dtype)  # [n, k]
    sums = one_hot.T @ x  # [k, d]
    counts = jnp.sum(one_hot, axis=0)  # [k]
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    return jnp.where(counts[:, None] > 0, means, centroids)

  centroids = jax.lax.fori_loop(0, iterations, lloyd, centroids)
  assign = jnp.argmin(squared_distances(x, centroids), axis=-1)  # [n]
  return centroids, assign
