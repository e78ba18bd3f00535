"""The sweep launcher: a 2x2 grid (learning rate x Trainer.seed) trained for real as four
`python -m gensar_jax.train` subprocesses on the tiny model, the summary table and plot,
resuming (a second invocation trains nothing), and the emitted TPU launch commands."""
import csv
import importlib.util
import json
import os
import shlex
import sys

import pytest

from task_world import LENGTHS, build_world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, path):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up by name
  spec.loader.exec_module(module)
  return module


sweep = _load("sweep", os.path.join(REPO, "launch", "sweep.py"))
sweep_spec = sys.modules["sweep_spec"]  # imported by sweep.py from launch/
tpu_pod = _load("tpu_pod", os.path.join(REPO, "launch", "tpu_pod.py"))

NAMES = ["lr-0.01_seed-0", "lr-0.01_seed-1", "lr-0.001_seed-0", "lr-0.001_seed-1"]


def write_spec(path):
  spec = {
      "name": "test_grid",
      "gin_files": ["gin/runs/train.gin", "gin/models/tiny.gin"],
      "bindings": {"TRAIN_STEPS": 2, "BATCH_SIZE": 8, "EVAL_PERIOD": 2, "EVAL_BATCHES": 1,
                   "CHECKPOINT_PERIOD": 2, "KEEP_CHECKPOINTS": 1, "LOG_PERIOD": 1,
                   "WARMUP_STEPS": 1, "MIXTURE_VARIANT": "'rec_only'",
                   # Select by loss; the ranking hook (train.gin's default) is not under test.
                   "train.eval_hook": "None", "TrainCheckpoints.best_metric": "'eval/loss'",
                   "TrainCheckpoints.best_mode": "'min'",
                   "TASK_FEATURE_LENGTHS": {"'inputs'": LENGTHS["inputs"],
                                            "'targets'": LENGTHS["targets"]}},
      "grid": {"LEARNING_RATE": [1e-2, 1e-3], "Trainer.seed": [0, 1]},
      "short_names": {"LEARNING_RATE": "lr"},
      "metric": "loss", "mode": "min", "select": "best",
  }
  with open(path, "w") as f:
    json.dump(spec, f)
  return str(path)


def data_flags(world):
  return [f"--gin.PREPARED_DIR='{world['prepared']}'",
          f"--gin.IDENTIFIERS_DIR='{world['dual']}'",
          f"--gin.VOCAB_PATH='{world['vocab_path']}'"]


def read_metrics(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  """Runs the grid once (subprocesses on one CPU device with a shared XLA cache)."""
  root = tmp_path_factory.mktemp("sweep")
  world = build_world(tmp_path_factory.mktemp("sweep_world"))
  spec = write_spec(root / "grid.json")
  sweep_dir = str(root / "grid")
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "JAX_COMPILATION_CACHE_DIR": str(root / "xla_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    argv = [f"--spec={spec}", f"--sweep_dir={sweep_dir}", *data_flags(world)]
    code = sweep.main(argv)
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return {"world": world, "spec": spec, "dir": sweep_dir, "argv": argv, "code": code}


def test_each_point_trains_with_its_own_bindings(swept):
  assert swept["code"] == 0
  dirs = sorted(d for d in os.listdir(swept["dir"])
                if os.path.isdir(os.path.join(swept["dir"], d)))
  assert dirs == sorted(NAMES)
  final_lr = {}
  for name in NAMES:
    run_dir = os.path.join(swept["dir"], name)
    lr, seed = ("0.01" if "lr-0.01_" in name else "0.001"), name[-1]
    with open(os.path.join(run_dir, "sweep_point.gin")) as f:
      point_gin = f.read()
    assert f"LEARNING_RATE = {lr}\n" in point_gin and f"Trainer.seed = {seed}\n" in point_gin
    with open(os.path.join(run_dir, "config.gin")) as f:
      config = f.read()   # the trainer's operative config: the point's values were used
    assert f"LEARNING_RATE = {lr}\n" in config and f"Trainer.seed = {seed}\n" in config
    assert f"MODEL_DIR = '{run_dir}'" in config
    records = read_metrics(run_dir)
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    final_lr[name] = train[-1]["learning_rate"]
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "2"))
  # Same schedule shape, peak 10x apart.
  assert final_lr["lr-0.01_seed-0"] == pytest.approx(10 * final_lr["lr-0.001_seed-0"], rel=1e-5)
  assert final_lr["lr-0.01_seed-1"] == pytest.approx(final_lr["lr-0.01_seed-0"], rel=1e-6)
  # Different seeds initialise differently: different losses.
  losses = {n: read_metrics(os.path.join(swept["dir"], n))[0]["loss"] for n in NAMES}
  assert losses["lr-0.01_seed-0"] != losses["lr-0.01_seed-1"]


