"""Decoding and outputs of a multi-host job: evaluate, infer, export and the eval hook.

`ranking.decode_batch` splits every decode batch over the mesh's 'data' axis (each
device decodes its rows, the rankings gathered onto every host): checked on 8 devices of
one process. Then training with the ranking eval hook and `evaluate` as 2 processes x 4 CPU
devices: both processes get the metrics one process of 8 devices gets, and only process 0
writes, behind a barrier, so the run directory holds one copy of every output and no
process returns before it is complete.
"""
from __future__ import annotations

import json
import os

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from gensar_jax import evaluate as evaluate_lib
from gensar_jax import ranking
from gensar_jax import export as export_lib
from gensar_jax import infer as infer_lib
from gensar_jax import optimizers
from gensar_jax import partitioning
from gensar_jax import trainer as trainer_lib
from gensar_jax.decoding import build_candidate_tries, decode_identifiers
from gensar_jax.serving import artifact as artifact_lib
from gensar_jax import train as train_lib
from gensar_jax import train_logging
from task_world import INPUT_LENGTH, TINY_VOCAB, build_world, input_shapes, tiny_model
from task_world import under_gin, world_flags
# The same loopback cluster as the training test (the worker's own directory, tests/, is on
# its sys.path, so it finds task_world).
from process_group import cpu_env, free_port, read_json, run_together

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "multihost_outputs_worker.py")
PREFIX = "tmhout"
TIMEOUT_S = 600


def _args(world, model_dir):
  return ["--gin_file=gin/runs/train.gin", "--gin_file=gin/models/tiny.gin",
          "--gin_file=gin/runs/evaluate.gin", "--gin_file=gin/runs/infer.gin",
          "--gin_file=gin/runs/export.gin", f"--gin.MODEL_DIR='{model_dir}'",
          f"--gin.EXPORT_DIR='{model_dir}/export'", "--gin.export.batch_buckets=[1]",
          "--gin.SERVING_BEAMS=4", "--gin.infer.num_beams=4", "--gin.infer.top_k=4",
          *world_flags(world, PREFIX), "--gin.TRAIN_STEPS=4", "--gin.EVAL_PERIOD=4",
          "--gin.EVAL_BATCHES=1", "--gin.CHECKPOINT_PERIOD=4", "--gin.LOG_PERIOD=4",
          "--gin.WARMUP_STEPS=1", "--gin.LEARNING_RATE=1e-2", "--gin.NUM_BEAMS=4",
          "--gin.SEED=1", "--gin.INPUT_SHARDS=2", "--gin.RankingEvalHook.max_examples=24",
          "--gin.RankingEvalHook.batch_size=16", "--gin.evaluate.batch_size=16",
          "--gin.evaluate.max_examples=24", "--gin.train.report_param_movement=False"]


def _two_processes(tmp_path, argv):
  args_path = str(tmp_path / "args.json")
  with open(args_path, "w") as f:
    json.dump(argv, f)
  port = free_port()
  outputs = [str(tmp_path / f"process_{i}.json") for i in range(2)]
  logs = run_together([[WORKER, str(i), "2", str(port), args_path, outputs[i]]
                       for i in range(2)], [cpu_env(4)] * 2, TIMEOUT_S, log_tail=4000)
  results = read_json(outputs)
  return results, logs


def test_decode_batch_gives_each_device_its_rows_and_every_host_all_results():
  """One process, 8 devices: the search runs split over 'data' (each device decodes one
  row of 8) and returns what the same search over the whole batch on one device does."""
  model = tiny_model()
  partitioner = partitioning.Partitioner(partitioning.create_mesh(data=8, model=1))
  trainer = trainer_lib.Trainer(model, partitioner, optimizers.create_optimizer(), seed=0)
  params = trainer.init_state(input_shapes(8)).params
  rng = np.random.default_rng(0)
  tokens = rng.integers(2, TINY_VOCAB, size=(8, INPUT_LENGTH)).astype(np.int32)  # [b, len]
  candidates = rng.integers(2, TINY_VOCAB, size=(8, 5, 4))                   # [b, c, L]
  candidates[..., -1] = 1                                                     # EOS
  trie = build_candidate_tries(candidates)
  placed = ranking._rows_over_data(params, tokens)  # pylint: disable=protected-access
  assert placed.sharding.spec == P("data")
  assert {s.data.shape for s in placed.addressable_shards} == {(1, INPUT_LENGTH)}
  out = decode_identifiers(model, params, placed, trie, 3)
  assert out.items.sharding.spec[0] == "data"     # the search itself ran split by rows
  items, scores = ranking.decode_batch(model, params, tokens, trie, 3)
  assert isinstance(items, np.ndarray) and items.shape == (8, 3)
  on_one_device = jax.device_get(params)          # numpy leaves: the batch goes in whole
  whole = decode_identifiers(model, on_one_device, tokens, trie, 3)
  np.testing.assert_array_equal(items, np.asarray(whole.items))
  np.testing.assert_allclose(scores, np.asarray(whole.scores), rtol=1e-5)


