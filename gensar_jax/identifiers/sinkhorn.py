"""Sinkhorn-balanced code assignment (the published collision-avoidance trick).

Plain argmin lets many items pile onto one code of the last level, and items that share
every code get the same identifier. Solving a tiny entropic optimal-transport problem
between items and codes, with uniform marginals on both sides, spreads items evenly over
the codes while still preferring near ones. The published recipe: distances are first
centred to [-1, 1] (min/max of the batch), then 50 Sinkhorn iterations at epsilon 0.003;
each item takes the code with the largest transport mass.

At epsilon 0.003 the kernel exp(-d / eps) spans e^(+-333), far outside float32, so the
iterations run in the log domain on dual potentials: identical in exact arithmetic to the
published multiplicative updates (rows, then columns), but finite.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def center_distances(distances: jax.Array, row_mask: Optional[jax.Array] = None) -> jax.Array:
  """Rescales distances to [-1, 1] using the min and max over the (unmasked) rows.

  Args:
    distances: [n, codes].
    row_mask: optional [n] bool; False rows are padding and do not set the range.

  Returns:
    [n, codes] centred distances.
  """
  if row_mask is None:
    low, high = jnp.min(distances), jnp.max(distances)
  else:
    low = jnp.min(jnp.where(row_mask[:, None], distances, jnp.inf))
    high = jnp.max(jnp.where(row_mask[:, None], distances, -jnp.inf))
  middle = (high + low) / 2.0
  amplitude = high - middle + 1e-5
  return (distances - middle) / amplitude


@functools.partial(jax.jit, static_argnames=("epsilon", "iterations"))
def sinkhorn_codes(distances: jax.Array, epsilon: float = 0.003, iterations: int = 50,
                   row_mask: Optional[jax.Array] = None) -> jax.Array:
  """Balanced assignment of n items to codes.

  Args:
    distances: [n, codes] squared distances from each item to each code.
    epsilon: entropic regularisation (smaller = closer to argmin, harder to balance).
    iterations: Sinkhorn iterations (one row and one column normalisation each).
    row_mask: optional [n] bool; False rows are padding: they neither take nor give mass.

  Returns:
    codes [n] int32: argmax of each row of the transport plan.
  """
  distances = jax.lax.stop_gradient(distances.astype(jnp.float32))
  n, num_codes = distances.shape
  if row_mask is None:
    row_mask = jnp.ones((n,), bool)
  logits = -center_distances(distances, row_mask) / epsilon  # [n, codes]
  logits = jnp.where(row_mask[:, None], logits, -jnp.inf)

  def body(_, v):
    # Rows: every item carries the same total mass.
    u = -jax.nn.logsumexp(logits + v[None, :], axis=1)  # [n]
    u = jnp.where(row_mask, u, 0.0)
    # Columns: every code receives the same total mass.
    v = -jax.nn.logsumexp(logits + u[:, None], axis=0)  # [codes]
    return jnp.where(jnp.isfinite(v), v, 0.0)

  v = jax.lax.fori_loop(0, iterations, body, jnp.zeros((num_codes,), jnp.float32))
  # The row potential is constant along a row, so it does not change the argmax.
  return jnp.argmax(logits + v[None, :], axis=1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("epsilon", "iterations"))
def _batched_sinkhorn_codes(distances: jax.Array, row_mask: jax.Array, epsilon: float,
                            iterations: int) -> jax.Array:
  """vmap of `sinkhorn_codes` over independent groups: [groups, rows, codes] -> [groups, rows]."""
  return jax.vmap(lambda d, m: sinkhorn_codes(d, epsilon, iterations, m))(distances, row_mask)


def _next_power_of_two(x: int) -> int:
  return 1 << max(0, int(x) - 1).bit_length()


def grouped_sinkhorn_codes(distances: np.ndarray, group_ids: np.ndarray,
                           epsilon: float = 0.003, iterations: int = 50,
                           batch_rows: Tuple[int, int] = (1024, 256)) -> np.ndarray:
  """Runs one independent Sinkhorn problem per group (e.g. per colliding identifier).

  The published collision fix re-assigns each group of colliding items on its own, with
  its own centring. Doing that one group at a time is a Python loop over up to hundreds of
  thousands of groups; instead groups are bucketed by size (padded to a power of two) and
  each bucket is solved in padded batches of fixed shape [rows / size, size, codes].
  Shapes are few on purpose: XLA compiles every new shape (~2 s on a small CPU). Big
  batches (1M floats, about the L2 cache) carry the bulk at the best throughput; the
  remainder of a bucket goes in small batches so a nearly empty bucket costs little.

  Args:
    distances: [m, codes] distances of each item to the codes of its level.
    group_ids: [m] any integer label; items with the same label form one problem.
    epsilon, iterations: as in `sinkhorn_codes`.
    batch_rows: (big, small) padded rows per call; a larger group gets a call of its own.

  Returns:
    codes [m] int32.
  """
  distances = np.asarray(distances, np.float32)
  group_ids = np.asarray(group_ids)
  m, num_codes = distances.shape
  out = np.empty((m,), np.int32)
  if m == 0:
    return out
  order = np.argsort(group_ids, kind="stable")
  sorted_ids = group_ids[order]
  starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])  # [groups]
  sizes = np.diff(np.r_[starts, m])  # [groups]
  capacities = np.array([_next_power_of_two(s) for s in sizes], np.int64)  # [groups]

  def solve(chunk, capacity, groups_per_batch):
    rows = np.arange(capacity)[None, :]  # [1, capacity]
    # Row r of group g is item order[starts[g] + r] when r < sizes[g].
    valid = rows < sizes[chunk][:, None]  # [chunk, capacity]
    items = order[np.where(valid, starts[chunk][:, None] + rows, 0)]  # [chunk, capacity]
    batch = np.zeros((groups_per_batch, capacity, num_codes), np.float32)
    mask = np.zeros((groups_per_batch, capacity), bool)
    batch[:chunk.size] = distances[items]
    mask[:chunk.size] = valid
    codes = np.asarray(_batched_sinkhorn_codes(batch, mask, epsilon, iterations))
    out[items[valid]] = codes[:chunk.size][valid]

  for capacity in np.unique(capacities):
    capacity = int(capacity)
    bucket = np.flatnonzero(capacities == capacity)  # groups in this bucket
    big = max(1, batch_rows[0] // capacity)
    small = max(1, batch_rows[1] // capacity)
    lo = 0
    while bucket.size - lo >= big:
      solve(bucket[lo:lo + big], capacity, big)
      lo += big
    while lo < bucket.size:
      solve(bucket[lo:lo + small], capacity, small)
      lo += small
  return out
