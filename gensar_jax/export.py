"""Export a trained run as a self-contained serving artifact (gensar_jax/serving/artifact.py).

  python -m gensar_jax.export --gin_file=gin/runs/train.gin --gin_file=gin/models/tiny.gin \
      --gin_file=gin/runs/export.gin --gin.MODEL_DIR="'runs/tiny'" \
      --gin.EXPORT_DIR="'runs/tiny/export'" ...task macros (PREPARED_DIR, ...)...

Training needs gin, orbax, SeqIO and the Flax module; a server should need none of them.
So the constrained catalogue search is traced here, once per task and batch bucket, with
`jax.export`, and written next to the parameters (msgpack), the vocabulary, the catalogue
tries (npz) and the item table (jsonl). gensar_jax/serving/engine.py calls the deserialized
functions; it never builds the model. With `saved_model=True` the same functions also go
into a TensorFlow SavedModel in `<export_dir>/saved_model/` for TF Serving and Vertex AI
(gensar_jax/serving/saved_model.py), written inside the same atomic directory.
"""
from __future__ import annotations

if __name__ == "__main__":  # one gin registration: run as the importable module
  import gensar_jax.gin_utils as _gin_utils
  _gin_utils.run_module("gensar_jax.export")

import dataclasses
import os
import shutil
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import gin
import jax
import jax.numpy as jnp
import numpy as np

from gensar_jax.decoding import build_trie, identifier_search
from gensar_jax.decoding import trie as trie_lib
from gensar_jax import distributed
from gensar_jax import io_utils
from gensar_jax.io_utils import atomic_output_dir, write_json, write_jsonl
from gensar_jax.serving import artifact as artifact_lib
from gensar_jax.vocabulary import BEHAVIOUR_TOKENS, REC_ITEM, SRC_ITEM, SRC_QUERY

# Serving task -> the ranking index key of gensar_jax.ranking (ranking_setup().indices).
INDEX_OF_TASK = {"search": "search", "recommend": "rec"}


def serving_fn(model, num_beams: int, layout: Mapping[str, Any]) -> Callable:
  """(params, trie leaves, tokens [B, L]) -> (item rows [B, K] int32, scores [B, K] f32).

  The trie travels as its flat leaves so the exported calling convention holds only
  dicts, lists and arrays (no custom pytree node to register for serialization); its
  static layout (level kinds, max_branch) is baked into the trace.
  """

  def fn(params, trie_leaves, encoder_input_tokens):
    trie = artifact_lib.trie_from_leaves(trie_leaves, layout)
    result = identifier_search(model, params, encoder_input_tokens, trie, num_beams)
    return result.items.astype(jnp.int32), result.scores.astype(jnp.float32)  # [B, K] each

  return fn


def _spec(x) -> jax.ShapeDtypeStruct:
  x = np.asarray(x) if not hasattr(x, "shape") else x
  return jax.ShapeDtypeStruct(x.shape, x.dtype)


def export_function(fn: Callable, params: Any, trie_leaves: Sequence[np.ndarray],
                    batch_size: int, input_length: int,
                    platforms: Optional[Sequence[str]] = None) -> bytes:
  """Serialized `jax.export` of jit(fn) for one static batch size."""
  specs = (jax.tree.map(_spec, params), [_spec(x) for x in trie_leaves],
           jax.ShapeDtypeStruct((batch_size, input_length), jnp.int32))
  exported = jax.export.export(jax.jit(fn), platforms=platforms)(*specs)
  return bytes(exported.serialize())


def prompt_formats() -> Dict[str, str]:
  """The eval prompts (template 0) and event spellings, so a server needs no `tasks` import."""
  from gensar_jax import prompts  # pylint: disable=g-import-not-at-top
  return {
      "search": prompts.template(prompts.NEXT_SEARCH_ITEM, 0),
      "recommend": prompts.template(prompts.NEXT_REC_ITEM, 0),
      "history_separator": prompts.HISTORY_SEPARATOR,
      "rec_event": REC_ITEM + "{identifier}",
      "search_event": SRC_QUERY + " {query}" + SRC_ITEM + "{identifier}",
      "query": SRC_QUERY + " {query}",
  }


