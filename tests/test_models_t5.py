"""The T5.1.1 network: relative positions, logical axes, KV-cache decoding, gin sizes."""
from __future__ import annotations

import re

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from gensar_jax import gin_utils
from gensar_jax.models import EncoderDecoderModel, T5Config, Transformer, vocab_size_for
from gensar_jax.models.layers import relative_position_bucket
from task_world import jitted_forward

TINY = dict(emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=2,
            num_decoder_layers=2)
VOCAB = 100
ENCODER_TOKENS = np.array([[3, 4, 5, 6, 1, 0, 0], [7, 8, 1, 0, 0, 0, 0]], np.int32)
DECODER_INPUTS = np.array([[0, 9, 10, 11, 12, 1], [0, 13, 14, 1, 0, 0]], np.int32)


def _model(**overrides) -> EncoderDecoderModel:
  config = T5Config(**{**TINY, **overrides}).with_vocabulary(VOCAB)
  return EncoderDecoderModel(Transformer(config), seqio.PassThroughVocabulary(VOCAB, eos_id=1))


def _init(model, seed=0):
  # Jitted: eager Flax init dispatches op by op and is many times slower on CPU.
  shapes = {"encoder_input_tokens": ENCODER_TOKENS.shape,
            "decoder_input_tokens": DECODER_INPUTS.shape}
  return jax.jit(lambda rng: model.get_initial_variables(rng, shapes))(jax.random.PRNGKey(seed))


def _forward(model, params, encoder_tokens, decoder_inputs):
  """Teacher-forced logits, jitted once per config (compiling dominates test time)."""
  return np.asarray(jitted_forward(model.module.config)(params, encoder_tokens, decoder_inputs))


@pytest.fixture(scope="module")
def tiny():
  model = _model()
  boxed = _init(model)
  return model, boxed, flax.core.meta.unbox(boxed)["params"]


def _leaves_with_paths(tree):
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)[0]
  return {"/".join(p.key for p in path): leaf for path, leaf in flat}


def test_relative_position_bucket_matches_hand_computed_values():
  # relative = key - query. Bidirectional, 32 buckets (16 per direction, 8 exact),
  # max distance 128: 8 + floor(log(d / 8) / log(16) * 8) for d >= 8, capped at 15.
  relative = jnp.array([0, -1, 1, -7, -8, -20, 20, -200, 200])
  expected = [0, 1, 17, 7, 8, 10, 26, 15, 31]
  got = relative_position_bucket(relative, bidirectional=True, num_buckets=32, max_distance=128)
  np.testing.assert_array_equal(np.asarray(got), expected)
  # Causal: future keys -> 0; 16 exact buckets, then 16 + floor(log(d / 16) / log(8) * 16).
  relative = jnp.array([3, 0, -5, -15, -16, -32, -50, -127, -1000])
  expected = [0, 0, 5, 15, 16, 21, 24, 31, 31]
  got = relative_position_bucket(relative, bidirectional=False, num_buckets=32, max_distance=128)
  np.testing.assert_array_equal(np.asarray(got), expected)


EXPECTED_AXES = [
    (r"token_embedder/embedding", ("vocab", "embed")),
    (r"decoder/logits_dense/kernel", ("embed", "vocab")),
    (r".*/(query|key|value)/kernel", ("embed", "joined_kv")),
    (r".*/out/kernel", ("joined_kv", "embed")),
    (r".*/mlp/wi_[01]/kernel", ("embed", "mlp")),
    (r".*/mlp/wo/kernel", ("mlp", "embed")),
    (r".*(norm)/scale", ("embed",)),
    (r"(encoder|decoder)/relpos_bias/rel_embedding", ("heads", "relpos_buckets")),
]


