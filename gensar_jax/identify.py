"""Stage 2: the prepared dataset -> dual-purpose identifiers (docs/method.md section 1).

  python -m gensar_jax.identify --gin_file=gin/runs/identify.gin \
      --gin.PREPARED_DIR="'runs/ml100k/data'" --gin.IDENTIFIERS_DIR="'runs/ml100k/ids'"

1. semantic embeddings v_s: the sentence encoder over "title. description" of every item;
2. collaborative embeddings v_c: the item table of a SASRec trained on each user's ordered
   rec sequence up to their first held-out interaction (its validation HR/NDCG is the SASRec
   baseline, saved as sasrec_metrics.json);
3. the joint RQ-VAE, Sinkhorn collision handling and the final de-duplication.

Output directory (renamed into place only when complete):
  identifiers.jsonl, identifier_stats.json, code_usage.png   the identifier table
  identifier_structure.png                                     what items sharing a prefix
                                                               have in common (also under
                                                               "structure" in the stats)
  semantic_embeddings.npy, collaborative_embeddings.npy      [items, d] float32 inputs
  sasrec_metrics.json                                          SASRec on validation/test
  rqvae_params.msgpack, rqvae.json                             the trained RQ-VAE and the
                                                               encoder settings (add_items)
"""
from __future__ import annotations

if __name__ == "__main__":  # one gin registration: run as the importable module
  import gensar_jax.gin_utils as _gin_utils
  _gin_utils.run_module("gensar_jax.identify")

import os
from typing import Dict, List, Optional, Tuple

import gin
import numpy as np

from gensar_jax.data.columns import read_columns
from gensar_jax.data import sequences as sequences_lib
from gensar_jax.data.prepared import load_prepared
from gensar_jax.data.schema import DataError, REC
from gensar_jax.identifiers import assignment as assignment_lib
from gensar_jax.identifiers import rqvae as rqvae_lib
from gensar_jax.identifiers import rqvae_store
from gensar_jax.identifiers import sasrec as sasrec_lib
from gensar_jax.identifiers import structure as structure_lib
from gensar_jax.identifiers import table as table_lib
from gensar_jax.identifiers.text_encoder import SentenceEncoder
from gensar_jax.io_utils import atomic_output_dir, write_json


def rec_sequences(prepared_dir: str) -> Tuple[List[np.ndarray], Dict[str, Tuple]]:
  """Per-user training rec item sequences, and the held-out rec samples to score.

  The sequences come from the whole ordered rec log that `prepare` writes
  (gensar_jax/data/sequences.py), cut at each user's first held-out interaction, not from
  the train samples (shuffled, with 5-item histories). A held-out rec target is scored
  from every rec item of the user before it. Returns (train sequences, {split:
  (histories, candidates)}).
  """
  rows = {row["user_id"]: row for row in sequences_lib.load_rec_sequences(prepared_dir)}
  sequences = [np.asarray(r["items"][:r["train_end"]], np.int64) for r in rows.values()
               if r["train_end"] > 0]
  heldout = {}
  for split in ("validation", "test"):
    c = read_columns(prepared_dir, split, ["user_id", "kind", "target_index",
                                           "candidate_indices"])
    histories, candidates = [], []
    for user, kind, target, cands in zip(c["user_id"], c["kind"], c["target_index"],
                                         c["candidate_indices"]):
      if kind != REC:
        continue
      row = rows.get(user)
      position = None if row is None else row["heldout"].get(split)
      if position is None or row["items"][position:position + 1] != [int(target)]:
        raise DataError(f"{prepared_dir}/{sequences_lib.FILE_NAME}: user {user!r} has no "
                        f"{split} rec target {int(target)} at the position it records; "
                        "the file and the shards come from different prepare runs")
      if position == 0:
        continue  # nothing to predict from (SASRec scores histories of >= 1 item)
      histories.append(np.asarray(row["items"][:position], np.int64))
      candidates.append(np.asarray(cands, np.int64))
    heldout[split] = (histories, np.stack(candidates) if candidates
                      else np.zeros((0, 0), np.int64))
  return sequences, heldout


def _identifier_structure(prepared, assignment: assignment_lib.IdentifierAssignment,
                          semantic: Optional[np.ndarray],
                          collaborative: Optional[np.ndarray]) -> Dict:
  """What the final identifiers mean (gensar_jax/identifiers/structure.py), measured with
  the items' categories and queries; a column the prepared items lack is skipped."""
  items = prepared.items
  return structure_lib.structure_of_assignment(
      assignment, semantic, collaborative,
      categories=(structure_lib.category_labels(items["categories"])
                  if "categories" in items else None),
      queries=list(items["queries"]) if "queries" in items else None,
      latents=assignment.latents)


