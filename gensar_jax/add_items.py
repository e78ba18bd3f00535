"""Give items added to the catalogue identifiers, without retraining anything.

  python -m gensar_jax.add_items --gin_file=gin/runs/add_items.gin \
      --gin.IDENTIFIERS_DIR="'runs/ml100k/identifiers'" \
      --gin.PREPARED_DIR="'runs/ml100k/data_week2'" \
      --gin.OUTPUT_DIR="'runs/ml100k/identifiers_week2'"

`PREPARED_DIR` is the catalogue as it is now (prepare run again on the updated items and
events files); every item in it that the table at `IDENTIFIERS_DIR` lacks is new. The
output is an identifier table for the new catalogue in which:

  * every existing item keeps its SID and CID exactly, so the trained T5, its checkpoint
    and its vocabulary stay valid (the run-input check of evaluate / infer / export
    accepts a table that extends the one a run was trained with);
  * a new item's SID comes from its text through the saved sentence-encoder settings and
    the trained RQ-VAE, its CID from the same RQ-VAE fed a collaborative embedding borrowed
    from existing items (gensar_jax/identifiers/cold_start.py: sequence neighbours, else
    text neighbours), placed around the existing identifiers without collisions and with
    the SID/CID shared prefix kept (gensar_jax/identifiers/extend.py);
  * items no longer in the catalogue are left out, but their identifiers are never given
    to a new item (the model associates them with the old one).

Codes stay inside the trained codebooks, so the vocabulary needs no new token. Export
again with `IDENTIFIERS_DIR` set to the output to get a serving artifact whose tries hold
the new items; nothing is retrained.
"""
from __future__ import annotations

if __name__ == "__main__":  # one gin registration: run as the importable module
  import gensar_jax.gin_utils as _gin_utils
  _gin_utils.run_module("gensar_jax.add_items")

import os
import shutil
from typing import Dict, List

import gin
import numpy as np

from gensar_jax.data import sequences as sequences_lib
from gensar_jax.data.prepared import load_prepared
from gensar_jax.data.schema import DataError
from gensar_jax.identifier_init import COLLABORATIVE_FILE, SEMANTIC_FILE
from gensar_jax.identifiers import assignment as assignment_lib
from gensar_jax.identifiers import cold_start
from gensar_jax.identifiers import extend as extend_lib
from gensar_jax.identifiers import rqvae_store
from gensar_jax.identifiers import table as table_lib
from gensar_jax.identifiers.text_encoder import SentenceEncoder
from gensar_jax.io_utils import atomic_output_dir, write_json

ADDED_FILE = "added_items.json"


def _embeddings(identifiers_dir: str, name: str, rows: int):
  path = os.path.join(identifiers_dir, name)
  if not os.path.isfile(path):
    return None
  table = np.load(path)
  if table.shape[0] != rows:
    raise DataError(f"{path}: {table.shape[0]} rows for a table of {rows} items")
  return table


