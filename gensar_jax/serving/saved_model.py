"""The serving artifact as a TensorFlow SavedModel, for TF Serving and Vertex AI.

  python -m gensar_jax.serving.saved_model --artifact=runs/tiny/export
  # or at export time: --gin.export.saved_model=True  ->  <EXPORT_DIR>/saved_model/

T5X users deploy SavedModels; this one holds everything the HTTP server (app.py + engine.py)
does, so TF Serving can answer the same requests without our Python:

  signature          inputs                                         outputs [batch, beams]
  search             query [n] string; history_kind, history_item_id,   item_ids (string),
  (serving_default)  history_query [n, H] string ("" pads a history)    titles (string),
  recommend          history_kind, history_item_id, history_query        item_rows (int32),
  search_tokens      encoder_input_tokens [n, input_length] int32        scores (float32)
  recommend_tokens   encoder_input_tokens [n, input_length] int32

Beams come best first; a beam with no item (catalogue smaller than the beam count) has item
row -1, item id "" and a score of -inf, which a client drops, as the server does. A client
keeps the first k. History events are {kind: "rec" | "search", item_id, query} oldest first,
the request fields of app.py as one padded string tensor each.

Choices, and why:

- Built from the artifact, not from the model: the constrained search is the artifact's own
  `jax.export` function per batch bucket, so the SavedModel runs the very programs the
  engine runs, with the parameters and the catalogue tries embedded as variables (in the
  SavedModel's variables/, no 2 GB graph limit) and the item table, identifier spellings,
  prompts and SentencePiece model as graph constants.
- No jax2tf.convert: it serialises StableHLO at JAX's newest "4 weeks old" version (1.17 with
  JAX 0.10, 1.20 with 0.11), which TensorFlow 2.21's XlaCallModule (StableHLO 1.13.7) cannot
  read (`lax.top_k` is a `composite_v2`). Each function's StableHLO is re-serialised for the
  StableHLO version of the TensorFlow that writes the SavedModel and called through an
  XlaCallModule op, the op jax2tf emits too. Serve it with a TensorFlow (or TF Serving) at
  least as new as the one that wrote it.
- One input signature with a free batch dimension, over static per-bucket programs: inside
  the graph a batch runs in chunks of the largest bucket and the remainder is padded (with
  copies of its first row) to the smallest bucket that holds it, exactly as the engine does,
  so TF Serving's own request batching can send any batch size. Shape-polymorphic export
  would need shape-assertion custom calls TF 2.21 cannot read either.
- The request path is in the graph: stripping, unwrapping of angle-bracketed control forms in
  user text (engine.user_text), the last `history` events of each kind, the eval prompt
  templates and SentencePiece via tensorflow-text, padded as SeqIO pads. An unknown item id,
  an unknown event kind, an empty query or history fields of different shapes fail the call
  (InvalidArgumentError naming the problem). The
  text signatures need tensorflow-text's SentencePiece ops in the server (TF Serving's model
  server links them; in Python, `import tensorflow_text` before `tf.saved_model.load`); the
  *_tokens signatures need only core ops and XlaCallModule.
- Written atomically next to the artifact's files (`saved_model/`); the HTTP server neither
  needs nor reads it. docs/serving.md shows TF Serving and Vertex AI requests.
"""
from __future__ import annotations

if __name__ == "__main__":  # one module identity when run with -m
  import gensar_jax.serving.saved_model as _self
  _self.main()
  raise SystemExit(0)

import argparse
import os
import string
import sys
from typing import Any, Dict, List, Optional, Sequence

import jax
import numpy as np
import tensorflow as tf
import tensorflow_text  # the SentencePiece ops  # pylint: disable=unused-import
from jax.extend.mlir.dialects import stablehlo as jax_stablehlo
from tensorflow.compiler.mlir.stablehlo import stablehlo as tf_stablehlo
from tensorflow.compiler.tf2xla.python import xla as tfxla

from gensar_jax import io_utils
from gensar_jax.io_utils import atomic_output_dir
from gensar_jax.serving import artifact as artifact_lib
from gensar_jax.serving.artifact import ArtifactError

SAVED_MODEL_DIR = "saved_model"
SIGNATURES = ("search", "recommend", "search_tokens", "recommend_tokens")
HISTORY_FIELDS = ("history_kind", "history_item_id", "history_query")
_RESERVED_FORM = r"<(/?[A-Za-z0-9_]+)>"   # engine._RESERVED_FORM, also valid RE2


