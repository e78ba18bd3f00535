"""The inference CLI on a tiny T5 trained a few steps on the synthetic world.

Predictions: one line per example of the split, k distinct items sorted by score, titles
and identifiers those of the prepared items and the identifier table, scores equal to the
model's own log-probability of the identifier, the search compiled once for all batches,
and the candidates trie confined to each example's candidates. Errors: no checkpoint, a
vocabulary of another size, another vocabulary file than the run's, an identifier table
whose tokens the vocabulary lacks; each stops with exit code 2 and a message naming it.
"""
import json
import os
import shutil

import gin
import jax
import numpy as np
import pytest

from gensar_jax import build_vocab as build_vocab_lib
from gensar_jax import gin_utils
from gensar_jax import infer as infer_lib
from gensar_jax import restore
from gensar_jax import train as train_lib
from gensar_jax.checkpoints import CheckpointError
from gensar_jax.data.prepared import load_prepared
from gensar_jax.data.schema import DataError
from gensar_jax.decoding import beam_search
from gensar_jax.identifiers.table import load_identifier_table
from gensar_jax.models.encoder_decoder import build_model
from gensar_jax.vocabulary import load_vocabulary
from task_world import LENGTHS, REPO, build_world, parse_and_call, world_flags, write_table
from task_world import under_gin as run

PREFIX = "tinfer"


def args(world, model_dir, *extra, identifiers=None, vocab=None, variant="no_adhoc"):
  return ["--gin_file=gin/runs/train.gin", "--gin_file=gin/models/tiny.gin",
          "--gin_file=gin/runs/infer.gin",
          f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=3",
          *world_flags(world, PREFIX, identifiers, vocab),
          f"--gin.MIXTURE_VARIANT='{variant}'", "--gin.EVAL_PERIOD=0",
          "--gin.CHECKPOINT_PERIOD=3",
          "--gin.KEEP_CHECKPOINTS=1", "--gin.LOG_PERIOD=3", "--gin.WARMUP_STEPS=1",
          "--gin.LEARNING_RATE=1e-2", "--gin.infer.num_beams=5", "--gin.infer.top_k=4",
          "--gin.infer.batch_size=3", "--gin.infer.progress=False", *extra]


def run_cli(argv):
  gin.clear_config()
  try:
    gin_utils.run(infer_lib.main, argv)
  finally:
    gin.clear_config()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  world = build_world(tmp_path_factory.mktemp("infer_world"), prefix=PREFIX)
  model_dir = str(tmp_path_factory.mktemp("infer") / "model")
  run(args(world, model_dir), train_lib.train)
  return world, model_dir


