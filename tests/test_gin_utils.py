"""gin_utils.run: a required gin value left unset is a one-line usage error (exit 2) in
every entry point, and any other error still raises."""
from typing import Mapping, Optional

import gin
import pytest

from gensar_jax import gin_utils


@gin.configurable
def needs_two(model_dir=gin.REQUIRED, steps=gin.REQUIRED, extra=1):
  return model_dir, steps, extra


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_unset_required_argument_is_a_usage_error(capsys):
  with pytest.raises(SystemExit) as e:
    gin_utils.run(needs_two, ["--gin.needs_two.steps=3"])
  err = capsys.readouterr().err
  assert e.value.code == 2
  assert "needs_two needs ['model_dir'] bound: pass --gin.needs_two.model_dir=..." in err
  assert "Traceback" not in err


def test_unset_required_macro_is_a_usage_error(tmp_path, capsys):
  config = tmp_path / "run.gin"
  config.write_text("MODEL_DIR = %gin.REQUIRED\nneeds_two.model_dir = %MODEL_DIR\n"
                    "needs_two.steps = 2\n")
  with pytest.raises(SystemExit) as e:
    gin_utils.run(needs_two, [f"--gin_file={config}"])
  assert e.value.code == 2
  assert "MODEL_DIR is required: pass --gin.MODEL_DIR=..." in capsys.readouterr().err


def test_bound_values_run_and_other_errors_still_raise():
  seen = []
  gin_utils.run(lambda: seen.append(needs_two()),
                ["--gin.needs_two.model_dir='m'", "--gin.needs_two.steps=4"])
  assert seen == [("m", 4, 1)]
  gin.clear_config()  # run() leaves the parsed config locked, as a process would

  def broken():
    raise ValueError("a real bug, not a missing binding")

  with pytest.raises(ValueError, match="a real bug"):
    gin_utils.run(broken, [])


@gin.configurable
def refuses_input(path=gin.REQUIRED):
  from gensar_jax.data.schema import DataError
  raise DataError(f"{path}: not a prepared dataset")


def test_a_data_error_inside_a_configurable_is_one_line(capsys):
  """gin appends "In call to configurable ..." to what a configurable raises; users get the
  error alone."""
  with pytest.raises(SystemExit) as e:
    gin_utils.run(refuses_input, ["--gin.refuses_input.path='runs/x'"])
  err = capsys.readouterr().err
  assert e.value.code == 2
  assert err.strip() == "error: runs/x: not a prepared dataset"


def _parse_unfinalised(files, bindings=()):
  """Parse as the binaries do, without the REQUIRED checks (no run directories given)."""
  gin.parse_config_files_and_bindings(list(files), list(bindings), skip_unknown=True,
                                      finalize_config=False)


@pytest.mark.parametrize("data_file, lengths", [
    ("ml100k.gin", {"inputs": 144, "targets": 32}),
    ("amazon2014.gin", {"inputs": 320, "targets": 64}),
])
def test_dataset_gin_file_sets_its_token_lengths_over_the_default(data_file, lengths):
  """The data file comes after gin/runs/train.gin (which includes gin/tasks.gin's default),
  so training, the eval hook and evaluation all get that dataset's lengths."""
  _parse_unfinalised(["gin/runs/train.gin", "gin/runs/evaluate.gin", f"gin/data/{data_file}"])
  assert gin.query_parameter("%TASK_FEATURE_LENGTHS") == lengths
  for user in ("train.task_feature_lengths", "evaluate.task_feature_lengths",
               "RankingEvalHook.task_feature_lengths"):
    assert str(gin.query_parameter(user)) == "%TASK_FEATURE_LENGTHS"
  gin.clear_config()


def test_quickstart_trains_with_ml100k_lengths():
  _parse_unfinalised(["gin/experiments/ml100k_quickstart.gin"])
  assert gin.query_parameter("%TASK_FEATURE_LENGTHS") == {"inputs": 144, "targets": 32}
  gin.clear_config()
  _parse_unfinalised(["gin/experiments/ml100k_quickstart.gin"],
                     ["TASK_FEATURE_LENGTHS = {'inputs': 200, 'targets': 16}"])
  assert gin.query_parameter("%TASK_FEATURE_LENGTHS") == {"inputs": 200, "targets": 16}
  gin.clear_config()


