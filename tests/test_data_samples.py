"""Tests of event order, histories, filtering and the leave-one-out split (samples.py).

Logs are built in memory. Expected histories are recomputed by brute force from the
definition in docs/evaluation.md#samples-and-the-split, not from the implementation's bookkeeping:
events from interactions strictly earlier in (timestamp, file order), the last 5 rec items
and the last 5 search sessions, merged back into time order.
"""
import collections

import numpy as np
import pytest

from gensar_jax.data import queries
from gensar_jax.data.samples import SPLITS, build_samples, order_events
from gensar_jax.data.schema import REC, SEARCH, SearchRecLog, make_events, make_items


def make_log(rows, items=None):
  """rows: (user, time, kind, item, query, interaction); lines are 1-based list positions."""
  items = items or sorted({r[3] for r in rows})
  item_frame = make_items(items, items, [""] * len(items), [[] for _ in items])
  users, times, kinds, item_ids, qs, inter = zip(*rows)
  events = make_events(users, times, kinds, item_ids, qs, inter, range(1, len(rows) + 1))
  return SearchRecLog(items=item_frame, events=events, items_path="items.csv",
                      events_path="events.csv")


def semi_synthetic(user_times_items, no_query=(), start=0):
  """(user, time, item) interactions -> rec + search rows sharing the interaction number
  (numbered from `start`), all rec rows first as add_semi_synthetic_search writes them."""
  rows = []
  for i, (user, t, item) in enumerate(user_times_items, start=start):
    rows.append((user, t, REC, item, "", i))
  for i, (user, t, item) in enumerate(user_times_items, start=start):
    if item not in no_query:
      rows.append((user, t, SEARCH, item, f"q {item}", i))
  return rows


def random_log(seed, num_users=12, real_search=False):
  """Many users, heavy timestamp ties, items of several kinds; search semi-synthetic or real."""
  rng = np.random.default_rng(seed)
  rows = []
  for u in range(num_users):
    n = int(rng.integers(1, 30))
    times = np.sort(rng.integers(0, 8, size=n))  # few distinct seconds: many ties
    for t in times:
      item = f"i{int(rng.integers(0, 15))}"
      if real_search and rng.random() < 0.4:
        rows.append((f"u{u}", int(t), SEARCH, item, f"query {int(rng.integers(3))}"))
      else:
        rows.append((f"u{u}", int(t), REC, item, ""))
  order = rng.permutation(len(rows))  # file order is not time order
  rows = [rows[i] for i in order]
  rows = [r + (i,) for i, r in enumerate(rows)]
  log = make_log(rows, items=[f"i{i}" for i in range(15)])
  if real_search:
    return log
  items = log.items.copy()
  items["categories"] = [[["Cat", f"Sub{i % 4}"]] if i % 5 else [] for i in range(15)]
  log = SearchRecLog(items=items, events=log.events, items_path="items.csv",
                     events_path="events.csv")
  return queries.add_semi_synthetic_search(log, seed=seed)


# --------------------------------------------------------------------------- order


def test_order_events_tie_break_keeps_file_order():
  rows = [
      ("u", 30, REC, "z", "", 0),
      ("u", 10, REC, "y", "", 1),
      ("u", 10, SEARCH, "x", "q", 2),
      ("u", 10, REC, "w", "", 3),
      ("a", 99, REC, "v", "", 4),
  ]
  ordered = order_events(make_log(rows).events)
  assert list(ordered["item_id"]) == ["v", "y", "x", "w", "z"]
  assert list(ordered["line"]) == [5, 2, 3, 4, 1]


def test_order_events_semi_synthetic_halves_adjacent_rec_first():
  rows = semi_synthetic([("u", 5, "b"), ("u", 5, "a"), ("u", 1, "c")])
  ordered = order_events(make_log(rows).events)
  assert list(zip(ordered["item_id"], ordered["kind"])) == [
      ("c", REC), ("c", SEARCH), ("b", REC), ("b", SEARCH), ("a", REC), ("a", SEARCH)]


# --------------------------------------------------------------------------- histories


def brute_force_history(events, target, rec_history=5, search_history=5):
  """Rows of the history of `target` straight from the definition; plus whether any
  earlier rec item / search session exists."""
  user, time, inter = (events[c].to_numpy() for c in ("user_id", "timestamp", "interaction"))
  is_search = (events["kind"] == SEARCH).to_numpy()
  key = lambda r: (time[r], inter[r])
  earlier = [r for r in np.flatnonzero(user == user[target]) if key(r) < key(target)]
  earlier.sort(key=lambda r: key(r) + (is_search[r],))
  rec = [r for r in earlier if not is_search[r]]
  search = [r for r in earlier if is_search[r]]
  chosen = (set(rec[max(0, len(rec) - rec_history):])
            | set(search[max(0, len(search) - search_history):]))
  return [r for r in earlier if r in chosen], bool(rec), bool(search)