class XlaFunction:
  """One deserialised `jax.export` function, called as an XlaCallModule op.

  Its StableHLO is re-serialised for the StableHLO version of this TensorFlow (1.13.7 for
  TF 2.21), which is older than the one JAX writes by default.
  """

  def __init__(self, blob: bytes, where: str):
    with artifact_lib.reading(where, "a serialized JAX function"):
      self.exported = jax.export.deserialize(bytearray(blob))
      text = self.exported.mlir_module()
      self.module = bytes(jax_stablehlo.serialize_portable_artifact_str(
          text, tf_stablehlo.get_current_version()))
    self.shardy = "sdy." in text
    if self.exported.nr_devices != 1 or self.exported.uses_global_constants:
      raise ArtifactError(f"{where}: a multi-device or shape-polymorphic function; the "
                          "SavedModel takes the artifact's single-device batch buckets")

  def __call__(self, flat_args: Sequence[Any]) -> List[Any]:
    ex = self.exported
    kept = [flat_args[i] for i in ex.module_kept_var_idx]
    return list(tfxla.call_module(
        kept, version=ex.calling_convention_version, module=self.module,
        Tout=[tf.as_dtype(a.dtype) for a in ex.out_avals],
        Sout=[tuple(a.shape) for a in ex.out_avals],
        platforms=[p.upper() for p in ex.platforms],
        disabled_checks=[str(c) for c in ex.disabled_safety_checks],
        use_shardy_partitioner=self.shardy))


def _format(fmt: str, **slots) -> tf.Tensor:
  """str.format for string tensors: literal pieces joined with the slots (broadcast)."""
  pieces = []
  for literal, field, _, _ in string.Formatter().parse(fmt):
    if literal:
      pieces.append(tf.constant(literal))
    if field is not None:
      pieces.append(slots[field])
  return tf.strings.join(pieces)


def user_text(text: tf.Tensor) -> tf.Tensor:
  """engine.user_text in the graph, after the server's strip: unwrap `<form>` until none is
  left ("<<m0_1>>" -> "<m0_1>" -> "m0_1")."""
  def unwrap(previous, current):
    return current, tf.strings.regex_replace(current, _RESERVED_FORM, r"\1")

  def changed(previous, current):
    return tf.reduce_any(tf.not_equal(previous, current))

  text = tf.strings.strip(text)
  _, text = tf.while_loop(changed, unwrap, unwrap(text, text))
  return text


def _check(condition: tf.Tensor, message: str, *values) -> tf.Operation:
  """An assertion op: the call fails with InvalidArgumentError "<message> <values>"."""
  return tf.debugging.Assert(tf.reduce_all(condition), [message, *values], summarize=5)