def read_lines(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def split_examples(world, split, kind):
  ds = load_prepared(world["prepared"]).load_split(split)
  return [ex for ex in ds.as_numpy_iterator() if ex["kind"].decode() == kind]


def test_catalogue_predictions_sorted_titled_and_scored_by_the_model(trained, tmp_path):
  world, model_dir = trained
  out = str(tmp_path / "rec.jsonl")
  beam_search._JITTED.clear()
  summary = run(args(world, model_dir, f"--gin.INFER_OUTPUT='{out}'"), infer_lib.infer)
  rows = read_lines(out)
  expected = split_examples(world, "test", "rec")
  assert summary.num_examples == len(rows) == len(expected) > 3  # several batches of 3
  assert sorted(r["user_id"] for r in rows) == sorted(e["user_id"].decode() for e in expected)
  titles = dict(zip(world["items"]["item_id"], world["items"]["title"]))
  table = load_identifier_table(world["dual"])
  cids = {i: "<rec_item>" + "".join(t) for i, t in zip(table.item_ids, table.cid_tokens)}
  for row in rows:
    items = row["items"]
    assert len(items) == 4
    scores = [it["score"] for it in items]
    assert scores == sorted(scores, reverse=True) and all(np.isfinite(scores))
    assert len({it["item_id"] for it in items}) == 4
    for it in items:
      assert it["title"] == titles[it["item_id"]]
      assert it["identifier"] == cids[it["item_id"]]
    assert row["input"].startswith("Recommendation") and row["target"] in titles
  # One compilation served every batch (the last one is padded, not a new shape).
  (_, jitted), = beam_search._JITTED.values()
  assert jitted._cache_size() == 1

  # The score of an item is the model's log-probability of its identifier + EOS.
  vocab = load_vocabulary(world["vocab_path"])
  gin.parse_config_files_and_bindings([os.path.join(REPO, "gin/models/tiny.gin")], [])
  try:
    model = build_model(vocab)
  finally:
    gin.clear_config()
  params, _ = restore.load_params(model_dir, model)
  first = rows[0]
  inputs = vocab.encode(first["input"])[:LENGTHS["inputs"] - 1] + [1]
  targets = [vocab.tokenizer.piece_to_id(p) for p in
             first["items"][0]["identifier"].replace("><", ">\n<").split("\n")] + [1]
  batch = {"encoder_input_tokens": np.asarray([inputs], np.int32),
           "decoder_target_tokens": np.asarray([targets], np.int32),
           "decoder_input_tokens": np.asarray([[0] + targets[:-1]], np.int32),
           "decoder_loss_weights": np.ones((1, len(targets)), np.float32)}
  score = float(jax.jit(model.score_batch)(params, batch)[0])
  assert score == pytest.approx(first["items"][0]["score"], abs=1e-3)


def test_candidates_constraint_returns_exactly_each_examples_candidates(trained, tmp_path):
  world, model_dir = trained
  out = str(tmp_path / "search.jsonl")
  run(args(world, model_dir, f"--gin.INFER_OUTPUT='{out}'", "--gin.INFER_SPLIT='validation'",
           "--gin.INFER_TASK='next_search_item'", "--gin.INFER_CONSTRAINT='candidates'",
           "--gin.infer.num_beams=6", "--gin.infer.top_k=6"), infer_lib.infer)
  rows = read_lines(out)
  expected = {e["user_id"].decode(): e for e in split_examples(world, "validation", "search")}
  assert len(rows) == len(expected)
  for row in rows:
    ex = expected[row["user_id"]]
    # target + 5 negatives, 6 beams: the ranking is a permutation of the candidates.
    assert sorted(it["item_id"] for it in row["items"]) == sorted(
        c.decode() for c in ex["candidates"])
    assert row["target"] == ex["target_item"].decode()
    assert all(it["identifier"].startswith("<src_item>") for it in row["items"])


def test_no_checkpoint_exits_2(trained, tmp_path, capsys):
  world, _ = trained
  with pytest.raises(SystemExit) as exit_info:
    run_cli(args(world, str(tmp_path / "empty")))
  assert exit_info.value.code == 2
  assert "no checkpoints/ directory" in capsys.readouterr().err


@pytest.fixture(scope="module")
def other_vocab(trained, tmp_path_factory):
  """A vocabulary over the same data with another size (1300 pieces -> 1408 logits)."""
  world, _ = trained
  path = str(tmp_path_factory.mktemp("vocab_other") / "other.model")
  parse_and_call([os.path.join(REPO, "gin", "runs", "build_vocab.gin")],
                 [f"PREPARED_DIR = '{world['prepared']}'",
                  f"IDENTIFIERS_DIRS = ['{world['dual']}']", f"VOCAB_PATH = '{path}'",
                  "build_vocab.vocab_size = 1300", "build_vocab.renders_per_template = 5"],
                 build_vocab_lib.build_vocab)
  return path


def test_vocabulary_of_another_size_is_refused(trained, other_vocab, tmp_path):
  world, model_dir = trained
  # Without the run's config.gin only the embedding shapes can tell.
  bare = str(tmp_path / "bare")
  shutil.copytree(model_dir, bare)
  os.remove(os.path.join(bare, "config.gin"))
  with pytest.raises(CheckpointError, match=r"vocab_size 1408.*1024"):
    run(args(world, bare, vocab=other_vocab), infer_lib.infer)


def test_vocabulary_other_than_the_runs_is_refused(trained, other_vocab, tmp_path, capsys):
  world, model_dir = trained
  with pytest.raises(SystemExit) as exit_info:
    run_cli(args(world, model_dir, vocab=other_vocab))
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "trained with VOCAB_PATH=" in err and "other contents" in err


@pytest.mark.parametrize("stage", ["evaluate", "export"])
def test_evaluate_and_export_share_the_run_checks(trained, other_vocab, tmp_path, stage,
                                                  capsys):
  """One run loader (restore.load_run): evaluate and export refuse what infer refuses."""
  from gensar_jax import evaluate as evaluate_lib, export as export_lib
  world, model_dir = trained
  main = {"evaluate": evaluate_lib.main, "export": export_lib.main}[stage]
  extra = (["--gin_file=gin/runs/evaluate.gin", f"--gin.evaluate.output_dir='{tmp_path}/e'"]
           if stage == "evaluate" else
           ["--gin_file=gin/runs/export.gin", f"--gin.EXPORT_DIR='{tmp_path}/x'"])
  gin.clear_config()
  try:
    with pytest.raises(SystemExit) as exit_info:
      gin_utils.run(main, args(world, model_dir, *extra, vocab=other_vocab))
  finally:
    gin.clear_config()
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "trained with VOCAB_PATH=" in err and "other contents" in err
  assert not os.path.exists(os.path.join(str(tmp_path), "e" if stage == "evaluate" else "x"))


def test_identifier_tokens_missing_from_the_vocabulary_are_refused(trained, tmp_path):
  world, model_dir = trained
  foreign = write_table(str(tmp_path / "ids_foreign"), list(world["items"]["item_id"]),
                        {"sid": ["m0", "m1", "q0", "q1"], "cid": ["m0", "m1", "c0", "c1"]})
  with pytest.raises(DataError, match=r"<q0_"):
    run(args(world, model_dir, identifiers=foreign), infer_lib.infer)


def test_bad_options_are_data_errors(trained, tmp_path):
  world, model_dir = trained
  with pytest.raises(DataError, match="trains only tinfer.*next_rec_item"):
    run(args(world, model_dir, "--gin.INFER_TASK='next_search_item'", variant="rec_only"),
        infer_lib.infer)
  with pytest.raises(DataError, match="infer.constraint='trie'"):
    run(args(world, model_dir, "--gin.INFER_CONSTRAINT='trie'"), infer_lib.infer)
  with pytest.raises(DataError, match="has no candidates"):
    run(args(world, model_dir, "--gin.INFER_SPLIT='train'", "--gin.INFER_CONSTRAINT='candidates'",
             f"--gin.INFER_OUTPUT='{tmp_path / 'x.jsonl'}'"), infer_lib.infer)
  assert not os.path.exists(tmp_path / "x.jsonl")
