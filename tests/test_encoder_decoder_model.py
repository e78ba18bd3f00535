"""EncoderDecoderModel: loss against a NumPy reference, scores, greedy decoding."""
from __future__ import annotations


import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from gensar_jax.models import EncoderDecoderModel, T5Config, Transformer, build_model
from gensar_jax.models.encoder_decoder import token_cross_entropy
from task_world import jitted_forward

TINY = dict(emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=2,
            num_decoder_layers=2)
VOCAB = 100
EOS = 1


def _batch():
  """EncDecFeatureConverter-shaped batch (pack=False) with padding in both halves."""
  targets = np.array([[9, 10, 11, 12, 1], [13, 14, 1, 0, 0], [15, 1, 0, 0, 0]], np.int32)
  inputs = np.zeros_like(targets)
  inputs[:, 1:] = targets[:, :-1]  # shifted right, PAD (0) as the start token
  return {
      "encoder_input_tokens": np.array([[3, 4, 5, 6, 1, 0, 0], [7, 8, 1, 0, 0, 0, 0],
                                        [20, 21, 22, 23, 24, 25, 1]], np.int32),
      "decoder_input_tokens": inputs,
      "decoder_target_tokens": targets,
      "decoder_loss_weights": (targets > 0).astype(np.int32),
  }


def _model(label_smoothing=0.0, z_loss=0.0) -> EncoderDecoderModel:
  config = T5Config(**TINY).with_vocabulary(VOCAB)
  return EncoderDecoderModel(Transformer(config), seqio.PassThroughVocabulary(VOCAB, eos_id=EOS),
                             label_smoothing=label_smoothing, z_loss=z_loss)


@pytest.fixture(scope="module")
def tiny():
  model = _model()
  shapes = {k: v.shape for k, v in _batch().items()}
  boxed = jax.jit(lambda rng: model.get_initial_variables(rng, shapes))(jax.random.PRNGKey(0))
  params = flax.core.meta.unbox(boxed)["params"]
  batch = _batch()
  logits = _forward(model)(params, batch["encoder_input_tokens"], batch["decoder_input_tokens"])
  return model, params, np.asarray(logits, np.float64), jax.jit(model.loss_fn)


def _forward(model):
  """Teacher-forced logits, compiled once per config (compiling dominates test time)."""
  return jitted_forward(model.module.config)


def _reference_sums(logits, batch, label_smoothing, z_loss):
  """Straightforward NumPy float64 token cross entropy (the loss's definition)."""
  vocab = logits.shape[-1]
  targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
  loss_sum = z_sum = weight_sum = correct = 0.0
  for b in range(targets.shape[0]):
    for t in range(targets.shape[1]):
      w = float(weights[b, t])
      if w == 0:
        continue
      row = logits[b, t]
      log_z = np.log(np.sum(np.exp(row - row.max()))) + row.max()
      log_p = row - log_z
      q = np.full(vocab, label_smoothing / (vocab - 1))
      q[targets[b, t]] = 1.0 - label_smoothing
      entropy = -np.sum(q[q > 0] * np.log(q[q > 0]))
      loss_sum += w * (-np.sum(q * log_p) - entropy + z_loss * log_z ** 2)
      z_sum += w * z_loss * log_z ** 2
      weight_sum += w
      correct += w * float(np.argmax(row) == targets[b, t])
  return dict(loss_sum=loss_sum, z_loss_sum=z_sum, weight_sum=weight_sum, correct_sum=correct)


@pytest.mark.parametrize("label_smoothing, z_loss", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-2),
                                                     (0.1, 1e-4)])
def test_token_cross_entropy_matches_numpy_reference(tiny, label_smoothing, z_loss):
  logits = tiny[2]
  batch = _batch()
  sums = token_cross_entropy(jnp.asarray(logits, jnp.float32), batch["decoder_target_tokens"],
                             batch["decoder_loss_weights"], label_smoothing, z_loss)
  ref = _reference_sums(logits, batch, label_smoothing, z_loss)
  assert ref["weight_sum"] == 10.0  # padding (weight 0) excluded
  for key, value in ref.items():
    np.testing.assert_allclose(float(sums[key]), value, rtol=1e-5, atol=1e-5, err_msg=key)


