"""Optimisers from gin: AdamW (default) or Adafactor, cosine schedule with warm-up, clipping.

The trainer needs two things from an optimiser: the optax transformation, and the learning
rate as a function of the step so it can report it. `Optimizer` carries both, so a gin file
swaps the whole recipe with one binding:

  Trainer.optimizer = @create_optimizer()
  create_optimizer.name = 'adafactor'
  create_learning_rate_schedule.peak_learning_rate = 1e-3

Weight decay (AdamW) applies only to parameters with two or more dimensions: kernels and
embeddings. One-dimensional parameters (layer-norm scales, biases) are left alone, the
usual choice for transformers; decaying a norm scale pulls it toward zero, which only
fights the normalisation. The rule is by rank, not by name, so it needs no knowledge of
the model's parameter names.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import gin
import jax
import optax


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """An optax transformation and the learning-rate schedule it was built with."""
  tx: optax.GradientTransformation
  learning_rate_fn: optax.Schedule

  def init(self, params: Any) -> optax.OptState:
    return self.tx.init(params)

  def update(self, grads: Any, opt_state: optax.OptState, params: Any):
    return self.tx.update(grads, opt_state, params)


@gin.configurable
def create_learning_rate_schedule(peak_learning_rate: float = 1e-3,
                                  warmup_steps: int = 1000,
                                  decay_steps: int = 100_000,
                                  end_learning_rate_fraction: float = 0.1) -> optax.Schedule:
  """Linear warm-up from 0 to the peak, then cosine decay to peak x end fraction.

  `decay_steps` counts from step 0 (warm-up included), like optax's
  warmup_cosine_decay_schedule; after it the rate stays at the end value.
  """
  if peak_learning_rate <= 0:
    raise ValueError(f"create_learning_rate_schedule: peak_learning_rate={peak_learning_rate} "
                     "must be > 0")
  if warmup_steps < 0 or decay_steps < 1:
    raise ValueError(f"create_learning_rate_schedule: warmup_steps={warmup_steps} must be >= 0 "
                     f"and decay_steps={decay_steps} >= 1")
  decay_steps = max(decay_steps, warmup_steps + 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=peak_learning_rate,
      warmup_steps=warmup_steps,
      decay_steps=decay_steps,
      end_value=peak_learning_rate * end_learning_rate_fraction)


def decay_mask(params: Any) -> Any:
  """True for parameters that get weight decay: rank >= 2 (kernels, embeddings)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


@gin.configurable
def create_optimizer(name: str = "adamw",
                     learning_rate_fn: Optional[optax.Schedule] = None,
                     b1: float = 0.9,
                     b2: float = 0.999,
                     eps: float = 1e-8,
                     weight_decay: float = 0.01,
                     clip_grad_norm: Optional[float] = 1.0) -> Optimizer:
  """Global-norm clipping followed by AdamW or Adafactor.

  Adafactor uses optax's defaults (factored second moments, update clipping, no momentum),
  the T5 recipe; `b1`, `b2`, `eps` and `weight_decay` apply to AdamW only.
  """
  if learning_rate_fn is None:
    learning_rate_fn = create_learning_rate_schedule()
  if name == "adamw":
    core = optax.adamw(learning_rate_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                       mask=decay_mask)
  elif name == "adafactor":
    core = optax.adafactor(learning_rate_fn)
  else:
    raise ValueError(f"create_optimizer: unknown optimizer name={name!r}; "
                     "expected 'adamw' or 'adafactor'")
  if clip_grad_norm is not None and clip_grad_norm <= 0:
    raise ValueError(f"create_optimizer: clip_grad_norm={clip_grad_norm} must be > 0 or None")
  parts = [optax.clip_by_global_norm(clip_grad_norm)] if clip_grad_norm else []
  return Optimizer(tx=optax.chain(*parts, core), learning_rate_fn=learning_rate_fn)
