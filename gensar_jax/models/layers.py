"""Building blocks of the T5 network (T5.1.1 and T5 v1.0), each parameter tagged with
logical axis names.

Logical names (mapped to mesh axes by the rules table in gensar_jax/partitioning.py):
  parameters:  vocab, embed, mlp, joined_kv (= heads * head_dim, flattened), relpos_buckets,
               heads
  activations: batch, length, embed, mlp, heads, kv, vocab
Outside a rules context the constraints are no-ops, so these modules also run unsharded.

Numerics follow T5.1.1: no biases anywhere, RMSNorm statistics in float32, attention
logits and softmax in float32, the 1/sqrt(head_dim) of dot-product attention folded into
the query initialiser (so the forward pass has no explicit scaling).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Initializer = Callable[..., Array]

# Large negative number instead of -inf: a row whose keys are all masked (an all-padding
# input) then softmaxes to uniform weights rather than NaN.
MASK_VALUE = -1e10

default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


@jax.custom_vjp
def add_shared_bias(x: Array, bias: Array) -> Array:
  """x [batch, ...] + bias [1, ...] (broadcast over the batch and any other size-1 axis).

  The same as `x + bias`, with a gradient that sums over the batch by a matrix-vector
  product instead of a reduction. XLA's CPU backend in jaxlib 0.10 runs a reduction over
  the leading axis of a wide array about 100 times slower than the equivalent product
  (17 ms against 0.14 ms for [16, 8, 128, 128]); the attention bias gradient of a t5-small
  train step paid that in every layer. Elsewhere the product is as cheap as the
  reduction; it runs at float32 precision everywhere.
  """
  return x + bias


def _add_shared_bias_fwd(x, bias):
  return x + bias, bias


def _add_shared_bias_bwd(bias, grad):
  batch = grad.shape[0]
  rows = grad.reshape((batch, -1))  # [batch, rest]
  # HIGHEST: on TPU a float32 product otherwise rounds its inputs to bfloat16.
  summed = jnp.dot(jnp.ones((batch,), grad.dtype), rows,
                   precision=lax.Precision.HIGHEST)  # [rest]
  summed = summed.reshape((1,) + grad.shape[1:])
  other_axes = tuple(i for i in range(1, grad.ndim)
                     if bias.shape[i] == 1 and grad.shape[i] != 1)
  if other_axes:
    summed = jnp.sum(summed, axis=other_axes, keepdims=True)
  return grad, summed.astype(bias.dtype)


add_shared_bias.defvjp(_add_shared_bias_fwd, _add_shared_bias_bwd)


def _axes(names: Sequence[Optional[str]]) -> Tuple[Optional[str], ...]:
  return tuple(names)


def constrain(x: Array, names: Sequence[Optional[str]]) -> Array:
  """Logical sharding constraint on an activation (a no-op without rules)."""
  return nn.with_logical_constraint(x, _axes(names))


class RMSNorm(nn.Module):
  """T5's layer norm: rescales by the root mean square, no centring and no bias.

  Statistics are taken in float32 even under bfloat16 compute, where the mean of squares
  over a few hundred features would otherwise lose most of its precision.
  """
  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    x32 = jnp.asarray(x, jnp.float32)
    mean_square = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = jnp.asarray(x32 * lax.rsqrt(mean_square + self.epsilon), self.dtype)
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (features,), self.param_dtype)
    return normed * jnp.asarray(scale, self.dtype)


class Dropout(nn.Module):
  """Inverted dropout whose keep mask costs an eighth of what `flax.linen.Dropout` pays.

  Flax draws a float uniform per element (`jax.random.bernoulli`): one 32-bit threefry
  output plus a float conversion each, 18 ms for the [16, 8, 128, 128] attention weights
  of a t5-small batch on XLA's CPU backend. Here one 32-bit draw feeds two elements, each
  kept when its 16-bit half is below round(keep * 2^16): 2.4 ms for the same mask. Kept
  values are scaled by 2^16 / threshold, the exact inverse of the keep probability that is
  used, so the expected output equals the input; that probability differs from 1 - rate
  by at most 2^-17. Masks differ from Flax's for the same key.
  """
  rate: float
  broadcast_dims: Tuple[int, ...] = ()
  rng_collection: str = "dropout"

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    if not 0.0 <= self.rate < 1.0:
      raise ValueError(f"Dropout: rate must be in [0, 1), got {self.rate}")
    if deterministic or self.rate == 0.0:
      return x
    threshold = int(round((1.0 - self.rate) * 65536))
    if threshold == 0:
      return jnp.zeros_like(x)
    mask_shape = [1 if d in [a % x.ndim for a in self.broadcast_dims] else n
                  for d, n in enumerate(x.shape)]
    size = math.prod(mask_shape)
    bits = jax.random.bits(self.make_rng(self.rng_collection), ((size + 1) // 2,), jnp.uint32)
    halves = lax.bitcast_convert_type(bits, jnp.uint16).reshape(-1)[:size]  # [size] uint16
    keep = (halves.astype(jnp.int32) < threshold).reshape(mask_shape)
    scale = jnp.asarray(65536.0 / threshold, x.dtype)
    return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))


class Dense(nn.Module):
  """A bias-free projection of the last axis, with a 2-D kernel and logical axis names.

  Multi-head projections keep their kernel flattened ([embed, heads * head_dim], axis
  'joined_kv') and reshape the activation, so a checkpoint stores plain matrices and
  fan-in initialisation sees the true input width.
  """
  features: int
  kernel_axes: Tuple[str, str]
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                        (x.shape[-1], self.features), self.param_dtype)
    x = jnp.asarray(x, self.dtype)
    kernel = jnp.asarray(kernel, self.dtype)
    # [..., in] -> [rows, in] x [in, out] -> [..., out]. One 2-D matmul rather than a
    # dot_general with free leading dimensions: XLA's CPU backend runs the backward pass of
    # the latter far slower (a gated MLP's step took 93 ms instead of 53 ms at
    # [32, 144, 128] x [128, 512]); on TPU/GPU the two compile to the same kernel.
    rows = x.reshape((-1, x.shape[-1]))  # [rows, in]
    out = lax.dot_general(rows, kernel, (((1,), (0,)), ((), ())))  # [rows, out]
    return out.reshape(x.shape[:-1] + (self.features,))


class Embed(nn.Module):
  """Token embedding table [vocab, embed], shared by the encoder and the decoder inputs.

  `attend` is the tied output projection of T5 v1.0 (`T5Config.logits_via_embedding`).
  The table is made in `setup` so both methods read the same parameter.
  """
  num_embeddings: int
  features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  embedding_init: Initializer = nn.initializers.normal(stddev=1.0)

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(self.embedding_init, ("vocab", "embed")),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, tokens: Array) -> Array:
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise TypeError(f"Embed: token ids must be integers, got dtype {tokens.dtype}")
    # [batch, length] -> [batch, length, embed]
    return jnp.take(jnp.asarray(self.embedding, self.dtype), tokens, axis=0)

  def attend(self, query: Array) -> Array:
    """[..., embed] -> [..., vocab] float32 logits against every embedding row."""
    table = jnp.asarray(self.embedding, jnp.float32)  # [vocab, embed]
    rows = jnp.asarray(query, jnp.float32).reshape((-1, query.shape[-1]))  # [rows, embed]
    out = lax.dot_general(rows, table, (((1,), (1,)), ((), ())))  # [rows, vocab]
    return out.reshape(query.shape[:-1] + (self.num_embeddings,))


_ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": functools.partial(nn.gelu, approximate=True),  # tanh form: T5X, HF gelu_new
    "gelu_exact": functools.partial(nn.gelu, approximate=False),  # erf form: HF "gelu"
    "silu": nn.silu,
    "linear": lambda x: x,
}


class MlpBlock(nn.Module):
  """T5's feed-forward block, no biases: wo(prod_i act_i(wi_i x)).

  ("gelu", "linear") is T5.1.1's gated GELU, wo(gelu(wi_0 x) * wi_1 x); a single
  activation, e.g. T5 v1.0's ("relu",), has one input kernel named `wi` (T5X's names).
  """
  mlp_dim: int
  activations: Tuple[str, ...] = ("gelu", "linear")
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    emb_dim = x.shape[-1]
    dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    hidden = None
    for i, name in enumerate(self.activations):
      dense_name = "wi" if len(self.activations) == 1 else f"wi_{i}"
      h = _ACTIVATIONS[name](Dense(self.mlp_dim, ("embed", "mlp"), name=dense_name, **dense)(x))
      hidden = h if hidden is None else hidden * h  # [batch, length, mlp]
    hidden = constrain(hidden, ("batch", "length", "mlp"))
    hidden = Dropout(self.dropout_rate, broadcast_dims=(-2,))(hidden, deterministic=deterministic)
    out = Dense(emb_dim, ("mlp", "embed"), name="wo", **dense)(hidden)
    return constrain(out, ("batch", "length", "embed"))


def relative_position_bucket(relative_position: Array, bidirectional: bool,
                             num_buckets: int = 32, max_distance: int = 128) -> Array:
  """Maps key_position - query_position to one of `num_buckets` buckets (T5's scheme).

  Near distances get a bucket each; farther ones share logarithmically wider buckets up to
  `max_distance`, beyond which everything falls in the last bucket. Bidirectional
  (encoder): half the buckets for keys before the query, half for keys after it. Causal
  (decoder): future keys all map to bucket 0 (they are masked anyway), so every bucket
  describes the past.
  """
  relative_position = jnp.asarray(relative_position, jnp.int32)
  # Distance looking back: positive when the key precedes the query.
  distance_back = -relative_position
  bucket_offset = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    bucket_offset = jnp.where(distance_back < 0, num_buckets, 0)
    distance = jnp.abs(distance_back)
  else:
    distance = jnp.maximum(distance_back, 0)
  num_exact = num_buckets // 2
  is_exact = distance < num_exact
  # log-spaced buckets for num_exact <= distance < max_distance
  log_ratio = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / num_exact)
               / math.log(max_distance / num_exact))
  log_bucket = num_exact + (log_ratio * (num_buckets - num_exact)).astype(jnp.int32)
  log_bucket = jnp.minimum(log_bucket, num_buckets - 1)
  return bucket_offset + jnp.where(is_exact, distance, log_bucket)


class RelativePositionBias(nn.Module):
  """A learned scalar per (head, bucket), added to the attention logits.

  Computed once per stack from query and key positions and shared by every layer of that
  stack; one table per stack (encoder: bidirectional, decoder: causal).
  """
  num_heads: int
  bidirectional: bool
  num_buckets: int = 32
  max_distance: int = 128
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, query_positions: Array, key_positions: Array) -> Array:
    """[q] query positions, [k] key positions -> bias [1, heads, q, k] (float32)."""
    table = self.param(
        "rel_embedding",
        nn.with_logical_partitioning(nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
                                     ("heads", "relpos_buckets")),
        (self.num_heads, self.num_buckets), self.param_dtype)
    relative = key_positions[None, :] - query_positions[:, None]  # [q, k]
    buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets,
                                       self.max_distance)
    # One-hot contraction instead of a gather (as T5X does): a gather's gradient is a
    # scatter-add of q * k values into 32 slots, slow on TPU; the contraction is a small
    # matmul everywhere and friendly to sharding the heads axis.
    one_hot = jax.nn.one_hot(buckets, self.num_buckets, dtype=jnp.float32)  # [q, k, buckets]
    bias = jnp.einsum("hb,qkb->hqk", jnp.asarray(table, jnp.float32), one_hot)
    return bias[None]  # [1, heads, q, k]


class KeyValue(NamedTuple):
  """Projected attention keys and values, each heads-major: [batch, heads, length, head_dim].

  What `MultiHeadAttention.project_kv` returns and what its `inputs_kv` accepts in place of
  the raw inputs: the decoder's cross-attention attends to the same encoder output at every
  decoding step, so its projections are computed once and passed in. Heads-major is the
  layout of the attention products' operands, so a decode step reads them as they are
  instead of re-laying out every layer's keys and values at every step (that transpose was
  about 5% of a t5-small constrained decode on CPU).
  """
  key: Array
  value: Array


class MultiHeadAttention(nn.Module):
  """Bias-free multi-head dot-product attention with an optional incremental KV cache.

  With `decode=True` the module keeps `cached_key` / `cached_value` ([batch, heads,
  max_length, head_dim], heads-major) and a scalar `cache_index` in the 'cache'
  collection. The first call (made with the full-length input, e.g. under
  `jax.eval_shape`) only creates them; every
  later call takes one new position, writes its key/value at `cache_index`, and attends
  over the positions written so far. Only self-attention uses the cache.

  The query/key/value projections are defined in `setup` (not inline) so that
  `project_kv` can run them on its own: cross-attention keys/values can be computed once
  per decode and handed back as a `KeyValue`. The parameter names (query, key, value, out)
  are the same either way.
  """
  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    joined = self.num_heads * self.head_dim
    dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def query_init(key, shape, dtype):
      # Folds the 1/sqrt(head_dim) logit scaling into the initial query weights.
      return default_kernel_init(key, shape, dtype) / math.sqrt(self.head_dim)

    self.query = Dense(joined, ("embed", "joined_kv"), kernel_init=query_init, **dense)
    self.key = Dense(joined, ("embed", "joined_kv"), **dense)
    self.value = Dense(joined, ("embed", "joined_kv"), **dense)

  def _split_heads(self, x: Array) -> Array:
    """[batch, length, heads * kv] -> [batch, length, heads, kv]."""
    x = x.reshape(x.shape[:-1] + (self.num_heads, self.head_dim))
    return constrain(x, ("batch", "length", "heads", "kv"))

  def _heads_major(self, x: Array) -> Array:
    """[batch, length, heads, kv] -> [batch, heads, length, kv]."""
    return constrain(x.transpose(0, 2, 1, 3), ("batch", "heads", "length", "kv"))

  def project_kv(self, inputs_kv: Array) -> KeyValue:
    """inputs_kv [batch, k, embed] -> its keys and values, each [batch, heads, k, kv]."""
    return KeyValue(self._heads_major(self._split_heads(self.key(inputs_kv))),
                    self._heads_major(self._split_heads(self.value(inputs_kv))))

  def _attend_heads_major(self, query, key, value, mask, bias, group, dropout):
    """query [batch_q, q, heads, kv], key/value [batch_k, heads, k, kv] -> like the query.

    Heads-major layout, the group's queries stacked on the query axis, so both products
    are plain batched matmuls over (example, head). Training uses it because XLA's CPU
    backend ran the gradients of the five-axis einsums of `_attend_einsum` markedly slower;
    a decode step because its keys and values (cache, cross-attention) are kept
    heads-major, so only the one-position query and context are transposed.
    """
    batch_q, q_len = query.shape[:2]
    batch_k, k_len = key.shape[0], key.shape[2]
    # [batch_k, heads, group * q, kv]
    query = query.reshape((batch_k, group) + query.shape[1:]).transpose(0, 3, 1, 2, 4)
    query = query.reshape((batch_k, self.num_heads, group * q_len, self.head_dim))
    value = jnp.asarray(value, self.dtype)
    batched = ((0, 1), (0, 1))
    # [batch_k, heads, group, q, k], float32 for a stable softmax
    logits = lax.dot_general(query, key, (((3,), (3,)), batched),
                             preferred_element_type=jnp.float32)
    logits = logits.reshape((batch_k, self.num_heads, group, q_len, k_len))
    if bias is not None:  # [1, heads, q, k] -> [1, heads, 1, q, k]
      logits = add_shared_bias(logits, jnp.asarray(bias, jnp.float32)[:, :, None])
    if mask is not None:
      if mask.shape[0] == batch_q and group > 1:  # per-row mask -> [batch_k, 1, group, q, k]
        mask = mask.reshape((batch_k, group) + mask.shape[1:]).transpose(0, 2, 1, 3, 4)
      else:                                       # per-example mask, shared by the group
        mask = mask[:, :, None]                   # [batch_k | 1, 1, 1, q, k]
      logits = jnp.where(mask, logits, MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1)
    weights = dropout(weights)
    weights = jnp.asarray(weights, self.dtype).reshape(
        (batch_k, self.num_heads, group * q_len, k_len))
    context = lax.dot_general(weights, value, (((3,), (2,)), batched))  # [bk, h, g*q, kv]
    context = context.reshape((batch_k, self.num_heads, group, q_len, self.head_dim))
    return context.transpose(0, 2, 3, 1, 4).reshape(
        (batch_q, q_len, self.num_heads, self.head_dim))

  def _attend_einsum(self, query, key, value, mask, bias, group, dropout):
    """Forward-only attention (evaluation, decoding): [batch_q, q, heads, kv] -> the same.

    Keys stay in their (cache) layout [batch_k, k, heads, kv]: transposing a whole KV cache
    at every decoding step would cost more than the one-row products it feeds.
    """
    batch_q = query.shape[0]
    batch_k = key.shape[0]
    query = query.reshape((batch_k, group) + query.shape[1:])  # [batch_k, group, q, heads, kv]
    # [batch_k, group, heads, q, k], float32 for a stable softmax
    logits = jnp.einsum("bgqhd,bkhd->bghqk", query, key, preferred_element_type=jnp.float32)
    if bias is not None:
      logits = logits + jnp.asarray(bias, jnp.float32)[:, None]
    if mask is not None:
      if mask.shape[0] == batch_q and group > 1:  # per-row mask: [batch_k, group, 1, q, k]
        mask = mask.reshape((batch_k, group) + mask.shape[1:])
      else:                                       # per-example mask, shared by the group
        mask = mask[:, None]
      logits = jnp.where(mask, logits, MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1)
    weights = dropout(weights)
    weights = jnp.asarray(weights, self.dtype)
    context = jnp.einsum("bghqk,bkhd->bgqhd", weights, jnp.asarray(value, self.dtype))
    return context.reshape((batch_q,) + context.shape[2:])  # [batch_q, q, heads, kv]

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Union[Array, KeyValue],
               mask: Optional[Array] = None, bias: Optional[Array] = None,
               decode: bool = False, deterministic: bool = True) -> Array:
    """inputs_q [batch, q, embed], inputs_kv [batch, k, embed] or its `project_kv`;
    mask [batch|1, 1, q, k] (True = may attend), bias [1, heads, q, k] -> [batch, q, embed]."""
    query = self._split_heads(self.query(inputs_q))
    heads_major = isinstance(inputs_kv, KeyValue)
    if heads_major:
      if decode:
        raise ValueError("MultiHeadAttention: precomputed keys/values are for "
                         "cross-attention; the decode cache projects each new position")
      if (inputs_kv.key.ndim != 4 or inputs_kv.key.shape[1] != self.num_heads
          or inputs_kv.key.shape[3] != self.head_dim
          or inputs_kv.value.shape != inputs_kv.key.shape):
        raise ValueError(f"MultiHeadAttention: precomputed key {inputs_kv.key.shape} / value "
                         f"{inputs_kv.value.shape} do not match [batch, {self.num_heads}, k, "
                         f"{self.head_dim}] (heads-major, as project_kv returns)")
      key, value = inputs_kv
    elif decode:
      key, value = self.project_kv(inputs_kv)  # [batch, heads, length, kv]
      heads_major = True
    else:
      key = self._split_heads(self.key(inputs_kv))  # [batch, k, heads, kv]
      value = self._split_heads(self.value(inputs_kv))

    if decode:
      # The cache is heads-major, [batch, heads, max_length, kv]: the layout the one-query
      # attention products read, so a step never re-lays out the whole cache.
      is_initialized = self.has_variable("cache", "cached_key")
      cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
      cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
      if is_initialized:
        batch, heads, max_length, head_dim = cached_key.value.shape
        if query.shape[1] != 1:
          raise ValueError(f"MultiHeadAttention: incremental decoding takes one position per "
                           f"step, got query length {query.shape[1]}")
        if query.shape[0] != batch:
          raise ValueError(f"MultiHeadAttention: decode batch {query.shape[0]} does not match "
                           f"the cache batch {batch}; build the cache for the same batch "
                           "(beams included)")
        index = cache_index.value
        # [batch, heads, max_length, kv] with this step's key/value at `index`
        key = lax.dynamic_update_slice(cached_key.value, key.astype(cached_key.value.dtype),
                                       (0, 0, index, 0))
        value = lax.dynamic_update_slice(cached_value.value,
                                         value.astype(cached_value.value.dtype),
                                         (0, 0, index, 0))
        cached_key.value, cached_value.value = key, value
        cache_index.value = index + 1
        # Positions not yet written (> index) are hidden. [1, 1, 1, max_length]
        written = (jnp.arange(max_length) <= index)[None, None, None, :]
        mask = written if mask is None else jnp.logical_and(mask, written)

    # Query rows may outnumber key rows by a whole factor: beam search decodes `group`
    # beams per example against that example's encoder output, so the cross-attention
    # keys/values are computed once per example instead of once per beam.
    batch_q, batch_k = query.shape[0], key.shape[0]
    if batch_q % batch_k:
      raise ValueError(f"MultiHeadAttention: query batch {batch_q} is not a multiple of the "
                       f"key batch {batch_k}")
    group = batch_q // batch_k
    # Created here, in the compact method, and applied by the helper.
    dropout = functools.partial(Dropout(self.dropout_rate), deterministic=deterministic)
    # The heads-major layout pays for the gradient (training) and suits keys that are
    # already heads-major (decode cache, precomputed cross-attention); other forward-only
    # passes (evaluation, the encoder) keep the einsum layout, which XLA's CPU backend runs
    # faster there: with heads-major everywhere the quickstart's test evaluation took 89 s
    # instead of 32 s for 320 examples per task.
    if heads_major:
      context = self._attend_heads_major(query, key, value, mask, bias, group, dropout)
    elif query.shape[1] > 1 and not deterministic:
      context = self._attend_heads_major(query, self._heads_major(key),
                                         self._heads_major(value), mask, bias, group, dropout)
    else:
      context = self._attend_einsum(query, key, value, mask, bias, group, dropout)
    context = constrain(context, ("batch", "length", "heads", "kv"))
    context = context.reshape(context.shape[:2] + (self.num_heads * self.head_dim,))
    out = Dense(inputs_q.shape[-1], ("joined_kv", "embed"), dtype=self.dtype,
                param_dtype=self.param_dtype, name="out")(context)
    return constrain(out, ("batch", "length", "embed"))


def key_padding_mask(key_tokens: Array) -> Array:
  """[batch, 1, 1, k] True where the key is a real token (id > 0, PAD = 0)."""
  key_valid = key_tokens > 0  # [batch, k]
  return key_valid[:, None, None, :]


def segment_mask(query_segments: Array, key_segments: Array) -> Array:
  """[batch, 1, q, k] True where query and key belong to the same packed example.

  Segment ids come from SeqIO's packing feature converter: 1, 2, ... for the examples
  packed into one row, 0 for padding. A padding key (segment 0) is never attended to, so
  a padding query sees no key at all and softmaxes to uniform weights (MASK_VALUE, not
  -inf); its output carries no loss weight.
  """
  same = query_segments[:, :, None] == key_segments[:, None, :]  # [batch, q, k]
  return (same & (key_segments[:, None, :] > 0))[:, None]


def causal_mask(length: int) -> Array:
  """[1, 1, length, length] True where key position <= query position."""
  positions = jnp.arange(length)
  return (positions[None, :] <= positions[:, None])[None, None]
