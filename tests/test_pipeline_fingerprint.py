"""The pipeline's stage fingerprints: what makes a complete stage run again."""
from __future__ import annotations

import os

import gin
import pytest

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