def test_mistyped_macro_and_unquoted_string_are_one_line_usage_errors(tmp_path, capsys):
  config = tmp_path / "run.gin"
  config.write_text("MODEL_DIR = %gin.REQUIRED\nTRAIN_STEPS = 2\n"
                    "needs_two.model_dir = %MODEL_DIR\nneeds_two.steps = %TRAIN_STEPS\n")
  with pytest.raises(SystemExit) as e:  # gin alone would accept it and train 2 steps
    gin_utils.run(needs_two, [f"--gin_file={config}", "--gin.MODEL_DIR='m'",
                              "--gin.TRAIN_STEPZ=10"])
  err = capsys.readouterr().err
  assert e.value.code == 2 and "Traceback" not in err
  assert err.strip() == ("error: --gin.TRAIN_STEPZ: no gin file given declares or uses the "
                         "macro TRAIN_STEPZ; did you mean TRAIN_STEPS?")
  gin.clear_config()
  with pytest.raises(SystemExit) as e:
    gin_utils.run(needs_two, [f"--gin_file={config}", "--gin.MODEL_DIR=runs/x"])
  err = capsys.readouterr().err
  assert e.value.code == 2 and len(err.strip().splitlines()) == 1
  assert "--gin.MODEL_DIR=runs/x: not a gin value" in err
  assert "--gin.MODEL_DIR=\"'runs/x'\"" in err
  gin.clear_config()
  seen = []  # a macro that the file declares is accepted, and a dotted binding is gin's own
  gin_utils.run(lambda: seen.append(needs_two()), [f"--gin_file={config}",
                                                   "--gin.MODEL_DIR='m'", "--gin.TRAIN_STEPS=5"])
  assert seen == [("m", 5, 1)]
  gin.clear_config()


def test_every_user_error_is_one_gensar_error_printed_as_one_line(capsys):
  """One hierarchy: the errors a user's input can cause all derive from GensarError, which
  every entry point prints as one line with exit code 2 (and stay ValueErrors)."""
  from gensar_jax import checkpoints, errors, learning_curves, results, vocabulary
  from gensar_jax.data import schema
  from gensar_jax.decoding import trie
  from gensar_jax.identifiers import text_encoder
  from gensar_jax.serving import artifact
  user_errors = [schema.DataError, checkpoints.CheckpointError, text_encoder.CheckpointError,
                 gin_utils.FlagError, vocabulary.VocabularyError, artifact.ArtifactError,
                 trie.TrieBuildError, results.ResultError, learning_curves.CurveError]
  assert all(issubclass(e, errors.GensarError) and issubclass(e, ValueError)
             for e in user_errors)
  assert checkpoints.CheckpointError is text_encoder.CheckpointError  # one class, one name

  def broken_artifact():
    raise artifact.ArtifactError("runs/x/export: metadata.json is not JSON")

  with pytest.raises(SystemExit) as e:
    gin_utils.run(broken_artifact, [])
  assert e.value.code == 2
  assert capsys.readouterr().err.strip() == "error: runs/x/export: metadata.json is not JSON"


def test_each_required_value_is_declared_in_one_gin_file():
  """A `NAME = %gin.REQUIRED` repeated in several files silently depends on include order
  (a later declaration undoes an earlier binding); shared ones live in gin/inputs/."""
  import collections
  import pathlib
  import re
  declared = collections.defaultdict(list)
  for path in pathlib.Path(gin_utils.REPO_ROOT, "gin").rglob("*.gin"):
    for line in path.read_text(encoding="utf-8").splitlines():
      match = re.match(r"\s*([A-Z_][A-Z0-9_]*)\s*=\s*%gin\.REQUIRED\b", line)
      if match:
        declared[match.group(1)].append(str(path.relative_to(gin_utils.REPO_ROOT)))
  assert declared and {k: v for k, v in declared.items() if len(v) > 1} == {}


# ------------------------------------------- flag values gin accepts but cannot use (issue 30)


@gin.configurable
def checked_schedule(decay_steps: int = gin.REQUIRED, warmup_steps: int = 0):
  """Validates its own arguments, as optimizers.create_learning_rate_schedule does."""
  if decay_steps < 1:
    raise ValueError(f"checked_schedule: decay_steps={decay_steps} must be >= 1")
  return decay_steps - warmup_steps


@gin.configurable
def annotated_run(steps: int = gin.REQUIRED, schedule=None, name: Optional[str] = None,
                  lengths: Mapping[str, int] = None):
  return steps, schedule, name, lengths


def _deep_failure(value):
  raise ValueError(f"a bug below the configurable ({value})")


@gin.configurable
def buggy_schedule(decay_steps: int = gin.REQUIRED):
  return _deep_failure(decay_steps)


