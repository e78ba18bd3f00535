"""The model's vocabulary: a SentencePiece model with every identifier token whole.

GenSAR's model reads and writes three kinds of text: natural language (prompts, item text,
queries), behaviour tokens (`<rec_item>`, `<src_query>`, `<src_item>`) and identifier
tokens (`<m0_12>`, `<s1_7>`, `<c0_3>`, ...). Constrained decoding steps through identifiers
one token at a time, so every identifier token and every behaviour token must be exactly
one vocabulary entry. They are trained in as SentencePiece *user-defined symbols*: the
encoder never splits them and never merges them with their neighbours.

Choices (all deliberate, all tested in tests/test_vocabulary.py):

* T5 id convention: pad=0, eos=1, unk=2, no bos. `seqio.SentencePieceVocabulary` wraps
  the model unchanged, so `seqio.Feature(vocabulary=...)` and the feature converters work
  as they do for T5; no sentinel (extra) ids, GenSAR has no span corruption.
* Lossless encoding: `normalization_rule_name="identity"`, `add_dummy_prefix=False`,
  `remove_extra_whitespaces=False` and `byte_fallback=True`. Then `decode(encode(s)) == s`
  for every string: no Unicode normalisation, no whitespace folding, and characters the
  model has never seen become UTF-8 byte pieces rather than `<unk>`. Without a dummy
  prefix a target such as "<rec_item><m0_12><m1_201><c0_5><c1_3>" encodes to exactly its
  five tokens, the first being the behaviour token, and decoding a generated id sequence
  gives back the token strings exactly.
* Whitespace convention of the renderers (gensar_jax/prompts.py): a word is preceded by a space
  ("▁word" pieces), special tokens are glued to what precedes them when that is another
  special token or a word ("comedy<src_item><m0_1>..."). A space *before* a special token
  costs one "▁" piece; the renderers avoid it where they can.
* Corpus: text as the model will see it (rendered prompt templates, item text, queries;
  gensar_jax/vocab_corpus.py), so frequent prompt words become single pieces.
* BPE by default, unigram on request (`model_type`). T5 uses unigram, but on our corpus,
  which is small and templated (every item text reads "Released in ... Genres: ..."),
  SentencePiece's unigram trainer never seeds many frequent words and splits them
  ("▁c" + "omedy", "▁Rel" + "ease" + "d", "▁w" + "ill"); BPE learns them whole. Measured on
  ML-100K at vocab_size 8000: 27.2 tokens per corpus line with unigram, 19.3 with BPE.
* `vocab_size` counts everything: pad/eos/unk, 256 byte pieces, the special tokens and the
  learned text pieces. It is a soft limit (`hard_vocab_limit=False`): a small corpus gets
  a smaller vocabulary instead of an error.
* The model file is written atomically (temporary file + rename); a reader never sees a
  half-written model. seqio caches loaded models per path for the life of the process, so
  rebuilding a vocabulary at the same path inside one process is not supported (the CLI
  is a separate process).
"""
from __future__ import annotations

import io
import os
import tempfile
from typing import Iterable, List, Optional, Sequence

import seqio

from gensar_jax.errors import GensarError
from gensar_jax.token_ids import EOS_ID, PAD_ID, UNK_ID

BYTE_PIECES = 256

REC_ITEM = "<rec_item>"
SRC_QUERY = "<src_query>"
SRC_ITEM = "<src_item>"
BEHAVIOUR_TOKENS = (REC_ITEM, SRC_QUERY, SRC_ITEM)

DEFAULT_VOCAB_SIZE = 8000


class VocabularyError(GensarError):
  """The vocabulary cannot represent what a task needs (names the missing tokens)."""


def identifier_token_inventory(level_names: Sequence[str], codebook_size: int) -> List[str]:
  """Every identifier token of the given levels: `<{level}_{code}>` for code < size.

  The same spelling as `gensar_jax.identifiers` (e.g. levels ("m0", "m1", "s0", "s1")).
  """
  if codebook_size < 1:
    raise ValueError(f"codebook_size must be positive, got {codebook_size}")
  names = list(dict.fromkeys(level_names))
  return [f"<{name}_{code}>" for name in names for code in range(codebook_size)]


def special_tokens(identifier_tokens: Iterable[str]) -> List[str]:
  """Behaviour tokens first, then the identifier tokens, without duplicates."""
  return list(dict.fromkeys([*BEHAVIOUR_TOKENS, *identifier_tokens]))


