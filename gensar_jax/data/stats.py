"""The dataset statistics table, in the shape of the paper's (users, items, queries,
interactions, rows per split), plus what the filters removed."""
from __future__ import annotations

from typing import Dict

from gensar_jax.data.samples import SPLITS
from gensar_jax.data.schema import KINDS


def format_stats_table(stats: Dict) -> str:
  """A plain-text table for the terminal and the README."""
  rows = [
      ("users", stats["users"]),
      ("items", stats["items"]),
      ("queries", stats["queries"]),
      ("rec interactions", stats["rec_interactions"]),
      ("search interactions", stats["search_interactions"]),
  ]
  for kind in KINDS:
    for split in SPLITS:
      rows.append((f"{kind} {split} rows", stats["rows"][kind][split]))
  for name, value in stats["filtered"].items():
    rows.append((f"filtered: {name.replace('_', ' ')}", value))
  for name, value in stats.get("item_text", {}).items():  # how item texts were made
    rows.append((f"text: {name.replace('_', ' ')}", value))
  width = max(len(name) for name, _ in rows)
  title = f"dataset: {stats['name']}"
  lines = [title, "-" * max(len(title), width + 12)]
  lines += [f"{name:<{width}}  {value:>10,}" for name, value in rows]
  return "\n".join(lines)
