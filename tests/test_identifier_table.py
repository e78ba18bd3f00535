"""Identifier table: round trip, validation before writing, nothing partial on failure."""
import dataclasses
import json
import os

import numpy as np
import pytest

from gensar_jax.identifiers import assignment as assignment_lib
from gensar_jax.identifiers import rqvae
from gensar_jax.identifiers import table as table_lib

SMALL = rqvae.RQVAEConfig(hidden_dims=(32, 16), latent_dim=8, codebook_size=16, batch_size=128,
                          eval_chunk=256, epochs=1, eval_every=1, progress=False)


def _assignment(n=5, cid=True):
  """A hand-made dual assignment (no model needed)."""
  sid = np.stack([np.zeros(n), np.arange(n) % 2, np.arange(n), np.zeros(n)], 1).astype(np.int32)
  cids = sid.copy()
  cids[:, 2:] = sid[:, 2:][:, ::-1]
  counts = np.bincount(sid[:, 2], minlength=16)
  usage = {name: {"codes_used": 1, "perplexity": 1.0, "counts": counts.tolist()}
           for name in ("m0", "m1", "s0", "s1", "c0", "c1")}
  return assignment_lib.IdentifierAssignment(
      mode="dual", sid_codes=sid, cid_codes=cids if cid else None,
      sid_levels=("m0", "m1", "s0", "s1"), cid_levels=("m0", "m1", "c0", "c1") if cid else (),
      codebook_size=16, stats={"num_items": n, "code_usage": usage, "sid_levels": [
          "m0", "m1", "s0", "s1"], "cid_levels": ["m0", "m1", "c0", "c1"] if cid else [],
          "codebook_size": 16})


def test_round_trip(tmp_path):
  a = _assignment()
  ids = ["a", "b", "c", 7, np.int64(8)]
  out = table_lib.write_identifier_table(tmp_path / "ids", ids, a, {"note": np.float32(0.5)})
  assert sorted(os.listdir(out)) == ["code_usage.png", "identifier_stats.json", "identifiers.jsonl"]
  assert (out / "code_usage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  t = table_lib.load_identifier_table(out)
  assert t.item_ids == ["a", "b", "c", 7, 8]
  np.testing.assert_array_equal(t.sid_codes, a.sid_codes)
  np.testing.assert_array_equal(t.cid_codes, a.cid_codes)
  assert t.sid_tokens == a.sid_tokens and t.cid_tokens == a.cid_tokens
  assert t.sid_tokens[3] == ["<m0_0>", "<m1_1>", "<s0_3>", "<s1_0>"]
  assert t.stats["note"] == 0.5 and t.stats["num_items"] == 5
  first = json.loads((out / "identifiers.jsonl").read_text().splitlines()[0])
  assert set(first) == {"item_id", "sid", "cid", "sid_codes", "cid_codes"}
  assert t.vocabulary() == a.vocabulary()
  assert os.listdir(tmp_path) == ["ids"]  # no temporary directory left behind


def test_single_space_table_has_no_cid(tmp_path):
  t = table_lib.load_identifier_table(
      table_lib.write_identifier_table(tmp_path / "ids", list(range(5)), _assignment(cid=False)))
  assert t.cid_tokens is None and t.cid_codes is None and len(t) == 5


def test_overwrite_replaces_the_previous_table(tmp_path):
  table_lib.write_identifier_table(tmp_path / "ids", list(range(5)), _assignment())
  table_lib.write_identifier_table(tmp_path / "ids", list("vwxyz"), _assignment())
  assert table_lib.load_identifier_table(tmp_path / "ids").item_ids == list("vwxyz")
  assert os.listdir(tmp_path) == ["ids"]


@pytest.mark.parametrize("ids,message", [
    (list(range(4)), "4 entries but the assignment has 5"),
    ([1, 2, 3, 3, 4], "duplicates"),
    ([1.5, 2, 3, 4, 5], "str or int"),
])
def test_bad_item_ids_write_nothing(tmp_path, ids, message):
  with pytest.raises(ValueError, match=message):
    table_lib.write_identifier_table(tmp_path / "ids", ids, _assignment())
  assert os.listdir(tmp_path) == []


def test_colliding_ids_are_refused(tmp_path):
  a = _assignment()
  a.sid_codes[1] = a.sid_codes[0]
  with pytest.raises(ValueError, match="SIDs are not unique"):
    table_lib.write_identifier_table(tmp_path / "ids", list(range(5)), a)
  assert os.listdir(tmp_path) == []


def test_failure_while_writing_leaves_the_old_table(tmp_path, monkeypatch):
  table_lib.write_identifier_table(tmp_path / "ids", list(range(5)), _assignment())

  def broken_plot(*args):
    raise OSError("disk full")

  monkeypatch.setattr(table_lib, "_plot_code_usage", broken_plot)
  with pytest.raises(OSError, match="disk full"):
    table_lib.write_identifier_table(tmp_path / "ids", list("vwxyz"), _assignment())
  assert os.listdir(tmp_path) == ["ids"]
  assert table_lib.load_identifier_table(tmp_path / "ids").item_ids == list(range(5))
  with pytest.raises(OSError):
    table_lib.write_identifier_table(tmp_path / "fresh", list(range(5)), _assignment())
  assert not (tmp_path / "fresh").exists() and os.listdir(tmp_path) == ["ids"]


def _tables(n=300):
  rng = np.random.default_rng(0)
  return rng.normal(size=(n, 24)).astype(np.float32), rng.normal(size=(n, 12)).astype(np.float32)


@pytest.mark.parametrize("corrupt,message", [
    (lambda s, c: s.__setitem__((4, 1), np.nan), r"semantic .*NaN.* row 4\b"),
    (lambda s, c: c.__setitem__((9, 0), -np.inf), r"collaborative .*inf.* row 9\b"),
])
def test_bad_embeddings_leave_no_table(tmp_path, corrupt, message):
  sem, col = _tables()
  corrupt(sem, col)
  with pytest.raises(ValueError, match=message):
    table_lib.build_identifier_table(tmp_path / "ids", list(range(300)), sem, col, SMALL)
  assert os.listdir(tmp_path) == []


def test_mismatched_counts_leave_no_table(tmp_path):
  sem, col = _tables()
  with pytest.raises(ValueError, match=r"300.*299"):
    table_lib.build_identifier_table(tmp_path / "ids", list(range(300)), sem, col[:299], SMALL)
  with pytest.raises(ValueError, match="299 entries"):
    table_lib.build_identifier_table(tmp_path / "ids", list(range(299)), sem, col, SMALL)
  assert os.listdir(tmp_path) == []


def test_build_end_to_end(tmp_path):
  sem, col = _tables()
  ids = [f"item{i}" for i in range(300)]
  config = dataclasses.replace(SMALL, epochs=2)
  a, trained = table_lib.build_identifier_table(tmp_path / "ids", ids, sem, col, config)
  t = table_lib.load_identifier_table(tmp_path / "ids")
  assert t.item_ids == ids and len(trained.history) == 2
  assert len({tuple(r) for r in t.sid_tokens}) == 300 == len({tuple(r) for r in t.cid_tokens})
  assert t.stats["rqvae_history"][0]["epoch"] == 0
  assert t.stats["collisions"]["sid"]["final"]["collision_rate"] == 0.0
