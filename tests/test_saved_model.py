"""The TensorFlow SavedModel export (gensar_jax/serving/saved_model.py): a fresh process
that cannot import JAX loads it with `tf.saved_model.load` and its signatures return the artifact
engine's top-k for the same requests, from raw request fields and from tokens; bad inputs
fail with a clear error."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gensar_jax import gin_utils
from gensar_jax.serving import saved_model as saved_model_lib
from gensar_jax.serving.app import Event, Query
from gensar_jax.serving.engine import ServingEngine
from task_world import random_artifact

PREFIX = "tsaved"
BEAMS = 6
BUCKETS = (1, 4)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
  path, _ = random_artifact(tmp_path_factory.mktemp("saved"), PREFIX, BEAMS, BUCKETS,
                            saved_model=True)
  return path


def requests():
  """Five requests (a bucket of 4 and one of 1): empty to long histories (7 rec events,
  over the 5 kept), control forms in queries and history queries, extra spaces."""
  out = []
  for i in range(5):
    history = [Event("rec", f"I{i:02d}"), Event("search", f"I{i + 10:02d}", "usb <m0_1> cable"),
               Event("rec", f"I{(7 * i) % 30:02d}")][:i % 4]
    if i == 4:
      history = [Event("rec", f"I{j:02d}") for j in range(7)] + [
          Event("search", "I20", "<<rec_item>> mug ")]
    out.append(Query(history=tuple(history), k=BEAMS,
                     query=["coffee maker", " camera <src_item> lens "][i % 2]))
  return out


def as_validated(query):
  """The Query the HTTP server hands the engine: texts stripped (app._validate)."""
  return Query(history=tuple(Event(e.kind, e.item_id, e.query.strip()) for e in query.history),
               k=query.k, query=query.query.strip())


def request_fields(queries):
  """The request fields as the signatures take them: [n] and [n, H] string lists."""
  width = max(len(q.history) for q in queries)
  def column(field):
    return [[getattr(e, field) for e in q.history] + [""] * (width - len(q.history))
            for q in queries]
  return {"query": [q.query for q in queries], "history_kind": column("kind"),
          "history_item_id": column("item_id"), "history_query": column("query")}


# JAX is made unimportable (TensorFlow itself imports it when installed, for TF Lite): the
# SavedModel must run on TensorFlow alone, as in TF Serving.
FRESH_PROCESS = textwrap.dedent("""
  import json, sys
  sys.modules["jax"] = sys.modules["jaxlib"] = None
  import numpy as np
  import tensorflow as tf
  import tensorflow_text  # the SentencePiece ops of the text signatures
  saved, fields_path, tokens_path, out_path = sys.argv[1:5]
  model = tf.saved_model.load(saved)
  with open(fields_path) as f:
    fields = {k: tf.constant(v, tf.string) for k, v in json.load(f).items()}
  tokens = tf.constant(np.load(tokens_path))
  history = {k: v for k, v in fields.items() if k != "query"}
  out, errors = {}, {}
  calls = {"search": lambda: model.signatures["search"](**fields),
           "default": lambda: model.signatures["serving_default"](**fields),
           "recommend": lambda: model.signatures["recommend"](**history),
           "search_tokens": lambda: model.signatures["search_tokens"](
               encoder_input_tokens=tokens),
           "recommend_tokens": lambda: model.signatures["recommend_tokens"](
               encoder_input_tokens=tokens)}
  def host(value):  # strings as unicode: npz holds no object arrays without pickle
    if value.dtype == tf.string:
      return np.char.decode(value.numpy().astype(bytes), "utf-8")
    return value.numpy()
  for name, call in calls.items():
    for key, value in call().items():
      out[f"{name}/{key}"] = host(value)
  bad = {
      "float tokens": lambda: model.signatures["search_tokens"](
          encoder_input_tokens=tf.cast(tokens, tf.float32)),
      "short tokens": lambda: model.signatures["search_tokens"](
          encoder_input_tokens=tokens[:, :-1]),
      "unknown item": lambda: model.signatures["recommend"](
          history_kind=tf.constant([["rec"]]), history_item_id=tf.constant([["NOPE"]]),
          history_query=tf.constant([[""]])),
      "bad kind": lambda: model.signatures["recommend"](
          history_kind=tf.constant([["buy"]]), history_item_id=tf.constant([["I01"]]),
          history_query=tf.constant([[""]])),
      "empty query": lambda: model.signatures["search"](
          query=tf.constant([" "]), history_kind=tf.constant([[""]]),
          history_item_id=tf.constant([[""]]), history_query=tf.constant([[""]])),
      "batch mismatch": lambda: model.signatures["search"](
          query=tf.constant(["a", "b"]), history_kind=tf.constant([[""]]),
          history_item_id=tf.constant([[""]]), history_query=tf.constant([[""]])),
      "ragged history": lambda: model.signatures["recommend"](
          history_kind=tf.constant([["rec", "rec"]]), history_item_id=tf.constant([["I01"]]),
          history_query=tf.constant([["", ""]])),
  }
  for name, call in bad.items():
    try:
      call()
      errors[name] = None
    except Exception as e:
      errors[name] = type(e).__name__ + ": " + str(e)[:2000]
  out["empty/item_ids"] = host(model.signatures["search_tokens"](
      encoder_input_tokens=tokens[:0])["item_ids"])
  np.savez(out_path, **out)
  print(json.dumps({"errors": errors, "signatures": sorted(model.signatures)}))
