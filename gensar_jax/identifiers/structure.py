"""What identifiers mean: how alike the items are that share an identifier prefix.

Collision rates and code usage (assignment.py) say whether identifiers are unique and
whether the codebooks are used, not what the codes stand for. We found that the shared
prefix (m0, m1) of the joint RQ-VAE grouped items by behaviour only, not by text, which
none of those numbers shows. So for the items sharing a prefix (m0, m0+m1, the full SID,
the full CID) this module measures, over pairs of distinct items in the same group,

  semantic_cosine       mean cosine of their text embeddings;
  collaborative_cosine  mean cosine of their behaviour embeddings;
  category_jaccard      mean Jaccard similarity of their category label sets (a soft
                        measure: items with several category paths rarely have identical
                        sets, yet share most labels when alike), over the pairs where
                        both items have a category;
  query_agreement       share of pairs that have at least one query in common, over the
                        pairs where both items have a query;

each beside the same figure for random pairs of distinct items. A prefix that means
"similar text" has semantic cosine and category/query agreement well above random; one
that means "similar behaviour" has collaborative cosine above random; a shared prefix of a
dual identifier should do both. Also reported: codes used and perplexity per level, and
each space's latent variance before quantisation. The shared codebook quantises both
spaces' latents concatenated, so a space with a much smaller variance hardly moves its
distances and the shared levels end up following the other space alone.

Pure numpy. Pairs are sampled (at most `max_pairs` per prefix, uniformly over the pairs,
seeded), so a 60k-item catalogue takes well under a second.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from gensar_jax.identifiers.assignment import code_usage, row_ids

PLOT_FILE = "identifier_structure.png"
# Measure key -> (table column, plot title).
MEASURES = {
    "semantic_cosine": ("sem cos", "semantic cosine"),
    "collaborative_cosine": ("col cos", "collaborative cosine"),
    "category_jaccard": ("category", "category Jaccard"),
    "query_agreement": ("query", "query agreement"),
}
SPACE_NAMES = {"sid": "semantic", "cid": "collaborative"}  # ID space -> its embedding space

LabelSets = Tuple[np.ndarray, np.ndarray]  # CSR: indptr [items + 1], label ids [entries]


def category_labels(categories: Iterable[Any]) -> List[set]:
  """Per item the set of every label on its category paths (a list of lists of strings).

  Flattening lets items that share part of a path (["Books", "Mystery"] and ["Books",
  "Poetry"]) count as partly alike. A missing value (None, NaN) is an empty set.
  """
  out = []
  for paths in categories:
    labels = set()
    if isinstance(paths, (list, tuple, np.ndarray)):
      for path in paths:
        labels.update([path] if isinstance(path, str) else path)
    out.append(labels)
  return out


def _label_sets(labels: Optional[Sequence[Any]], n: int) -> Optional[LabelSets]:
  """Per-item labels (iterables of strings) as CSR label ids; None when no item has one.

  A missing value (None, NaN) counts as no label, a bare string as one label.
  """
  if labels is None or len(labels) == 0:
    return None
  if len(labels) != n:
    raise ValueError(f"got labels for {len(labels)} items, expected {n}")
  vocab: Dict[str, int] = {}
  rows = []
  for item in labels:
    if isinstance(item, str):
      item = [item]
    elif not isinstance(item, (list, tuple, set, frozenset, np.ndarray)):
      item = []
    rows.append(sorted({vocab.setdefault(str(x), len(vocab)) for x in item}))
  if not vocab:
    return None
  indptr = np.cumsum([0] + [len(r) for r in rows]).astype(np.int64)  # [items + 1]
  ids = np.fromiter((x for r in rows for x in r), np.int64, int(indptr[-1]))  # [entries]
  return indptr, ids


def _shared_label_counts(sets: LabelSets, i: np.ndarray, j: np.ndarray) -> np.ndarray:
  """[pairs] number of labels items i and j have in common, without a Python loop.

  Every (pair, label) of both sides becomes one key; a key seen twice is a shared label.
  """
  indptr, ids = sets
  width = int(ids.max()) + 1

  def keys(items):
    lengths = indptr[items + 1] - indptr[items]  # [pairs]
    pair = np.repeat(np.arange(items.size), lengths)  # [entries]
    offset = np.arange(pair.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return pair * width + ids[np.repeat(indptr[items], lengths) + offset]

  merged = np.sort(np.concatenate([keys(i), keys(j)]))  # [entries of both sides]
  twice = merged[1:][merged[1:] == merged[:-1]]
  return np.bincount(twice // width, minlength=i.size)


def _set_sizes(sets: LabelSets, items: np.ndarray) -> np.ndarray:
  return sets[0][items + 1] - sets[0][items]  # [pairs]


def _unit_rows(table: Optional[np.ndarray], n: int) -> Optional[np.ndarray]:
  """Rows scaled to unit length (zero rows stay zero), so a dot product is the cosine."""
  if table is None:
    return None
  table = np.asarray(table, np.float32)  # [items, d]
  if table.ndim != 2 or table.shape[0] != n:
    raise ValueError(f"embedding table of shape {table.shape}, expected [{n}, d]")
  norms = np.linalg.norm(table, axis=1, keepdims=True)  # [items, 1]
  return table / np.maximum(norms, 1e-12)


def _pairs(groups: np.ndarray, max_pairs: int, rng: np.random.Generator
           ) -> Tuple[np.ndarray, np.ndarray, int]:
  """Pairs of distinct items in the same group: all, or `max_pairs` drawn uniformly.

  Args:
    groups: [items] dense group ids 0 .. G-1.
  Returns:
    (first items, second items, number of such pairs in all).

  Every pair has an index in 0 .. total-1 (groups one after the other, pairs (a, b) with
  a < b in triangular order within a group), so sampling draws indices, not items.
  """
  order = np.argsort(groups, kind="stable")  # [items] grouped
  sizes = np.bincount(groups)  # [G]
  starts = np.cumsum(sizes) - sizes  # [G]
  counts = sizes * (sizes - 1) // 2  # [G] pairs per group
  ends = np.cumsum(counts)  # [G]
  total = int(ends[-1]) if ends.size else 0
  if total <= max_pairs:
    picks = np.arange(total, dtype=np.int64)
  else:
    picks = np.sort(rng.choice(total, max_pairs, replace=False))  # [pairs]
  g = np.searchsorted(ends, picks, side="right")  # [pairs] group of each pair
  t = picks - (ends[g] - counts[g])  # [pairs] index within its group
  b = np.floor((1 + np.sqrt(1 + 8 * t.astype(np.float64))) / 2).astype(np.int64)
  b -= b * (b - 1) // 2 > t  # guard against rounding of the square root
  b += (b + 1) * b // 2 <= t
  a = t - b * (b - 1) // 2
  return order[starts[g] + a], order[starts[g] + b], total


def _mean(values: np.ndarray) -> Optional[float]:
  return float(np.mean(values)) if values.size else None


def _pair_measures(features: Dict[str, Any], i: np.ndarray, j: np.ndarray
                   ) -> Dict[str, Optional[float]]:
  """Every measure of MEASURES over the pairs (i[p], j[p]); None where it has no data."""
  out = {}
  for key, space in (("semantic_cosine", "semantic"),
                     ("collaborative_cosine", "collaborative")):
    unit = features[space]
    out[key] = None if unit is None else _mean(np.sum(unit[i] * unit[j], axis=1))
  for key, name in (("category_jaccard", "categories"), ("query_agreement", "queries")):
    sets = features[name]
    if sets is None:
      out[key] = None
      continue
    size_i, size_j = _set_sizes(sets, i), _set_sizes(sets, j)  # [pairs]
    known = (size_i > 0) & (size_j > 0)
    shared = _shared_label_counts(sets, i[known], j[known])  # [known pairs]
    if key == "category_jaccard":
      out[key] = _mean(shared / (size_i[known] + size_j[known] - shared))
    else:
      out[key] = _mean((shared > 0).astype(np.float64))
  return out


def _spaces(sid_codes, cid_codes, sid_levels, cid_levels
            ) -> Dict[str, Tuple[np.ndarray, Tuple[str, ...]]]:
  """{"sid"/"cid": ([items, levels] codes, level names)} for the spaces the mode has."""
  out = {}
  for name, codes, levels in (("sid", sid_codes, sid_levels), ("cid", cid_codes, cid_levels)):
    if codes is None:
      continue
    codes = np.asarray(codes, np.int64)  # [items, levels]
    if codes.ndim != 2:
      raise ValueError(f"{name} codes must be [items, levels], got shape {codes.shape}")
    letter = name[0]
    levels = tuple(levels) if levels is not None else tuple(
        f"{letter}{i}" for i in range(codes.shape[1]))
    if len(levels) != codes.shape[1]:
      raise ValueError(f"{len(levels)} {name} level names for {codes.shape[1]} levels")
    out[name] = (codes, levels)
  if not out:
    raise ValueError("identifier_structure needs SID codes, CID codes or both")
  if len({codes.shape[0] for codes, _ in out.values()}) > 1:
    raise ValueError("SID and CID codes have different numbers of items")
  return out


def _prefix_codes(spaces) -> Dict[str, Tuple[Tuple[str, ...], np.ndarray]]:
  """{prefix name: (level names, [items, p] codes)}: the first 1 and 2 levels, then full IDs.

  Levels with the same name in both spaces (the shared m-levels) are one prefix; a short
  prefix that is already a whole ID is left to its "sid"/"cid" row.
  """
  out = {}
  for codes, levels in spaces.values():
    for p in (1, 2):
      if p < len(levels):
        out.setdefault("+".join(levels[:p]), (levels[:p], codes[:, :p]))
  for name, (codes, levels) in spaces.items():
    out[name] = (levels, codes)
  return out


def latent_variance(latents: np.ndarray, spaces: Sequence[str]) -> Dict[str, Optional[float]]:
  """Total variance (sum over dimensions of the per-dimension variance) of each space's
  part of the encoder output r0, and the semantic / collaborative ratio.

  Args:
    latents: [items, len(spaces) * latent] r0 as `rqvae.encode_and_quantize` returns it,
      the spaces' latents side by side in `spaces` order.
    spaces: e.g. ("semantic", "collaborative") or ("semantic",).
  """
  latents = np.asarray(latents, np.float64)  # [items, spaces * latent]
  if latents.ndim != 2 or latents.shape[1] % len(spaces):
    raise ValueError(f"latents of shape {latents.shape} do not split into {len(spaces)} spaces")
  parts = np.split(latents, len(spaces), axis=1)  # spaces x [items, latent]
  out: Dict[str, Optional[float]] = {
      s: float(p.var(axis=0).sum()) for s, p in zip(spaces, parts)}
  both = "semantic" in out and "collaborative" in out and out["collaborative"] > 0
  out["semantic_to_collaborative"] = (out["semantic"] / out["collaborative"]) if both else None
  return out


def identifier_structure(sid_codes: Optional[np.ndarray], cid_codes: Optional[np.ndarray],
                         semantic: Optional[np.ndarray], collaborative: Optional[np.ndarray],
                         categories: Optional[Sequence[Any]] = None,
                         queries: Optional[Sequence[Any]] = None,
                         latents: Optional[np.ndarray] = None, *,
                         sid_levels: Optional[Sequence[str]] = None,
                         cid_levels: Optional[Sequence[str]] = None,
                         codebook_size: Optional[int] = None, seed: int = 0,
                         max_pairs: int = 20000) -> Dict[str, Any]:
  """The structure diagnostics of one identifier table (see the module docstring).

  Args:
    sid_codes, cid_codes: [items, levels] codes; either may be None (sid_only, cid_only).
    semantic, collaborative: [items, d] embedding tables; None skips that cosine.
    categories, queries: per item an iterable of labels (strings; see `category_labels`
      for category paths); None or empty skips that measure.
    latents: [items, spaces * latent] encoder output r0, the spaces of the given codes in
      layout order (semantic first); None skips the latent variance.
    sid_levels, cid_levels: level names (assignment.sid_levels); names both spaces start
      with are shared levels. Default: "s0", "s1", ... and "c0", "c1", ... (none shared).
    codebook_size: codes per level (default: the largest code + 1).
    seed: for the pair samples; every prefix draws from its own generator.
    max_pairs: pairs sampled per prefix and for the random baseline.

  Returns:
    {"levels": {level: {"codes_used", "perplexity"}},
     "latent_variance": {"semantic", "collaborative", "semantic_to_collaborative"} or None,
     "prefixes": {prefix: {"levels", "groups", "items_per_group", "pairs", "sampled_pairs",
                           and every key of MEASURES}},
     "random": {"pairs", "sampled_pairs", and every key of MEASURES},
     "max_pairs", "seed"}; a measure without data is None.
  """
  spaces = _spaces(sid_codes, cid_codes, sid_levels, cid_levels)
  n = next(iter(spaces.values()))[0].shape[0]
  k = codebook_size or int(max(c.max(initial=0) for c, _ in spaces.values())) + 1
  features = {"semantic": _unit_rows(semantic, n),
              "collaborative": _unit_rows(collaborative, n),
              "categories": _label_sets(categories, n), "queries": _label_sets(queries, n)}
  levels = {}
  for codes, names in spaces.values():
    for j, name in enumerate(names):
      if name not in levels:
        usage = code_usage(codes[:, j], k)
        levels[name] = {"codes_used": usage["codes_used"], "perplexity": usage["perplexity"]}

  def measured(groups: np.ndarray, index: int) -> Dict[str, Any]:
    i, j, total = _pairs(groups, max_pairs, np.random.default_rng([seed, index]))
    return {"pairs": total, "sampled_pairs": int(i.size), **_pair_measures(features, i, j)}

  prefixes = {}
  for index, (name, (names, codes)) in enumerate(_prefix_codes(spaces).items(), start=1):
    groups = row_ids(codes, k)  # [items]
    count = int(groups.max()) + 1 if n else 0
    prefixes[name] = {"levels": list(names), "groups": count,
                      "items_per_group": n / count if count else 0.0,
                      **measured(groups, index)}
  variance = None
  if latents is not None:
    variance = latent_variance(latents, [SPACE_NAMES[s] for s in spaces])
  return {"levels": levels, "latent_variance": variance, "prefixes": prefixes,
          "random": measured(np.zeros((n,), np.int64), 0), "max_pairs": max_pairs,
          "seed": seed}


def structure_of_assignment(assignment, semantic: Optional[np.ndarray],
                            collaborative: Optional[np.ndarray],
                            categories: Optional[Sequence[Any]] = None,
                            queries: Optional[Sequence[Any]] = None,
                            latents: Optional[np.ndarray] = None, **kwargs) -> Dict[str, Any]:
  """`identifier_structure` of the final codes of an `assign_identifiers` result."""
  return identifier_structure(
      assignment.sid_codes, assignment.cid_codes, semantic, collaborative, categories,
      queries, latents, sid_levels=assignment.sid_levels or None,
      cid_levels=assignment.cid_levels or None, codebook_size=assignment.codebook_size,
      **kwargs)


def _cell(value: Optional[float], baseline: Optional[float]) -> str:
  if value is None and baseline is None:
    return "-"
  shown = "-" if value is None else f"{value:.3f}"
  return shown + ("" if baseline is None else f" ({baseline:.3f})")


def format_structure(structure: Dict[str, Any]) -> str:
  """The diagnostics as a text table: one row per prefix, random pairs in brackets."""
  lines = ["identifier structure: pairs of distinct items sharing a prefix "
           "(random pairs in brackets)"]
  variance = structure.get("latent_variance")
  if variance:
    parts = [f"{s} {variance[s]:.4g}" for s in SPACE_NAMES.values() if s in variance]
    ratio = variance.get("semantic_to_collaborative")
    lines.append("latent variance before quantisation: " + ", ".join(parts)
                 + ("" if ratio is None else f" (semantic / collaborative {ratio:.3g})"))
  header = (f"  {'prefix':<8} {'groups':>7} {'items/group':>11}" + "".join(
      f"  {column:<15}" for column, _ in MEASURES.values())).rstrip()
  lines += [header, "  " + "-" * (len(header) - 2)]
  random = structure["random"]
  for name, row in structure["prefixes"].items():
    lines.append((f"  {name:<8} {row['groups']:>7,} {row['items_per_group']:>11.2f}" + "".join(
        f"  {_cell(row[key], random[key]):<15}" for key in MEASURES)).rstrip())
  return "\n".join(lines)


def plot_structure(path: "os.PathLike | str", structure: Dict[str, Any]) -> None:
  """Writes a PNG: one panel per measure, per prefix a bar beside the random-pair bar.

  Prefixes without a pair of items (unique full IDs) have nothing to show and are left out.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  prefixes = [name for name, row in structure["prefixes"].items() if row["sampled_pairs"]]
  random = structure["random"]
  keys = [k for k in MEASURES if random[k] is not None] or list(MEASURES)[:1]
  cols = min(2, len(keys))
  rows = math.ceil(len(keys) / cols)
  fig = Figure(figsize=(max(4.0, 0.9 * len(prefixes) + 1.5) * cols, 2.8 * rows))
  FigureCanvasAgg(fig)
  fig.subplots_adjust(left=0.08, right=0.98, bottom=0.12, top=0.88, wspace=0.3, hspace=0.6)
  x = np.arange(len(prefixes))  # [prefixes]
  for p, key in enumerate(keys):
    ax = fig.add_subplot(rows, cols, p + 1)
    within = [structure["prefixes"][name][key] for name in prefixes]
    ax.bar(x - 0.2, [np.nan if v is None else v for v in within], 0.4, label="same prefix")
    base = np.nan if random[key] is None else random[key]
    ax.bar(x + 0.2, [base] * len(prefixes), 0.4, color="0.7", label="random pairs")
    ax.set_xticks(x, prefixes, fontsize=7)
    ax.set_title(MEASURES[key][1], fontsize=8)
    ax.tick_params(labelsize=6)
    if p == 0:
      ax.legend(fontsize=6)
  fig.savefig(path, dpi=100)
