"""Train state and the jitted, sharded train and eval steps.

Everything here is compiled once for the whole mesh: the state lives sharded from the
moment it is created (`jax.jit(init, out_shardings=...)`, never a host copy), the step
consumes global batches that the partitioner assembles from each process's rows, and the
old state's buffers are donated so the update happens in place.

Exactness of gradient accumulation. The model's loss is a ratio, sum of token losses over
sum of token weights. Averaging per-microbatch ratios would weight microbatches with few
target tokens too heavily, so instead each microbatch contributes the gradient of its
*sum* (loss x weight_sum, the weight sum held constant) and the accumulated gradient is
divided once by the total weight sum. The result is the full-batch gradient up to float
rounding, whatever the split.

Reproducibility. The dropout key of step s is fold_in(PRNGKey(seed), s) (and, within a
step, fold_in(that, microbatch)), a pure function of the seed and the step counter stored
in the state, so a run resumed from a checkpoint sees the same randomness as one that
never stopped.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import optax

from gensar_jax.optimizers import Optimizer
from gensar_jax.partitioning import DATA_AXIS, Partitioner, fit_spec_to_shape

Batch = Mapping[str, np.ndarray]
Metrics = Dict[str, jax.Array]

AUX_SUMS = ("loss_sum", "z_loss_sum", "weight_sum", "correct_sum")


@flax.struct.dataclass
class TrainState:
  """What a checkpoint holds: step (int32 scalar), fp32 params (unboxed), optimiser state."""
  step: jax.Array
  params: Any
  opt_state: Any


def _summed_stats(objective_sum: jax.Array, aux: Mapping[str, Any]) -> Dict[str, jax.Array]:
  """The statistics that add up across microbatches, with a fixed set of keys."""
  missing = [k for k in ("weight_sum", "correct_sum") if k not in aux]
  if missing:
    raise KeyError(f"model.loss_fn aux lacks {missing}; the trainer needs {AUX_SUMS} to "
                   "aggregate metrics exactly over microbatches and devices")
  objective_sum = jnp.asarray(objective_sum, jnp.float32)
  zero = jnp.zeros((), jnp.float32)
  return {
      "objective_sum": objective_sum,
      "loss_sum": jnp.asarray(aux.get("loss_sum", objective_sum), jnp.float32),
      "z_loss_sum": jnp.asarray(aux.get("z_loss_sum", zero), jnp.float32),
      "weight_sum": jnp.asarray(aux["weight_sum"], jnp.float32),
      "correct_sum": jnp.asarray(aux["correct_sum"], jnp.float32),
  }


def _global_norm(tree: Any) -> jax.Array:
  """sqrt of the sum of squares of every leaf (float32), as clip_by_global_norm computes it."""
  squares = [jnp.sum(jnp.square(jnp.asarray(x, jnp.float32))) for x in jax.tree.leaves(tree)]
  return jnp.sqrt(sum(squares))


def _metrics_from_sums(sums: Mapping[str, jax.Array]) -> Metrics:
  """Per-token averages from summed statistics (a batch with no target tokens gives 0)."""
  weight_sum = sums["weight_sum"]
  denominator = jnp.maximum(weight_sum, 1e-8)
  return {
      "loss": sums["objective_sum"] / denominator,
      "z_loss": sums["z_loss_sum"] / denominator,
      "accuracy": sums["correct_sum"] / denominator,
      "weight_sum": weight_sum,
  }


@gin.configurable
class Trainer:
  """Owns the compiled steps for one model, partitioner and optimiser.

  Args:
    model: an EncoderDecoderModel (get_initial_variables, loss_fn).
    partitioner: gives the mesh, the rules and every sharding.
    optimizer: an optimizers.Optimizer (transformation + learning-rate schedule).
    num_microbatches: gradient accumulation steps inside one train step; the global batch
      must split evenly into them.
    seed: seeds parameter initialisation and (via fold_in with the step) dropout.
  """

  def __init__(self,
               model: Any,
               partitioner: Partitioner,
               optimizer: Optimizer,
               num_microbatches: int = 1,
               seed: int = 0):
    if not isinstance(optimizer, Optimizer):
      raise TypeError(f"Trainer: optimizer must be a gensar_jax.optimizers.Optimizer (from "
                      f"create_optimizer), got {type(optimizer).__name__}")
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
      raise ValueError(f"Trainer: num_microbatches={num_microbatches!r} must be an int >= 1")
    self.model = model
    self.partitioner = partitioner
    self.optimizer = optimizer
    self.num_microbatches = num_microbatches
    self.seed = seed
    self._input_shapes: Optional[Dict[str, Tuple[int, ...]]] = None
    self._state_shape: Optional[TrainState] = None
    self._state_shardings: Optional[TrainState] = None
    self._init_jit: Optional[Callable] = None
    self._train_steps: Dict[Any, Callable] = {}
    self._eval_steps: Dict[Any, Callable] = {}

  # ------------------------------------------------------------------ state
  def _init_fn(self, rng: jax.Array, boxed: bool) -> TrainState:
    variables = self.model.get_initial_variables(rng, self._input_shapes)
    params = variables["params"]
    if not boxed:
      params = nn.meta.unbox(params)
    opt_state = self.optimizer.init(nn.meta.unbox(params))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)

  def _derive_shapes(self, input_shapes: Mapping[str, Tuple[int, ...]]) -> None:
    shapes = {k: tuple(int(d) for d in v) for k, v in input_shapes.items()}
    if shapes == self._input_shapes and self._state_shardings is not None:
      return
    self._input_shapes = shapes
    rng = jax.random.PRNGKey(self.seed)
    boxed_params = jax.eval_shape(
        lambda r: self.model.get_initial_variables(r, self._input_shapes)["params"], rng)
    self._state_shape = jax.eval_shape(functools.partial(self._init_fn, boxed=False), rng)
    params_shardings = self.partitioner.params_shardings(boxed_params)
    opt_shardings = self.partitioner.derived_shardings(
        self._state_shape.opt_state, self._state_shape.params, params_shardings)
    self._state_shardings = TrainState(step=self.partitioner.replicated,
                                       params=params_shardings,
                                       opt_state=opt_shardings)
    self._init_jit = None
    self._train_steps.clear()
    self._eval_steps.clear()

  def _require_shapes(self) -> None:
    if self._state_shardings is None:
      raise RuntimeError("Trainer: call init_state(input_shapes) (or set_input_shapes) "
                         "first; the state layout depends on the model's input shapes")

  def set_input_shapes(self, input_shapes: Mapping[str, Tuple[int, ...]]) -> None:
    """Derive state shapes and shardings without creating a state (e.g. before restore)."""
    self._derive_shapes(input_shapes)

  @property
  def state_shape(self) -> TrainState:
    """Abstract TrainState (jax.ShapeDtypeStruct leaves), from jax.eval_shape."""
    self._require_shapes()
    return self._state_shape

  @property
  def state_shardings(self) -> TrainState:
    """A TrainState of NamedSharding: where each leaf of the state lives."""
    self._require_shapes()
    return self._state_shardings

  def init_state(self, input_shapes: Mapping[str, Tuple[int, ...]]) -> TrainState:
    """A fresh TrainState created directly in its sharded layout.

    `input_shapes` are the model's init shapes, e.g. {'encoder_input_tokens': (b, li),
    'decoder_input_tokens': (b, lt)}; only their lengths matter to the parameters.
    """
    self._derive_shapes(input_shapes)
    if self._init_jit is None:
      self._init_jit = jax.jit(functools.partial(self._init_fn, boxed=False),
                               out_shardings=self._state_shardings)
    with self.partitioner.activation_context():
      return self._init_jit(jax.random.PRNGKey(self.seed))

  # ------------------------------------------------------------------ batches
  def batch_shardings(self, global_shapes: Mapping[str, Tuple[int, ...]]
                      ) -> Dict[str, NamedSharding]:
    return {k: self.partitioner.batch_sharding(v, name=k) for k, v in global_shapes.items()}

  def _as_global_batch(self, batch: Mapping[str, Any]) -> Dict[str, jax.Array]:
    """Host-local numpy rows -> global sharded arrays (global jax.Arrays pass through)."""
    if all(isinstance(v, jax.Array) for v in batch.values()):
      return dict(batch)
    return self.partitioner.shard_batch(
        {k: np.asarray(v, dtype=np.int32) if np.issubdtype(np.asarray(v).dtype, np.integer)
         else np.asarray(v) for k, v in batch.items()})

  @staticmethod
  def _signature(batch: Mapping[str, jax.Array]):
    return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))

  # ------------------------------------------------------------------ train step
  def _microbatches(self, batch: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
    """[batch, ...] -> [num_microbatches, batch / num_microbatches, ...].

    Microbatch m takes rows m, m + M, m + 2M, ...: splitting the row index as
    (row // M, row % M) keeps the data-sharded dimension outermost, so every microbatch
    is spread over all data shards instead of living on a few of them.
    """
    m = self.num_microbatches
    out = {}
    for name, x in batch.items():
      if x.shape[0] % m:
        raise ValueError(f"train_step: batch size {x.shape[0]} of {name!r} is not divisible "
                         f"by num_microbatches={m}")
      split = x.reshape((x.shape[0] // m, m) + x.shape[1:])   # [batch/M, M, ...]
      split = jnp.swapaxes(split, 0, 1)                       # [M, batch/M, ...]
      spec = fit_spec_to_shape(self.partitioner.mesh, PartitionSpec(None, DATA_AXIS),
                               split.shape, what=f"microbatched {name}")
      out[name] = jax.lax.with_sharding_constraint(
          split, NamedSharding(self.partitioner.mesh, spec))
    return out

  def _sum_grads_and_stats(self, params, batch, dropout_rng):
    """Gradient of the summed loss and summed statistics over one (micro)batch."""

    def summed_objective(p):
      loss, aux = self.model.loss_fn(p, batch, dropout_rng)
      weight_sum = jax.lax.stop_gradient(aux["weight_sum"])
      return loss * weight_sum, aux

    (objective_sum, aux), grads = jax.value_and_grad(summed_objective, has_aux=True)(params)
    return grads, _summed_stats(objective_sum, aux)

  def _train_step_fn(self, state: TrainState, batch: Dict[str, jax.Array]):
    dropout_base = jax.random.fold_in(jax.random.PRNGKey(self.seed), state.step)
    params_shardings = self._state_shardings.params
    if self.num_microbatches == 1:
      grads, sums = self._sum_grads_and_stats(state.params, batch, dropout_base)
    else:
      microbatches = self._microbatches(batch)

      def accumulate(carry, inputs):
        grads_acc, sums_acc = carry
        index, microbatch = inputs
        rng = jax.random.fold_in(dropout_base, index)
        grads, sums = self._sum_grads_and_stats(state.params, microbatch, rng)
        grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
        grads_acc = jax.lax.with_sharding_constraint(grads_acc, params_shardings)
        sums_acc = {k: sums_acc[k] + v for k, v in sums.items()}
        return (grads_acc, sums_acc), None

      zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
      zero_sums = {k: jnp.zeros((), jnp.float32)
                   for k in ("objective_sum",) + AUX_SUMS}
      (grads, sums), _ = jax.lax.scan(
          accumulate, (zero_grads, zero_sums),
          (jnp.arange(self.num_microbatches), microbatches))
    # Full-batch gradient of (sum of token losses / sum of weights).
    denominator = jnp.maximum(sums["weight_sum"], 1e-8)
    grads = jax.tree.map(lambda g: (g / denominator).astype(jnp.float32), grads)
    grads = jax.lax.with_sharding_constraint(grads, params_shardings)
    grad_norm = _global_norm(grads)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = _metrics_from_sums(sums)
    metrics["learning_rate"] = jnp.asarray(
        self.optimizer.learning_rate_fn(state.step), jnp.float32)
    metrics["grad_norm"] = grad_norm
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  def _compiled_train_step(self, batch: Dict[str, jax.Array]) -> Callable:
    key = self._signature(batch)
    step = self._train_steps.get(key)
    if step is None:
      batch_shardings = self.batch_shardings({k: v.shape for k, v in batch.items()})
      step = jax.jit(self._train_step_fn,
                     in_shardings=(self._state_shardings, batch_shardings),
                     out_shardings=(self._state_shardings, self.partitioner.replicated),
                     donate_argnums=(0,))
      self._train_steps[key] = step
    return step

  def train_step(self, state: TrainState, batch: Mapping[str, Any]
                 ) -> Tuple[TrainState, Metrics]:
    """One optimiser update on a batch: host-local numpy rows or global jax.Arrays.

    `state` is donated: do not use it after the call. Metrics are replicated scalars:
    loss, z_loss, accuracy, weight_sum, learning_rate (of the step just taken), grad_norm
    (before clipping).
    """
    self._require_shapes()
    batch = self._as_global_batch(batch)
    for name, value in batch.items():  # checked here, before the state could be donated
      if value.shape[0] % self.num_microbatches:
        raise ValueError(f"train_step: global batch size {value.shape[0]} of {name!r} is not "
                         f"divisible by num_microbatches={self.num_microbatches}")
    step = self._compiled_train_step(batch)
    with self.partitioner.activation_context():
      return step(state, batch)

  # ------------------------------------------------------------------ eval step
  def _eval_step_fn(self, params, batch: Dict[str, jax.Array]) -> Metrics:
    loss, aux = self.model.loss_fn(params, batch, None)
    return _metrics_from_sums(_summed_stats(loss * aux["weight_sum"], aux))

  def eval_step(self, params: Any, batch: Mapping[str, Any]) -> Metrics:
    """Loss, z_loss, accuracy and weight_sum on a batch, without dropout."""
    self._require_shapes()
    batch = self._as_global_batch(batch)
    key = self._signature(batch)
    step = self._eval_steps.get(key)
    if step is None:
      batch_shardings = self.batch_shardings({k: v.shape for k, v in batch.items()})
      step = jax.jit(self._eval_step_fn,
                     in_shardings=(self._state_shardings.params, batch_shardings),
                     out_shardings=self.partitioner.replicated)
      self._eval_steps[key] = step
    with self.partitioner.activation_context():
      return step(params, batch)
