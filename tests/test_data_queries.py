"""Tests of semi-synthetic search: category path -> query text -> search sessions."""
import numpy as np
import pytest

from gensar_jax.data import queries
from gensar_jax.data.schema import REC, SEARCH, SearchRecLog, make_events, make_items


@pytest.mark.parametrize("path, expected", [
    (["Electronics", "Computers & Accessories", "Cables & Accessories"],
     "electronics computers accessories cables"),
    # Ai et al.'s own example shape: stop-words and repeats gone, order of first use kept.
    (["Office Products", "Office & School Supplies", "Presentation Supplies",
      "Projection Screens"], "office products school supplies presentation projection screens"),
    (["Movies & TV", "The Best of the Best"], "movies tv best"),
    (["Clothing", "Men's"], "clothing men"),
    (["Sci-Fi", "1990s"], "sci fi 1990s"),
    (["ELECTRONICS", "electronics"], "electronics"),  # repeated word across levels
])
def test_category_path_to_query(path, expected):
  assert queries.category_path_to_query(path) == expected


@pytest.mark.parametrize("path", [[], ["Electronics"], ["The", "Of & And"]])
def test_paths_that_make_no_query(path):
  """One-level paths are ignored; so are paths with no content words."""
  assert queries.category_path_to_query(path) is None


def test_item_queries_distinct_in_path_order():
  cats = [
      [["Electronics"], ["Electronics", "Audio"], ["Electronics", "Audio"],
       ["Gifts", "For Him"]],
      [],
      [["Books"]],
  ]
  assert queries.item_queries(cats) == [["electronics audio", "gifts"], [], []]


def test_normalise_query():
  assert queries.normalise_query("  Blue   HAT\t") == "blue hat"


def _log(n_interactions=200, seed=0):
  rng = np.random.default_rng(seed)
  items = make_items(
      ["multi", "single", "flat", "none"], ["M", "S", "F", "N"], ["", "", "", ""],
      [[["Electronics", "Audio"], ["Electronics", "Cables"], ["Gifts", "For Him"]],
       [["Home", "Kitchen", "Coffee Makers"]],
       [["Electronics"]],  # one level only: no query
       []])
  item_ids = rng.choice(["multi", "single", "flat", "none"], size=n_interactions)
  users = rng.choice(["u1", "u2", "u3"], size=n_interactions)
  times = rng.integers(0, 50, size=n_interactions)
  events = make_events(users, times, [REC] * n_interactions, item_ids,
                       [""] * n_interactions, range(n_interactions),
                       range(1, n_interactions + 1))
  return SearchRecLog(items=items, events=events, items_path="items", events_path="events")


def test_add_semi_synthetic_search():
  log = _log()
  out = queries.add_semi_synthetic_search(log, seed=0)
  rec = out.events[out.events["kind"] == REC]
  search = out.events[out.events["kind"] == SEARCH]
  # The rec events are untouched: every interaction stays a recommendation event.
  assert rec.reset_index(drop=True).equals(log.events)
  # One search session per interaction whose item carries a query, none for the others.
  has_query = log.events["item_id"].isin(["multi", "single"])
  assert len(search) == int(has_query.sum())
  assert sorted(search["interaction"]) == sorted(log.events.loc[has_query, "interaction"])
  # Each session copies its interaction's user, time, item and line, and uses a query of
  # that item.
  merged = search.merge(log.events, on="interaction", suffixes=("", "_rec"))
  for col in ("user_id", "timestamp", "item_id", "line"):
    assert (merged[col] == merged[col + "_rec"]).all()
  allowed = {"multi": {"electronics audio", "electronics cables", "gifts"},
             "single": {"home kitchen coffee makers"}}
  for item, query in zip(search["item_id"], search["query"]):
    assert query in allowed[item]
  # An item with several paths spreads its sessions over its queries.
  assert set(search.loc[search["item_id"] == "multi", "query"]) == allowed["multi"]


def test_semi_synthetic_search_is_seeded():
  log = _log()
  a = queries.add_semi_synthetic_search(log, seed=0).events
  b = queries.add_semi_synthetic_search(log, seed=0).events
  c = queries.add_semi_synthetic_search(log, seed=1).events
  assert a.equals(b)
  assert not a["query"].equals(c["query"])
