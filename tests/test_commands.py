"""The installed `gensar` command and the stage table it shares with `python -m`."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from gensar_jax import stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _source(module: str) -> str:
  spec = importlib.util.find_spec(module)
  assert spec is not None and spec.origin, f"{module} is not importable"
  with open(spec.origin, encoding="utf-8") as f:
    return f.read()


@pytest.mark.parametrize("name", sorted(stages.STAGES))
def test_every_stage_module_runs_through_the_shared_runner(name):
  stage = stages.STAGES[name]
  source = _source(stage.module)
  mains = re.findall(r'^if __name__ == "__main__":', source, flags=re.M)
  assert len(mains) == 1, f"{stage.module}: {len(mains)} __main__ blocks (one is dead)"
  if stage.gin_flags:  # the top guard hands over to run_module under the module's own name
    assert f'run_module("{stage.module}")' in source
  if stage.gin_file:
    assert os.path.isfile(os.path.join(REPO, stage.gin_file)), stage.gin_file


def test_stage_help_lists_the_required_values_of_the_run_file_and_its_includes():
  text = stages.stage_help("train", "Stage 4: train.\n\nmore", REPO)
  assert text.startswith("gensar train (python -m gensar_jax.train): Stage 4: train.")
  required = text.split("required values")[1]
  for macro in ("MODEL_DIR", "TRAIN_STEPS", "PREPARED_DIR", "VOCAB_PATH"):
    assert macro in required
  assert "more" not in text  # only the docstring's first paragraph


def _gensar():
  path = os.path.join(os.path.dirname(sys.executable), "gensar")
  assert os.path.isfile(path), "the gensar console script is not installed (pip install -e .)"
  return path


def test_installed_command_help_and_errors(tmp_path):
  overview = subprocess.run([_gensar(), "--help"], capture_output=True, text=True, timeout=60)
  assert overview.returncode == 0
  assert all(name in overview.stdout for name in stages.STAGES)
  helped = subprocess.run([_gensar(), "prepare", "--help"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
  assert helped.returncode == 0, helped.stderr[-2000:]
  assert "python -m gensar_jax.prepare" in helped.stdout and "PREPARED_DIR" in helped.stdout
  assert "cuda" not in helped.stderr.lower()  # TensorFlow's start-up lines are silenced
  unknown = subprocess.run([_gensar(), "trian"], capture_output=True, text=True, timeout=60)
  assert unknown.returncode == 2 and "unknown stage 'trian'" in unknown.stderr
  # A stage with its own flags gets them: argparse's usage, not the gin flag parser.
  compared = subprocess.run([_gensar(), "comparison", "--help"], capture_output=True,
                            text=True, timeout=300)
  assert compared.returncode == 0 and "--results_dir" in compared.stdout


def test_importing_a_device_stage_leaves_jax_uninitialised():
  """A stage that computes on accelerators joins the distributed runtime in `main`, which
  must happen before JAX starts its backend (jax.distributed.initialize raises after). So
  importing any such stage may not start it: bm25s, for one, runs a JAX computation when
  imported, and is imported lazily for that reason."""
  modules = [s.module for s in stages.STAGES.values() if s.devices]
  code = ("import importlib, sys\n"
          f"for m in {modules!r}: importlib.import_module(m)\n"
          "import jax._src.xla_bridge as xb\n"
          "sys.exit(3 if xb._backends else 0)\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, (result.returncode, result.stderr[-2000:])


def test_installed_command_refuses_a_mistyped_flag_in_one_line(tmp_path):
  """`gensar <stage>` reaches gin_utils.run like `python -m`: a parameter typo (issue 30,
  row 7) is one line and exit 2, not gin's traceback with exit 1."""
  result = subprocess.run([_gensar(), "train", "--gin_file=gin/experiments/ml100k_quickstart.gin",
                           f"--gin.MODEL_DIR='{tmp_path / 'run'}'", "--gin.train.stepz=5"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [
      "error: --gin.train.stepz=5: train has no parameter 'stepz'; did you mean "
      "train.train_steps?"]


def test_one_name_per_stage_in_the_pipeline_the_commands_and_the_run_files():
  """A stage is called the same in `pipeline.stages`, `gensar <stage>` and gin/runs/."""
  from gensar_jax import pipeline
  # train_doc2query is the `train` command inside the gin scope "doc2query".
  commands_of_pipeline = {name: ("train" if name == "train_doc2query" else name)
                          for name in pipeline.STAGES}
  assert set(commands_of_pipeline.values()) <= set(stages.STAGES)
  for name, stage in stages.STAGES.items():
    if stage.gin_file:
      assert stage.gin_file == f"gin/runs/{name}.gin"
      assert os.path.isfile(os.path.join(REPO, stage.gin_file))