class ServingModule(tf.Module):
  """The artifact as a tf.Module: the four signature functions and what they capture."""

  def __init__(self, art: artifact_lib.Artifact):
    super().__init__()
    meta = art.metadata
    self._input_length = int(meta["feature_lengths"]["inputs"])
    self._buckets = sorted(int(b) for b in meta["batch_buckets"])
    self._beams = art.num_beams
    self._eos_id, self._pad_id = int(meta["eos_id"]), int(meta["pad_id"])
    self._history = {"rec": int(meta["history"]["rec"]),
                     "search": int(meta["history"]["search"])}
    self._prompts = dict(meta["prompts"])
    self.params = [tf.Variable(np.asarray(x), trainable=False)
                   for x in jax.tree.leaves(art.params)]
    self.tries = {task: [tf.Variable(np.asarray(x), trainable=False) for x in leaves]
                  for task, leaves in art.trie_leaves.items()}
    self._functions = {}
    for (task, bucket), blob in art.functions.items():
      where = os.path.join(art.directory, artifact_lib.function_file(task, bucket))
      fn = XlaFunction(blob, where)
      artifact_lib.check_function(fn.exported, where, art, task, bucket)
      self._functions[(task, bucket)] = fn
    item_ids = [str(row["item_id"]) for row in art.items]
    self._no_item = len(item_ids)
    self._item_ids = tf.constant(item_ids + [""])              # [items + 1]; last: no item
    self._titles = tf.constant([str(row["title"]) for row in art.items] + [""])
    self.item_rows = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(item_ids),
                                            tf.range(len(item_ids), dtype=tf.int32)), -1)
    self._identifier_text = {task: tf.constant([row["identifiers"][task] for row in art.items])
                             for task in meta["tasks"]}
    with artifact_lib.reading(art.vocab_path, "a SentencePiece model"):
      with open(art.vocab_path, "rb") as f:
        self.tokenizer = tensorflow_text.SentencepieceTokenizer(model=f.read(),
                                                                out_type=tf.int32)
    history = [tf.TensorSpec([None, None], tf.string, name=n) for n in HISTORY_FIELDS]
    tokens = [tf.TensorSpec([None, self._input_length], tf.int32,
                            name="encoder_input_tokens")]
    self.search = tf.function(self._search, input_signature=[
        tf.TensorSpec([None], tf.string, name="query")] + history)
    self.recommend = tf.function(self._recommend, input_signature=history)
    self.search_tokens = tf.function(lambda encoder_input_tokens: self._run_tokens(
        "search", encoder_input_tokens), input_signature=tokens)
    self.recommend_tokens = tf.function(lambda encoder_input_tokens: self._run_tokens(
        "recommend", encoder_input_tokens), input_signature=tokens)

  # --------------------------------------------------------------------------- signatures

  def _search(self, query, history_kind, history_item_id, history_query):
    query = user_text(query)                                       # [n]
    checks = [_check(tf.strings.length(query) > 0, "query must not be empty"),
              _check(tf.equal(tf.shape(query)[0], tf.shape(history_kind)[0]),
                     "query and the history fields need one request per row")]
    with tf.control_dependencies(checks):
      history = self._history_text(history_kind, history_item_id, history_query)
      prompt = _format(self._prompts["search"], history=history,
                       query=_format(self._prompts["query"], query=query))
    return self._run_tokens("search", self._encode(prompt))

  def _recommend(self, history_kind, history_item_id, history_query):
    history = self._history_text(history_kind, history_item_id, history_query)
    return self._run_tokens("recommend", self._encode(
        _format(self._prompts["recommend"], history=history)))

  # --------------------------------------------------------------------------- requests

  def _history_text(self, kind, item_id, query):
    """[n, H] padded events -> [n] history text of the last events of each kind."""
    checks = [_check(tf.equal(tf.shape(kind), tf.shape(other)), "history_kind, "
                     "history_item_id and history_query must have one shape [batch, events]")
              for other in (item_id, query)]
    with tf.control_dependencies(checks):
      is_rec, is_search = tf.equal(kind, "rec"), tf.equal(kind, "search")   # [n, H] each
      rows = self.item_rows.lookup(item_id)                        # [n, H]; -1: unknown
      unknown = (is_rec | is_search) & (rows < 0)
      query = user_text(query)
      checks = [
          _check(is_rec | is_search | tf.equal(kind, ""),
                 "history_kind must be 'rec', 'search' or '' (padding)"),
          _check(~unknown, "history names unknown item id(s):",
                 tf.boolean_mask(item_id, unknown)),
          _check(~is_search | (tf.strings.length(query) > 0),
                 "a search event in the history needs a non-empty query")]
    with tf.control_dependencies(checks):
      row = tf.maximum(rows, 0)
      rec = _format(self._prompts["rec_event"],
                    identifier=tf.gather(self._identifier_text["recommend"], row))
      search = _format(self._prompts["search_event"], query=query,
                       identifier=tf.gather(self._identifier_text["search"], row))
      # Count of the kind's events from this one to the end: keep the last `history`.
      keep = ((is_rec & (tf.cumsum(tf.cast(is_rec, tf.int32), 1, reverse=True)
                         <= self._history["rec"])) |
              (is_search & (tf.cumsum(tf.cast(is_search, tf.int32), 1, reverse=True)
                            <= self._history["search"])))           # [n, H]
      events = tf.ragged.boolean_mask(tf.where(is_rec, rec, search), keep)  # [n, (h)]
      return tf.strings.reduce_join(events, axis=1,
                                    separator=self._prompts["history_separator"])

  def _encode(self, text):
    """[n] prompts -> [n, L] int32: SeqIO's tokenize + append_eos_after_trim + padding."""
    ids = self.tokenizer.tokenize(text)[:, :self._input_length - 1]  # [n, (l)]
    eos = tf.RaggedTensor.from_tensor(tf.fill([tf.shape(text)[0], 1], self._eos_id))
    ids = tf.concat([ids, eos], axis=1)
    return ids.to_tensor(default_value=self._pad_id, shape=[None, self._input_length])

  # --------------------------------------------------------------------------- device

  def _run_bucket(self, task: str, bucket: int, tokens):
    """tokens [bucket, L] -> (rows, scores) [bucket, K] through the bucket's program."""
    rows, scores = self._functions[(task, bucket)]([*self.params, *self.tries[task], tokens])
    return rows, scores

  def _run_tokens(self, task: str, tokens):
    """tokens [n, L] -> outputs [n, K], in ServingEngine.run_tokens's chunks and padding."""
    tokens = tf.ensure_shape(tokens, [None, self._input_length])
    largest, beams = self._buckets[-1], self._beams
    full = tf.shape(tokens)[0] // largest * largest
    chunks = tf.reshape(tokens[:full], [-1, largest, self._input_length])  # [c, B, L]
    rows, scores = tf.map_fn(lambda chunk: self._run_bucket(task, largest, chunk), chunks,
                             fn_output_signature=(tf.int32, tf.float32))  # [c, B, K] each
    rows, scores = tf.reshape(rows, [-1, beams]), tf.reshape(scores, [-1, beams])
    rest = tokens[full:]                                           # [r, L], r < largest
    r = tf.shape(rest)[0]

    def padded_to(bucket):
      def branch():
        padded = tf.concat([rest, tf.repeat(rest[:1], bucket - r, axis=0)], 0)  # [b, L]
        out_rows, out_scores = self._run_bucket(task, bucket, padded)
        return out_rows[:r], out_scores[:r]
      return branch

    def remainder():
      smallest = tf.reduce_sum(tf.cast(tf.constant(self._buckets) < r, tf.int32))  # b >= r
      return tf.switch_case(smallest, [padded_to(b) for b in self._buckets])

    def nothing():
      return tf.zeros([0, beams], tf.int32), tf.zeros([0, beams], tf.float32)

    rest_rows, rest_scores = tf.cond(r > 0, remainder, nothing)
    rows = tf.concat([rows, rest_rows], 0)                         # [n, K]
    scores = tf.concat([scores, rest_scores], 0)
    index = tf.where(rows >= 0, rows, self._no_item)               # -1 -> the trailing ""
    return {"item_ids": tf.gather(self._item_ids, index),
            "titles": tf.gather(self._titles, index), "item_rows": rows, "scores": scores}


