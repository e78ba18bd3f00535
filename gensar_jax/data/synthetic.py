"""A seeded synthetic catalogue and event log in the generic CSV format, at any size.

Why: the stages must be measured at the sizes users train on (the published
Amazon-Electronics split has 62,671 items, 192,000 users and 1.62M interactions), and no
real log of that size ships with the code. The generator writes what
gensar_jax/data/loaders/generic.py reads:

  items.csv    item_id, title, description, categories ("Electronics > Sub > Leaf")
  events.csv   user_id, timestamp, item_id [, kind, query]

and is shaped like a review log where it matters for the stages' cost: every item has a
title, a description and a 3-level category path (so every interaction yields a
semi-synthetic search session, as with Amazon), item popularity is Zipf-like, each user
leans towards one sub-category (so SASRec and the RQ-VAE have structure to find), users have
at least `min_events` interactions (a 5-core log) and a geometric tail. With
`search_fraction` > 0 a share of the interactions is written as real search sessions whose
query is the leaf category's words plus one title word; the log then has search events and
prepare synthesises none.

  python -m gensar_jax.data.synthetic --out /tmp/scale/electronics --scale 1.0

Everything is drawn from one numpy generator seeded by `seed`, in whole-array operations
(no per-event Python), so 10x Electronics (16M events) is written in about a minute.
"""
from __future__ import annotations

import argparse
import json
import dataclasses
import os
from typing import Dict

import numpy as np
import pandas as pd

# The published Amazon-Electronics 5-core split (the paper's dataset table).
ELECTRONICS_ITEMS = 62_671
ELECTRONICS_USERS = 192_000
ELECTRONICS_EVENTS = 1_620_000

_SUBCATEGORIES = (
    "Computers & Accessories", "Camera & Photo", "Headphones", "Portable Audio & Video",
    "Television & Video", "Car Electronics", "Home Audio", "Cell Phones & Accessories",
    "Video Game Consoles", "Wearable Technology", "Security & Surveillance", "GPS & Navigation",
    "Office Electronics", "Power Accessories", "Musical Instruments", "Smart Home",
    "Networking Products", "Data Storage", "Printers & Scanners", "Batteries & Chargers")
_LEAF_WORDS = (
    "cables", "adapters", "cases", "chargers", "speakers", "microphones", "mounts", "stands",
    "lenses", "tripods", "filters", "keyboards", "mice", "monitors", "routers", "switches",
    "drives", "memory", "cards", "hubs", "docks", "earbuds", "amplifiers", "receivers",
    "antennas", "projectors", "remotes", "sensors", "cameras", "controllers", "screens",
    "batteries", "lights", "bags", "covers", "players", "recorders", "tuners", "modems",
    "printers")
_QUALIFIERS = ("Wireless", "Portable", "Compact", "Professional", "Outdoor", "Gaming",
               "Studio", "Travel", "Digital", "Smart", "USB", "Bluetooth", "HD", "Mini",
               "Rugged", "Premium")
_BRANDS = tuple(f"{a}{b}" for a in ("Vol", "Kan", "Zen", "Aur", "Pix", "Tek", "Nor", "Lum")
                for b in ("tra", "ix", "o", "ex", "ara", "on", "ia", "us"))  # 64 brands
_ADJECTIVES = ("durable", "lightweight", "fast", "reliable", "slim", "powerful", "quiet",
               "sturdy", "versatile", "ergonomic", "waterproof", "adjustable", "efficient",
               "high-resolution", "low-latency", "long-lasting")
_NOUNS = ("design", "build", "performance", "connection", "battery", "finish", "housing",
          "signal", "sound", "picture", "grip", "interface", "warranty", "charging", "setup",
          "range")


@dataclasses.dataclass(frozen=True)
class SyntheticSize:
  """How big a log to make; `scale(f)` is Electronics times f."""
  items: int
  users: int
  events: int

  @classmethod
  def electronics(cls, factor: float = 1.0) -> "SyntheticSize":
    return cls(items=max(200, int(round(ELECTRONICS_ITEMS * factor))),
               users=max(50, int(round(ELECTRONICS_USERS * factor))),
               events=max(500, int(round(ELECTRONICS_EVENTS * factor))))


