"""Pretrained starts: Hugging Face and T5X checkpoints give the logits of an independent
NumPy T5 (tests/t5_reference.py); the extended vocabulary; the training initialiser; and
one-line errors naming the tensor and the file."""
import dataclasses
import importlib.util
import json
import os
import shutil
import sys

import flax
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gensar_jax import vocabulary as vocab_lib
from gensar_jax.checkpoints import CheckpointError
from gensar_jax.models import Transformer, build_model
from gensar_jax.pretrained import PretrainedT5Init, load_pretrained, t5_config_from_hf
from gensar_jax.pretrained import t5x as t5x_lib
from t5_reference import t5_logits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "make_pretrained_fixtures", os.path.join(REPO, "launch", "make_pretrained_fixtures.py"))
fixtures_lib = importlib.util.module_from_spec(_spec)
sys.modules["make_pretrained_fixtures"] = fixtures_lib
_spec.loader.exec_module(fixtures_lib)

VARIANTS = ("t5", "t5_1_1")
# Padding (id 0) in the encoder input, decoder inputs starting from T5's start id 0; ids
# above the SentencePiece pieces (sentinel rows) included.
ENCODER_IDS = np.array([[5, 6, 7, 8, 150, 1, 0, 0], [9, 10, 11, 1, 0, 0, 0, 0]], np.int32)
DECODER_IDS = np.array([[0, 12, 13, 14, 200, 1], [0, 15, 1, 0, 0, 0]], np.int32)
IDENTIFIER_TOKENS = ["<m0_0>", "<m0_1>", "<m1_0>", "<c0_0>", "<c0_1>"]


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
  return fixtures_lib.write_all(str(tmp_path_factory.mktemp("pretrained")))


def _hf(folder):
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  return config, load_file(os.path.join(folder, "model.safetensors"))


def _our_logits(config, params, encoder_ids=ENCODER_IDS, decoder_ids=DECODER_IDS):
  apply = jax.jit(lambda p, e, d: Transformer(config).apply({"params": p}, e, d))
  return np.asarray(apply(params, encoder_ids, decoder_ids))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt", ["hf", "t5x"])
def test_logits_equal_the_numpy_reference(fx, variant, fmt):
  hf_config, weights = _hf(fx[f"hf_{variant}"])
  config = t5_config_from_hf(fx[f"hf_{variant}"])
  assert config.logits_via_embedding == (variant == "t5")
  assert config.mlp_activations == (("relu",) if variant == "t5" else ("gelu", "linear"))
  params = load_pretrained(fx[f"{fmt}_{variant}"], fmt, config)
  ours = _our_logits(config, params)
  reference = t5_logits(weights, hf_config, ENCODER_IDS, DECODER_IDS)
  assert ours.shape == reference.shape == (2, DECODER_IDS.shape[1], hf_config["vocab_size"])
  np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)
  assert np.abs(reference).max() > 1.0  # the comparison is not between near-zeros


def test_t5x_reader_reads_msgpack_and_zarr_arrays_and_both_layouts(fx, tmp_path):
  directory = fx["t5x_t5_1_1"]
  assert any(name.startswith("target.") for name in os.listdir(directory))  # zarr arrays
  tensors, file = t5x_lib.read_target(os.path.dirname(directory))  # the model directory
  assert file == os.path.join(directory, "checkpoint")
  hf_config, weights = _hf(fx["hf_t5_1_1"])
  expected = fixtures_lib.hf_to_t5x_names(weights, hf_config)
  assert sorted(tensors) == sorted(expected)
  for name, array in expected.items():
    np.testing.assert_array_equal(tensors[name], array, err_msg=name)
  # {'target': ...} at the top level (no legacy 'optimizer' wrapper), all in the msgpack.
  flat = fixtures_lib.write_t5x_checkpoint(str(tmp_path / "top"), expected, step=7,
                                           zarr_min_size=10**9, legacy_optimizer=False)
  tensors, _ = t5x_lib.read_target(flat)
  np.testing.assert_array_equal(tensors["token_embedder/embedding"],
                                expected["token_embedder/embedding"])