""")


def test_fresh_tensorflow_process_returns_the_engines_top_k(artifact, tmp_path):
  saved = os.path.join(artifact, saved_model_lib.SAVED_MODEL_DIR)
  assert os.path.isfile(os.path.join(saved, "saved_model.pb"))
  engine = ServingEngine(artifact)
  fields_path = str(tmp_path / "fields.json")
  with open(fields_path, "w") as f:
    json.dump(request_fields(requests()), f)
  queries = [as_validated(q) for q in requests()]
  # Six token rows (a bucket of 4 and a remainder of 2 padded to 4), search prompts.
  tokens = np.stack([engine.encode(engine.prompt("search", q)) for q in queries + queries[:1]])
  tokens_path, out_path = str(tmp_path / "tokens.npy"), str(tmp_path / "out.npz")
  np.save(tokens_path, tokens)
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([gin_utils.REPO_ROOT, env.get("PYTHONPATH", "")])
  proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, saved, fields_path, tokens_path,
                         out_path], env=env, capture_output=True, text=True, timeout=300,
                        cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["signatures"] == ["recommend", "recommend_tokens", "search", "search_tokens",
                                  "serving_default"]
  got = np.load(out_path)

  for name, want in (("search", engine.search(queries)), ("default", engine.search(queries)),
                     ("recommend", engine.recommend(queries))):
    ids = got[f"{name}/item_ids"].astype(str)                     # [n, K]
    assert ids.shape == (len(queries), BEAMS)
    for hits, row_ids, row_titles, row_scores in zip(
        want, ids, got[f"{name}/titles"].astype(str), got[f"{name}/scores"]):
      assert len(hits) == BEAMS
      assert list(row_ids) == [h.item_id for h in hits], name
      assert list(row_titles) == [h.title for h in hits]
      np.testing.assert_allclose(row_scores, [h.score for h in hits], rtol=1e-5, atol=1e-5)
  for task in ("search", "recommend"):
    rows, scores = engine.run_tokens(task, tokens)
    np.testing.assert_array_equal(got[f"{task}_tokens/item_rows"], rows)
    np.testing.assert_allclose(got[f"{task}_tokens/scores"], scores, rtol=1e-5, atol=1e-5)
    assert list(got[f"{task}_tokens/item_ids"].astype(str)[0]) == [
        engine.item_ids[r] for r in rows[0]]
  assert got["empty/item_ids"].shape == (0, BEAMS)

  errors = report["errors"]
  assert errors["float tokens"] and "int32" in errors["float tokens"], errors
  assert errors["short tokens"] and "shape" in errors["short tokens"].lower(), errors
  assert "NOPE" in errors["unknown item"]
  for name, message in (("unknown item", "unknown item id(s)"),
                        ("bad kind", "history_kind must"),
                        ("batch mismatch", "one request per row"),
                        ("empty query", "query must not be empty"),
                        ("ragged history", "must have one shape")):
    assert errors[name] and "InvalidArgumentError" in errors[name], (name, errors[name])
    assert message in errors[name], (name, errors[name])


def test_cli_refuses_an_existing_saved_model(artifact):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([gin_utils.REPO_ROOT, env.get("PYTHONPATH", "")])
  proc = subprocess.run([sys.executable, "-m", "gensar_jax.serving.saved_model",
                         f"--artifact={artifact}"], env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "already exists" in proc.stderr.strip().splitlines()[-1]


def test_metadata_that_disagrees_with_the_compiled_functions_is_refused(artifact, tmp_path):
  import shutil
  from gensar_jax.serving import artifact as artifact_lib
  broken = tmp_path / "broken"
  shutil.copytree(artifact, broken,
                  ignore=shutil.ignore_patterns(saved_model_lib.SAVED_MODEL_DIR))
  path = broken / artifact_lib.METADATA_FILE
  metadata = json.loads(path.read_text())
  metadata["num_beams"] = BEAMS - 1
  path.write_text(json.dumps(metadata))
  with pytest.raises(artifact_lib.ArtifactError, match=f"num_beams {BEAMS - 1}"):
    saved_model_lib.ServingModule(artifact_lib.read_artifact(str(broken)))
