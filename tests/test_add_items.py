"""Items added after training: codes from the saved RQ-VAE around the existing identifiers,
collaborative embeddings for unseen items, the add_items stage, and the run-input check."""
import dataclasses
import json
import os

import gin
import numpy as np
import pytest

from gensar_jax import add_items as add_items_lib
from gensar_jax import gin_utils
from gensar_jax import pipeline as pipeline_lib
from gensar_jax import restore
from gensar_jax.checkpoints import CheckpointError
from gensar_jax.data.holdout import FILE_NAME as HELD_OUT_FILE
from gensar_jax.data.schema import DataError
from gensar_jax.identifiers import assignment as assignment_lib
from gensar_jax.identifiers import cold_start
from gensar_jax.identifiers import extend as extend_lib
from gensar_jax.identifiers import rqvae
from gensar_jax.identifiers import rqvae_store
from gensar_jax.identifiers.table import (IDENTIFIERS_FILE, extension_problem,
                                          load_identifier_table)
from gensar_jax.io_utils import read_jsonl
from test_assignment import SMALL as SMALL_RQVAE, random_tables
from test_identify_pipeline import parse
from test_prepare import synthetic_data, write_generic


def assert_unique(codes):
  assert np.unique(codes, axis=0).shape[0] == codes.shape[0]


@pytest.fixture(scope="module")
def trained():
  sem, col = random_tables(400, seed=3)
  model = rqvae.train_rqvae(sem[:300], col[:300], SMALL_RQVAE)
  existing = assignment_lib.assign_identifiers(model, sem[:300], col[:300], SMALL_RQVAE)
  return model, existing, sem, col


def test_new_items_keep_existing_ids_unique_and_share_the_prefix(trained):
  model, existing, sem, col = trained
  # New items: 100 unseen ones plus exact copies of 20 existing items (their argmin
  # identifiers are taken, so they must move).
  new_sem = np.concatenate([sem[300:], sem[:20]])
  new_col = np.concatenate([col[300:], col[:20]])
  codes, moved = extend_lib.extend_codes(
      model, {"sid": existing.sid_codes, "cid": existing.cid_codes}, new_sem, new_col)
  for space, old in (("sid", existing.sid_codes), ("cid", existing.cid_codes)):
    assert codes[space].shape == (120, 4)
    assert_unique(np.concatenate([old, codes[space]]))
    assert 20 <= moved[space] < 120
  assert extend_lib.shared_prefix_kept(codes, 2)
  # An item keeps its argmin SID unless taken: a copy of an existing item that holds its
  # own argmin SID must move, and most unseen items keep theirs.
  _, shared, specific = rqvae.encode_and_quantize(model, (new_sem, new_col))
  argmin = np.concatenate([shared, specific[rqvae.SEMANTIC]], axis=1)  # [120, 4]
  kept = np.all(codes["sid"] == argmin, axis=1)
  assert kept.sum() == 120 - moved["sid"]
  holds_own = np.all(existing.sid_codes[:20] == argmin[100:], axis=1)
  assert holds_own.any() and not kept[100:][holds_own].any()


def test_a_full_subtree_moves_the_item_up_a_level():
  """Codebook of 2, 1 shared + 1 specific level: 4 identifiers per space. With 3 taken and
  the new item's argmin subtree full, it must land on the single free identifier."""
  config = dataclasses.replace(SMALL_RQVAE, codebook_size=2, shared_levels=1,
                               specific_levels=1, epochs=1)
  sem, col = random_tables(8, seed=5)
  model = rqvae.init_rqvae(sem, col, config)
  _, shared, specific = rqvae.encode_and_quantize(model, (sem[:1], col[:1]))
  s0 = int(shared[0, 0])
  # Both codes under the item's own shared code are taken, and one under the other.
  existing = np.asarray([[s0, 0], [s0, 1], [1 - s0, 0]])
  codes, moved = extend_lib.extend_codes(model, {"sid": existing, "cid": existing},
                                         sem[:1], col[:1])
  assert codes["sid"].tolist() == [[1 - s0, 1]] and codes["cid"].tolist() == [[1 - s0, 1]]
  assert moved == {"sid": 1, "cid": 1}
  with pytest.raises(ValueError, match="no free identifier"):
    extend_lib.extend_codes(model, {"sid": np.concatenate([existing, codes["sid"]]),
                                    "cid": np.concatenate([existing, codes["cid"]])},
                            sem[1:2], col[1:2])