def _check_symbol(token: str) -> None:
  if not token or any(c.isspace() for c in token) or "," in token:
    # The trainer receives the symbols as one comma-separated flag.
    raise ValueError(f"special token {token!r} must be non-empty, without whitespace or ','")


def train_vocabulary(sentences: Iterable[str], output_path: str,
                     identifier_tokens: Sequence[str], vocab_size: int = DEFAULT_VOCAB_SIZE,
                     model_type: str = "bpe", num_threads: int = 2,
                     overwrite: bool = False) -> str:
  """Trains the SentencePiece model and writes it atomically to `output_path`.

  Args:
    sentences: the training corpus, one text per element (see gensar_jax/vocab_corpus.py).
    output_path: where the `.model` file goes (its directory is created).
    identifier_tokens: every identifier token the model must know; the behaviour tokens
      are added here.
    vocab_size: total size, special and byte pieces included (a soft limit).
    model_type: "bpe" (default, see the module docstring) or "unigram" (T5's).
    num_threads: trainer threads.
    overwrite: replace an existing model file.

  Returns:
    `output_path`.
  """
  import sentencepiece as spm

  if os.path.exists(output_path) and not overwrite:
    raise FileExistsError(f"{output_path} exists; pass overwrite=True to replace it")
  symbols = special_tokens(identifier_tokens)
  for token in symbols:
    _check_symbol(token)
  minimum = 3 + BYTE_PIECES + len(symbols) + 1
  if vocab_size < minimum:
    raise ValueError(
        f"vocab_size={vocab_size} cannot hold pad/eos/unk, {BYTE_PIECES} byte pieces and "
        f"{len(symbols)} special tokens; use at least {minimum} (plus room for text pieces)")
  corpus = [s for s in sentences if s and s.strip()]
  if not corpus:
    raise ValueError("the vocabulary corpus is empty")

  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_writer=model,
      model_type=model_type, vocab_size=vocab_size, hard_vocab_limit=False,
      user_defined_symbols=symbols,
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
      pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
      byte_fallback=True, character_coverage=1.0,
      normalization_rule_name="identity", add_dummy_prefix=False,
      remove_extra_whitespaces=False, split_digits=False,
      max_sentence_length=1 << 16, input_sentence_size=0, shuffle_input_sentence=False,
      num_threads=num_threads, minloglevel=2)

  return _write_atomically(output_path, model.getvalue())