def test_t5x_orbax_layout_gives_the_reference_logits(fx, tmp_path):
  hf_config, weights = _hf(fx["hf_t5"])
  model_dir = str(tmp_path / "orbax_run")
  step_dir = fixtures_lib.write_t5x_checkpoint(
      model_dir, fixtures_lib.hf_to_t5x_names(weights, hf_config), step=3, orbax=True)
  assert os.path.isdir(os.path.join(step_dir, "state"))
  config = t5_config_from_hf(fx["hf_t5"])
  params = load_pretrained(model_dir, "t5x", config)
  np.testing.assert_allclose(_our_logits(config, params),
                             t5_logits(weights, hf_config, ENCODER_IDS, DECODER_IDS),
                             atol=1e-4, rtol=0)


def test_extended_vocabulary_keeps_old_ids_and_gives_each_new_token_one_id(fx, tmp_path):
  import sentencepiece as spm

  base = spm.SentencePieceProcessor(model_file=fx["spiece"])
  path = vocab_lib.extend_vocabulary(fx["spiece"], str(tmp_path / "ext.model"),
                                     IDENTIFIER_TOKENS)
  vocab = vocab_lib.load_vocabulary(path)
  size = base.get_piece_size()
  assert [vocab.tokenizer.id_to_piece(i) for i in range(size)] == [
      base.id_to_piece(i) for i in range(size)]
  specials = [*vocab_lib.BEHAVIOUR_TOKENS, *IDENTIFIER_TOKENS]
  assert vocab.vocab_size == size + len(specials)
  assert vocab_lib.special_token_ids(vocab, specials) == {
      t: size + i for i, t in enumerate(specials)}
  # A target is exactly its special tokens (no dummy-prefix piece); text still encodes
  # with the base pieces.
  assert vocab.encode("<rec_item><m0_1><c0_0>") == [size, size + 4, size + 6]
  assert vocab.encode("a film<src_item><m1_0>")[-2:] == [size + 2, size + 5]
  assert max(vocab.encode("the quick brown fox")) < size
  with pytest.raises(FileExistsError):
    vocab_lib.extend_vocabulary(fx["spiece"], path, IDENTIFIER_TOKENS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_initialiser_puts_pretrained_values_into_fresh_parameters(fx, variant, tmp_path):
  folder = fx[f"hf_{variant}"]
  vocab = vocab_lib.load_vocabulary(vocab_lib.extend_vocabulary(
      fx["spiece"], str(tmp_path / "ext.model"), IDENTIFIER_TOKENS))
  config = t5_config_from_hf(folder, vocab_size=None)
  model = build_model(vocab, config)
  shapes = {"encoder_input_tokens": (2, 8), "decoder_input_tokens": (2, 6)}
  variables = model.get_initial_variables(jax.random.PRNGKey(0), shapes)
  fresh = flax.core.meta.unbox(variables)["params"]
  params = PretrainedT5Init(folder, "hf", config=config)(fresh, vocab)

  _, weights = _hf(folder)
  base = fixtures_lib.piece_count(fx["spiece"])
  rows = model.module.config.vocab_size
  assert rows == 128 and vocab.vocab_size == base + 8
  flat = flax.traverse_util.flatten_dict(params)
  assert {k: v.shape for k, v in flat.items()} == {
      k: v.shape for k, v in flax.traverse_util.flatten_dict(fresh).items()}
  embedding = np.asarray(flat[("token_embedder", "embedding")])
  np.testing.assert_array_equal(embedding[:base], weights["shared.weight"][:base])
  mean = weights["shared.weight"][:base].mean(axis=0)
  np.testing.assert_allclose(embedding[base:], np.broadcast_to(mean, (rows - base, mean.size)),
                             atol=1e-6)
  np.testing.assert_array_equal(
      np.asarray(flat[("encoder", "layers_1", "attention", "query", "kernel")]),
      weights["encoder.block.1.layer.0.SelfAttention.q.weight"].T)
  if variant == "t5_1_1":
    kernel = np.asarray(flat[("decoder", "logits_dense", "kernel")])
    np.testing.assert_array_equal(kernel[:, :base], weights["lm_head.weight"][:base].T)
    np.testing.assert_allclose(kernel[:, base:].T - weights["lm_head.weight"][:base].mean(0),
                               0.0, atol=1e-6)
  else:
    assert ("decoder", "logits_dense", "kernel") not in flat
  # The model computes with them: logits of old ids are the checkpoint's own.
  hf_config, _ = _hf(folder)
  encoder_ids, decoder_ids = ENCODER_IDS % base, DECODER_IDS % base  # the pieces' ids
  reference = t5_logits(weights, hf_config, encoder_ids, decoder_ids)
  ours = _our_logits(model.module.config, params, encoder_ids, decoder_ids)
  np.testing.assert_allclose(ours[..., :base], reference[..., :base], atol=1e-4, rtol=0)


def test_initialiser_refuses_a_vocabulary_not_extended_from_the_checkpoint(fx, tmp_path):
  other = fixtures_lib.write_spiece_model(str(tmp_path / "other.model"), vocab_size=60)
  vocab = vocab_lib.load_vocabulary(vocab_lib.extend_vocabulary(
      other, str(tmp_path / "ext.model"), IDENTIFIER_TOKENS))
  config = t5_config_from_hf(fx["hf_t5"], vocab_size=128)
  with pytest.raises(vocab_lib.VocabularyError, match="does not start with the"):
    PretrainedT5Init(fx["hf_t5"], "hf", config=config)({}, vocab)


def _copy(folder, tmp_path, edit):
  out = str(tmp_path / "edited")
  shutil.copytree(folder, out)
  config, weights = _hf(out)
  edit(config, weights)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f)
  save_file(weights, os.path.join(out, "model.safetensors"))
  return out


