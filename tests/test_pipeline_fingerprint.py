"""The pipeline's stage fingerprints: what makes a complete stage run again."""
from __future__ import annotations

import os

import gin
import pytest

from gensar_jax import gin_utils
from gensar_jax import pipeline as pipeline_lib  # registers every stage's configurables


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _bind(items, events):
  gin.parse_config([f"ITEMS_TABLE = '{items}'", "load_generic.items_path = %ITEMS_TABLE",
                    f"load_generic.events_path = '{events}'",
                    "prepare.name = 'custom'", "prepare.loader = @load_generic"])


def test_prepare_fingerprint_follows_the_contents_of_its_input_files(tmp_path):
  items, events = tmp_path / "items.csv", tmp_path / "events.csv"
  items.write_text("item_id,title\n1,a\n")
  events.write_text("user_id,item_id,timestamp\nu,1,1\n")
  _bind(items, events)
  before = pipeline_lib.stage_fingerprint("prepare")
  digests = pipeline_lib.input_file_digests("prepare")
  assert [d.split()[1] for d in digests] == sorted([str(events), str(items)])  # via the macro
  stat = os.stat(items)
  os.utime(items, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes
  assert pipeline_lib.stage_fingerprint("prepare") == before
  items.write_text("item_id,title\n1,a fixed title\n")  # the fixed file of a rerun
  changed = pipeline_lib.stage_fingerprint("prepare")
  assert changed != before
  # Downstream stages chain the upstream fingerprint, so they rerun too.
  assert (pipeline_lib.stage_fingerprint("identify", changed)
          != pipeline_lib.stage_fingerprint("identify", before))
  # Stages without input files are unaffected by file contents.
  assert pipeline_lib.input_file_digests("identify") == []


STAGE_RUN_FILES = {"prepare": "prepare.gin", "identify": "identify.gin",
                   "build_vocab": "build_vocab.gin", "baselines": "baselines.gin",
                   "train_doc2query": "doc2query.gin",
                   "train": "train.gin", "evaluate": "evaluate.gin"}


@pytest.mark.parametrize("stage", sorted(STAGE_RUN_FILES))
def test_stage_configurables_cover_every_configurable_its_run_file_binds(stage):
  """A binding the stage's fingerprint does not cover would let a changed config reuse
  stale outputs: every configurable a stage's gin run file (with its includes) binds is in
  STAGE_CONFIGURABLES for that stage."""
  gin.clear_config()
  try:
    gin.parse_config_file(os.path.join(gin_utils.REPO_ROOT, "gin", "runs",
                                       STAGE_RUN_FILES[stage]))
    # Macros are not configurables: the fingerprint counts the macros a stage reads.
    bound = {selector.split(".")[-1] for (_, selector) in gin.config._CONFIG  # pylint: disable=protected-access
             if selector != "gin.macro"}
  finally:
    gin.clear_config()
  covered = set(pipeline_lib.STAGE_CONFIGURABLES[stage])
  if stage == "train_doc2query":  # one run file for the doc2query model and its sampling
    covered |= set(pipeline_lib.STAGE_CONFIGURABLES["doc2query"])
  assert bound - covered == set(), f"{stage}: not in STAGE_CONFIGURABLES: {bound - covered}"
