"""The SentencePiece vocabulary: T5 ids, whole identifier tokens, lossless round trips in
Python and in TensorFlow, atomic writes, clear errors."""
import os

import pytest
import seqio
import tensorflow as tf

from gensar_jax import vocabulary as vocab_lib

LEVELS = ["m0", "m1", "s0", "s1", "c0", "c1"]
CODEBOOK = 16
CORPUS = [
    "Recommendation: The user's recent activity, oldest first: <rec_item>; <src_query> "
    "wireless headphones<src_item>. Which item will the user engage with next?",
    "Search: Here is what this user did lately: <rec_item>. They type the query "
    "<src_query> coffee maker. Find the item they are looking for.",
    "Black wireless headphones 12. A compact cable for the road.",
    "Compact coffee maker 3. Brews twelve cups; stainless steel.",
    "<src_query> camera lens",
    "<src_query> travel mug",
] * 30

ROUND_TRIP = [
    "Recommendation: The user's recent activity: <rec_item><m0_3><m1_15><c0_0><c1_7>; "
    "<src_query> coffee maker<src_item><m0_3><m1_15><s0_2><s1_9>. Which item next?",
    "Naïve café — 東京 🎧 with  two  spaces, a\ttab and trailing space ",
    " leading space, symbols <>{}[]\\ and digits 0123456789",
    "<src_query> wireless headphones",
    "",
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("vocab") / "v.model")
  tokens = vocab_lib.identifier_token_inventory(LEVELS, CODEBOOK)
  vocab_lib.train_vocabulary(CORPUS, path, tokens, vocab_size=700)
  return path


@pytest.fixture(scope="module")
def vocab(model_path):
  return vocab_lib.load_vocabulary(model_path)


def test_t5_special_ids(vocab):
  assert isinstance(vocab, seqio.SentencePieceVocabulary)
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
  assert vocab.tokenizer.bos_id() == -1 and vocab.extra_ids == 0
  assert vocab.tokenizer.id_to_piece(1) == "</s>"
  assert 3 + 256 + 3 + len(LEVELS) * CODEBOOK < vocab.vocab_size <= 700


def test_every_special_token_is_one_piece(vocab):
  tokens = [*vocab_lib.BEHAVIOUR_TOKENS,
            *vocab_lib.identifier_token_inventory(LEVELS, CODEBOOK)]
  ids = [vocab_lib.token_id(vocab, t) for t in tokens]
  assert len(set(ids)) == len(tokens)  # one id each, all distinct
  assert vocab_lib.user_defined_tokens(vocab) == tokens
  for token, i in zip(tokens, ids):
    assert vocab.encode(token) == [i]
    assert vocab.decode([i]) == token  # a generated id decodes to the exact token
  assert vocab_lib.missing_tokens(vocab, tokens) == []
  assert vocab_lib.special_token_ids(vocab)["<rec_item>"] == ids[0]


def test_identifier_sequences_round_trip(vocab):
  target = "<rec_item><m0_12><m1_3><c0_5><c1_15>"
  ids = vocab.encode(target)
  assert [vocab.tokenizer.id_to_piece(i) for i in ids] == [
      "<rec_item>", "<m0_12>", "<m1_3>", "<c0_5>", "<c1_15>"]
  assert vocab.decode(ids) == target
  assert vocab.decode(ids + [vocab.eos_id, 7, 8]) == target  # stops at EOS
  # Glued to text on either side, identifiers stay whole.
  pieces = vocab.tokenizer.encode_as_pieces("lens<src_item><m0_1><m1_2><s0_3><s1_4>; next")
  assert pieces[pieces.index("<src_item>"):pieces.index("<src_item>") + 5] == [
      "<src_item>", "<m0_1>", "<m1_2>", "<s0_3>", "<s1_4>"]


@pytest.mark.parametrize("s", ROUND_TRIP)
def test_text_round_trip_is_lossless(vocab, s):
  ids = vocab.encode(s)
  assert vocab.decode(ids) == s
  assert vocab.unk_id not in ids  # unseen characters fall back to bytes, never <unk>


def test_tensorflow_matches_python(vocab):
  for s in ROUND_TRIP:
    tf_ids = vocab.encode_tf(tf.constant(s)).numpy().tolist()
    assert tf_ids == vocab.encode(s)
    if tf_ids:
      assert vocab.decode_tf(tf.constant(tf_ids)).numpy().decode("utf-8") == s


def test_seqio_feature_uses_it(vocab):
  ds = tf.data.Dataset.from_tensors({"targets": "<src_item><m0_1><m1_2><s0_3><s1_4>"})
  features = {"targets": seqio.Feature(vocabulary=vocab, add_eos=True)}
  ds = seqio.preprocessors.tokenize(ds, features)
  ds = seqio.preprocessors.append_eos_after_trim(ds, output_features=features,
                                                 sequence_length={"targets": 8})
  ex = next(ds.as_numpy_iterator())
  assert ex["targets"].tolist() == vocab.encode(ex["targets_pretokenized"].decode()) + [1]
  assert len(ex["targets"]) == 6


def test_atomic_write_and_overwrite(model_path, tmp_path):
  assert os.listdir(os.path.dirname(model_path)) == ["v.model"]  # no temporary left
  with pytest.raises(FileExistsError, match="overwrite"):
    vocab_lib.train_vocabulary(CORPUS, model_path, [], vocab_size=700)
  out = str(tmp_path / "sub" / "w.model")
  with pytest.raises(ValueError, match="corpus is empty"):
    vocab_lib.train_vocabulary(["", "  "], out, [], vocab_size=700)
  assert not os.path.exists(os.path.dirname(out)) or os.listdir(os.path.dirname(out)) == []
  vocab_lib.train_vocabulary(CORPUS, out, ["<z0_1>"], vocab_size=700)
  first = open(out, "rb").read()
  vocab_lib.train_vocabulary(CORPUS[:40], out, ["<z0_2>"], vocab_size=700, overwrite=True)
  assert open(out, "rb").read() != first
  assert sorted(os.listdir(os.path.dirname(out))) == ["w.model"]


def test_clear_errors(vocab, tmp_path):
  with pytest.raises(ValueError, match="use at least"):
    vocab_lib.train_vocabulary(CORPUS, str(tmp_path / "x.model"),
                               vocab_lib.identifier_token_inventory(LEVELS, CODEBOOK),
                               vocab_size=300)
  with pytest.raises(ValueError, match="without whitespace"):
    vocab_lib.train_vocabulary(CORPUS, str(tmp_path / "x.model"), ["<a b>"])
  with pytest.raises(vocab_lib.VocabularyError, match=r"lacks 2 identifier tokens.*<x0_1>"):
    vocab_lib.require_tokens(vocab, ["<m0_1>", "<x0_1>", "<x0_2>"], "identifier tokens")
  with pytest.raises(vocab_lib.VocabularyError, match="not a piece"):
    vocab_lib.token_id(vocab, "<x0_1>")
  with pytest.raises(FileNotFoundError, match="build_vocab"):
    vocab_lib.load_vocabulary(str(tmp_path / "missing.model"))
  assert vocab_lib.identifier_token_inventory(["a", "b", "a"], 2) == [
      "<a_0>", "<a_1>", "<b_0>", "<b_1>"]