def _one_line(error):
  text = str(error.value)
  assert "\n" not in text
  return text


def test_missing_tensor_is_a_one_line_error_naming_it_and_the_file(fx, tmp_path):
  name = "decoder.block.1.layer.1.EncDecAttention.k.weight"
  folder = _copy(fx["hf_t5_1_1"], tmp_path, lambda c, w: w.pop(name))
  with pytest.raises(CheckpointError) as error:
    load_pretrained(folder, "hf", t5_config_from_hf(folder))
  text = _one_line(error)
  assert name in text and os.path.join(folder, "model.safetensors") in text


def test_shape_mismatch_is_a_one_line_error_naming_the_tensor(fx, tmp_path):
  config = t5_config_from_hf(fx["hf_t5_1_1"])
  with pytest.raises(CheckpointError) as error:  # T5X: no config.json, the shapes decide
    load_pretrained(fx["t5x_t5_1_1"], "t5x", dataclasses.replace(config, mlp_dim=64))
  text = _one_line(error)
  assert "decoder/layers_0/mlp/wi_0/kernel" in text and "(32, 48)" in text
  assert os.path.join(fx["t5x_t5_1_1"], "checkpoint") in text
  name = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
  folder = _copy(fx["hf_t5"], tmp_path, lambda c, w: w.update({name: w[name][:, :40]}))
  with pytest.raises(CheckpointError) as error:
    load_pretrained(folder, "hf", t5_config_from_hf(folder))
  assert name in _one_line(error)


def test_config_the_model_cannot_express_or_does_not_match_is_refused(fx, tmp_path):
  folder = _copy(fx["hf_t5"], tmp_path,
                 lambda c, w: c.update(feed_forward_proj="gated-mish"))
  with pytest.raises(CheckpointError, match="feed_forward_proj 'gated-mish'") as error:
    t5_config_from_hf(folder)
  assert "config.json" in _one_line(error)
  config = t5_config_from_hf(fx["hf_t5"])
  with pytest.raises(CheckpointError, match=r"num_heads=4 .* T5Config.num_heads=8") as error:
    load_pretrained(fx["hf_t5"], "hf", dataclasses.replace(config, num_heads=8))
  _one_line(error)
  # More layers in the checkpoint than the T5X model describes: a tensor without a place.
  with pytest.raises(CheckpointError, match="no place for, e.g. 'decoder/layers_1/") as error:
    load_pretrained(fx["t5x_t5"], "t5x", dataclasses.replace(config, num_decoder_layers=1))
  _one_line(error)
  with pytest.raises(CheckpointError, match="no T5X checkpoint inside"):
    load_pretrained(str(tmp_path), "t5x", config)


def test_model_files_have_the_published_shapes():
  import gin

  from gensar_jax.models import T5Config
  expected = {
      "t5_v1_0_small": dict(emb_dim=512, num_heads=8, head_dim=64, mlp_dim=2048,
                            num_encoder_layers=6, num_decoder_layers=6,
                            mlp_activations=("relu",), logits_via_embedding=True),
      "t5_v1_1_small": dict(emb_dim=512, num_heads=6, head_dim=64, mlp_dim=1024,
                            num_encoder_layers=8, num_decoder_layers=8,
                            mlp_activations=("gelu", "linear"), logits_via_embedding=False),
  }
  for name, fields in expected.items():
    gin.clear_config()
    try:
      gin.parse_config_file(os.path.join(REPO, "gin", "models", f"{name}.gin"))
      config = T5Config()
    finally:
      gin.clear_config()
    assert {k: getattr(config, k) for k in fields} == fields, name
    assert (config.relative_attention_num_buckets, config.relative_attention_max_distance,
            config.layer_norm_epsilon) == (32, 128, 1e-6)