def _leaf_paths(num_leaves: int) -> np.ndarray:
  """[num_leaves] distinct "Electronics > Sub > Qualifier leaf" strings, in a fixed order."""
  paths = []
  for q in _QUALIFIERS:
    for sub in _SUBCATEGORIES:
      for leaf in _LEAF_WORDS:
        paths.append(f"Electronics > {sub} > {q} {leaf.capitalize()}")
        if len(paths) == num_leaves:
          return np.array(paths, dtype=object)
  return np.array(paths, dtype=object)


def num_leaves_for(items: int) -> int:
  """Leaf categories grow like the square root of the catalogue (about 1,000 at
  Electronics size, Amazon's order of magnitude), so a leaf holds ~60 items there."""
  return int(np.clip(round(4 * np.sqrt(items)), 8, len(_QUALIFIERS) * len(_SUBCATEGORIES)
                     * len(_LEAF_WORDS)))


def _pick(words, index: np.ndarray) -> np.ndarray:
  """words[index] as an object array of str ([n])."""
  return np.asarray(words, dtype=object)[index % len(words)]


def make_items(num_items: int, rng: np.random.Generator) -> pd.DataFrame:
  """The catalogue: item_id, title, description, categories; plus the hidden `leaf`."""
  num_leaves = num_leaves_for(num_items)
  leaves = _leaf_paths(num_leaves)
  leaf = rng.integers(0, num_leaves, num_items)                       # [items]
  words = rng.integers(0, 1 << 30, (num_items, 6))                    # [items, 6]
  leaf_name = np.array([p.rsplit("> ", 1)[1] for p in leaves], dtype=object)[leaf]
  model = rng.integers(100, 10_000, num_items).astype(str).astype(object)
  title = (_pick(_BRANDS, words[:, 0]) + " " + _pick(_ADJECTIVES, words[:, 1]).astype(object)
           + " " + leaf_name + " " + model)
  description = ("A " + _pick(_ADJECTIVES, words[:, 2]) + " " + leaf_name.astype(str).astype(
      object) + " with a " + _pick(_ADJECTIVES, words[:, 3]) + " " + _pick(_NOUNS, words[:, 4])
      + " and a " + _pick(_ADJECTIVES, words[:, 5]) + " " + _pick(_NOUNS, words[:, 5] >> 7)
      + ".")
  ids = np.char.add("I", np.char.zfill(np.arange(num_items).astype(str), 7))
  return pd.DataFrame({"item_id": ids, "title": title, "description": description,
                       "categories": leaves[leaf], "leaf": leaf})