def test_every_parameter_carries_the_expected_logical_axes(tiny):
  _, boxed, _ = tiny
  leaves = _leaves_with_paths(boxed["params"])
  # embedding, logits, 2 relpos tables, 2 final norms, encoder and decoder layers
  assert len(leaves) == 1 + 1 + 2 + 2 + 2 * (4 + 3 + 2) + 2 * (8 + 3 + 3)
  for path, leaf in leaves.items():
    assert isinstance(leaf, nn.LogicallyPartitioned), f"{path} is not annotated"
    matches = [axes for pattern, axes in EXPECTED_AXES if re.fullmatch(pattern, path)]
    assert matches, f"unexpected parameter {path}"
    assert leaf.names == matches[0], f"{path}: {leaf.names} != {matches[0]}"
    assert leaf.value.ndim == len(leaf.names)
    assert leaf.value.dtype == jnp.float32
  specs = nn.get_partition_spec(boxed)["params"]
  assert tuple(specs["token_embedder"]["embedding"]) == ("vocab", "embed")


def test_no_biases_and_an_untied_output_layer(tiny):
  _, _, params = tiny
  paths = list(_leaves_with_paths(params))
  assert not [p for p in paths if "bias" in p.split("/")[-1]], paths
  embedding = params["token_embedder"]["embedding"]  # [vocab, embed]
  logits_kernel = params["decoder"]["logits_dense"]["kernel"]  # [embed, vocab]
  assert embedding.shape == (128, 32) and logits_kernel.shape == (32, 128)
  assert not np.allclose(np.asarray(embedding).T, np.asarray(logits_kernel))
  # Untied means gradients differ too: changing the output layer leaves the inputs alone.
  model, _, _ = tiny
  logits = _forward(model, params, ENCODER_TOKENS, DECODER_INPUTS)
  changed = jax.tree.map(lambda x: x, params)
  changed["decoder"]["logits_dense"]["kernel"] = logits_kernel * 2.0
  encode = jax.jit(model.encode)
  np.testing.assert_array_equal(np.asarray(encode(changed, ENCODER_TOKENS)),
                                np.asarray(encode(params, ENCODER_TOKENS)))
  logits2 = _forward(model, changed, ENCODER_TOKENS, DECODER_INPUTS)
  np.testing.assert_allclose(logits2, 2.0 * logits, rtol=1e-5, atol=1e-5)


def _incremental_logits(model, params, encoder_tokens, decoder_inputs, cross_kv=False):
  """Step-by-step logits; with cross_kv the steps read precomputed cross-attention K/V."""
  encoded = jax.jit(model.encode)(params, encoder_tokens)
  if cross_kv:
    encoded = jax.jit(model.cross_attention_kv)(params, encoded)
  cache = model.init_decoder_cache(params, decoder_inputs.shape[0], decoder_inputs.shape[1])
  step = jax.jit(model.decode_step)
  out = []
  for t in range(decoder_inputs.shape[1]):
    logits, cache = step(params, cache, encoded, encoder_tokens, decoder_inputs[:, t:t + 1])
    out.append(logits)
  return np.stack(out, axis=1), cache


def test_incremental_decoding_matches_the_teacher_forced_pass(tiny):
  model, _, params = tiny
  full = _forward(model, params, ENCODER_TOKENS, DECODER_INPUTS)
  incremental, cache = _incremental_logits(model, params, ENCODER_TOKENS, DECODER_INPUTS)
  assert incremental.dtype == np.float32 and incremental.shape == (2, 6, 128)
  np.testing.assert_allclose(incremental, full, atol=1e-5, rtol=1e-5)
  # Cache contract: every leaf has the decode batch as leading dimension, or is a scalar.
  for leaf in jax.tree.leaves(cache):
    assert leaf.ndim == 0 or leaf.shape[0] == 2, leaf.shape
  # ... and the scalars count the steps taken.
  scalars = [int(x) for x in jax.tree.leaves(cache) if x.ndim == 0]
  assert scalars and set(scalars) == {6}


