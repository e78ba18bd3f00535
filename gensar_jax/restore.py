"""Parameters of a trained run, for evaluation, inference and export.

A run directory (gensar_jax/train.py) holds orbax checkpoints of the whole TrainState; the
optimiser state is restored too (orbax restores a tree as saved) and dropped. "best" is the
checkpoint kept for the best validation metric (TrainCheckpoints.best_metric), falling back
to the latest when none was tracked; a step number picks that step.
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Tuple, Union

from gensar_jax import checkpoints as checkpoints_lib
from gensar_jax import io_utils
from gensar_jax import optimizers as optimizers_lib
from gensar_jax import partitioning as partitioning_lib
from gensar_jax import trainer as trainer_lib

logger = logging.getLogger(__name__)
CHECKPOINTS_SUBDIR = "checkpoints"


def load_params(model_dir: str, model: Any, checkpoint: Union[str, int] = "best",
                partitioner: Optional[partitioning_lib.Partitioner] = None
                ) -> Tuple[Any, int]:
  """(params placed with the partitioner's shardings, the step restored)."""
  directory = io_utils.join(model_dir, CHECKPOINTS_SUBDIR)
  if not io_utils.isdir(directory):
    raise checkpoints_lib.CheckpointError(
        f"{model_dir}: no checkpoints/ directory; train a model there first "
        "(python -m gensar_jax.train)")
  trainer = trainer_lib.Trainer(model=model, partitioner=partitioner
                                or partitioning_lib.Partitioner(),
                                optimizer=optimizers_lib.create_optimizer())
  # Parameter shapes do not depend on the batch; one row per device keeps every split even.
  rows = max(1, len(trainer.partitioner.mesh.devices.flat))
  trainer.set_input_shapes({"encoder_input_tokens": (rows, 8),
                            "decoder_input_tokens": (rows, 8)})
  target = checkpoints_lib.abstract_state(trainer.state_shape, trainer.state_shardings)
  manager = checkpoints_lib.TrainCheckpoints(directory)
  try:
    if checkpoint == "best":
      step = manager.best_step()
      if step is None:
        step = manager.latest_step()
        logger.info("%s: no best checkpoint recorded, using the latest", directory)
    elif checkpoint == "latest":
      step = manager.latest_step()
    else:
      step = int(checkpoint)
      if step not in manager.all_steps():
        raise checkpoints_lib.CheckpointError(
            f"{directory}: no checkpoint at step {step} (have {manager.all_steps()})")
    if step is None:
      raise checkpoints_lib.CheckpointError(f"{directory}: holds no checkpoint")
    restored = manager.restore(step, target)
  finally:
    manager.close()
  return restored.state.params, step
