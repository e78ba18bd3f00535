"""Training with the ranking eval hook (keep-best by mean validation NDCG@5), then the
evaluate CLI on the kept checkpoint: the paper's checkpoint selection, end to end."""
import json
import os

import numpy as np
import pytest

from gensar_jax import evaluate as evaluate_lib
from gensar_jax import results as results_lib
from gensar_jax import train as train_lib
from gensar_jax import train_logging
from gensar_jax.checkpoints import CheckpointError
from task_world import build_world, under_gin as run, world_flags

pytestmark = pytest.mark.slow  # end-to-end runs of minutes; `make test-fast` skips them

PREFIX = "tevalcli"


def args(world, model_dir, *extra):
  return ["--gin_file=gin/runs/train.gin", "--gin_file=gin/models/tiny.gin",
          "--gin_file=gin/runs/evaluate.gin",
          f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=12",
          *world_flags(world, PREFIX),
          "--gin.EVAL_PERIOD=4", "--gin.EVAL_BATCHES=1", "--gin.CHECKPOINT_PERIOD=4",
          "--gin.KEEP_CHECKPOINTS=1", "--gin.LOG_PERIOD=4", "--gin.WARMUP_STEPS=2",
          "--gin.LEARNING_RATE=1e-2", "--gin.NUM_BEAMS=4", "--gin.SEED=1", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  world = build_world(tmp_path_factory.mktemp("evalcli_world"), prefix=PREFIX)
  model_dir = str(tmp_path_factory.mktemp("evalcli") / "model")
  run(args(world, model_dir), train_lib.train)
  return world, model_dir


def test_keep_best_by_mean_validation_ndcg5_and_evaluate(trained):
  world, model_dir = trained
  evals = train_logging.read_jsonl_metrics(model_dir, "eval")
  assert [e["step"] for e in evals] == [4, 8, 12]
  for e in evals:
    assert e["mean_ndcg@5"] == pytest.approx((e["rec_ndcg@5"] + e["search_ndcg@5"]) / 2)
  out = run(args(world, model_dir), evaluate_lib.evaluate)
  # KEEP_CHECKPOINTS=1 keeps only the latest; the best survives through keep-best.
  by_step = {e["step"]: e["mean_ndcg@5"] for e in evals}
  assert by_step[out["checkpoint_step"]] == max(by_step.values())
  out_dir = os.path.join(model_dir, "eval_test")
  result = results_lib.read_result(os.path.join(out_dir, "gensar_seed1.json"))
  assert result.family == "generative" and result.seed == 1 and result.split == "test"
  for task in ("rec", "search"):
    block = getattr(result, task)
    rows = [json.loads(ln) for ln in open(os.path.join(out_dir, f"predictions_{task}.jsonl"))]
    assert len(rows) == block["num_examples"] > 0
    # The stored metrics are those of the stored rankings.
    ranks = np.array([r["candidates"].index(r["target"]) if r["target"] in r["candidates"]
                      else -1 for r in rows])
    assert block["HR@1"] == pytest.approx(np.mean(ranks == 0))
    assert 0.0 <= block["catalogue_HR@10"] <= 1.0
    assert all(len(r["candidates"]) == 4 for r in rows)
  assert "| search |" in open(os.path.join(out_dir, "results.md")).read()


def test_evaluate_without_checkpoints_fails_clearly(trained, tmp_path):
  world, _ = trained
  with pytest.raises(CheckpointError, match="no checkpoints"):
    run(args(world, str(tmp_path / "empty")), evaluate_lib.evaluate)
