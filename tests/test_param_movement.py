"""Parameter movement: token kinds of a vocabulary, module families, and the sharded
measurement against a numpy computation on the tiny model."""
from __future__ import annotations

import json

import flax
import jax
import numpy as np
import pytest
import seqio

from gensar_jax import optimizers
from gensar_jax import param_movement as pm
from gensar_jax import partitioning
from gensar_jax import trainer as trainer_lib
from gensar_jax import vocabulary as vocab_lib
from task_world import TINY_VOCAB, input_shapes, synthetic_batch, tiny_model

IDENTIFIER = np.arange(100, 120, dtype=np.int32)
GROUPS = {"word_piece": np.arange(0, 96, dtype=np.int32),
          "behaviour": np.arange(96, 100, dtype=np.int32),
          "identifier": IDENTIFIER}  # ids 120-127: the model's padding rows, in no group


def _numpy_ratio(new, old):
  return np.linalg.norm(new - old) / np.linalg.norm(old)


def _numpy_movement(params, reference):
  """The metrics by hand: whole-group Frobenius ratios, rows/columns by token kind."""
  flat = flax.traverse_util.flatten_dict(params)
  flat_ref = flax.traverse_util.flatten_dict(reference)
  out = {}
  for name, path, rows in [("embedding", pm.EMBEDDING_PATH, lambda t: t),
                           ("output", pm.OUTPUT_PATH, lambda t: t.T)]:
    new, old = rows(flat.pop(path)), rows(flat_ref.pop(path))    # [vocab, embed]
    for kind, ids in GROUPS.items():
      out[f"{name}/{kind}"] = _numpy_ratio(new[ids], old[ids])
    out[f"{name}/identifier_row_median"] = np.median(
        np.linalg.norm(new[IDENTIFIER] - old[IDENTIFIER], axis=1)
        / np.linalg.norm(old[IDENTIFIER], axis=1))
  families = {}
  for path in flat:
    stack, module = path[0], path[2] if path[1].startswith("layers_") else path[1]
    family = f"{stack}/{'norm' if module.endswith('norm') else module}"
    families.setdefault(family, []).append(path)
  for family, paths in families.items():
    diff = np.sqrt(sum(np.sum((flat[p] - flat_ref[p]) ** 2) for p in paths))
    norm = np.sqrt(sum(np.sum(flat_ref[p] ** 2) for p in paths))
    out[family] = diff / norm
  return out


def test_module_families_drop_the_layer_index():
  assert pm.module_group(("encoder", "layers_3", "mlp", "wo", "kernel")) == "encoder/mlp"
  assert pm.module_group(("encoder", "layers_0", "attention", "query", "kernel")) == (
      "encoder/attention")
  assert pm.module_group(("decoder", "layers_1", "pre_cross_attention_norm", "scale")) == (
      "decoder/norm")
  assert pm.module_group(("decoder", "decoder_norm", "scale")) == "decoder/norm"
  assert pm.module_group(("decoder", "relpos_bias", "rel_embedding")) == "decoder/relpos_bias"


def test_token_groups_of_a_sentencepiece_vocabulary(tmp_path):
  path = str(tmp_path / "v.model")
  identifiers = vocab_lib.identifier_token_inventory(["m0", "s1", "c0"], 4)
  corpus = ["the user searched for wireless headphones and a coffee maker"] * 20
  vocab_lib.train_vocabulary(corpus, path, identifiers, vocab_size=300)
  vocabulary = vocab_lib.load_vocabulary(path)
  groups = pm.token_groups(vocabulary)
  assert set(groups) == {"identifier", "behaviour", "word_piece"}
  sp = vocabulary.tokenizer
  assert sorted(sp.id_to_piece(int(i)) for i in groups["identifier"]) == sorted(identifiers)
  assert sorted(sp.id_to_piece(int(i)) for i in groups["behaviour"]) == sorted(
      vocab_lib.BEHAVIOUR_TOKENS)
  everything = np.concatenate(list(groups.values()))
  np.testing.assert_array_equal(np.sort(everything), np.arange(vocabulary.vocab_size))
  assert 0 in groups["word_piece"] and sp.piece_to_id("<m0_3>") in groups["identifier"]
  # No SentencePiece model: every id is a word piece.
  plain = pm.token_groups(seqio.PassThroughVocabulary(50))
  assert list(plain) == ["word_piece"] and len(plain["word_piece"]) == 50


@pytest.fixture(scope="module")
def trained():
  """The tiny model on a 4 x 2 mesh: its initial state tracked, then 3 AdamW steps."""
  mesh = partitioning.create_mesh(data=4, model=2, devices=jax.devices()[:8])
  partitioner = partitioning.Partitioner(mesh)
  schedule = optimizers.create_learning_rate_schedule(peak_learning_rate=1e-2,
                                                      warmup_steps=0, decay_steps=10)
  trainer = trainer_lib.Trainer(tiny_model(), partitioner,
                                optimizers.create_optimizer(learning_rate_fn=schedule))
  state = trainer.init_state(input_shapes(8))
  initial = jax.device_get(state.params)
  tracker = pm.MovementTracker(state.params, GROUPS, 0, partitioner.replicated)
  at_start = tracker.measure(state.params)
  for seed in range(3):  # each step donates the state the tracker was copied from
    state, _ = trainer.train_step(state, synthetic_batch(seed, 8))
  return tracker, state, initial, at_start


def test_movement_matches_numpy_on_the_sharded_tiny_model(trained):
  tracker, state, initial, at_start = trained
  assert TINY_VOCAB == 128 and at_start[pm.REFERENCE_STEP] == 0
  assert all(v == 0 for k, v in at_start.items())
  measured = tracker.measure(state.params)
  expected = _numpy_movement(jax.device_get(state.params), initial)
  assert set(measured) == {pm.PREFIX + k for k in expected} | {pm.REFERENCE_STEP}
  assert {"encoder/attention", "encoder/mlp", "decoder/self_attention",
          "decoder/encoder_decoder_attention", "decoder/mlp"} <= set(expected)
  for name, value in expected.items():
    assert value > 0, name
    np.testing.assert_allclose(measured[pm.PREFIX + name], value, rtol=1e-4, err_msg=name)
  # The reference is a copy: still the initial params after the donating steps.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(tracker.reference), initial)


def test_report_json_and_table_say_what_the_reference_is(trained, tmp_path):
  tracker, state, _, _ = trained
  resumed = pm.MovementTracker(state.params, GROUPS, 3)
  report = resumed.report(5, resumed.measure(state.params))
  assert report["reference_step"] == 3 and report["relative_to"] == "the restored step 3"
  assert report["movement"]["embedding/identifier"] == 0.0
  written = pm.write_report(str(tmp_path), report)
  with open(written) as f:
    assert json.load(f) == report
  fresh = tracker.report(3, tracker.measure(state.params))
  table = pm.format_table(fresh)
  assert "relative to initialisation" in table and "embedding/identifier_row_median" in table
  assert f"{100 * fresh['movement']['encoder/mlp']:.2f}%" in table
