"""Parameters of a trained run, for evaluation, inference and export.

A run directory (gensar_jax/train.py) holds orbax checkpoints of the whole TrainState; the
optimiser state is restored too (orbax restores a tree as saved) and dropped. "best" is the
checkpoint kept for the best validation metric (TrainCheckpoints.best_metric), falling back
to the latest when none was tracked; a step number picks that step.

`load_run` is the one loader evaluate, infer and export share: the ranking setup, a check
that the vocabulary and identifier table given have the contents the run was trained with
(token ids are positions in the vocabulary, so another vocabulary of the same size would
restore silently and decode nonsense), the model and the chosen parameters.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any, Dict, Optional, Tuple, Union

from gin import config_parser

from gensar_jax import checkpoints as checkpoints_lib
from gensar_jax import io_utils
from gensar_jax import optimizers as optimizers_lib
from gensar_jax import partitioning as partitioning_lib
from gensar_jax import trainer as trainer_lib
from gensar_jax.data.schema import DataError
from gensar_jax.identifiers.table import IDENTIFIERS_FILE, extension_problem

logger = logging.getLogger(__name__)
CHECKPOINTS_SUBDIR = "checkpoints"
TRAINED_CONFIG = "config.gin"


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


# ------------------------------------------------------------------ a run for decoding


def _file_digest(path: str) -> str:
  return hashlib.sha256(io_utils.read_bytes(path)).hexdigest()


class _LiteralsOnly(config_parser.ParserDelegate):
  """Reads a config's values without resolving `@configurable` or `%MACRO` references."""

  def configurable_reference(self, scoped_name, evaluate):
    return None

  def macro(self, name):
    return None


def _trained_macros(model_dir: str) -> Dict[str, str]:
  """The string macros of the run's operative config (MODEL_DIR/config.gin), if written.

  Parsed with gin's own parser: gin writes a binding whose line would pass 80 columns as
  `NAME = \\` with the value on the next line, which any long path does.
  """
  path = io_utils.join(model_dir, TRAINED_CONFIG)
  if not io_utils.isfile(path):
    return {}
  try:
    statements = list(config_parser.ConfigParser(io_utils.read_text(path), _LiteralsOnly()))
  except SyntaxError as e:
    logger.warning("%s: not a readable gin config (%s); the run's inputs are not compared",
                   path, e)
    return {}
  return {statement.selector: statement.value for statement in statements
          if isinstance(statement, config_parser.BindingStatement) and not statement.scope
          and not statement.arg_name and isinstance(statement.value, str)}


def check_run_inputs(model_dir: str, vocab_path: str, identifiers_dir: str) -> None:
  """Refuses a vocabulary or identifier table whose contents differ from the run's own.

  Token ids are positions in the vocabulary, so a different vocabulary of the same padded
  size restores without complaint and decodes nonsense; the only record of what training
  used is the operative config it wrote. Paths may move between machines, so contents are
  compared, and a training-time file that is no longer there is only logged.
  """
  macros = _trained_macros(model_dir)
  for macro, given, file_name in (("VOCAB_PATH", vocab_path, None),
                                  ("IDENTIFIERS_DIR", identifiers_dir, IDENTIFIERS_FILE)):
    trained = macros.get(macro)
    if trained is None:
      continue
    trained_file = io_utils.join(trained, file_name) if file_name else trained
    given_file = io_utils.join(given, file_name) if file_name else given
    if not io_utils.isfile(trained_file):
      logger.info("%s: trained with %s=%r, which is not here; not compared", model_dir,
                  macro, trained)
      continue
    if not io_utils.isfile(given_file):
      continue  # the setup reports a missing input with its own message
    if _file_digest(trained_file) != _file_digest(given_file):
      why, hint = "has other contents", ""
      if file_name == IDENTIFIERS_FILE:  # items added since (gensar_jax/add_items.py)?
        problem = extension_problem(io_utils.read_text(trained_file),
                                    io_utils.read_text(given_file))
        if problem is None:
          logger.info("%s extends the table %s was trained with; decoding the items added "
                      "since", given_file, model_dir)
          continue
        why = f"is not an extension of it ({problem})"
        hint = ", or a table gensar_jax.add_items extended from it"
      config = io_utils.join(model_dir, TRAINED_CONFIG)
      raise checkpoints_lib.CheckpointError(
          f"{model_dir}: trained with {macro}={trained!r} ({config}), but {given_file} "
          f"{why}; decode with the {macro} the run was trained with{hint}")


def _ranking_setup(who: str):
  """ranking.ranking_setup(), with its input errors reported as DataError (exit 2)."""
  from gensar_jax import ranking  # pylint: disable=g-import-not-at-top
  try:
    return ranking.ranking_setup()
  except DataError:
    raise
  except (ValueError, FileNotFoundError) as e:
    # VocabularyError (a token missing from the vocabulary), an item without identifier,
    # a missing identifier table: all mean the inputs given do not belong together.
    raise DataError(f"{who}: the vocabulary, identifiers and prepared data do not fit: "
                    f"{e}") from e


def _load_params_checked(model_dir: str, model, checkpoint: Union[str, int], vocab_path: str):
  try:
    return load_params(model_dir, model, checkpoint)
  except DataError:
    raise
  except ValueError as e:
    # Orbax refuses a stored array whose shape differs from the model built here; for the
    # embeddings that means another vocabulary (or another gin model size).
    raise checkpoints_lib.CheckpointError(
        f"{model_dir}: the checkpoint does not fit the model built from vocabulary "
        f"{vocab_path} (vocab_size {model.module.config.vocab_size}) and the gin model "
        f"size: {e}") from e


@dataclasses.dataclass(frozen=True)
class LoadedRun:
  setup: Any          # ranking.RankingSetup
  model: Any          # the EncoderDecoderModel built from the run's vocabulary
  params: Any
  step: int


def load_run(model_dir: str, checkpoint: Union[str, int] = "best",
             who: str = "evaluate") -> LoadedRun:
  """The gin-bound ranking setup, checked against the run, its model and parameters.
  Input mistakes are DataError or CheckpointError (exit 2 in the CLIs), named for `who`."""
  from gensar_jax.models.encoder_decoder import build_model  # pylint: disable=g-import-not-at-top
  setup = _ranking_setup(who)
  vocab_path = setup.vocabulary.sentencepiece_model_file
  check_run_inputs(model_dir, vocab_path, setup.identifiers_dir)
  model = build_model(setup.vocabulary)
  params, step = _load_params_checked(model_dir, model, checkpoint, vocab_path)
  return LoadedRun(setup=setup, model=model, params=params, step=step)