def test_loss_fn_is_the_weighted_mean_of_the_reference(tiny):
  _, params, logits, _ = tiny
  model = _model(label_smoothing=0.1, z_loss=1e-4)
  batch = _batch()
  loss, aux = jax.jit(model.loss_fn)(params, batch, None)
  ref = _reference_sums(logits, batch, 0.1, 1e-4)
  assert sorted(aux) == ["correct_sum", "loss_sum", "weight_sum", "z_loss_sum"]
  for key, value in ref.items():
    np.testing.assert_allclose(float(aux[key]), value, rtol=1e-5, atol=1e-5, err_msg=key)
  np.testing.assert_allclose(float(loss), ref["loss_sum"] / ref["weight_sum"], rtol=1e-5)


def test_padding_targets_do_not_contribute(tiny):
  _, params, _, loss_fn = tiny
  batch = _batch()
  changed = dict(batch, decoder_target_tokens=np.where(batch["decoder_loss_weights"] > 0,
                                                       batch["decoder_target_tokens"], 77))
  a = loss_fn(params, batch, None)[1]["loss_sum"]
  b = loss_fn(params, changed, None)[1]["loss_sum"]
  np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


def test_label_smoothing_and_z_loss_shift_the_loss_as_expected(tiny):
  logits = tiny[2]
  batch = _batch()
  w = batch["decoder_loss_weights"]

  def mean_loss(label_smoothing, z_loss):
    sums = token_cross_entropy(jnp.asarray(logits, jnp.float32), batch["decoder_target_tokens"],
                               w, label_smoothing, z_loss)
    return float(sums["loss_sum"] / sums["weight_sum"]), float(sums["z_loss_sum"])

  plain, plain_z = mean_loss(0.0, 0.0)
  # z-loss adds exactly z * mean(log Z^2) over weighted tokens, and reports it separately.
  with_z, z_sum = mean_loss(0.0, 1e-2)
  log_z = np.log(np.exp(logits).sum(-1))
  expected_z = 1e-2 * np.sum(w * log_z ** 2) / w.sum()
  assert expected_z > 0 and plain_z == 0.0
  np.testing.assert_allclose(with_z - plain, expected_z, rtol=1e-4)
  np.testing.assert_allclose(z_sum / w.sum(), expected_z, rtol=1e-4)
  # A random model is near-uniform, so the smoothed target (closer to uniform) is easier:
  # label smoothing lowers the loss, more so for more smoothing.
  smoothed, _ = mean_loss(0.2, 0.0)
  more, _ = mean_loss(0.4, 0.0)
  assert more < smoothed < plain
  # A confident correct prediction: smoothing now *raises* the loss above zero.
  confident = np.full((1, 1, 128), -10.0, np.float32)
  confident[0, 0, 5] = 10.0
  one = lambda ls: float(token_cross_entropy(confident, np.array([[5]]), np.array([[1]]), ls,
                                             0.0)["loss_sum"])
  assert one(0.0) < 1e-6 < one(0.1)


def test_dropout_rng_switches_dropout_on(tiny):
  _, params, _, loss_fn = tiny  # dropout does not change the parameters
  config = T5Config(**TINY, dropout_rate=0.3).with_vocabulary(VOCAB)
  model = EncoderDecoderModel(Transformer(config), seqio.PassThroughVocabulary(VOCAB, eos_id=EOS))
  batch = _batch()
  off = float(loss_fn(params, batch, None)[0])
  with_dropout = jax.jit(model.loss_fn)
  on1 = float(with_dropout(params, batch, jax.random.PRNGKey(1))[0])
  on2 = float(with_dropout(params, batch, jax.random.PRNGKey(2))[0])
  assert len({off, on1, on2}) == 3


def test_score_batch_is_minus_the_per_example_loss_sum(tiny):
  model, params, _, loss_fn = tiny
  batch = _batch()
  scores = np.asarray(jax.jit(model.score_batch)(params, batch))
  assert scores.shape == (3,) and scores.dtype == np.float32 and (scores < 0).all()
  for i in range(3):
    example = {k: v[i:i + 1] for k, v in batch.items()}
    np.testing.assert_allclose(scores[i], -float(loss_fn(params, example, None)[1]["loss_sum"]),
                               rtol=1e-5)
  # A longer target is a product of more probabilities < 1: lower log-probability.
  assert scores[0] < scores[2]