def _check_buckets(batch_buckets: Sequence[int]) -> Tuple[int, ...]:
  buckets = tuple(sorted({int(b) for b in batch_buckets}))
  if not buckets or buckets[0] < 1:
    raise ValueError(f"batch_buckets must be positive batch sizes, got {list(batch_buckets)}")
  return buckets


def write_serving_artifact(export_dir: str, *, model, params: Any, indices: Mapping[str, Any],
                           titles: Mapping[str, str], input_length: int, num_beams: int,
                           batch_buckets: Sequence[int] = (1, 8, 32), source_step: int = -1,
                           rec_history: int = 5, search_history: int = 5,
                           platforms: Optional[Sequence[str]] = None,
                           saved_model: bool = False, overwrite: bool = False) -> str:
  """Writes the artifact of `model` + `params` (any source: a checkpoint or a fresh init).

  Args:
    indices: {"rec": IdentifierTokens, "search": IdentifierTokens}, rows in catalogue
      order (gensar_jax.ranking.ranking_setup().indices); both share `item_ids`.
    titles: item id -> title shown in responses.
    rec_history, search_history: the events of each kind a prompt keeps (the prepared
      data's build_samples settings), so served prompts look like trained ones.
  """
  buckets = _check_buckets(batch_buckets)
  if num_beams < 1:
    raise ValueError(f"num_beams must be >= 1, got {num_beams}")
  vocabulary = model.vocabulary
  item_ids = list(indices["rec"].item_ids)
  if list(indices["search"].item_ids) != item_ids:
    raise ValueError("the rec and search identifier indices list different catalogues")
  missing = [i for i in item_ids if i not in titles]
  if missing:
    raise ValueError(f"{len(missing)} catalogue items have no title (e.g. {missing[0]!r})")
  vocab_size = model.module.config.vocab_size
  host_params = distributed.to_host(params)  # gathered when spread over hosts
  tries, layouts, identifier_tokens, identifier_text = {}, {}, {}, {}
  sp = vocabulary.tokenizer
  for task, key in INDEX_OF_TASK.items():
    tokens = np.asarray(indices[key].tokens, np.int32)                    # [items, L]
    trie = build_trie(tokens, what=f"{task} identifiers")
    largest = trie_lib.max_token(trie)
    if largest is not None and largest >= vocab_size:
      raise ValueError(f"{task} trie uses token id {largest}, the model has {vocab_size} logits")
    tries[task], identifier_tokens[task] = trie, tokens
    layouts[task] = artifact_lib.trie_layout(trie)
    # Behaviour token and EOS stripped: the history slot spells the codes only.
    identifier_text[task] = ["".join(sp.id_to_piece(int(t)) for t in row[1:-1])
                             for row in tokens]
  config = dataclasses.asdict(model.module.config)
  metadata = {
      "format_version": artifact_lib.FORMAT_VERSION,
      "tasks": list(INDEX_OF_TASK),
      "model_config": config,
      "vocab_size": int(vocabulary.vocab_size),
      "feature_lengths": {"inputs": int(input_length),
                          "identifier": int(identifier_tokens["search"].shape[1])},
      "num_beams": int(num_beams),
      "batch_buckets": list(buckets),
      "behaviour_token_ids": {t: int(sp.piece_to_id(t)) for t in BEHAVIOUR_TOKENS},
      "eos_id": int(model.eos_id),
      "pad_id": 0,
      "history": {"rec": int(rec_history), "search": int(search_history)},
      "prompts": prompt_formats(),
      "spaces": {task: indices[key].space for task, key in INDEX_OF_TASK.items()},
      "tries": layouts,
      "num_items": len(item_ids),
      "source_checkpoint_step": int(source_step),
      "platforms": list(platforms) if platforms else [jax.export.default_export_platform()],
      "jax_version": jax.__version__,
      "functions": {task: {str(b): artifact_lib.function_file(task, b) for b in buckets}
                    for task in INDEX_OF_TASK},
  }
  def write() -> None:  # traced and written on process 0 only
    with atomic_output_dir(export_dir, overwrite=overwrite) as tmp:
      with open(os.path.join(tmp, artifact_lib.PARAMS_FILE), "wb") as f:
        f.write(artifact_lib.params_to_bytes(host_params))
      shutil.copyfile(vocabulary.sentencepiece_model_file,
                      os.path.join(tmp, artifact_lib.VOCAB_FILE))
      write_jsonl(os.path.join(tmp, artifact_lib.ITEMS_FILE),
                  ({"item_id": item, "title": str(titles[item]),
                    "identifiers": {task: identifier_text[task][row] for task in INDEX_OF_TASK}}
                   for row, item in enumerate(item_ids)))
      np.savez(os.path.join(tmp, artifact_lib.IDENTIFIERS_FILE), **identifier_tokens)
      trie_arrays = {}
      for task in INDEX_OF_TASK:
        trie_arrays.update(artifact_lib.trie_arrays_dict(task, tries[task], layouts[task]))
      np.savez(os.path.join(tmp, artifact_lib.TRIES_FILE), **trie_arrays)
      for task in INDEX_OF_TASK:
        fn = serving_fn(model, num_beams, layouts[task])
        leaves = artifact_lib.trie_leaves(trie_arrays, task, layouts[task])
        for bucket in buckets:
          blob = export_function(fn, host_params, leaves, bucket, input_length, platforms)
          with open(os.path.join(tmp, artifact_lib.function_file(task, bucket)), "wb") as f:
            f.write(blob)
      write_json(os.path.join(tmp, artifact_lib.METADATA_FILE), metadata)
      if saved_model:  # from the files just written: the engine's very functions
        from gensar_jax.serving import saved_model as saved_model_lib
        saved_model_lib.write_saved_model(tmp)

  distributed.write_once(f"the serving artifact to {export_dir}", write)
  return export_dir if io_utils.is_remote(export_dir) else os.path.abspath(export_dir)


