"""gin_utils.run: a required gin value left unset is a one-line usage error (exit 2) in
every entry point, and any other error still raises."""
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