@pytest.mark.slow  # end-to-end runs of minutes; `make test-fast` skips them
@pytest.mark.timeout(TIMEOUT_S + 240)
def test_two_processes_decode_like_one_and_write_once(tmp_path):
  (tmp_path / "world").mkdir()
  world = build_world(tmp_path / "world", prefix=PREFIX)
  multi_dir, single_dir = tmp_path / "multi", tmp_path / "single"
  results, logs = _two_processes(tmp_path, _args(world, str(multi_dir)))
  # The reference: one process, the same 8-device mesh, the same input shards.
  argv = _args(world, str(single_dir))
  summary = under_gin(argv, train_lib.train)
  reference = under_gin(argv, evaluate_lib.evaluate)
  inferred = under_gin(argv, infer_lib.infer)
  under_gin(argv, export_lib.export)

  assert [r["process_index"] for r in results] == [0, 1]
  assert all(r["process_count"] == 2 for r in results)
  # The in-training hook: the same ranking metrics on both processes as on one.
  for result in results:
    hook = {k: v for k, v in result["eval_metrics"].items() if "ndcg" in k or "hr@" in k}
    assert hook and hook == {k: summary.eval_metrics[k] for k in hook}
  logged = train_logging.read_jsonl_metrics(str(multi_dir), "eval")
  assert [e["step"] for e in logged] == [4]               # one metrics line, not two
  assert logged[0]["mean_ndcg@5"] == summary.eval_metrics["eval/mean_ndcg@5"]
  # evaluate: identical metrics and tables everywhere.
  keys = ("rec", "search", "checkpoint_step", "table")
  for result in results:
    assert {k: result["evaluate"][k] for k in keys} == {k: reference[k] for k in keys}
  assert [r["infer_examples"] for r in results] == [inferred.num_examples] * 2
  # One writer: process 0 wrote each output once, and nothing was left half-renamed.
  text = "\n".join(logs)
  for what in ("evaluate results", "infer predictions", "the serving artifact"):
    written = [line for line in text.splitlines() if f"wrote {what}" in line]
    assert len(written) == 1 and "process 0 of 2" in written[0], (what, written)
  assert sorted(os.listdir(multi_dir)) == sorted(os.listdir(single_dir))
  for name in os.listdir(multi_dir / "eval_test"):
    if name.startswith("predictions_"):  # item ids only: equal ranks, equal rankings
      assert (multi_dir / "eval_test" / name).read_text() == \
          (single_dir / "eval_test" / name).read_text()
  assert sorted(os.listdir(multi_dir / "eval_test")) == sorted(os.listdir(single_dir /
                                                                            "eval_test"))
  name = os.path.basename(inferred.output_path)
  multi_rows = [json.loads(line) for line in (multi_dir / name).read_text().splitlines()]
  single_rows = [json.loads(line) for line in (single_dir / name).read_text().splitlines()]
  assert [[i["item_id"] for i in r["items"]] for r in multi_rows] == \
      [[i["item_id"] for i in r["items"]] for r in single_rows]
  np.testing.assert_allclose([i["score"] for r in multi_rows for i in r["items"]],
                             [i["score"] for r in single_rows for i in r["items"]], rtol=1e-5)
  assert sorted(os.listdir(multi_dir / "export")) == sorted(os.listdir(single_dir / "export"))
  # The exported parameters, gathered from both hosts, are those one process trained.
  multi_params, single_params = (
      artifact_lib.params_from_bytes((d / "export" / artifact_lib.PARAMS_FILE).read_bytes())
      for d in (multi_dir, single_dir))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               multi_params, single_params)