def test_incremental_decoding_with_encoder_outputs_repeated_per_beam(tiny):
  model, _, params = tiny
  beams = 3
  full = _forward(model, params, ENCODER_TOKENS, DECODER_INPUTS)
  encoder_tokens = np.repeat(ENCODER_TOKENS, beams, axis=0)  # [batch * beams, len]
  # Different continuations per beam: beam b of example i reads example (i + b) % 2's inputs.
  decoder_inputs = np.stack([DECODER_INPUTS[(i + b) % 2] for i in range(2) for b in range(beams)])
  incremental, _ = _incremental_logits(model, params, encoder_tokens, decoder_inputs)
  reference = _forward(model, params, encoder_tokens, decoder_inputs)
  np.testing.assert_allclose(incremental, reference, atol=1e-5, rtol=1e-5)
  # Beam 0 of each example is that example itself.
  np.testing.assert_allclose(incremental[::beams], full, atol=1e-5, rtol=1e-5)


def test_precomputed_cross_attention_kv_gives_the_same_logits(tiny):
  model, _, params = tiny
  encoded = jax.jit(model.encode)(params, ENCODER_TOKENS)
  cross_kv = jax.jit(model.cross_attention_kv)(params, encoded)
  assert len(cross_kv) == TINY["num_decoder_layers"]
  for key, value in cross_kv:  # heads-major: [batch, heads, input_length, head_dim]
    assert key.shape == value.shape == (2, 2, 7, 16) and key.dtype == jnp.float32
  full = _forward(model, params, ENCODER_TOKENS, DECODER_INPUTS)
  per_step, _ = _incremental_logits(model, params, ENCODER_TOKENS, DECODER_INPUTS)
  precomputed, cache = _incremental_logits(model, params, ENCODER_TOKENS, DECODER_INPUTS,
                                           cross_kv=True)
  np.testing.assert_allclose(precomputed, full, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(precomputed, per_step, atol=1e-5, rtol=1e-5)
  assert {int(x) for x in jax.tree.leaves(cache) if x.ndim == 0} == {6}
  # Beams share their example's keys/values: decoder batch 6 against K/V batch 2.
  beams = 3
  decoder_inputs = np.stack([DECODER_INPUTS[(i + b) % 2] for i in range(2) for b in range(beams)])
  cache = model.init_decoder_cache(params, 2 * beams, DECODER_INPUTS.shape[1])
  step = jax.jit(model.decode_step)
  grouped = []
  for t in range(DECODER_INPUTS.shape[1]):
    logits, cache = step(params, cache, cross_kv, ENCODER_TOKENS, decoder_inputs[:, t:t + 1])
    grouped.append(logits)
  reference = _forward(model, params, np.repeat(ENCODER_TOKENS, beams, axis=0), decoder_inputs)
  np.testing.assert_allclose(np.stack(grouped, axis=1), reference, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="1 precomputed cross-attention keys/values for 2 layers"):
    model.decode_step(params, cache, cross_kv[:1], ENCODER_TOKENS, decoder_inputs[:, :1])


def test_future_decoder_tokens_do_not_change_earlier_logits(tiny):
  model, _, params = tiny
  changed = DECODER_INPUTS.copy()
  changed[:, 3:] = 42
  a = _forward(model, params, ENCODER_TOKENS, DECODER_INPUTS)
  b = _forward(model, params, ENCODER_TOKENS, changed)
  np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-6)
  assert not np.allclose(a[:, 3:], b[:, 3:])