def _write_atomically(output_path: str, data: bytes) -> str:
  """Writes `data` to a temporary file beside `output_path`, then renames it."""
  directory = os.path.dirname(os.path.abspath(output_path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(output_path)}.tmp-", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, output_path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return output_path


def extend_vocabulary(base_model_path: str, output_path: str,
                      identifier_tokens: Sequence[str], overwrite: bool = False) -> str:
  """A pretrained checkpoint's SentencePiece model with our special tokens appended.

  For starting from pretrained T5 weights (gensar_jax/pretrained/): every piece of the
  base model keeps its id, so its pretrained embedding row still fits; the behaviour and
  identifier tokens follow as USER_DEFINED pieces (never split, one id each), from id
  `base size` on. T5's spiece.model has 32000 pieces, so they take ids 32000, 32001, ...,
  the ids T5's seqio vocabulary gives its 100 sentinels (extra ids): GenSAR has no span
  corruption and loads the vocabulary with extra_ids=0 (`load_vocabulary`), so the
  sentinels' pretrained rows are not used. The model's vocab_size is this model's size
  padded to 128 (`T5Config.with_vocabulary`), e.g. 32000 + 1,539 -> 33664 rows.

  The base model's normaliser and pieces are kept, with one change: no dummy prefix (T5's
  adds a "▁" before the text), so that a target "<rec_item><m0_12>..." encodes to
  exactly its special tokens, as with our own vocabularies; a text's first word then
  reads "word" instead of "▁word" (both are usually pieces). T5's normaliser (NFKC,
  whitespace folding) and missing byte pieces make decoding lossy for rare characters,
  unlike `train_vocabulary`'s.
  """
  from sentencepiece import sentencepiece_model_pb2

  if os.path.exists(output_path) and not overwrite:
    raise FileExistsError(f"{output_path} exists; pass overwrite=True to replace it")
  try:
    with open(base_model_path, "rb") as f:
      proto = sentencepiece_model_pb2.ModelProto.FromString(f.read())
  except OSError as e:
    raise VocabularyError(f"{base_model_path}: cannot read the base vocabulary ({e})") from None
  except Exception as e:  # protobuf's DecodeError
    raise VocabularyError(f"{base_model_path}: not a SentencePiece model ({e})") from None
  ids = {p.piece: i for i, p in enumerate(proto.pieces)}
  expected = {PAD_ID: "<pad>", EOS_ID: "</s>", UNK_ID: "<unk>"}
  spec = proto.trainer_spec
  if (spec.pad_id, spec.eos_id, spec.unk_id) != (PAD_ID, EOS_ID, UNK_ID):
    raise VocabularyError(f"{base_model_path}: pad/eos/unk ids are {spec.pad_id}/"
                          f"{spec.eos_id}/{spec.unk_id}, not T5's {PAD_ID}/{EOS_ID}/{UNK_ID} "
                          f"({expected})")
  user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
  for token in special_tokens(identifier_tokens):
    _check_symbol(token)
    if token in ids:
      if proto.pieces[ids[token]].type != user_defined:
        raise VocabularyError(f"{base_model_path}: {token!r} is already a piece of another "
                              "kind; it could be split or merged")
      continue
    piece = proto.pieces.add()
    piece.piece, piece.score, piece.type = token, 0.0, user_defined
    ids[token] = len(proto.pieces) - 1
  proto.normalizer_spec.add_dummy_prefix = False
  return _write_atomically(output_path, proto.SerializeToString())


def load_vocabulary(path: str) -> seqio.SentencePieceVocabulary:
  """The model file as a `seqio.Vocabulary` (pad 0, eos 1, unk 2; no extra ids)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no vocabulary model; build one with "
                            "`python -m gensar_jax.build_vocab`")
  vocab = seqio.SentencePieceVocabulary(path, extra_ids=0)
  if (vocab.pad_id, vocab.eos_id, vocab.unk_id) != (PAD_ID, EOS_ID, UNK_ID):
    raise VocabularyError(f"{path}: expected pad/eos/unk = 0/1/2, got "
                          f"{vocab.pad_id}/{vocab.eos_id}/{vocab.unk_id}")
  return vocab


def token_id(vocab: seqio.SentencePieceVocabulary, token: str) -> int:
  """The id of one whole piece (a behaviour or identifier token); error if absent."""
  i = vocab.tokenizer.piece_to_id(token)
  if i == vocab.unk_id and token != vocab.tokenizer.id_to_piece(vocab.unk_id):
    raise VocabularyError(f"{token!r} is not a piece of {vocab.sentencepiece_model_file}")
  return int(i)


def missing_tokens(vocab: seqio.SentencePieceVocabulary, tokens: Iterable[str]) -> List[str]:
  """The tokens that are not single pieces of `vocab` (empty when all are)."""
  sp = vocab.tokenizer
  unk = sp.id_to_piece(vocab.unk_id)
  return [t for t in tokens if t != unk and sp.piece_to_id(t) == vocab.unk_id]


def require_tokens(vocab: seqio.SentencePieceVocabulary, tokens: Iterable[str],
                   what: str = "tokens") -> None:
  """Raises VocabularyError naming the first missing tokens, if any."""
  missing = missing_tokens(vocab, tokens)
  if missing:
    raise VocabularyError(
        f"{vocab.sentencepiece_model_file} lacks {len(missing)} {what} (e.g. "
        f"{missing[:5]}); rebuild it with `python -m gensar_jax.build_vocab` over the "
        "identifier tables you use")


def user_defined_tokens(vocab: seqio.SentencePieceVocabulary) -> List[str]:
  """The never-split pieces of the model (behaviour + identifier tokens), in id order."""
  from sentencepiece import sentencepiece_model_pb2

  proto = sentencepiece_model_pb2.ModelProto.FromString(vocab.sp_model)
  kind = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
  return [p.piece for p in proto.pieces if p.type == kind]


def special_token_ids(vocab: seqio.SentencePieceVocabulary,
                      tokens: Optional[Sequence[str]] = None) -> dict:
  """{token: id} for the given tokens (default: every user-defined token)."""
  tokens = user_defined_tokens(vocab) if tokens is None else tokens
  return {t: token_id(vocab, t) for t in tokens}