@pytest.mark.parametrize("seed, real_search", [(0, False), (1, False), (2, True)])
def test_histories_match_definition(seed, real_search):
  log = random_log(seed, real_search=real_search)
  samples = build_samples(log, min_samples=1, drop_train_after_heldout=False)
  events = samples.events
  assert len(samples.target) > 50
  seen_targets = set()
  for kind, target, history in zip(samples.kind, samples.target, samples.history):
    seen_targets.add(int(target))
    assert events["kind"].iat[target] == kind
    expected, _, _ = brute_force_history(events, target)
    assert list(history) == expected
    # Never the other half of its own interaction, never anything later.
    own = events["interaction"].iat[target]
    assert own not in set(events["interaction"].to_numpy()[history])
    kinds = collections.Counter(events["kind"].to_numpy()[history])
    assert 1 <= kinds[REC] <= 5 and 1 <= kinds[SEARCH] <= 5
    times = events["timestamp"].to_numpy()[history]
    assert np.all(np.diff(times) >= 0) and np.all(times <= events["timestamp"].iat[target])
  # Every event with an earlier rec item and an earlier search session is a sample.
  for r in range(len(events)):
    _, has_rec, has_search = brute_force_history(events, r)
    assert (r in seen_targets) == (has_rec and has_search)


def test_history_keeps_last_five_of_each_kind_merged_by_time():
  # 8 rec-only interactions, then 7 semi-synthetic ones, then the target.
  rows = [("u", t, REC, f"r{t}", "", t) for t in range(8)]
  for t in range(8, 15):
    rows += [("u", t, REC, f"s{t}", "", t), ("u", t, SEARCH, f"s{t}", f"q{t}", t)]
  rows += [("u", 20, REC, "target", "", 20)]
  samples = build_samples(make_log(rows), min_samples=1)
  events = samples.events
  last = samples.target.tolist().index(int(np.flatnonzero(events["item_id"] == "target")[0]))
  hist = samples.history[last]
  got = list(zip(events["kind"].to_numpy()[hist], events["item_id"].to_numpy()[hist]))
  # Last 5 rec items are s10..s14; last 5 searches are s10..s14; rec before search per pair.
  assert got == [(k, f"s{t}") for t in range(10, 15) for k in (REC, SEARCH)]


def test_history_tie_break_is_file_order():
  """Equal timestamps: the history lists them in file order, not by item id or kind."""
  rows = semi_synthetic([("u", 7, "zz"), ("u", 7, "aa"), ("u", 7, "mm"), ("u", 9, "last")])
  samples = build_samples(make_log(rows), min_samples=1)
  events = samples.events
  target = int(np.flatnonzero((events["item_id"] == "last") & (events["kind"] == SEARCH))[0])
  hist = samples.history[samples.target.tolist().index(target)]
  assert list(events["item_id"].to_numpy()[hist]) == ["zz", "zz", "aa", "aa", "mm", "mm"]
  # The first equal-time interaction's search target sees nothing of itself: no sample.
  first_search = int(np.flatnonzero((events["item_id"] == "zz") & (events["kind"] == SEARCH))[0])
  assert first_search not in samples.target
  # The second one's history is exactly the first interaction (both halves).
  second = int(np.flatnonzero((events["item_id"] == "aa") & (events["kind"] == SEARCH))[0])
  hist = samples.history[samples.target.tolist().index(second)]
  assert list(events["item_id"].to_numpy()[hist]) == ["zz", "zz"]


def test_history_lengths_configurable_including_zero():
  log = random_log(0)
  s = build_samples(log, rec_history=0, search_history=2, min_samples=1)
  for h in s.history:
    kinds = collections.Counter(s.events["kind"].to_numpy()[h])
    assert kinds[REC] == 0 and 1 <= kinds[SEARCH] <= 2
  s = build_samples(log, rec_history=3, search_history=0, min_samples=1)
  for h in s.history:
    kinds = collections.Counter(s.events["kind"].to_numpy()[h])
    assert kinds[SEARCH] == 0 and 1 <= kinds[REC] <= 3


# --------------------------------------------------------------------------- split, filters


def per_user_kind(samples):
  groups = collections.defaultdict(list)
  for i, (kind, target) in enumerate(zip(samples.kind, samples.target)):
    groups[(samples.events["user_id"].iat[target], kind)].append(i)
  return groups


