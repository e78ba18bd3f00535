"""The ablation grid: which pipeline runs it plans, that their gin bindings mean what they
say, that a finished grid becomes one comparison, and that a failed run stops it loudly.

The runs themselves are the pipeline's (tested in tests/test_pipeline.py); here a recording
runner stands in for the subprocess and writes each run's result file.
"""
import json
import os
import re
import sys

import gin
import pytest

from gensar_jax import ablations as ablations_lib
from gensar_jax import gin_utils
from gensar_jax import pipeline as pipeline_lib  # noqa: F401  (registers every stage's configurables)
from gensar_jax import results as results_lib

pytestmark = pytest.mark.slow  # end-to-end runs of minutes; `make test-fast` skips them

EXPERIMENT = "gin/experiments/ml100k_ablations.gin"
SYSTEMS = [("GenSAR", "dual", "all"), ("GenSAR (rec only)", "dual", "rec_only"),
           ("GenSAR (SID only)", "sid_only", "all"),
           ("GenSAR (no shared levels)", "dual_no_shared", "single_id")]


def _plan(tmp_path, seeds=(0, 1, 2)):
  systems = ablations_lib.parse_systems(SYSTEMS)
  return ablations_lib.plan(systems, list(seeds), str(tmp_path), "ids/dual", "GenSAR", 0,
                            "all", str(tmp_path / "results" / "gensar"))


def test_plan_reuses_the_base_run_and_builds_each_table_once(tmp_path):
  base, identify, train = _plan(tmp_path)
  assert [j.title for j in base] == ["base pipeline"] and base[0].stages == ()
  assert [j.title for j in identify] == ["identifiers (sid_only)",
                                         "identifiers (dual_no_shared)"]
  assert all(j.stages == ("identify",) for j in identify)
  # GenSAR seed 0 is the base pipeline's run: 4 systems x 3 seeds - 1 runs to train.
  assert len(train) == 11 and "GenSAR seed 0" not in [j.title for j in train]
  assert len({j.run_dir for j in train}) == len({j.eval_dir for j in train}) == 11
  sid_runs = [j for j in train if j.title.startswith("GenSAR (SID only)")]
  table = os.path.join(str(tmp_path), "ablations", "identifiers_sid_only", "table")
  assert all(f"IDENTIFIERS_DIR = {json.dumps(table)}" in j.bindings for j in sid_runs)


def test_job_bindings_parse_against_the_real_experiment(tmp_path):
  _, identify, train = _plan(tmp_path)
  files = [EXPERIMENT]

  def parsed(job, *queries):
    command = ablations_lib.job_command(job, files, ["TRAIN_STEPS = 7"])
    assert command[:3] == [sys.executable, "-m", "gensar_jax.pipeline"]
    gin.clear_config()
    try:
      gin_utils.parse_gin(command[3:])
      return [gin.query_parameter(q) for q in queries]
    finally:
      gin.clear_config()

  job = next(j for j in train if j.title == "GenSAR (SID only) seed 2")
  stages, run_dir, variant, seed, data_seed, system, model_dir, steps, catalogue = parsed(
      job, "pipeline.stages", "pipeline.run_dir", "%MIXTURE_VARIANT", "%SEED", "%DATA_SEED",
      "%SYSTEM_NAME", "%MODEL_DIR", "%TRAIN_STEPS", "evaluate.catalogue")
  assert stages == ["train", "evaluate"] and run_dir == job.run_dir
  assert (variant, seed, data_seed, system, steps) == ("all", 2, 2, "GenSAR (SID only)", 7)
  assert model_dir == os.path.join(job.run_dir, "model") and catalogue is False
  mode, ids, stages = parsed(identify[0], "RQVAEConfig.mode", "%IDENTIFIERS_DIR",
                             "pipeline.stages")
  assert (mode, stages) == ("sid_only", ["identify"]) and ids.endswith("identifiers_sid_only/table")


def test_systems_are_checked():
  with pytest.raises(ValueError, match="identifier mode 'rqvae'"):
    ablations_lib.parse_systems([("X", "rqvae", "all")])
  with pytest.raises(ValueError, match="mixture variant 'everything'"):
    ablations_lib.parse_systems([("X", "dual", "everything")])
  with pytest.raises(ValueError, match="single_id needs a table with both"):
    ablations_lib.parse_systems([("X", "cid_only", "single_id")])
  with pytest.raises(ValueError, match="share the name"):
    ablations_lib.parse_systems([("X", "dual", "all"), ("X", "dual", "rec_only")])
  with pytest.raises(ValueError, match="expected \\(name"):
    ablations_lib.parse_systems([("X", "dual")])


def _write(eval_dir, system, seed, rec, search, family="generative"):
  def block(v):
    return None if v is None else {**{m: v for m in results_lib.METRIC_NAMES},
                                   "num_examples": 10}
  results_lib.write_result(
      os.path.join(eval_dir, results_lib.result_filename(system, seed)),
      results_lib.SystemResult(system=system, family=family, seed=seed, split="test",
                               dataset="toy", rec=block(rec), search=block(search),
                               wall_seconds=1.0))