def test_single_space_modes_extend(trained):
  _, _, sem, col = trained
  config = dataclasses.replace(SMALL_RQVAE, mode="sid_only")
  model = rqvae.init_rqvae(sem[:50], None, config)
  existing = assignment_lib.assign_identifiers(model, sem[:50], None, config)
  codes, _ = extend_lib.extend_codes(model, {"sid": existing.sid_codes},
                                     np.concatenate([sem[50:60], sem[:5]]), None)
  assert set(codes) == {"sid"}
  assert_unique(np.concatenate([existing.sid_codes, codes["sid"]]))


def test_cold_items_borrow_from_sequence_then_text_neighbours():
  existing_col = np.eye(4, dtype=np.float32)  # [4 existing items, 4]
  existing_sem = np.eye(4, 3, dtype=np.float32) + 0.01
  # Catalogue rows: 0-3 existing, 4 and 5 new; item 4 follows 1 and precedes 2.
  is_existing = np.asarray([True] * 4 + [False] * 2)
  found = cold_start.sequence_neighbours([[0, 1, 4, 2], [3]], [4, 5], is_existing, window=1)
  assert sorted(found[4]) == [1, 2] and found[5] == []
  new_sem = np.asarray([[0, 0, 1], [0, 1, 0]], np.float32)  # item 5 reads like item 1
  emb, sources = cold_start.collaborative_for_new_items(
      existing_col, existing_sem, new_sem, [found[4], found[5]], text_neighbours=1)
  np.testing.assert_allclose(emb[0], [0, 0.5, 0.5, 0])
  np.testing.assert_allclose(emb[1], existing_col[1])
  assert sources == [cold_start.NEIGHBOURS, cold_start.TEXT]


def test_extension_problem_accepts_additions_and_removals_only():
  def table(rows):
    return "".join(json.dumps({"item_id": i, "sid": None, "cid": None, "sid_codes": s,
                               "cid_codes": c}) + "\n" for i, s, c in rows)
  trained = table([("a", [0, 1], [0, 2]), ("b", [1, 1], [1, 2])])
  assert extension_problem(trained, table([("b", [1, 1], [1, 2]), ("c", [2, 0], [2, 0])])
                           ) is None
  assert "other identifiers" in extension_problem(
      trained, table([("a", [0, 1], [0, 3]), ("b", [1, 1], [1, 2])]))
  # "a" was removed, but its SID must not go to a new item: the model still emits it.
  assert "of trained item 'a'" in extension_problem(
      trained, table([("b", [1, 1], [1, 2]), ("c", [0, 1], [3, 3])]))


# --------------------------------------------------------------------- the whole stage


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
  """Identifiers trained without the newest 10% of items, then extended to all of them."""
  root = str(tmp_path_factory.mktemp("new_items"))
  raw = write_generic(os.path.join(root, "raw"), *synthetic_data())
  gin.clear_config()
  parse(os.path.join(root, "old"), *raw, extra=["prepare.hold_out_newest_items = 0.1"])
  pipeline_lib.pipeline()
  gin.clear_config()
  parse(os.path.join(root, "now"), *raw,
        extra=["pipeline.stages = ('prepare',)"])
  pipeline_lib.pipeline()
  gin.clear_config()
  gin_utils.parse_gin([
      "--gin_file=gin/runs/add_items.gin",
      f"--gin.IDENTIFIERS_DIR='{root}/old/ids'", f"--gin.PREPARED_DIR='{root}/now/data'",
      f"--gin.OUTPUT_DIR='{root}/extended'"])
  added = add_items_lib.add_items()
  gin.clear_config()
  return root, added