@pytest.mark.slow
def test_a_fresh_train_run_starts_from_the_checkpoint(fx, tmp_path, monkeypatch):
  """The real stage functions: the vocab stage extends the checkpoint's spiece.model, the
  train CLI binds PretrainedT5Init to train.initialise_params, and the run's first
  parameters are the checkpoint's."""
  import gin

  from gensar_jax import build_vocab as build_vocab_lib
  from gensar_jax import train as train_lib
  from gensar_jax.pretrained import init as init_lib
  from task_world import LENGTHS, build_world, parse_and_call

  (tmp_path / "world").mkdir()
  world = build_world(tmp_path / "world", prefix="tpre")
  vocab_path = str(tmp_path / "vocab" / "pretrained.model")
  summary = parse_and_call(
      [os.path.join(REPO, "gin", "runs", "build_vocab.gin")],
      [f"PREPARED_DIR = '{world['prepared']}'", f"IDENTIFIERS_DIRS = ['{world['dual']}']",
       f"VOCAB_PATH = '{vocab_path}'", f"BASE_VOCABULARY_PATH = '{fx['spiece']}'",
       "build_vocab.renders_per_template = 1"],
      build_vocab_lib.build_vocab)
  base = fixtures_lib.piece_count(fx["spiece"])
  assert summary["vocab_size"] == base + summary["special_tokens"]

  seen = {}
  original = init_lib.PretrainedT5Init.__call__

  def spy(self, params, vocabulary):
    out = original(self, params, vocabulary)
    # A host copy: the train step donates (deletes) the device buffers.
    seen["flat"] = {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(out).items()}
    return out

  monkeypatch.setattr(init_lib.PretrainedT5Init, "__call__", spy)
  folder = fx["hf_t5"]
  sizes = fixtures_lib.TINY
  argv = ["--gin_file=gin/runs/train.gin", "--gin_file=gin/models/tiny.gin",
          f"--gin.MODEL_DIR='{tmp_path / 'run'}'", "--gin.TRAIN_STEPS=2",
          f"--gin.PREPARED_DIR='{world['prepared']}'",
          f"--gin.IDENTIFIERS_DIR='{world['dual']}'", f"--gin.VOCAB_PATH='{vocab_path}'",
          f"--gin.PSEUDO_QUERIES_PATH='{world['pseudo']}'", "--gin.TASK_PREFIX='tpre'",
          "--gin.MIXTURE_VARIANT='rec_only'", f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
          "--gin.BATCH_SIZE=4", "--gin.EVAL_PERIOD=0", "--gin.CHECKPOINT_PERIOD=2",
          "--gin.train.eval_hook=None", "--gin.TrainCheckpoints.best_metric=None",
          "--gin.WARMUP_STEPS=1",
          f"--gin.T5Config.emb_dim={sizes['d_model']}",
          f"--gin.T5Config.num_heads={sizes['num_heads']}",
          f"--gin.T5Config.head_dim={sizes['d_kv']}", f"--gin.T5Config.mlp_dim={sizes['d_ff']}",
          f"--gin.T5Config.relative_attention_num_buckets="
          f"{sizes['relative_attention_num_buckets']}",
          f"--gin.T5Config.relative_attention_max_distance="
          f"{sizes['relative_attention_max_distance']}",
          "--gin.T5Config.mlp_activations=('relu',)", "--gin.T5Config.logits_via_embedding=True",
          "--gin.train.initialise_params=@PretrainedT5Init()",
          f"--gin.PRETRAINED_PATH='{folder}'"]
  gin.clear_config()
  try:
    train_lib.cli(argv)
  finally:
    gin.clear_config()
  _, weights = _hf(folder)
  flat = seen["flat"]
  np.testing.assert_array_equal(flat[("token_embedder", "embedding")][:base],
                                weights["shared.weight"][:base])
  np.testing.assert_array_equal(flat[("decoder", "layers_1", "mlp", "wo", "kernel")],
                                weights["decoder.block.1.layer.2.DenseReluDense.wo.weight"].T)
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "2")