@pytest.mark.parametrize("real_search", [False, True])
def test_leave_one_out_split(real_search):
  log = random_log(3, num_users=20, real_search=real_search)
  samples = build_samples(log, drop_train_after_heldout=False)
  groups = per_user_kind(samples)
  assert groups
  for (user, kind), idx in groups.items():
    targets = samples.target[idx]
    assert np.all(np.diff(targets) > 0)  # (user, time) order
    assert len(idx) >= 3
    assert list(samples.split[idx]) == ["train"] * (len(idx) - 2) + ["validation", "test"]
  for split in SPLITS:
    for kind in (REC, SEARCH):
      sel = samples.select(split, kind)
      assert np.all((samples.split[sel] == split) & (samples.kind[sel] == kind))
  # Exactly one validation and one test sample per user and kind.
  for split in ("validation", "test"):
    for kind in (REC, SEARCH):
      users = samples.events["user_id"].to_numpy()[samples.target[samples.select(split, kind)]]
      assert len(users) == len(set(users)) == sum(1 for (_, k) in groups if k == kind)


def test_small_min_samples_put_single_sample_in_test():
  rows = semi_synthetic([("u", 1, "a"), ("u", 2, "b"), ("v", 1, "a"), ("v", 2, "b"),
                         ("v", 3, "c")])
  samples = build_samples(make_log(rows), min_samples=1)
  groups = per_user_kind(samples)
  assert [samples.split[i] for i in groups[("u", REC)]] == ["test"]
  assert [samples.split[i] for i in groups[("u", SEARCH)]] == ["test"]
  assert [samples.split[i] for i in groups[("v", REC)]] == ["validation", "test"]


def test_filtering_counts():
  rows = []
  # A: 5 interactions, all with queries -> 4 rec + 4 search samples, kept.
  rows += semi_synthetic([("A", t, f"a{t}") for t in range(5)])
  # B: 3 interactions -> 2 + 2 samples: below min_samples=3, skipped.
  rows += semi_synthetic([("B", t, f"b{t}") for t in range(3)], start=10)
  # C: rec only (no item has a query) -> 4 samples without history, skipped.
  rows += [("C", t, REC, f"c{t}", "", 100 + t) for t in range(4)]
  # D: the first item has no query -> interaction 2's halves lack a search history.
  rows += semi_synthetic([("D", t, f"d{t}") for t in range(4)], no_query=("d0",), start=20)
  samples = build_samples(make_log(rows))
  assert samples.counts == {
      "users_in_log": 4,
      "samples_without_history": 2 + 2 + 4 + 3,
      "samples_user_below_min": 4 + 4,
      "train_samples_after_heldout": 0,
      "users_skipped": 3,
  }
  assert set(samples.events["user_id"].to_numpy()[samples.target]) == {"A"}
  assert collections.Counter(zip(samples.kind, samples.split)) == {
      (REC, "train"): 2, (REC, "validation"): 1, (REC, "test"): 1,
      (SEARCH, "train"): 2, (SEARCH, "validation"): 1, (SEARCH, "test"): 1}


def test_min_samples_applies_per_kind():
  # 4 interactions with queries, then 3 without: rec has 6 samples, search only 3.
  interactions = [("u", t, f"i{t}") for t in range(7)]
  rows = semi_synthetic(interactions, no_query={"i4", "i5", "i6"})
  samples = build_samples(make_log(rows), min_samples=4, drop_train_after_heldout=False)
  assert set(samples.kind) == {REC}
  assert samples.counts["samples_user_below_min"] == 3
  assert samples.counts["users_skipped"] == 0


def test_drop_train_after_heldout():
  """Search sessions stop before rec does: rec train targets from the held-out search
  interactions, or later, would leak the held-out labels and are dropped."""
  interactions = [("u", t, f"i{t}") for t in range(8)]
  rows = semi_synthetic(interactions, no_query={"i6", "i7"})
  log = make_log(rows)
  kept_all = build_samples(log, drop_train_after_heldout=False)
  samples = build_samples(log, drop_train_after_heldout=True)
  items = samples.events["item_id"].to_numpy()

  def split_items(s, kind):
    return {split: [items[s.target[i]] for i in s.select(split, kind)] for split in SPLITS}

  # Search: samples at i1..i5 -> validation i4, test i5. Rec: i1..i7 -> validation i6, test i7.
  assert split_items(kept_all, SEARCH) == {"train": ["i1", "i2", "i3"], "validation": ["i4"],
                                           "test": ["i5"]}
  assert split_items(kept_all, REC)["train"] == ["i1", "i2", "i3", "i4", "i5"]
  # With the guard: rec train stops before i4, the search validation interaction.
  assert split_items(samples, REC) == {"train": ["i1", "i2", "i3"], "validation": ["i6"],
                                       "test": ["i7"]}
  assert split_items(samples, SEARCH) == split_items(kept_all, SEARCH)
  assert samples.counts["train_samples_after_heldout"] == 2
  heldout = {items[samples.target[i]] for i in range(len(samples.target))
             if samples.split[i] != "train"}
  for i in np.flatnonzero(samples.split == "train"):
    assert not heldout & set(items[samples.history[i]])
    assert items[samples.target[i]] not in heldout
