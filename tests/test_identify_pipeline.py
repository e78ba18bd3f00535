"""The identify stage and the pipeline on a tiny synthetic dataset (real encoder, real
SASRec, real RQ-VAE; small sizes so it runs in well under a minute of compute)."""
import json
import os

import gin
import numpy as np
import pytest

from gensar_jax import gin_utils
from gensar_jax import pipeline as pipeline_lib
from gensar_jax.data.schema import DataError
from gensar_jax.identifiers.table import load_identifier_table
from gensar_jax.identify import format_identifier_stats, identify
from gensar_jax.io_utils import read_jsonl
from test_prepare import synthetic_data, write_generic

SMALL = [
    "make_candidates.num_negatives = 5",
    "RQVAEConfig.codebook_size = 8",
    "RQVAEConfig.hidden_dims = (32, 16)",
    "RQVAEConfig.latent_dim = 8",
    "RQVAEConfig.epochs = 6",
    "RQVAEConfig.batch_size = 16",
    "RQVAEConfig.eval_every = 3",
    "RQVAEConfig.kmeans_iters = 5",
    "RQVAEConfig.progress = False",
    "SASRecConfig.epochs = 2",
    "SASRecConfig.embed_dim = 16",
    "SASRecConfig.max_len = 8",
    "SASRecConfig.progress = False",
]


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def parse(run_dir, items_path, events_path, extra=()):
  gin_utils.parse_gin([
      "--gin_file=gin/runs/prepare.gin", "--gin_file=gin/data/generic.gin",
      "--gin_file=gin/runs/identify.gin",
      f"--gin.ITEMS_TABLE='{items_path}'", f"--gin.EVENTS_TABLE='{events_path}'",
      f"--gin.PREPARED_DIR='{run_dir}/data'", f"--gin.IDENTIFIERS_DIR='{run_dir}/ids'",
      f"--gin.pipeline.run_dir='{run_dir}'", f"--gin.pipeline.prepared_dir='{run_dir}/data'",
      f"--gin.pipeline.identifiers_dir='{run_dir}/ids'",
      "--gin.pipeline.stages=('prepare', 'identify')",
      *[f"--gin_bindings={b}" for b in SMALL], *[f"--gin_bindings={b}" for b in extra]])


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
  items, reviews = synthetic_data()
  return write_generic(str(tmp_path_factory.mktemp("raw")), items, reviews)


@pytest.fixture(scope="module")
def run(tmp_path_factory, raw):
  run_dir = str(tmp_path_factory.mktemp("run"))
  gin.clear_config()
  parse(run_dir, *raw)
  report = pipeline_lib.pipeline()
  gin.clear_config()
  return run_dir, report


def test_identifiers_cover_every_item_uniquely(run):
  run_dir, _ = run
  items = read_jsonl(os.path.join(run_dir, "data", "items.jsonl"))
  table = load_identifier_table(os.path.join(run_dir, "ids"))
  assert table.item_ids == [i["item_id"] for i in items]
  sids = [tuple(t) for t in table.sid_tokens]
  cids = [tuple(t) for t in table.cid_tokens]
  assert len(set(sids)) == len(sids) and len(set(cids)) == len(cids)
  assert all(s[:2] == c[:2] for s, c in zip(sids, cids))
  assert all(s[2].startswith("<s0_") and c[2].startswith("<c0_") for s, c in zip(sids, cids))
  sem = np.load(os.path.join(run_dir, "ids", "semantic_embeddings.npy"))
  col = np.load(os.path.join(run_dir, "ids", "collaborative_embeddings.npy"))
  assert sem.shape == (len(items), 384) and col.shape == (len(items), 16)
  np.testing.assert_allclose(np.linalg.norm(sem, axis=1), 1.0, atol=1e-4)
  sasrec = json.load(open(os.path.join(run_dir, "ids", "sasrec_metrics.json")))
  assert set(sasrec) == {"validation", "test"} and 0.0 <= sasrec["test"]["HR@10"] <= 1.0


def test_report_prints_both_stages(run):
  _, report = run
  assert report[0].startswith("dataset: custom")
  assert "SID collisions" in report[1] and "final 0.00%" in report[1]


def test_pipeline_skips_complete_stages_and_reruns_changed_ones(run, raw, capsys):
  run_dir, _ = run
  ids_before = open(os.path.join(run_dir, "ids", "identifiers.jsonl")).read()
  parse(run_dir, *raw)
  pipeline_lib.pipeline()
  out = capsys.readouterr().out
  assert "[prepare] complete for this config, skipped" in out
  assert "[identify] complete for this config, skipped" in out
  gin.clear_config()
  parse(run_dir, *raw, extra=["RQVAEConfig.seed = 7"])
  pipeline_lib.pipeline()
  out = capsys.readouterr().out
  assert "[prepare] complete for this config, skipped" in out
  assert "[identify] running" in out
  assert os.path.exists(os.path.join(run_dir, "ids", "identifiers.jsonl"))
  assert open(os.path.join(run_dir, "ids", "identifiers.jsonl")).read() != ids_before


def test_pipeline_resumes_after_a_killed_stage(run, raw):
  run_dir, _ = run
  # A stage killed before its marker was written: the marker is missing, output may exist.
  os.remove(os.path.join(run_dir, "stages", "identify.json"))
  parse(run_dir, *raw, extra=["RQVAEConfig.seed = 7"])
  pipeline_lib.pipeline()
  assert os.path.exists(os.path.join(run_dir, "stages", "identify.json"))


def test_identify_rejects_a_directory_that_is_not_prepared(tmp_path, raw):
  parse(str(tmp_path), *raw)
  with pytest.raises(DataError, match="not a prepared dataset"):
    identify()
  assert not os.path.exists(tmp_path / "ids")


def test_format_identifier_stats_names_every_level():
  stats = {"mode": "dual", "num_items": 3, "codebook_size": 4,
           "collisions": {"sid": {"argmin": {"collision_rate": 0.5, "colliding_items": 2},
                                  "final": {"collision_rate": 0.0, "colliding_items": 0}}},
           "dedup_moved_items": {"total": 1}, "sid_cid_shared_prefix_share": 1.0,
           "code_usage": {"m0": {"codes_used": 2, "perplexity": 1.9}}}
  text = format_identifier_stats(stats)
  assert "argmin 50.00% (2 items)" in text and "m0" in text and "1 items" in text
