"""The run's own inputs are read back from the config.gin that training wrote.

gin writes a binding whose line would pass 80 columns as `NAME = \\` with the value on
the next line; a run directory under a long path (a pod's bucket, pytest's temporary
folders under xdist) gets exactly that form, and the check must still fire.
"""
import shutil

import gin
import pytest

from gensar_jax import restore
from gensar_jax.checkpoints import CheckpointError


@gin.configurable
def _consumer(vocab_path=None, identifiers_dir=None):
  return vocab_path, identifiers_dir


def _write_trained_config(model_dir, vocab_path, identifiers_dir):
  gin.clear_config()
  try:
    gin.parse_config([f"VOCAB_PATH = '{vocab_path}'", f"IDENTIFIERS_DIR = '{identifiers_dir}'",
                      "_consumer.vocab_path = %VOCAB_PATH",
                      "_consumer.identifiers_dir = %IDENTIFIERS_DIR"])
    _consumer()
    text = gin.operative_config_str()
  finally:
    gin.clear_config()
  (model_dir / "config.gin").write_text(text)
  return text


def test_a_long_vocab_path_wrapped_by_gin_is_still_compared(tmp_path):
  deep = tmp_path / ("a_folder_name_long_enough_to_wrap_" * 3) / "vocab"
  deep.mkdir(parents=True)
  trained_vocab = deep / "gensar.model"
  trained_vocab.write_bytes(b"the run's vocabulary")
  model_dir = tmp_path / "model"
  model_dir.mkdir()
  text = _write_trained_config(model_dir, trained_vocab, tmp_path / "ids")
  assert "VOCAB_PATH = \\\n" in text  # the form this test is about

  moved = tmp_path / "moved.model"
  shutil.copy(trained_vocab, moved)
  restore.check_run_inputs(str(model_dir), str(moved), str(tmp_path / "ids"))  # same bytes

  other = tmp_path / "other.model"
  other.write_bytes(b"another vocabulary")
  with pytest.raises(CheckpointError, match=r"trained with VOCAB_PATH=.*other contents"):
    restore.check_run_inputs(str(model_dir), str(other), str(tmp_path / "ids"))


def test_an_unreadable_config_skips_the_comparison(tmp_path):
  model_dir = tmp_path / "model"
  model_dir.mkdir()
  (model_dir / "config.gin").write_text("VOCAB_PATH = 'unterminated\n")
  other = tmp_path / "other.model"
  other.write_bytes(b"x")
  restore.check_run_inputs(str(model_dir), str(other), str(tmp_path / "ids"))