@gin.configurable
def export(model_dir: str = gin.REQUIRED, export_dir: str = gin.REQUIRED,
           prepared_dir: str = gin.REQUIRED, checkpoint: Any = "best",
           task_feature_lengths: Mapping[str, int] = gin.REQUIRED, num_beams: int = 20,
           batch_buckets: Sequence[int] = (1, 8, 32), rec_history: int = 5,
           search_history: int = 5, platforms: Optional[Sequence[str]] = None,
           saved_model: bool = False, overwrite: bool = False) -> str:
  """Restores the run's chosen checkpoint and writes its serving artifact to `export_dir`."""
  if io_utils.exists(export_dir) and not overwrite:
    # Before the minutes of restoring and tracing, not after.
    raise FileExistsError(f"{export_dir} already exists; bind export.overwrite = True to "
                          "replace it")
  from gensar_jax import restore
  from gensar_jax.data.prepared import load_prepared
  run = restore.load_run(model_dir, checkpoint, "export")
  setup, model, params, step = run.setup, run.model, run.params, run.step
  items = load_prepared(prepared_dir).items
  titles = {str(i): str(t) for i, t in zip(items["item_id"], items["title"])}
  path = write_serving_artifact(
      export_dir, model=model, params=params, indices=setup.indices, titles=titles,
      input_length=int(task_feature_lengths["inputs"]), num_beams=num_beams,
      batch_buckets=batch_buckets, source_step=step, rec_history=rec_history,
      search_history=search_history, platforms=platforms, saved_model=saved_model,
      overwrite=overwrite)
  print(f"exported checkpoint step {step} of {model_dir} to {path}", flush=True)
  return path


def main() -> None:
  export()