def test_gradients_are_finite_and_reach_every_parameter(tiny):
  _, params, _, _ = tiny
  model = _model(label_smoothing=0.1, z_loss=1e-4)
  grads = jax.jit(jax.grad(lambda p: model.loss_fn(p, _batch(), None)[0]))(params)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  for path, g in flat:
    g = np.asarray(g)
    assert np.isfinite(g).all(), path
    if "relpos_bias" not in jax.tree_util.keystr(path):  # only the used buckets get signal
      assert np.abs(g).max() > 0, jax.tree_util.keystr(path)


def _greedy_reference(model, params, encoder_tokens, length, eos=EOS):
  """Argmax decoding with a full teacher-forced forward pass per step (no cache)."""
  forward = _forward(model)
  batch = encoder_tokens.shape[0]
  out = np.zeros((batch, length), np.int32)
  for t in range(length):
    inputs = np.zeros((batch, length), np.int32)
    inputs[:, 1:t + 1] = out[:, :t]
    logits = np.asarray(forward(params, encoder_tokens, inputs))[:, t, :VOCAB]
    out[:, t] = logits.argmax(-1)
  # EOS ends a sequence; what follows is padding.
  for row in out:
    hits = np.flatnonzero(row == eos)
    if hits.size:
      row[hits[0] + 1:] = 0
  return out


def test_predict_batch_greedy_equals_step_by_step_argmax(tiny):
  model, params, _, _ = tiny
  batch = _batch()
  predicted = np.asarray(model.predict_batch(params, batch, max_decode_length=6))
  assert predicted.shape == (3, 6) and predicted.dtype == np.int32
  expected = _greedy_reference(model, params, batch["encoder_input_tokens"], 6)
  np.testing.assert_array_equal(predicted, expected)
  assert (predicted < VOCAB).all()  # never a padded vocabulary id
  # Default length: the batch's decoder length.
  assert np.asarray(model.predict_batch(params, batch)).shape == (3, 5)


def test_predict_batch_stops_at_eos_and_pads_after_it(tiny):
  model, params, _, _ = tiny
  batch = _batch()
  free = _greedy_reference(model, params, batch["encoder_input_tokens"], 6, eos=-1)
  # Declare the token example 0 emits at step 2 to be EOS (a fresh one if possible), so a
  # random model must stop there; the network is unchanged, only the vocabulary differs.
  step = 2
  eos = int(free[0, step])
  assert eos not in free[0, :step], free
  stopping = EncoderDecoderModel(model.module, seqio.PassThroughVocabulary(VOCAB, eos_id=eos))
  predicted = np.asarray(stopping.predict_batch(params, batch, max_decode_length=6))
  np.testing.assert_array_equal(predicted[0, :step + 1], free[0, :step + 1])
  assert (predicted[0, step + 1:] == 0).all()
  np.testing.assert_array_equal(
      predicted, _greedy_reference(model, params, batch["encoder_input_tokens"], 6, eos=eos))


def test_predict_batch_calls_decode_fn(tiny):
  model, params, _, _ = tiny
  seen = {}

  def decode_fn(model, params, encoded, encoder_input_tokens, **kwargs):
    seen.update(kwargs, encoded_shape=encoded.shape, tokens=encoder_input_tokens)
    return jnp.full((encoded.shape[0], 2), 7, jnp.int32)

  out = model.predict_batch(params, _batch(), decode_fn=decode_fn, max_decode_length=3,
                            beam_size=4)
  assert np.asarray(out).tolist() == [[7, 7]] * 3
  assert seen["beam_size"] == 4 and seen["max_decode_length"] == 3
  assert seen["encoded_shape"] == (3, 7, 32)


