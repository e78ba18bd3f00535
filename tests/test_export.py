"""Train a tiny model, export it, and check that the artifact alone (in a fresh process
without gin or the Flax module) ranks exactly as the in-process constrained search."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from gensar_jax import ranking, gin_utils, restore
from gensar_jax import export as export_lib
from gensar_jax import train as train_lib
from gensar_jax.decoding import build_trie, identifier_search
from gensar_jax.models.encoder_decoder import build_model
from gensar_jax.serving import artifact as artifact_lib
from task_world import LENGTHS, build_world, under_gin, world_flags

PREFIX = "texport"
BEAMS = 4
BUCKETS = (1, 4)


def gin_args(world, model_dir, export_dir):
  return ["--gin_file=gin/runs/train.gin", "--gin_file=gin/models/tiny.gin",
          "--gin_file=gin/runs/export.gin",
          f"--gin.MODEL_DIR='{model_dir}'", f"--gin.EXPORT_DIR='{export_dir}'",
          "--gin.TRAIN_STEPS=2", *world_flags(world, PREFIX), "--gin.EVAL_PERIOD=0",
          "--gin.CHECKPOINT_PERIOD=2",
          "--gin.LOG_PERIOD=2", "--gin.WARMUP_STEPS=1", "--gin.LEARNING_RATE=1e-2",
          f"--gin.SERVING_BEAMS={BEAMS}", f"--gin_bindings=export.batch_buckets={BUCKETS}",
          "--gin_bindings=export.checkpoint='latest'",
          # The TF SavedModel too, through the stage's binding (tests/test_saved_model.py
          # checks what it answers).
          "--gin_bindings=export.saved_model=True",
          # One layer each way: the test is about the artifact, not the model's depth.
          "--gin_bindings=T5Config.num_encoder_layers=1",
          "--gin_bindings=T5Config.num_decoder_layers=1"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  world = build_world(tmp_path_factory.mktemp("export_world"), prefix=PREFIX)
  root = tmp_path_factory.mktemp("export")
  model_dir, export_dir = str(root / "model"), str(root / "artifact")
  argv = gin_args(world, model_dir, export_dir)
  under_gin(argv, train_lib.train)
  path = under_gin(argv, export_lib.export)

  def in_process():
    setup = ranking.ranking_setup()
    model = build_model(setup.vocabulary)
    params, step = restore.load_params(model_dir, model, "latest")
    return setup, model, params, step

  setup, model, params, step = under_gin(argv, in_process)
  return {"world": world, "path": path, "setup": setup, "model": model, "params": params,
          "step": step, "argv": argv}


def test_artifact_files_and_metadata(exported):
  path = exported["path"]
  meta = artifact_lib.read_metadata(path)
  assert meta["format_version"] == artifact_lib.FORMAT_VERSION
  assert meta["source_checkpoint_step"] == exported["step"] == 2
  assert meta["num_beams"] == BEAMS and meta["batch_buckets"] == list(BUCKETS)
  assert meta["feature_lengths"] == {"inputs": LENGTHS["inputs"], "identifier": 6}
  assert meta["model_config"]["emb_dim"] == 32
  assert meta["model_config"]["num_decoder_layers"] == 1
  assert meta["model_config"]["vocab_size"] == exported["model"].module.config.vocab_size
  assert meta["spaces"] == {"search": "sid", "recommend": "cid"}
  sp = exported["setup"].vocabulary.tokenizer
  for token, i in meta["behaviour_token_ids"].items():
    assert sp.id_to_piece(i) == token
  art = artifact_lib.read_artifact(path)
  # Identifier tables are the evaluation's, rows in catalogue order.
  np.testing.assert_array_equal(art.identifier_tokens["search"],
                                exported["setup"].indices["search"].tokens)
  np.testing.assert_array_equal(art.identifier_tokens["recommend"],
                                exported["setup"].indices["rec"].tokens)
  assert [r["item_id"] for r in art.items] == exported["setup"].indices["rec"].item_ids
  titles = dict(zip(exported["world"]["items"]["item_id"], exported["world"]["items"]["title"]))
  assert all(r["title"] == titles[r["item_id"]] for r in art.items)
  # History spellings decode to the identifier tokens without behaviour token and EOS.
  first = art.items[0]["identifiers"]["recommend"]
  spelled = art.identifier_tokens["recommend"][0, 1:-1]
  assert first == "".join(sp.id_to_piece(int(t)) for t in spelled)
  # The stored trie is the catalogue trie, leaf for leaf.
  rebuilt = artifact_lib.trie_from_leaves(art.trie_leaves["search"], meta["tries"]["search"])
  expected = build_trie(exported["setup"].indices["search"].tokens)
  for a, b in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)
  assert rebuilt.max_branch == expected.max_branch
  # Params round-trip exactly.
  want = jax.tree.leaves(jax.tree.map(np.asarray, exported["params"]))
  got = jax.tree.leaves(art.params)
  assert len(want) == len(got)
  for a, b in zip(want, got):
    np.testing.assert_array_equal(a, b)
  assert not [n for n in os.listdir(os.path.dirname(path)) if ".tmp-" in n]
  assert os.path.isfile(os.path.join(path, "saved_model", "saved_model.pb"))
  assert not [n for n in os.listdir(path) if ".tmp-" in n]


FRESH_PROCESS = textwrap.dedent("""
  import json, sys
  import numpy as np
  from gensar_jax.serving.engine import ServingEngine
  artifact, tokens_path, out_path = sys.argv[1:4]
  engine = ServingEngine(artifact)
  tokens = np.load(tokens_path)
  out = {}
  for task in ("search", "recommend"):
    rows, scores = engine.run_tokens(task, tokens)
    out[task + "_rows"], out[task + "_scores"] = rows, scores
  np.savez(out_path, **out)
  import gin
  print(json.dumps({"gin_config": gin.config_str(),
                    "flax_model_loaded": "gensar_jax.models.t5" in sys.modules,
                    "tensorflow_loaded": "tensorflow" in sys.modules,
                    "seqio_loaded": "seqio" in sys.modules}))