def make_events(items: pd.DataFrame, size: SyntheticSize, rng: np.random.Generator,
                min_events: int = 5, affinity: float = 0.6,
                search_fraction: float = 0.0) -> pd.DataFrame:
  """The log: user_id, timestamp, item_id (+ kind, query when `search_fraction` > 0).

  Each user draws `min_events` plus a geometric number of interactions (mean
  events / users overall), each interaction with probability `affinity` from the user's
  favourite leaf category (by popularity within it), otherwise from the whole catalogue
  by Zipf popularity.
  """
  num_items, num_users = len(items), size.users
  extra_mean = max(size.events / num_users - min_events, 0.0)
  extra = (rng.geometric(1.0 / (1.0 + extra_mean), num_users) - 1 if extra_mean > 0
           else np.zeros(num_users, np.int64))
  per_user = min_events + extra                                        # [users]
  user_of = np.repeat(np.arange(num_users), per_user)                  # [events]
  n = len(user_of)
  # Zipf popularity over a random permutation of the catalogue.
  popularity = 1.0 / np.arange(1, num_items + 1) ** 0.8
  popularity = popularity[rng.permutation(num_items)]                  # [items]
  global_cdf = np.cumsum(popularity) / popularity.sum()
  item = np.searchsorted(global_cdf, rng.random(n), side="right").clip(0, num_items - 1)
  # Favourite-leaf draws: items sorted by leaf; a popularity CDF within each leaf block.
  leaf = items["leaf"].to_numpy()
  by_leaf = np.argsort(leaf, kind="stable")                            # [items]
  leaf_sorted = leaf[by_leaf]
  num_leaves = int(leaf.max()) + 1
  block_start = np.searchsorted(leaf_sorted, np.arange(num_leaves))    # [leaves]
  block_end = np.searchsorted(leaf_sorted, np.arange(num_leaves), side="right")
  cum = np.cumsum(popularity[by_leaf])                                 # [items]
  base = np.where(block_start > 0, cum[block_start - 1], 0.0)          # [leaves]
  nonempty = np.flatnonzero(block_end > block_start)
  favourite = nonempty[rng.integers(0, len(nonempty), num_users)]      # [users]
  use_fav = rng.random(n) < affinity
  fav = favourite[user_of[use_fav]]                                    # [m]
  target = base[fav] + rng.random(len(fav)) * (cum[block_end[fav] - 1] - base[fav])
  pos = np.clip(np.searchsorted(cum, target, side="right"), block_start[fav],
                block_end[fav] - 1)
  item[use_fav] = by_leaf[pos]
  # Timestamps: each user starts somewhere in 2010-2014 and acts every ~1-60 days.
  start = rng.integers(1_262_304_000, 1_388_534_400, num_users)        # [users]
  gaps = rng.integers(3_600, 60 * 86_400, n)                           # [events]
  first = np.r_[0, np.cumsum(per_user)[:-1]]
  cum_gaps = np.cumsum(gaps)
  timestamp = start[user_of] + cum_gaps - (cum_gaps[first] - gaps[first])[user_of]
  frame = {
      "user_id": np.char.add("U", np.char.zfill(user_of.astype(str), 7)),
      "timestamp": timestamp,
      "item_id": items["item_id"].to_numpy()[item],
  }
  if search_fraction > 0:
    search = rng.random(n) < search_fraction
    leaf_query = np.array([p.split(" > ", 1)[1].replace(" > ", " ").replace("&", "").lower()
                           for p in _leaf_paths(num_leaves)], dtype=object)
    query = np.where(search, leaf_query[leaf[item]], "")
    frame["kind"] = np.where(search, "search", "rec")
    frame["query"] = query
  return pd.DataFrame(frame)


def generate(out_dir: str, size: SyntheticSize, seed: int = 0,
             search_fraction: float = 0.0) -> Dict[str, str]:
  """Writes items.csv and events.csv under `out_dir`; returns their paths and counts."""
  rng = np.random.default_rng([seed, 0x5CA1E])
  items = make_items(size.items, rng)
  events = make_events(items, size, rng, search_fraction=search_fraction)
  os.makedirs(out_dir, exist_ok=True)
  items_path = os.path.join(out_dir, "items.csv")
  events_path = os.path.join(out_dir, "events.csv")
  items.drop(columns="leaf").to_csv(items_path, index=False)
  events.to_csv(events_path, index=False, chunksize=1_000_000)
  return {"items_path": items_path, "events_path": events_path, "items": len(items),
          "users": int(size.users), "events": len(events)}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="folder for items.csv and events.csv")
  parser.add_argument("--scale", type=float, default=1.0,
                      help="size as a multiple of Amazon-Electronics (62,671 items, 192,000 "
                           "users, 1.62M interactions)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--search_fraction", type=float, default=0.0,
                      help="share of interactions written as real search sessions")
  args = parser.parse_args(argv)
  info = generate(args.out, SyntheticSize.electronics(args.scale), seed=args.seed,
                  search_fraction=args.search_fraction)
  print(json.dumps(info))


if __name__ == "__main__":
  main()