def test_bad_batches_name_the_missing_feature(tiny):
  model, params, _, _ = tiny
  batch = _batch()
  del batch["decoder_loss_weights"]
  with pytest.raises(KeyError, match="decoder_loss_weights"):
    model.loss_fn(params, batch, None)
  with pytest.raises(ValueError, match=r"decoder_tokens must be \[batch, 1\]"):
    cache = model.init_decoder_cache(params, 3, 4)
    model.decode_step(params, cache, jnp.zeros((3, 7, 32)), _batch()["encoder_input_tokens"],
                      jnp.zeros((3, 2), jnp.int32))


def test_build_model_pads_the_vocabulary():
  model = build_model(seqio.PassThroughVocabulary(300, eos_id=EOS), T5Config(**TINY))
  assert model.module.config.vocab_size == 384
  assert model.FEATURE_CONVERTER_CLS is seqio.EncDecFeatureConverter


def _packed_and_unpacked(examples, lengths):
  """The same {"inputs", "targets"} examples through SeqIO's converter, packed and not."""
  import tensorflow as tf

  def convert(pack, feature_lengths):
    ds = tf.data.Dataset.from_generator(
        lambda: iter(examples), output_signature={
            "inputs": tf.TensorSpec([None], tf.int32),
            "targets": tf.TensorSpec([None], tf.int32)})
    ds = seqio.EncDecFeatureConverter(pack=pack)(ds, feature_lengths)
    rows = list(ds.as_numpy_iterator())
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  longest = {k: max(len(e[k]) for e in examples) for k in ("inputs", "targets")}
  return convert(True, lengths), convert(False, longest)


def test_packed_rows_give_the_same_losses_and_gradients_as_unpacked():
  """Packing (several examples per row, segment ids) changes the layout, not the maths:
  each example's target log-probabilities and the gradient of the summed loss match the
  unpacked batch (masks keep examples apart; relative positions are the same)."""
  model = _model(z_loss=1e-4)
  rng = np.random.default_rng(0)
  examples = []
  for n_in, n_tgt in ((7, 5), (4, 3), (9, 2), (3, 6), (5, 4)):
    inputs = rng.integers(2, VOCAB, n_in).astype(np.int32)
    targets = rng.integers(2, VOCAB, n_tgt).astype(np.int32)
    examples.append({"inputs": np.r_[inputs, EOS].astype(np.int32),
                     "targets": np.r_[targets, EOS].astype(np.int32)})
  packed, unpacked = _packed_and_unpacked(examples, {"inputs": 20, "targets": 12})
  assert packed["encoder_input_tokens"].shape[0] < len(examples)  # really packed
  assert packed["encoder_segment_ids"].max() >= 2
  shapes = {k: v.shape for k, v in packed.items()}
  params = flax.core.meta.unbox(
      model.get_initial_variables(jax.random.PRNGKey(3), shapes))["params"]

  tokens = np.asarray(jax.jit(model.token_scores)(params, packed))  # [rows, length]
  per_example = [tokens[r][packed["decoder_segment_ids"][r] == s].sum()
                 for r in range(tokens.shape[0])
                 for s in range(1, packed["decoder_segment_ids"][r].max() + 1)]
  expected = np.asarray(jax.jit(model.score_batch)(params, unpacked))
  # Greedy packing keeps the stream's order: row by row, segment by segment.
  np.testing.assert_allclose(per_example, expected, rtol=2e-5, atol=2e-5)

  def summed_loss(p, batch):
    return model.loss_fn(p, batch, None)[1]["loss_sum"]

  grad_packed = jax.jit(jax.grad(summed_loss))(params, packed)
  grad_unpacked = jax.jit(jax.grad(summed_loss))(params, unpacked)
  for (path, g_p), g_u in zip(jax.tree_util.tree_flatten_with_path(grad_packed)[0],
                              jax.tree.leaves(grad_unpacked)):
    np.testing.assert_allclose(np.asarray(g_p), np.asarray(g_u), rtol=1e-4, atol=1e-5,
                               err_msg=str(path))

  # Without the segment ids the same rows mix examples: the scores change.
  leaky = {k: v for k, v in packed.items() if "segment" not in k}
  assert not np.allclose(np.asarray(jax.jit(model.token_scores)(params, leaky)), tokens,
                         atol=1e-4)
