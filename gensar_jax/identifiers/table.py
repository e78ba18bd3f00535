"""The identifier table on disk: written whole or not at all, and read back.

Later stages (training data, constrained decoding, serving) all key on this table, so a
half-written one would silently corrupt everything downstream. Every input is checked
before the first byte is written; files go into a temporary directory next to the target
and the directory is renamed into place at the end. A failure at any point leaves either
the previous table or no table, never a partial one.

Layout of `out_dir`:
  identifiers.jsonl       one line per item: item_id, sid, cid (token lists), sid_codes, cid_codes
  identifier_stats.json   collision rates per phase, moved items, code usage, extra stats
  code_usage.png          items per code, one panel per level
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from gensar_jax.identifiers import assignment as assignment_lib
from gensar_jax.identifiers import rqvae as rqvae_lib
from gensar_jax.identifiers import rqvae_config as rqvae_config_lib

IDENTIFIERS_FILE = "identifiers.jsonl"
STATS_FILE = "identifier_stats.json"
PLOT_FILE = "code_usage.png"

PathLike = Union[str, os.PathLike]


@dataclasses.dataclass
class IdentifierTable:
  """A loaded identifier table; row i of every field belongs to item_ids[i]."""
  item_ids: List[Any]
  sid_tokens: Optional[List[List[str]]]
  cid_tokens: Optional[List[List[str]]]
  sid_codes: Optional[np.ndarray]  # [n, sid_length] int32
  cid_codes: Optional[np.ndarray]  # [n, cid_length] int32
  stats: Dict[str, Any]

  def __len__(self) -> int:
    return len(self.item_ids)

  def vocabulary(self) -> List[str]:
    """Every identifier token of the table's levels (shared levels once)."""
    names = list(dict.fromkeys(self.stats["sid_levels"] + self.stats["cid_levels"]))
    return [f"<{n}_{c}>" for n in names for c in range(self.stats["codebook_size"])]


def _json_item_id(item_id: Any) -> Union[str, int]:
  if isinstance(item_id, (np.integer,)):
    return int(item_id)
  if isinstance(item_id, np.str_):
    return str(item_id)
  if isinstance(item_id, (str, int)) and not isinstance(item_id, bool):
    return item_id
  raise ValueError(f"item ids must be str or int, got {type(item_id).__name__}: {item_id!r}")


def _validate(item_ids: Sequence[Any], assignment: assignment_lib.IdentifierAssignment,
              extra_stats: Optional[Dict[str, Any]]) -> Tuple[List[Any], str]:
  """All checks that can fail, done before anything touches the disk."""
  ids = [_json_item_id(i) for i in item_ids]
  n = assignment.num_items
  if len(ids) != n:
    raise ValueError(f"item_ids has {len(ids)} entries but the assignment has {n} items")
  if len(set(ids)) != len(ids):
    raise ValueError("item_ids contains duplicates")
  for name, codes in (("SID", assignment.sid_codes), ("CID", assignment.cid_codes)):
    if codes is not None:
      if codes.shape[0] != n:
        raise ValueError(f"{name} codes have {codes.shape[0]} rows, expected {n}")
      if np.unique(codes, axis=0).shape[0] != n:
        raise ValueError(f"{name}s are not unique; refusing to write the table")
  stats = {**assignment.stats, **(extra_stats or {})}
  try:
    stats_text = json.dumps(stats, indent=2, allow_nan=True, default=_json_default)
  except (TypeError, ValueError) as e:
    raise ValueError(f"stats are not JSON-serialisable: {e}") from e
  return ids, stats_text


def _json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"{type(x).__name__} is not JSON-serialisable")


def _write_jsonl(path: pathlib.Path, ids: List[Any], assignment) -> None:
  def rows(codes, names):
    if codes is None:
      return None
    tables = [[f'"<{nm}_{c}>"' for c in range(assignment.codebook_size)] for nm in names]
    return [("[" + ",".join(t[c] for t, c in zip(tables, row)) + "]",
             "[" + ",".join(map(str, row)) + "]") for row in codes.tolist()]

  sid = rows(assignment.sid_codes, assignment.sid_levels)
  cid = rows(assignment.cid_codes, assignment.cid_levels)
  null = ("null", "null")
  with open(path, "w", encoding="utf-8") as f:
    for i, item_id in enumerate(ids):
      s = sid[i] if sid is not None else null
      c = cid[i] if cid is not None else null
      f.write(f'{{"item_id":{json.dumps(item_id)},"sid":{s[0]},"cid":{c[0]},'
              f'"sid_codes":{s[1]},"cid_codes":{c[1]}}}\n')