RUN_GIN = """STEPS = %gin.REQUIRED
annotated_run.steps = %STEPS
annotated_run.schedule = @checked_schedule()
SCHEDULE_STEPS = %STEPS
checked_schedule.decay_steps = %SCHEDULE_STEPS
"""


@pytest.mark.parametrize("flag,message", [
    ("--gin.annotated_run.stepz=5",
     "--gin.annotated_run.stepz=5: annotated_run has no parameter 'stepz'; did you mean "
     "annotated_run.steps?"),
    ("--gin.STEPS='abc'", "--gin.STEPS='abc': annotated_run.steps takes int, not str 'abc'"),
    ("--gin.STEPS=2.5", "--gin.STEPS=2.5: annotated_run.steps takes int, not float 2.5"),
    ("--gin.annotated_run.name=3", "--gin.annotated_run.name=3: annotated_run.name takes "
                                   "Optional[str], not int 3"),
    ("--gin.annotated_run.lengths=[1]", "annotated_run.lengths takes Mapping[str, int]"),
    # Reaches checked_schedule through a chain of macros; the configurable refuses it.
    ("--gin.STEPS=-5", "--gin.STEPS=-5: checked_schedule: decay_steps=-5 must be >= 1"),
    ("--gin.nowhere.steps=1", "--gin.nowhere.steps=1: no configurable named 'nowhere'"),
    ("--gin.STEPS=None", "--gin.STEPS=None: STEPS is required (annotated_run.steps takes "
                         "int, not None)"),
])
def test_an_unusable_flag_value_is_one_line_naming_the_flag(tmp_path, capsys, flag, message):
  """Issue 30, row 7: each of these was a 33-53 line gin traceback with exit code 1."""
  config = tmp_path / "run.gin"
  config.write_text(RUN_GIN)
  argv = [f"--gin_file={config}", "--gin.STEPS=4", flag]
  with pytest.raises(SystemExit) as e:
    gin_utils.run(lambda: annotated_run(), argv)
  err = capsys.readouterr().err
  assert e.value.code == 2 and "Traceback" not in err
  assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
  assert message in err, err


def test_flag_values_that_fit_run_and_deeper_errors_keep_their_traceback(tmp_path):
  config = tmp_path / "run.gin"
  config.write_text(RUN_GIN)
  seen = []
  gin_utils.run(lambda: seen.append(annotated_run()),
                [f"--gin_file={config}", "--gin.STEPS=4", "--gin.annotated_run.name=None",
                 "--gin.annotated_run.lengths={'inputs': 8}",
                 "--gin.checked_schedule.warmup_steps=1"])
  assert seen == [(4, 3, None, {"inputs": 8})]
  gin.clear_config()
  # None where the parameter's default is None is that default, whatever the annotation.
  gin_utils.run(lambda: seen.append(annotated_run()),
                [f"--gin_file={config}", "--gin.STEPS=4", "--gin.annotated_run.lengths=None"])
  assert seen[-1] == (4, 4, None, None)
  gin.clear_config()
  config.write_text(RUN_GIN.replace("@checked_schedule()", "@buggy_schedule()")
                    .replace("checked_schedule.decay_steps", "buggy_schedule.decay_steps"))
  with pytest.raises(ValueError, match="a bug below the configurable"):
    gin_utils.run(lambda: annotated_run(), [f"--gin_file={config}", "--gin.STEPS=4"])


@pytest.mark.parametrize("flag,message", [
    ("--gin.train.stepz=5", "--gin.train.stepz=5: train has no parameter 'stepz'; did you "
                            "mean train.train_steps?"),
    ("--gin.TRAIN_STEPS='abc'", "--gin.TRAIN_STEPS='abc': train.train_steps takes int"),
    ("--gin.TRAIN_STEPS=-5", "TRAIN_STEPS=-5"),
])
def test_the_train_stage_refuses_the_issue_flags_in_one_line(tmp_path, capsys, flag, message):
  """The probes of issue 30 on the real train entry point with the quickstart's gin file
  (every gin stage goes through gin_utils.run: tests/test_commands.py)."""
  from gensar_jax import train
  with pytest.raises(SystemExit) as e:
    # No mixture to register: the refusal must not depend on prepared data being there.
    gin_utils.run(train.main, ["--gin_file=gin/experiments/ml100k_quickstart.gin",
                               f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
                               "--gin.train.mixture_or_task_name='not_registered'", flag])
  err = capsys.readouterr().err
  assert e.value.code == 2 and "Traceback" not in err, err
  assert len(err.strip().splitlines()) == 1 and message in err, err
  assert not (tmp_path / "run").exists()
