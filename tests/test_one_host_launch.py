"""launch/learning_curves_one_host.py: every output of the experiment under one folder."""
import importlib.util
import os
import sys

import gin

from gensar_jax import gin_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "learning_curves_one_host", os.path.join(REPO, "launch", "learning_curves_one_host.py"))
one_host = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(one_host)


def _resolved(query):
  value = gin.query_parameter(query)
  while hasattr(value, "selector"):  # a macro reference: %NAME
    value = gin.query_parameter(str(value))
  return value


def _parsed_config(argv):
  gin.clear_config()
  try:
    gin_utils.parse_gin(argv)
    return gin.config_str(), {
        q: _resolved(q) for q in (
            "ablations.run_dir", "ablations.curves_dir", "ablations.identifiers_dir",
            "ablations.baselines_dir", "ablations.base_eval_dir", "pipeline.prepared_dir",
            "pipeline.vocab_path", "pipeline.model_dir", "pipeline.comparison_dir",
            "%TRAIN_STEPS", "%BATCH_SIZE")}
  finally:
    gin.clear_config()


def test_every_directory_of_the_experiment_is_under_out(tmp_path):
  out = str(tmp_path / "curves")
  command = one_host.command(out, "full", ["--gin.SEED=3"], dry_run=False)
  assert command[:3] == [sys.executable, "-m", "gensar_jax.ablations"]
  text, values = _parsed_config(command[3:])
  assert "runs/ml100k_quickstart" not in text  # no path left at the quickstart's default
  for name, path in values.items():
    if not name.startswith("%"):
      assert path == out or path.startswith(out + os.sep), (name, path)
  assert values["%TRAIN_STEPS"] == 2000 and values["%BATCH_SIZE"] == 128
  assert "SEED = 3" in text


def test_tiny_size_keeps_the_paths_and_shrinks_the_run(tmp_path):
  out = str(tmp_path / "tiny")
  command = one_host.command(out, "tiny", [], dry_run=True)
  text, values = _parsed_config(command[3:])
  assert values["%TRAIN_STEPS"] == 12 and values["%BATCH_SIZE"] == 8
  assert "runs/ml100k_quickstart" not in text
  assert "ablations.dry_run = True" in text