def _plot_code_usage(path: pathlib.Path, stats: Dict[str, Any]) -> None:
  """Items per code for every level (codes sorted by usage), one panel per level."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  usage = stats["code_usage"]
  names = list(usage)
  cols = min(4, len(names))
  rows = math.ceil(len(names) / cols)
  fig = Figure(figsize=(3.2 * cols, 2.6 * rows))
  FigureCanvasAgg(fig)
  fig.subplots_adjust(left=0.08, right=0.98, bottom=0.12, top=0.9, wspace=0.35, hspace=0.6)
  for i, name in enumerate(names):
    ax = fig.add_subplot(rows, cols, i + 1)
    counts = np.sort(np.asarray(usage[name]["counts"]))[::-1]
    # One filled step artist per panel, not one rectangle per code (256 bars x levels is slow).
    ax.stairs(counts, np.arange(counts.size + 1), fill=True)
    ax.set_title(f"{name}: {usage[name]['codes_used']} used, "
                 f"ppl {usage[name]['perplexity']:.0f}", fontsize=8)
    ax.set_xlabel("code (sorted by usage)", fontsize=7)
    ax.set_ylabel("items", fontsize=7)
    ax.tick_params(labelsize=6)
  fig.savefig(path, dpi=100)


def write_identifier_table(out_dir: PathLike, item_ids: Sequence[Any],
                           assignment: assignment_lib.IdentifierAssignment,
                           extra_stats: Optional[Dict[str, Any]] = None) -> pathlib.Path:
  """Writes the table atomically; replaces an existing table at `out_dir`.

  Args:
    out_dir: target directory (its parent is created if needed).
    item_ids: one id (str or int) per item, in the row order of the assignment.
    assignment: from `assign_identifiers`.
    extra_stats: merged at the top level of identifier_stats.json (e.g. training history).

  Returns:
    The path of the written directory.
  """
  out_dir = pathlib.Path(out_dir)
  ids, stats_text = _validate(item_ids, assignment, extra_stats)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
  old = None
  try:
    _write_jsonl(tmp / IDENTIFIERS_FILE, ids, assignment)
    (tmp / STATS_FILE).write_text(stats_text, encoding="utf-8")
    _plot_code_usage(tmp / PLOT_FILE, assignment.stats)
    if out_dir.exists():
      old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
      os.replace(out_dir, old / "table")
    os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if old is not None and not out_dir.exists():
      os.replace(old / "table", out_dir)  # put the previous table back
    raise
  finally:
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  return out_dir


def load_identifier_table(path: PathLike) -> IdentifierTable:
  """Reads a table written by `write_identifier_table`."""
  path = pathlib.Path(path)
  for name in (IDENTIFIERS_FILE, STATS_FILE):
    if not (path / name).is_file():
      raise FileNotFoundError(f"{path / name} is missing: not an identifier table")
  stats = json.loads((path / STATS_FILE).read_text(encoding="utf-8"))
  ids, sid, cid, sid_codes, cid_codes = [], [], [], [], []
  with open(path / IDENTIFIERS_FILE, encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      ids.append(row["item_id"])
      sid.append(row["sid"])
      cid.append(row["cid"])
      sid_codes.append(row["sid_codes"])
      cid_codes.append(row["cid_codes"])
  has_sid = bool(ids) and sid[0] is not None
  has_cid = bool(ids) and cid[0] is not None
  return IdentifierTable(
      item_ids=ids, sid_tokens=sid if has_sid else None, cid_tokens=cid if has_cid else None,
      sid_codes=np.asarray(sid_codes, np.int32) if has_sid else None,
      cid_codes=np.asarray(cid_codes, np.int32) if has_cid else None, stats=stats)


def build_identifier_table(out_dir: PathLike, item_ids: Sequence[Any],
                           semantic: Optional[np.ndarray], collaborative: Optional[np.ndarray],
                           config: rqvae_config_lib.RQVAEConfig = rqvae_config_lib.RQVAEConfig(),
                           extra_stats: Optional[Dict[str, Any]] = None):
  """Validate -> train -> assign -> write, the whole identify stage in one call.

  Inputs are checked first (finite tables, equal counts, one id per item), so bad input
  fails in seconds and leaves nothing on disk.

  Returns:
    (assignment, trained RQ-VAE).
  """
  tables = rqvae_config_lib.validate_embeddings(semantic, collaborative, config)
  if len(item_ids) != tables[0].shape[0]:
    raise ValueError(f"item_ids has {len(item_ids)} entries but the embedding tables have "
                     f"{tables[0].shape[0]} rows")
  trained = rqvae_lib.train_rqvae(semantic, collaborative, config)
  assignment = assignment_lib.assign_identifiers(trained, semantic, collaborative, config)
  history = {"rqvae_history": trained.history}
  write_identifier_table(out_dir, item_ids, assignment, {**history, **(extra_stats or {})})
  return assignment, trained


def _codes_by_item(text: str) -> Dict[str, Tuple]:
  rows = (json.loads(line) for line in text.splitlines() if line.strip())
  return {str(r["item_id"]): (r["sid_codes"], r["cid_codes"]) for r in rows}


def extension_problem(trained_text: str, given_text: str) -> Optional[str]:
  """Why the table `given_text` does not extend `trained_text` (two identifiers.jsonl
  contents), or None when it does: every item of both keeps its SID and CID, and no
  identifier of the trained table belongs to another item. A model trained on the first
  table decodes the second correctly; items removed since are allowed."""
  trained, given = _codes_by_item(trained_text), _codes_by_item(given_text)
  changed = [item for item in trained.keys() & given.keys() if trained[item] != given[item]]
  if changed:
    return f"{len(changed)} items have other identifiers (e.g. item {sorted(changed)[0]!r})"
  owner = {}
  for item, (sid, cid) in trained.items():
    owner[("sid", tuple(sid or ()))] = owner[("cid", tuple(cid or ()))] = item
  for item, (sid, cid) in given.items():
    for key in (("sid", tuple(sid or ())), ("cid", tuple(cid or ()))):
      if key[1] and owner.get(key, item) != item:
        return (f"item {item!r} has the {key[0].upper()} {list(key[1])} of trained item "
                f"{owner[key]!r}")
  return None