def test_summary_table_and_plot(swept):
  with open(os.path.join(swept["dir"], "summary.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [r["point"] for r in rows] == NAMES
  for row in rows:
    evals = [r for r in read_metrics(os.path.join(swept["dir"], row["point"]))
             if r["split"] == "eval"]
    assert float(row["loss"]) == pytest.approx(min(e["loss"] for e in evals))
    assert int(row["eval_step"]) == 2 and row["status"] == "done"
    assert float(row["LEARNING_RATE"]) == (0.01 if "lr-0.01_" in row["point"] else 0.001)
    assert row["Trainer.seed"] == row["point"][-1]
    assert float(row["accuracy"]) == pytest.approx(evals[0]["accuracy"])
  with open(os.path.join(swept["dir"], "summary.md")) as f:
    table = [line for line in f if line.startswith("| ")]
  assert len(table) == 1 + 4 and "| point | status | LEARNING_RATE | Trainer.seed |" in table[0]
  with open(os.path.join(swept["dir"], "summary.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_second_invocation_skips_finished_points(swept, capsys):
  before = {n: os.path.getmtime(os.path.join(swept["dir"], n, "metrics.jsonl")) for n in NAMES}
  assert sweep.main(swept["argv"]) == 0
  out = capsys.readouterr().out
  assert out.count("finished, skipped") == 4
  after = {n: os.path.getmtime(os.path.join(swept["dir"], n, "metrics.jsonl")) for n in NAMES}
  assert after == before
  # A changed binding for every point (TRAIN_STEPS) is new work: the dry run lists it.
  assert sweep.main(swept["argv"] + ["--gin.TRAIN_STEPS=3", "--dry_run"]) == 0
  lines = [ln for ln in capsys.readouterr().out.splitlines() if "gensar_jax.train" in ln]
  assert len(lines) == 4 and all("--gin.TRAIN_STEPS=3" in ln for ln in lines)


def test_tpu_launch_lines_one_per_unfinished_point(swept, tmp_path, capsys):
  # Finished points (their metrics reached TRAIN_STEPS) get no launch line.
  assert sweep.main(swept["argv"] + ["--launcher=tpu", "--gin.TRAIN_STEPS=2"]) == 0
  assert not [ln for ln in capsys.readouterr().out.splitlines() if "tpu_pod.py" in ln]
  # Fresh MODEL_DIRs on a bucket: four commands that the TPU launcher accepts.
  sweep_dir = str(tmp_path / "tpu")
  argv = [f"--spec={swept['spec']}", f"--sweep_dir={sweep_dir}", "--launcher=tpu",
          "--model_root=gs://bucket/sweeps/grid", "--tpu_name=sw",
          "--tpu_args=--zone=us-east5-a --accelerator_type=v5p-64 --spot",
          "--tpu_dry_run", "--gin.PREPARED_DIR='gs://bucket/data'"]
  assert sweep.main(argv) == 0
  lines = [ln for ln in capsys.readouterr().out.splitlines() if "tpu_pod.py" in ln]
  assert len(lines) == 4
  with open(os.path.join(sweep_dir, "tpu_commands.sh")) as f:
    assert f.read().count("launch/tpu_pod.py") == 4
  for i, (line, name) in enumerate(zip(lines, NAMES)):
    words = shlex.split(line)
    assert words[:2] == ["python", "launch/tpu_pod.py"] and words[-1] == "--dry_run"
    spec, dry_run, _ = tpu_pod.parse_args(words[2:])
    assert dry_run and spec.name == f"sw-{i:02d}" and spec.shape.workers == 8
    values = tpu_pod.gin_macro_values(spec.train_flags)
    assert values["MODEL_DIR"] == f"gs://bucket/sweeps/grid/{name}"
    assert values["LEARNING_RATE"] == ("0.01" if "lr-0.01_" in name else "0.001")
    assert f"--gin.Trainer.seed={name[-1]}" in spec.train_flags
    assert os.path.isfile(os.path.join(sweep_dir, name, "sweep_point.json"))


def test_spec_values_names_and_errors(tmp_path, capsys):
  assert sweep_spec.gin_literal("'all'", "x") == "'all'"
  assert sweep_spec.gin_literal([1e-3, None, True], "x") == "[0.001, None, True]"
  assert sweep_spec.gin_literal({"'inputs'": 8}, "x") == "{'inputs': 8}"
  spec = {"gin_files": ["gin/runs/train.gin"], "grid": {"a.b": ["'x y'", "'z'"]},
          "points": [{"LEVELS": 2}, {"LEVELS": 3}], "bindings": {"C": 1}}
  path = tmp_path / "s.json"
  path.write_text(json.dumps(spec))
  points = sweep_spec.expand_points(sweep_spec.load_spec(str(path)))
  assert [p.name for p in points] == ["levels-2_b-x-y", "levels-2_b-z", "levels-3_b-x-y",
                                      "levels-3_b-z"]
  assert points[1].bindings == {"LEVELS": "2", "a.b": "'z'"}
  for bad, says in [({"grid": {"A": []}}, "grid.A must be a non-empty list"),
                    ({"grid": {"not a name": [1]}}, "not a gin binding name"),
                    ({"gin_files": []}, "gin_files must be"),
                    ({"colour": 1}, "unknown field")]:
    path.write_text(json.dumps({**spec, **bad}))
    assert sweep.main([f"--spec={path}", f"--sweep_dir={tmp_path / 'd'}"]) == 2
    assert says in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "d")