def test_add_items_gives_the_held_out_items_identifiers(extended):
  root, added = extended
  held_out = json.load(open(os.path.join(root, "old", "data", HELD_OUT_FILE)))
  assert held_out and sorted(added["new_item_ids"]) == sorted(held_out)
  old = load_identifier_table(os.path.join(root, "old", "ids"))
  new = load_identifier_table(os.path.join(root, "extended"))
  items = [i["item_id"] for i in read_jsonl(os.path.join(root, "now", "data", "items.jsonl"))]
  assert new.item_ids == items  # the new catalogue's order, like identify writes
  row = {item: r for r, item in enumerate(new.item_ids)}
  for r, item in enumerate(old.item_ids):
    assert new.sid_tokens[row[item]] == old.sid_tokens[r]
    assert new.cid_tokens[row[item]] == old.cid_tokens[r]
  assert_unique(new.sid_codes) and assert_unique(new.cid_codes)
  assert np.all(new.sid_codes[:, :2] == new.cid_codes[:, :2])
  assert added["items_added"] == len(held_out) and added["items_removed"] == 0
  assert sum(added["cid_source"].values()) == len(held_out)
  assert extension_problem(open(os.path.join(root, "old", "ids", IDENTIFIERS_FILE)).read(),
                           open(os.path.join(root, "extended", IDENTIFIERS_FILE)).read()) is None
  sem = np.load(os.path.join(root, "extended", "semantic_embeddings.npy"))
  assert sem.shape[0] == len(items)
  # The extended table can itself take more items later: it keeps the RQ-VAE.
  model, encoder = rqvae_store.load_rqvae(os.path.join(root, "extended"))
  assert model.config.codebook_size == 8 and encoder["pooling"] == "mean"


def test_check_run_inputs_accepts_an_extension_and_refuses_other_tables(extended, tmp_path):
  root, _ = extended
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  (model_dir / "config.gin").write_text(f"IDENTIFIERS_DIR = '{root}/old/ids'\n")
  vocab = str(tmp_path / "missing.model")
  restore.check_run_inputs(str(model_dir), vocab, os.path.join(root, "extended"))
  changed = tmp_path / "changed"
  changed.mkdir()
  rows = read_jsonl(os.path.join(root, "old", "ids", IDENTIFIERS_FILE))
  rows[0]["sid_codes"], rows[1]["sid_codes"] = rows[1]["sid_codes"], rows[0]["sid_codes"]
  (changed / IDENTIFIERS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
  with pytest.raises(CheckpointError, match="not an extension of it .*other identifiers"):
    restore.check_run_inputs(str(model_dir), vocab, str(changed))


def test_add_items_refuses_bad_requests(extended, tmp_path):
  root, _ = extended
  with pytest.raises(DataError, match="not over it"):
    add_items_lib.add_items(identifiers_dir=f"{root}/old/ids", prepared_dir=f"{root}/now/data",
                            output_dir=f"{root}/old/ids", overwrite=True)
  with pytest.raises(DataError, match="nothing to add"):
    add_items_lib.add_items(identifiers_dir=f"{root}/extended", prepared_dir=f"{root}/now/data",
                            output_dir=str(tmp_path / "again"))
  bare = tmp_path / "bare"
  bare.mkdir()
  (bare / IDENTIFIERS_FILE).write_text("")
  with pytest.raises(DataError, match="does not keep its RQ-VAE"):
    add_items_lib.add_items(identifiers_dir=str(bare), prepared_dir=f"{root}/now/data",
                            output_dir=str(tmp_path / "out"))
  assert not (tmp_path / "again").exists() and not (tmp_path / "out").exists()
