"""The whole pipeline on a tiny synthetic log and the tiny model: every stage runs for real
(prepare -> identify -> vocab -> baselines -> doc2query -> pseudo-queries -> train ->
evaluate -> compare), then a second run skips every stage."""
import json
import os

import gin
import pytest

from gensar_jax import gin_utils
from gensar_jax import pipeline as pipeline_lib
from gensar_jax import results as results_lib
from gensar_jax.doc2query import copy_rate
from test_identify_pipeline import SMALL
from test_prepare import synthetic_data, write_generic

pytestmark = pytest.mark.slow  # end-to-end runs of minutes; `make test-fast` skips them

TINY_RUN = [
    "TRAIN_STEPS = 6", "BATCH_SIZE = 8", "EVAL_PERIOD = 3", "EVAL_BATCHES = 1",
    "CHECKPOINT_PERIOD = 3", "LOG_PERIOD = 3", "WARMUP_STEPS = 1",
    "TASK_FEATURE_LENGTHS = {'inputs': 96, 'targets': 24}",
    "DOC2QUERY_STEPS = 4", "DOC2QUERY_LENGTHS = {'inputs': 32, 'targets': 8}",
    "doc2query/train.batch_size = 8", "generate_pseudo_queries.input_length = 32",
    "generate_pseudo_queries.max_query_length = 6", "generate_pseudo_queries.batch_size = 16",
    "RankingEvalHook.max_examples = 8", "NUM_BEAMS = 4", "evaluate.max_examples = 12",
    "build_vocab.vocab_size = 700", "build_vocab.renders_per_template = 2",
    "mixture_rates.search_rows = 1000",
    "run_baselines.systems = ('popularity', 'sasrec', 'bm25')",
]


def parse(run_dir, raw):
  items, events = raw
  files = ["gin/runs/prepare.gin", "gin/data/generic.gin", "gin/runs/identify.gin",
           "gin/runs/build_vocab.gin", "gin/runs/baselines.gin", "gin/runs/train.gin",
           "gin/models/tiny.gin", "gin/runs/evaluate.gin", "gin/runs/doc2query.gin"]
  paths = {"PREPARED_DIR": "data", "IDENTIFIERS_DIR": "ids", "VOCAB_PATH": "vocab/v.model",
           "BASELINES_DIR": "baselines", "DOC2QUERY_DIR": "doc2query",
           "PSEUDO_QUERIES_PATH": "pseudo.jsonl", "MODEL_DIR": "gensar"}
  bindings = [f"{k} = '{run_dir}/{v}'" for k, v in paths.items()]
  bindings += [f"ITEMS_TABLE = '{items}'", f"EVENTS_TABLE = '{events}'",
               "IDENTIFIERS_DIRS = [%IDENTIFIERS_DIR]", "MIXTURE_VARIANT = 'all'",
               "TASK_PREFIX = 'smoke'",
               f"pipeline.run_dir = '{run_dir}'", "pipeline.prepared_dir = %PREPARED_DIR",
               "pipeline.identifiers_dir = %IDENTIFIERS_DIR", "pipeline.vocab_path = %VOCAB_PATH",
               "run_baselines.identifiers_dir = %IDENTIFIERS_DIR",
               "pipeline.baselines_dir = %BASELINES_DIR", "pipeline.doc2query_dir = %DOC2QUERY_DIR",
               "pipeline.pseudo_queries_path = %PSEUDO_QUERIES_PATH",
               "pipeline.model_dir = %MODEL_DIR", f"pipeline.eval_dir = '{run_dir}/results'",
               f"pipeline.comparison_dir = '{run_dir}/comparison'", *SMALL, *TINY_RUN]
  gin.clear_config()
  gin_utils.parse_gin([f"--gin_file={f}" for f in files]
                      + [f"--gin_bindings={b}" for b in bindings])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  raw = write_generic(str(tmp_path_factory.mktemp("raw")), *synthetic_data())
  run_dir = str(tmp_path_factory.mktemp("smoke"))
  parse(run_dir, raw)
  try:
    report = pipeline_lib.pipeline()
  finally:
    gin.clear_config()
  return run_dir, raw, report


def test_every_stage_produces_its_output(run):
  run_dir, _, report = run
  assert len(report) == len(pipeline_lib.STAGES)
  for stage in pipeline_lib.STAGES:
    assert os.path.exists(os.path.join(run_dir, "stages", f"{stage}.json")), stage
  pseudo = [json.loads(ln) for ln in open(os.path.join(run_dir, "pseudo.jsonl"))]
  items = [json.loads(ln)["item_id"] for ln in open(os.path.join(run_dir, "data", "items.jsonl"))]
  assert {p["item_id"] for p in pseudo} <= set(items) and pseudo
  for p in pseudo:
    assert all(q and "<" not in q for q in p["queries"])  # plain text, no special tokens
  systems = {r.system for r in results_lib.read_results(os.path.join(run_dir, "results"))}
  assert systems == {"GenSAR"}
  table = open(os.path.join(run_dir, "comparison", "comparison.md")).read()
  for name in ("GenSAR", "BM25", "Popularity", "SASRec"):
    assert name in table
  assert os.path.getsize(os.path.join(run_dir, "comparison", "tradeoff.png")) > 0


def test_second_run_skips_every_stage(run, capsys):
  run_dir, raw, _ = run
  parse(run_dir, raw)
  try:
    pipeline_lib.pipeline()
  finally:
    gin.clear_config()
  out = capsys.readouterr().out
  for stage in pipeline_lib.STAGES:
    assert f"[{stage}] complete for this config, skipped" in out
  # The run directory's log holds both invocations: the first ran, the second skipped.
  log = open(os.path.join(run_dir, pipeline_lib.LOG_FILE), encoding="utf-8").read()
  assert log.count("=== pipeline ") == 2
  for stage in pipeline_lib.STAGES:
    assert f"[{stage}] running -> " in log and f"[{stage}] done in " in log
    assert f"[{stage}] complete for this config, skipped" in log
  assert "GenSAR" in log and "BM25" in log  # the stage reports (evaluate, compare)


def test_copy_rate_flags_verbatim_copies():
  texts = ["Wireless headphones with noise cancelling for travel", "A coffee maker"]
  assert copy_rate(["wireless headphones", "espresso"], texts) == 0.0
  assert copy_rate(["headphones with noise cancelling", "a coffee maker"], texts) == 1.0