def test_encoder_padding_is_ignored(tiny):
  model, _, params = tiny
  longer = np.concatenate([ENCODER_TOKENS, np.zeros((2, 5), np.int32)], axis=1)
  a = _forward(model, params, ENCODER_TOKENS, DECODER_INPUTS)
  b = _forward(model, params, longer, DECODER_INPUTS)
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_bfloat16_compute_keeps_float32_parameters_and_logits(tiny):
  model = _model(dtype="bfloat16")
  shapes = {"encoder_input_tokens": ENCODER_TOKENS.shape,
            "decoder_input_tokens": DECODER_INPUTS.shape}
  boxed = jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes))
  assert {x.dtype for x in jax.tree.leaves(flax.core.meta.unbox(boxed))} == {jnp.dtype("float32")}
  params = tiny[2]  # same shapes: compute dtype does not change the parameters
  encoded = jax.jit(model.encode)(params, ENCODER_TOKENS)
  assert encoded.dtype == jnp.bfloat16
  logits = _forward(model, params, ENCODER_TOKENS, DECODER_INPUTS)
  assert logits.dtype == np.float32 and np.isfinite(logits).all()
  reference = _forward(_model(), params, ENCODER_TOKENS, DECODER_INPUTS)
  np.testing.assert_allclose(logits, reference, atol=0.15, rtol=0.05)
  # Precomputed cross-attention K/V are cast exactly as the per-step projection casts them.
  cross_kv = jax.jit(model.cross_attention_kv)(params, encoded)
  assert {x.dtype for x in jax.tree.leaves(cross_kv)} == {jnp.dtype("bfloat16")}
  cache = model.init_decoder_cache(params, 2, 1)
  step = jax.jit(model.decode_step)
  first = DECODER_INPUTS[:, :1]
  np.testing.assert_allclose(np.asarray(step(params, cache, cross_kv, ENCODER_TOKENS, first)[0]),
                             np.asarray(step(params, cache, encoded, ENCODER_TOKENS, first)[0]),
                             atol=1e-5)


def test_config_validation_and_vocab_padding():
  assert vocab_size_for(1) == 128 and vocab_size_for(128) == 128 and vocab_size_for(129) == 256
  assert vocab_size_for(seqio.PassThroughVocabulary(8000)) == 8064
  with pytest.raises(ValueError, match="dtype"):
    T5Config(dtype="float16")
  with pytest.raises(ValueError, match="vocab_size is not set"):
    Transformer(T5Config(**TINY)).init(jax.random.PRNGKey(0), ENCODER_TOKENS, DECODER_INPUTS)
  with pytest.raises(ValueError, match="vocabulary has 300 ids"):
    EncoderDecoderModel(Transformer(T5Config(**TINY).with_vocabulary(VOCAB)),
                        seqio.PassThroughVocabulary(300, eos_id=1))
  with pytest.raises(ValueError, match="encoder_input_tokens must be"):
    _model().module.init(jax.random.PRNGKey(0), ENCODER_TOKENS[0], DECODER_INPUTS)


def _non_vocab_params(d, hk, ff, enc, dec, heads, buckets=32):
  encoder_layer = 4 * d * hk + 3 * d * ff + 2 * d
  decoder_layer = 8 * d * hk + 3 * d * ff + 3 * d
  return enc * encoder_layer + dec * decoder_layer + 2 * d + 2 * heads * buckets