""")


def served_inputs(path):
  """Six real serving prompts ([6, L]): searches and recommendations over varied histories."""
  from gensar_jax.serving.app import Event, Query
  from gensar_jax.serving.engine import ServingEngine
  engine = ServingEngine(path)
  rows = []
  for i in range(6):
    history = (Event("rec", f"I{i:02d}"), Event("search", f"I{i + 10:02d}", "usb cable"),
               Event("rec", f"I{(7 * i) % 30:02d}"))
    query = Query(history=history, k=BEAMS, query=["coffee maker", "camera lens"][i % 2])
    rows.append(engine.encode(engine.prompt("search" if i % 2 else "recommend", query)))
  return np.stack(rows)


def test_fresh_process_matches_in_process_search(exported, tmp_path):
  setup, model, params = exported["setup"], exported["model"], exported["params"]
  # 6 rows: one full bucket of 4 and a remainder of 2 padded to 4.
  tokens = served_inputs(exported["path"])
  tokens_path, out_path = str(tmp_path / "tokens.npy"), str(tmp_path / "out.npz")
  np.save(tokens_path, tokens)
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([gin_utils.REPO_ROOT, env.get("PYTHONPATH", "")])
  proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, exported["path"], tokens_path,
                         out_path], env=env, capture_output=True, text=True, timeout=300,
                        cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report == {"gin_config": "", "flax_model_loaded": False, "tensorflow_loaded": False,
                    "seqio_loaded": False}
  served = np.load(out_path)
  for task, key in export_lib.INDEX_OF_TASK.items():
    trie = build_trie(setup.indices[key].tokens)
    want = jax.jit(lambda p, x, c: identifier_search(model, p, x, c, BEAMS))(
        params, tokens, trie)
    want_items, want_scores = np.asarray(want.items), np.asarray(want.scores)
    np.testing.assert_array_equal(served[f"{task}_rows"], want_items)
    np.testing.assert_allclose(served[f"{task}_scores"], want_scores, rtol=1e-5, atol=1e-5)
    assert (want_items >= 0).all()
    # Distinct items per example: beams are distinct catalogue paths.
    assert all(len(set(r)) == BEAMS for r in want_items)


def test_engine_prompts_match_the_training_prompts(exported):
  """The engine's prompt text and tokens equal those of the SeqIO eval task."""
  from gensar_jax.serving.app import Event, Query
  from gensar_jax.serving.engine import ServingEngine
  from gensar_jax import prompts
  engine = ServingEngine(exported["path"])
  setup = exported["setup"]
  table = {task: setup.indices[key] for task, key in export_lib.INDEX_OF_TASK.items()}
  sp = setup.vocabulary.tokenizer
  spell = lambda task, item: "".join(sp.id_to_piece(int(t)) for t in
                                     table[task].tokens[table[task].row[item], 1:-1])
  events = [Event("rec", "I03"), Event("search", "I07", "coffee maker"), Event("rec", "I11")]
  want_history = prompts.history_text([
      ("rec", spell("recommend", "I03"), ""), ("search", spell("search", "I07"), "coffee maker"),
      ("rec", spell("recommend", "I11"), "")])
  want = prompts.render(prompts.NEXT_SEARCH_ITEM, 0, history=want_history,
                        query=prompts.query_text("café grinder"))
  got = engine.prompt("search", Query(history=events, k=2, query="café grinder"))
  assert got == want
  encoded = setup.vocabulary.encode(want)
  expected = np.zeros(LENGTHS["inputs"], np.int32)
  expected[:min(len(encoded), LENGTHS["inputs"] - 1)] = encoded[:LENGTHS["inputs"] - 1]
  expected[min(len(encoded), LENGTHS["inputs"] - 1)] = 1
  np.testing.assert_array_equal(engine.encode(want), expected)
  # Only the last 5 events of each kind reach the prompt, in time order.
  long = [Event("rec", f"I{i:02d}") for i in range(8)] + [Event("search", "I20", "q")]
  kept = engine._recent(long)
  assert [e.item_id for e in kept] == ["I03", "I04", "I05", "I06", "I07", "I20"]


def test_export_refuses_existing_dir_and_bad_buckets(exported, tmp_path):
  argv = exported["argv"]
  with pytest.raises(FileExistsError):
    under_gin(argv, export_lib.export)
  with pytest.raises(artifact_lib.ArtifactError, match="missing metadata.json"):
    artifact_lib.read_artifact(str(tmp_path))
  with pytest.raises(ValueError, match="batch_buckets"):
    export_lib.write_serving_artifact(
        str(tmp_path / "x"), model=exported["model"], params=exported["params"],
        indices=exported["setup"].indices, titles={}, input_length=8, num_beams=2,
        batch_buckets=(0,))