@gin.configurable
def add_items(identifiers_dir: str = gin.REQUIRED, prepared_dir: str = gin.REQUIRED,
              output_dir: str = gin.REQUIRED, window: int = 3, text_neighbours: int = 10,
              overwrite: bool = False) -> Dict:
  """Writes the extended table to `output_dir`; returns what was added (also in
  added_items.json there). `window` and `text_neighbours` are cold_start's settings."""
  if os.path.exists(output_dir) and not overwrite:
    raise DataError(f"{output_dir}: output exists; bind add_items.overwrite=True")
  if os.path.abspath(output_dir) == os.path.abspath(identifiers_dir):
    raise DataError(f"{output_dir}: write the extended table next to {identifiers_dir}, not "
                    "over it (the trained run's input check reads the original)")
  trained, encoder_settings = rqvae_store.load_rqvae(identifiers_dir)
  table = table_lib.load_identifier_table(identifiers_dir)
  old_ids = [str(i) for i in table.item_ids]
  old_row = {item: r for r, item in enumerate(old_ids)}
  prepared = load_prepared(prepared_dir)
  item_ids = [str(i) for i in prepared.items["item_id"]]
  new_rows = [r for r, item in enumerate(item_ids) if item not in old_row]
  if not new_rows:
    raise DataError(f"{prepared_dir}: every item already has identifiers in "
                    f"{identifiers_dir}; nothing to add")
  mode = trained.config.mode
  layout = trained.config.layout()

  old_semantic = _embeddings(identifiers_dir, SEMANTIC_FILE, len(old_ids))
  old_collaborative = _embeddings(identifiers_dir, COLLABORATIVE_FILE, len(old_ids))
  new_semantic = new_collaborative = None
  sources: List[str] = []
  texts = prepared.item_texts()
  # The text is encoded in every mode: it gives the SID, and the fallback CID of an item
  # nobody has interacted with.
  encoder = SentenceEncoder(**(encoder_settings or {}))
  new_semantic = encoder.encode([texts[r] for r in new_rows])  # [new, d_s]
  if mode != "sid_only":
    if old_collaborative is None or old_semantic is None:
      raise DataError(f"{identifiers_dir}: {SEMANTIC_FILE} and {COLLABORATIVE_FILE} are "
                      "needed to place new items' CIDs")
    is_old = np.asarray([item in old_row for item in item_ids])
    rows = sequences_lib.load_rec_sequences(prepared_dir)
    found = cold_start.sequence_neighbours(
        [r["items"][:r["train_end"]] for r in rows], new_rows, is_old, window)
    neighbours = [[old_row[item_ids[j]] for j in found[r]] for r in new_rows]
    new_collaborative, sources = cold_start.collaborative_for_new_items(
        old_collaborative, old_semantic, new_semantic, neighbours, text_neighbours)
  existing = {"sid": table.sid_codes, "cid": table.cid_codes}
  codes, moved = extend_lib.extend_codes(
      trained, {k: v for k, v in existing.items() if v is not None},
      new_semantic if mode != "cid_only" else None, new_collaborative)
  if not extend_lib.shared_prefix_kept(codes, layout.shared_levels):
    raise RuntimeError("internal error: a new item's SID and CID lost their shared prefix")

  # The output follows the new catalogue's order, like a table `identify` writes.
  new_index = {r: i for i, r in enumerate(new_rows)}
  def merged(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    return np.stack([new[new_index[r]] if r in new_index else old[old_row[item]]
                     for r, item in enumerate(item_ids)])
  full = {space: merged(existing[space], codes[space]) for space in codes}
  removed = len(set(old_ids) - set(item_ids))
  added = {
      "from_table": os.path.abspath(identifiers_dir),
      "prepared_dir": os.path.abspath(prepared_dir),
      "items_added": len(new_rows),
      "items_kept": len(item_ids) - len(new_rows),
      "items_removed": removed,
      "moved_off_argmin": moved,
      "cid_source": {s: sources.count(s) for s in (cold_start.NEIGHBOURS, cold_start.TEXT)},
      "new_item_ids": [item_ids[r] for r in new_rows],
  }
  stats = {**table.stats, "num_items": len(item_ids), "added_items": {
      k: v for k, v in added.items() if k != "new_item_ids"}}
  assignment = assignment_lib.IdentifierAssignment(
      mode=mode, sid_codes=full.get("sid"), cid_codes=full.get("cid"),
      sid_levels=tuple(table.stats["sid_levels"]), cid_levels=tuple(table.stats["cid_levels"]),
      codebook_size=int(table.stats["codebook_size"]), stats=stats)
  with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
    staged = os.path.join(tmp, "table")
    table_lib.write_identifier_table(staged, prepared.items["item_id"].tolist(), assignment)
    for name in os.listdir(staged):
      os.replace(os.path.join(staged, name), os.path.join(tmp, name))
    os.rmdir(staged)
    for name, old, new in ((SEMANTIC_FILE, old_semantic, new_semantic),
                           (COLLABORATIVE_FILE, old_collaborative, new_collaborative)):
      if old is not None and new is not None:
        np.save(os.path.join(tmp, name), merged(old, new).astype(np.float32))
    for name in (rqvae_store.PARAMS_FILE, rqvae_store.META_FILE, "sasrec_metrics.json"):
      if os.path.isfile(os.path.join(identifiers_dir, name)):
        shutil.copy2(os.path.join(identifiers_dir, name), os.path.join(tmp, name))
    write_json(os.path.join(tmp, ADDED_FILE), added)
  return added


def format_added(added: Dict) -> str:
  sources = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in added["cid_source"].items())
  moved = ", ".join(f"{k.upper()} {v}" for k, v in added["moved_off_argmin"].items())
  return (f"added {added['items_added']:,} items ({added['items_kept']:,} kept, "
          f"{added['items_removed']:,} removed)\n"
          f"moved off their argmin identifier to stay unique: {moved}\n"
          f"collaborative embedding from: {sources}")


def main() -> None:
  print(format_added(add_items()))