@pytest.mark.parametrize("size, dims", [
    ("small", dict(d=512, hk=512, ff=1024, enc=8, dec=8, heads=8)),
    ("base", dict(d=768, hk=768, ff=2048, enc=12, dec=12, heads=12)),
])
def test_gin_model_sizes_parse_and_count(size, dims):
  gin.clear_config()
  try:
    gin_utils.parse_gin([f"--gin_file=gin/models/{size}.gin"])
    config = T5Config()
    assert config.dtype == "bfloat16" and config.dropout_rate == 0.1  # t5-small's, published
  finally:
    gin.clear_config()
  config = config.with_vocabulary(8000)
  assert config.vocab_size == 8064
  model = EncoderDecoderModel(Transformer(config), seqio.PassThroughVocabulary(8000, eos_id=1))
  shapes = jax.eval_shape(lambda: flax.core.meta.unbox(model.get_initial_variables(
      jax.random.PRNGKey(0), {"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 4)})))
  total = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  vocab_params = 2 * config.vocab_size * config.emb_dim  # input embedding + logits_dense
  assert total - vocab_params == _non_vocab_params(**dims)
  if size == "small":
    assert 45e6 < total - vocab_params < 55e6  # 50,353,664
  else:
    assert 190e6 < total - vocab_params < 205e6


def test_tiny_gin_parses():
  gin.clear_config()
  try:
    gin_utils.parse_gin(["--gin_file=gin/models/tiny.gin"])
    config = T5Config()
  finally:
    gin.clear_config()
  assert config == T5Config(**TINY, dtype="float32")


def _embedding_table(config: T5Config) -> np.ndarray:
  """The token embedding table [vocab, embed] a fresh init gives (shapes only, no forward)."""
  module = Transformer(config)
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), ENCODER_TOKENS, DECODER_INPUTS)
  return np.asarray(flax.core.meta.unbox(variables)["params"]["token_embedder"]["embedding"])


@pytest.mark.parametrize("stddev", [1.0, 0.05])
def test_embedding_init_stddev_is_honoured(stddev):
  # 512 x 64 draws: the sample std is within ~1% of the configured one.
  config = T5Config(**{**TINY, "emb_dim": 64}, embedding_init_stddev=stddev).with_vocabulary(512)
  table = _embedding_table(config)                                   # [512, 64]
  np.testing.assert_allclose(table.std(), stddev, rtol=0.03)
  assert abs(table.mean()) < 0.01 * stddev
  # Row norms, which identifier_init.mixed_rows keeps, follow the configured scale.
  np.testing.assert_allclose(np.median(np.linalg.norm(table, axis=1)), stddev * 8, rtol=0.05)


def test_embedding_init_stddev_default_validation_and_gin_macro():
  assert T5Config().embedding_init_stddev == 1.0  # T5X's N(0, 1)
  with pytest.raises(ValueError, match="embedding_init_stddev"):
    T5Config(embedding_init_stddev=0.0)
  gin.clear_config()
  try:
    gin_utils.parse_gin(["--gin_file=gin/models/tiny.gin", "--gin.EMBEDDING_INIT_STDDEV=0.05"])
    assert T5Config().embedding_init_stddev == 0.05
  finally:
    gin.clear_config()


def test_sharded_forward_under_logical_rules_matches_unsharded(tiny):
  """Every constraint name and rank is valid: the model compiles on a (data 2, model 2)
  mesh with tensor-parallel rules and gives the same logits."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  model, boxed, params = tiny
  rules = (("batch", "data"), ("vocab", "model"), ("mlp", "model"), ("heads", "model"),
           ("joined_kv", "model"), ("length", None), ("kv", None), ("relpos_buckets", None),
           ("embed", None))
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)["params"]
  assert shardings["decoder"]["logits_dense"]["kernel"].spec == PartitionSpec(None, "model")
  sharded_params = jax.device_put(params, shardings)
  tokens = NamedSharding(mesh, PartitionSpec("data", None))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    logits = jax.jit(lambda p, e, d: model.module.apply({"params": p}, e, d))(
        sharded_params, jax.device_put(ENCODER_TOKENS, tokens),
        jax.device_put(DECODER_INPUTS, tokens))
    encoded = jax.jit(model.encode)(sharded_params, jax.device_put(ENCODER_TOKENS, tokens))
    cross_kv = jax.jit(model.cross_attention_kv)(sharded_params, encoded)
  assert logits.sharding.spec == PartitionSpec("data", None, "model")
  np.testing.assert_allclose(np.asarray(logits),
                             _forward(model, params, ENCODER_TOKENS, DECODER_INPUTS), atol=1e-5)
  # Precomputed cross-attention K/V keep the logical constraint: heads on the model axis.
  for leaf in jax.tree.leaves(cross_kv):
    assert leaf.sharding.spec == PartitionSpec("data", "model")  # [batch, heads, k, kv]