def signatures(module: ServingModule, default: str = "search") -> Dict[str, Any]:
  """Signature name -> concrete function (keyword inputs, as TF Serving calls them)."""
  out = {name: getattr(module, name).get_concrete_function() for name in SIGNATURES}
  out["serving_default"] = out[default]
  return out


def write_saved_model(artifact_dir: str, output_dir: Optional[str] = None,
                      default_signature: str = "search", overwrite: bool = False) -> str:
  """Writes the SavedModel of an artifact (default: `<artifact_dir>/saved_model`).

  `default_signature` is the one also named serving_default, which is what Vertex AI's
  prebuilt TensorFlow containers call.
  """
  if default_signature not in SIGNATURES:
    raise ValueError(f"the default signature must be one of {SIGNATURES}, got "
                     f"{default_signature!r}")
  output_dir = output_dir or os.path.join(artifact_dir, SAVED_MODEL_DIR)
  if io_utils.exists(output_dir) and not overwrite:  # before minutes of building, not after
    raise FileExistsError(f"{output_dir} already exists; pass --overwrite to replace it")
  module = ServingModule(artifact_lib.read_artifact(artifact_dir))
  with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
    tf.saved_model.save(module, tmp, signatures=signatures(module, default_signature))
  return output_dir


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m gensar_jax.serving.saved_model",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--artifact", required=True, help="directory written by gensar_jax.export")
  parser.add_argument("--output", default=None, help="default: <artifact>/saved_model")
  parser.add_argument("--default_signature", default="search", choices=SIGNATURES,
                      help="also served as serving_default (what Vertex AI calls)")
  parser.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  try:
    path = write_saved_model(args.artifact, args.output, args.default_signature,
                             overwrite=args.overwrite)
  except (ArtifactError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2)
  print(f"wrote the SavedModel of {args.artifact} to {path}", flush=True)