@gin.configurable
def identify(prepared_dir: str = gin.REQUIRED, output_dir: str = gin.REQUIRED,
             rqvae_config: Optional[rqvae_lib.RQVAEConfig] = None,
             sasrec_config: Optional[sasrec_lib.SASRecConfig] = None,
             overwrite: bool = False) -> Dict:
  """Runs the identifiers stage; returns the identifier statistics."""
  if os.path.exists(output_dir) and not overwrite:
    raise FileExistsError(f"{output_dir}: output exists; bind identify.overwrite=True")
  prepared = load_prepared(prepared_dir)
  rqvae_config = rqvae_config or rqvae_lib.RQVAEConfig()
  mode = rqvae_config.mode
  item_ids = list(prepared.items["item_id"])

  semantic = collaborative = encoder = None
  sasrec_metrics = {}
  if mode != "cid_only":
    encoder = SentenceEncoder()
    semantic = encoder.encode(prepared.item_texts())  # [items, d_s]
  if mode != "sid_only":
    sequences, heldout = rec_sequences(prepared_dir)
    result = sasrec_lib.train_sasrec(sequences, len(item_ids), sasrec_config,
                                     validation=heldout["validation"])
    collaborative = result.item_embeddings  # [items, d_c]
    sasrec_metrics = {split: sasrec_lib.evaluate_sasrec(result, *heldout[split])
                      for split in heldout}
  rqvae_lib.validate_embeddings(semantic, collaborative, rqvae_config)

  trained = rqvae_lib.train_rqvae(semantic, collaborative, rqvae_config)
  assignment = assignment_lib.assign_identifiers(trained, semantic, collaborative,
                                                 rqvae_config)
  structure = _identifier_structure(prepared, assignment, semantic, collaborative)
  with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
    staged = os.path.join(tmp, "table")
    table_lib.write_identifier_table(
        staged, item_ids, assignment,
        {"rqvae_history": trained.history, "sasrec": sasrec_metrics,
         "prepared_dir": os.path.abspath(prepared_dir), "structure": structure})
    for name in os.listdir(staged):
      os.replace(os.path.join(staged, name), os.path.join(tmp, name))
    os.rmdir(staged)
    structure_lib.plot_structure(os.path.join(tmp, structure_lib.PLOT_FILE), structure)
    if semantic is not None:
      np.save(os.path.join(tmp, "semantic_embeddings.npy"), semantic.astype(np.float32))
    if collaborative is not None:
      np.save(os.path.join(tmp, "collaborative_embeddings.npy"),
              collaborative.astype(np.float32))
    write_json(os.path.join(tmp, "sasrec_metrics.json"), sasrec_metrics)
    # What gives items added later their codes (gensar_jax/add_items.py).
    rqvae_store.save_rqvae(tmp, trained, None if encoder is None
                           else rqvae_store.encoder_settings(encoder))
    with open(os.path.join(tmp, "config.gin"), "w", encoding="utf-8") as f:
      f.write(gin.operative_config_str())
  return {**assignment.stats, "sasrec": sasrec_metrics, "structure": structure}


def format_identifier_stats(stats: Dict) -> str:
  """The headline numbers of an identifier table, for the terminal and README."""
  lines = [f"identifiers: mode {stats['mode']}, {stats['num_items']:,} items, "
           f"{stats['codebook_size']} codes per level", "-" * 64]
  for space, phases in stats.get("collisions", {}).items():
    rates = ", ".join(f"{phase} {v['collision_rate']:.2%} ({v['colliding_items']} items)"
                      for phase, v in phases.items())
    lines.append(f"{space.upper()} collisions: {rates}")
  moved = stats.get("dedup_moved_items", {})
  if moved:
    lines.append(f"moved by final de-duplication: {moved.get('total', 0)} items")
  share = stats.get("sid_cid_shared_prefix_share")
  if share is not None:  # None when the mode has only one identifier space
    lines.append(f"items whose SID and CID share the prefix: {share:.1%}")
  lines.append("code usage per level (codes used / perplexity):")
  for level, usage in stats.get("code_usage", {}).items():
    lines.append(f"  {level:<4} {usage['codes_used']:>4} / {usage['perplexity']:7.1f}")
  for split, metrics in stats.get("sasrec", {}).items():
    lines.append(f"SASRec {split}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
  if stats.get("structure"):
    lines.append(structure_lib.format_structure(stats["structure"]))
  return "\n".join(lines)


def main() -> None:
  stats = identify()
  print(format_identifier_stats(stats))