def test_grid_runs_in_order_and_ends_in_one_comparison(tmp_path):
  baselines = str(tmp_path / "baselines")
  _write(baselines, "BM25", None, None, 0.4, family="baseline")
  calls = []

  def runner(job, command, env):
    calls.append(job.title)
    assert env["JAX_COMPILATION_CACHE_DIR"]
    if job.eval_dir:  # what the pipeline's evaluate stage would leave
      match = re.fullmatch(r"(.*) seed (\d+)", job.title)
      system, seed = (match.group(1), int(match.group(2))) if match else ("GenSAR", 0)
      single = dict((s[0], s[2]) for s in SYSTEMS)[system]
      _write(job.eval_dir, system, seed, None if single == "search_only" else 0.1 + seed / 10,
             None if single == "rec_only" else 0.2)
    return 1.0

  rows = ablations_lib.ablations(
      gin_files=[EXPERIMENT], systems=SYSTEMS, seeds=[0, 1, 2], run_dir=str(tmp_path),
      identifiers_dir="ids", baselines_dir=baselines, base_eval_dir=str(tmp_path / "results"),
      base_system="GenSAR", base_seed=0, base_mixture="all", runner=runner)
  assert calls[0] == "base pipeline" and calls[1:3] == ["identifiers (sid_only)",
                                                         "identifiers (dual_no_shared)"]
  assert len(calls) == 1 + 2 + 11
  by_name = {r.system: r for r in rows}
  assert set(by_name) == {"BM25"} | {s[0] for s in SYSTEMS}
  gensar = by_name["GenSAR"]
  assert gensar.seeds == [0, 1, 2]
  mean, std = gensar.tasks["rec"]["NDCG@10"]
  assert mean == pytest.approx(0.2) and std == pytest.approx(0.1)
  assert by_name["GenSAR (rec only)"].tasks["search"] is None
  out = tmp_path / "ablations" / "comparison"
  table = (out / "comparison.md").read_text()
  assert "0.2000 ± 0.1000" in table and (out / "tradeoff.png").stat().st_size > 0


def test_a_failed_run_stops_the_grid_with_its_log(tmp_path):
  job = ablations_lib.Job("broken seed 1", str(tmp_path / "run"), ("train",), ())
  command = [sys.executable, "-c", "print('the reason it broke'); raise SystemExit(3)"]
  with pytest.raises(ablations_lib.AblationError, match="(?s)broken seed 1 failed \\(exit 3\\)"
                     ".*the reason it broke"):
    ablations_lib.run_job(job, command, dict(os.environ))
  assert "the reason it broke" in (tmp_path / "run" / "log.txt").read_text()


def test_learning_curves_grid_trains_every_system_and_draws_their_curves(tmp_path):
  """With the base pipeline stopped before training, every system (the base one too) is a
  job of the grid; each job's metrics.jsonl becomes one curve."""
  baselines = str(tmp_path / "baselines")
  _write(baselines, "BM25", None, None, 0.4, family="baseline")
  calls = []

  def runner(job, command, env):
    calls.append((job.title, job.stages))
    if job.model_dir:  # what training and evaluation would leave
      os.makedirs(job.model_dir, exist_ok=True)
      single = dict((s[0], s[2]) for s in SYSTEMS)[job.system]
      with open(os.path.join(job.model_dir, "metrics.jsonl"), "w") as f:
        for k in range(1, 4):
          record = {"step": 10 * k, "split": "eval", "examples_seen": 320 * k}
          if single != "search_only":
            record["rec_ndcg@10"] = 0.1 * k
          if single != "rec_only":
            record["search_ndcg@10"] = 0.3 - 0.05 * k
          f.write(json.dumps(record) + "\n")
      _write(job.eval_dir, job.system, 0, None if single == "search_only" else 0.1,
             None if single == "rec_only" else 0.2)
    return 1.0

  systems = SYSTEMS[:3]
  curves_dir = tmp_path / "curves"
  ablations_lib.ablations(
      gin_files=[EXPERIMENT], systems=systems, seeds=[0], run_dir=str(tmp_path),
      identifiers_dir="ids", baselines_dir=baselines, base_eval_dir=str(tmp_path / "results"),
      base_system="GenSAR", base_seed=0, base_mixture="all", runner=runner,
      subdir="learning_curves", base_stages=["prepare", "identify"],
      curves_dir=str(curves_dir))
  assert calls[0] == ("base pipeline", ("prepare", "identify"))
  trained = [title for title, stages in calls[1:] if stages != ("identify",)]
  assert trained == [f"{s[0]} seed 0" for s in systems]
  assert (tmp_path / "learning_curves" / "comparison" / "comparison.md").exists()
  table = (curves_dir / "curves.md").read_text()
  assert (curves_dir / "curves.png").stat().st_size > 0
  gensar_line = next(ln for ln in table.splitlines() if ln.startswith("| GenSAR |"))
  assert "0.3000 (960, still rising)" in gensar_line   # rec: best at the last evaluation
  assert "0.2500 (320)" in gensar_line                 # search: best at the first
  rec_only = next(ln for ln in table.splitlines() if ln.startswith("| GenSAR (rec only) |"))
  assert "—" in rec_only
