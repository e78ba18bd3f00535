"""Tests of the raw-format loaders and of the schema validation behind them.

Amazon fixtures are written here in the real 2014 format: gzip'ed JSON lines for reviews
and gzip'ed Python-literal lines (single quotes, `categories` a list of lists) for metadata.
Every bad input must raise a DataError that names the file, the line/row and the field.
"""
import gzip
import json
import os

import numpy as np
import pandas as pd
import pytest

from gensar_jax import gin_utils
from gensar_jax.data.loaders import amazon, generic, movielens
from gensar_jax.data.schema import REC, SEARCH, DataError


# --------------------------------------------------------------------------- fixtures


def write_gz_lines(path, lines):
  with gzip.open(path, "wt", encoding="utf-8") as f:
    for line in lines:
      f.write(line + "\n")
  return str(path)


def review(user, asin, t):
  """One review line as the 2014 release writes it (strict JSON)."""
  return json.dumps({"reviewerID": user, "asin": asin, "reviewerName": "Some Body",
                     "helpful": [0, 0], "reviewText": "Works fine.", "overall": 5.0,
                     "summary": "Good", "unixReviewTime": t, "reviewTime": "01 1, 2013"})


def meta(asin, title, categories, description="A thing.", **extra):
  """One metadata line as the 2014 release writes it: a Python literal, not JSON."""
  obj = {"asin": asin, "title": title, "description": description, "price": 9.99,
         "imUrl": "http://example.com/x.jpg", "related": {"also_bought": ["B000000000"]},
         "salesRank": {"Electronics": 1234}, "categories": categories, **extra}
  return repr(obj)


def amazon_files(tmp_path, reviews=None, metas=None):
  reviews = reviews if reviews is not None else [
      review("U1", "B001", 1_300_000_000),
      review("U2", "B002", 1_300_000_100),
      "",  # blank lines are skipped but still counted in line numbers
      review("U1", "B002", 1_300_000_200),
  ]
  metas = metas if metas is not None else [
      meta("B001", "USB cable, 2 m", [["Electronics", "Computers & Accessories",
                                       "Cables & Accessories"], ["Electronics"]]),
      meta("B999", "Never reviewed", [["Electronics", "Audio"]]),
      meta("B002", "Kid's headphones", [["Electronics", "Audio", "Headphones"]],
           description="Over-ear, wired."),
  ]
  r = write_gz_lines(tmp_path / "reviews_Electronics_5.json.gz", reviews)
  m = write_gz_lines(tmp_path / "meta_Electronics.json.gz", metas)
  return r, m


def write_csv(path, header, rows):
  frame = pd.DataFrame(rows, columns=header)
  frame.to_csv(path, index=False)
  return str(path)


ITEMS_HEADER = ["item_id", "title", "description", "categories"]
ITEM_ROWS = [
    ["i1", "Red shoes", "Leather.", "Clothing > Shoes > Sneakers | Gifts > For Her"],
    ["i2", "Blue hat", "", "Clothing > Hats"],
    ["i3", "Plain thing", "Nothing.", ""],
]
EVENTS_HEADER = ["user_id", "timestamp", "item_id", "kind", "query"]
EVENT_ROWS = [
    ["u1", "100", "i1", "rec", ""],
    ["u1", "2020-01-01T00:00:00Z", "i2", "search", "Blue  HAT"],
    ["u2", "50", "i3", "", ""],
]


def assert_names(err, *parts):
  text = str(err.value)
  for part in parts:
    assert str(part) in text, f"{part!r} not in error message {text!r}"


# --------------------------------------------------------------------------- MovieLens


@pytest.fixture(scope="module")
def movielens_log():
  return movielens.load_movielens_100k()


def test_movielens_from_wheel(movielens_log):
  log = movielens_log
  assert len(log.items) == 1682
  assert len(log.events) == 100_000
  assert (log.events["kind"] == REC).all()
  assert (log.events["query"] == "").all()
  assert log.num_users == 943
  assert log.events["user_id"].value_counts().min() >= 20
  assert log.items_path.endswith("ml-100k.item")
  assert log.events_path.endswith("ml-100k.inter")
  toy_story = log.items.iloc[0]
  assert toy_story["item_id"] == "1"
  assert toy_story["title"] == "Toy Story"
  assert toy_story["categories"] == [["Animation", "Children's", "Comedy", "1990s"]]
  assert "1995" in toy_story["description"] and "Animation" in toy_story["description"]
  # Junk release years ("unkonwn", "V") add no decade level.
  by_id = log.items.set_index("item_id")
  assert by_id.loc["1412", "categories"] == [["Animation", "Children's"]]
  assert by_id.loc["267", "categories"] == [["unknown"]]
  # File order and line numbers: the first data row is line 2 (after the typed header).
  first = log.events.iloc[0]
  assert (first["user_id"], first["item_id"], first["timestamp"]) == ("196", "242", 881250949)
  assert first["line"] == 2 and first["interaction"] == 0
  assert np.array_equal(log.events["interaction"].to_numpy(), np.arange(100_000))
  # Every (user, item) pair is rated once.
  assert not log.events.duplicated(["user_id", "item_id"]).any()


def test_movielens_without_decade(tmp_path):
  src = movielens.movielens_100k_dir()
  # A two-item copy keeps the test fast and checks data_dir is honoured.
  with open(os.path.join(src, "ml-100k.item"), encoding="utf-8", errors="replace") as f:
    item_lines = f.read().splitlines()[:3]
  (tmp_path / "ml-100k.item").write_text("\n".join(item_lines) + "\n", encoding="utf-8")
  (tmp_path / "ml-100k.inter").write_text(
      "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
      "7\t2\t4\t881250949\n7\t1\t3\t881250949\n", encoding="utf-8")
  log = movielens.load_movielens_100k(data_dir=str(tmp_path), decade_in_path=False)
  assert list(log.items["item_id"]) == ["1", "2"]
  assert log.items.iloc[0]["categories"] == [["Animation", "Children's", "Comedy"]]
  assert list(log.events["item_id"]) == ["2", "1"]
  assert list(log.events["line"]) == [2, 3]


@pytest.mark.parametrize("case", ["missing_file", "missing_column", "short_row", "bad_time",
                                  "unknown_item"])
def test_movielens_bad_input(tmp_path, case):
  item_text = ("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
               "1\tToy Story\t1995\tAnimation Comedy\n")
  inter_text = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                "7\t1\t4\t881250949\n")
  if case == "missing_column":
    item_text = "item_id:token\tmovie_title:token_seq\tclass:token_seq\n1\tToy\tComedy\n"
  elif case == "short_row":
    inter_text += "7\t1\t4\n"
  elif case == "bad_time":
    inter_text += "7\t1\t4\tyesterday\n"
  elif case == "unknown_item":
    inter_text += "7\t99\t4\t881250950\n"
  if case != "missing_file":
    (tmp_path / "ml-100k.item").write_text(item_text, encoding="utf-8")
  (tmp_path / "ml-100k.inter").write_text(inter_text, encoding="utf-8")
  with pytest.raises(DataError) as err:
    movielens.load_movielens_100k(data_dir=str(tmp_path))
  expected = {
      "missing_file": ("ml-100k.item", "file not found"),
      "missing_column": ("ml-100k.item:1", "release_year"),
      "short_row": ("ml-100k.inter:3", "fields"),
      "bad_time": ("ml-100k.inter:3", "'timestamp'", "yesterday"),
      "unknown_item": ("ml-100k.inter:3", "'item_id'", "'99'"),
  }[case]
  assert_names(err, *expected)


# --------------------------------------------------------------------------- Amazon 2014


def test_amazon_real_format(tmp_path):
  r, m = amazon_files(tmp_path)
  # The metadata really is in the Python-literal form json.loads rejects.
  with gzip.open(m, "rt", encoding="utf-8") as f:
    first = f.readline()
  assert first.startswith("{'asin': 'B001'")
  with pytest.raises(json.JSONDecodeError):
    json.loads(first)

  log = amazon.load_amazon_2014(reviews_path=r, meta_path=m)
  # The catalogue is restricted to reviewed items, in metadata order.
  assert list(log.items["item_id"]) == ["B001", "B002"]
  b001, b002 = log.items.iloc[0], log.items.iloc[1]
  assert b001["title"] == "USB cable, 2 m"
  assert b001["categories"] == [["Electronics", "Computers & Accessories",
                                 "Cables & Accessories"], ["Electronics"]]
  assert b002["title"] == "Kid's headphones"  # the line used double quotes for this one
  assert b002["description"] == "Over-ear, wired."
  ev = log.events
  assert list(ev["user_id"]) == ["U1", "U2", "U1"]
  assert list(ev["item_id"]) == ["B001", "B002", "B002"]
  assert list(ev["timestamp"]) == [1_300_000_000, 1_300_000_100, 1_300_000_200]
  assert list(ev["kind"]) == [REC] * 3
  assert list(ev["line"]) == [1, 2, 4]  # the blank line 3 is skipped, not renumbered
  assert list(ev["interaction"]) == [0, 1, 2]
  assert log.items_path == m and log.events_path == r


def test_amazon_meta_json_and_list_description(tmp_path):
  """Strict-JSON metadata lines and list-valued descriptions load too."""
  r, m = amazon_files(tmp_path, reviews=[review("U1", "B1", 5)], metas=[
      json.dumps({"asin": "B1", "title": "T", "description": ["line one", "line two"],
                  "categories": [["A", "B"]]})])
  log = amazon.load_amazon_2014(reviews_path=r, meta_path=m)
  assert log.items.iloc[0]["description"] == "line one line two"
  assert log.items.iloc[0]["categories"] == [["A", "B"]]


AMAZON_BAD = {
    # case: (reviews, metas, file that must be named, other parts of the message)
    "missing_reviews": (None, None, "reviews_Electronics_5.json.gz", ["file not found"]),
    "missing_meta": (None, None, "meta_Electronics.json.gz", ["file not found"]),
    "review_missing_key": (
        [review("U1", "B001", 1), '{"reviewerID": "U2", "unixReviewTime": 5}'], None,
        "reviews_Electronics_5.json.gz:2", ["'asin'", "missing key"]),
    "review_broken_json": (
        [review("U1", "B001", 1), '{"reviewerID": "U2", "asin": "B001", '], None,
        "reviews_Electronics_5.json.gz:2", ["malformed line"]),
    "review_bad_time": (
        [review("U1", "B001", 1), review("U2", "B001", "soon")], None,
        "reviews_Electronics_5.json.gz:2", ["'unixReviewTime'", "soon"]),
    "meta_broken_literal": (
        None, [meta("B001", "x", [["A", "B"]]), "{'asin': 'B002', 'title': 'y'"],
        "meta_Electronics.json.gz:2", ["malformed line"]),
    "meta_unhashable_literal": (
        None, [meta("B001", "x", [["A", "B"]]), "{['asin']: 'B002'}"],
        "meta_Electronics.json.gz:2", ["malformed line"]),
    "meta_not_object": (
        None, [meta("B001", "x", [["A", "B"]]), "['B002']"],
        "meta_Electronics.json.gz:2", ["expected an object"]),
    "meta_missing_asin": (
        None, [meta("B001", "x", [["A", "B"]]), "{'title': 'no id'}"],
        "meta_Electronics.json.gz:2", ["'asin'", "missing key"]),
    "meta_bad_categories": (
        None, [meta("B001", "x", [["A", "B"]]), meta("B002", "y", "Electronics > Audio")],
        "meta_Electronics.json.gz:2", ["'categories'"]),
    "duplicate_item": (
        None, [meta("B001", "x", [["A", "B"]]), meta("B002", "y", [["A", "B"]]),
               meta("B001", "again", [["A", "B"]])],
        "meta_Electronics.json.gz:3", ["'asin'", "duplicate item id 'B001'", "line 1"]),
    "unknown_item": (
        [review("U1", "B001", 1), review("U1", "B002", 2), review("U2", "B404", 3)], None,
        "reviews_Electronics_5.json.gz:3", ["'item_id'", "unknown item 'B404'"]),
    "empty_catalogue": (
        [review("U1", "B404", 1)], [meta("B001", "x", [["A", "B"]])],
        "meta_Electronics.json.gz", ["catalogue is empty"]),
    "no_reviews": ([], None, "reviews_Electronics_5.json.gz", ["no reviews"]),
    "empty_reviewer": (
        [review("U1", "B001", 1), review("", "B001", 2)], None,
        "reviews_Electronics_5.json.gz:2", ["'reviewerID'", "empty value"]),
}


@pytest.mark.parametrize("case", sorted(AMAZON_BAD))
def test_amazon_bad_input(tmp_path, case):
  reviews, metas, named, parts = AMAZON_BAD[case]
  r, m = amazon_files(tmp_path, reviews=reviews, metas=metas)
  if case == "missing_reviews":
    os.remove(r)
  if case == "missing_meta":
    os.remove(m)
  with pytest.raises(DataError) as err:
    amazon.load_amazon_2014(reviews_path=r, meta_path=m)
  assert_names(err, str(tmp_path / named), *parts)


def test_amazon_truncated_gzip(tmp_path):
  r, m = amazon_files(tmp_path)
  data = open(r, "rb").read()
  with open(r, "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(DataError) as err:
    amazon.load_amazon_2014(reviews_path=r, meta_path=m)
  assert_names(err, r, "unreadable")


# --------------------------------------------------------------------------- generic


def test_generic_csv(tmp_path):
  items = write_csv(tmp_path / "items.csv", ITEMS_HEADER, ITEM_ROWS)
  events = write_csv(tmp_path / "events.csv", EVENTS_HEADER, EVENT_ROWS)
  log = generic.load_generic(items_path=items, events_path=events)
  assert list(log.items["item_id"]) == ["i1", "i2", "i3"]
  assert log.items.iloc[0]["categories"] == [["Clothing", "Shoes", "Sneakers"],
                                             ["Gifts", "For Her"]]
  assert log.items.iloc[1]["categories"] == [["Clothing", "Hats"]]
  assert log.items.iloc[2]["categories"] == []
  assert log.items.iloc[1]["description"] == ""
  ev = log.events
  assert list(ev["kind"]) == [REC, SEARCH, REC]  # empty kind defaults to rec
  assert list(ev["timestamp"]) == [100, 1577836800, 50]  # ISO dates become epoch seconds
  assert list(ev["query"]) == ["", "Blue  HAT", ""]  # kept as given; normalised later
  assert list(ev["line"]) == [1, 2, 3]  # 1-based data rows
  assert list(ev["interaction"]) == [0, 1, 2]


def test_generic_optional_columns_and_iso_variants(tmp_path):
  items = write_csv(tmp_path / "items.csv", ["item_id", "title"], [["a", "A"], ["b", "B"]])
  events = write_csv(tmp_path / "events.csv", ["user_id", "timestamp", "item_id"], [
      ["u", "2020-01-01", "a"], ["u", "2020-01-01T00:00:10", "b"],
      ["u", "2020-01-01T00:00:20+00:00", "a"]])
  log = generic.load_generic(items_path=items, events_path=events)
  assert list(log.items["description"]) == ["", ""]
  assert list(log.items["categories"]) == [[], []]
  assert list(log.events["kind"]) == [REC] * 3
  assert list(log.events["timestamp"]) == [1577836800, 1577836810, 1577836820]


def test_generic_mixed_int_and_iso_timestamps(tmp_path):
  items = write_csv(tmp_path / "items.csv", ["item_id", "title"], [["a", "A"]])
  events = write_csv(tmp_path / "events.csv", ["user_id", "timestamp", "item_id"], [
      ["u", "1577836800", "a"], ["u", "2020-01-01T00:01:00Z", "a"]])
  log = generic.load_generic(items_path=items, events_path=events)
  assert list(log.events["timestamp"]) == [1577836800, 1577836860]


def test_generic_parquet(tmp_path):
  items = tmp_path / "items.parquet"
  pd.DataFrame({
      "item_id": ["i1", "i2", "i3"],
      "title": ["Red shoes", "Blue hat", "Plain"],
      # Both accepted forms: the "A > B | C > D" string and a list of lists.
      "categories": ["Clothing > Shoes | Gifts > For Her", None, "Home"],
  }).to_parquet(items)
  items_lists = tmp_path / "items_lists.parquet"
  pd.DataFrame({
      "item_id": ["i1", "i2", "i3"],
      "title": ["Red shoes", "Blue hat", "Plain"],
      "categories": [[["Clothing", "Shoes"], ["Gifts", "For Her"]], [], [["Home"]]],
  }).to_parquet(items_lists)
  events = tmp_path / "events.parquet"
  pd.DataFrame({"user_id": [1, 1, 2], "timestamp": [30, 20, 10],
                "item_id": ["i2", "i1", "i3"]}).to_parquet(events)
  for path in (items, items_lists):
    log = generic.load_generic(items_path=str(path), events_path=str(events))
    assert list(log.items["categories"]) == [
        [["Clothing", "Shoes"], ["Gifts", "For Her"]], [], [["Home"]]]
    assert list(log.events["user_id"]) == ["1", "1", "2"]
    assert list(log.events["timestamp"]) == [30, 20, 10]


def _generic_case(tmp_path, case):
  """Writes the generic tables with one defect; returns (items, events, expected parts)."""
  items_header, item_rows = list(ITEMS_HEADER), [list(r) for r in ITEM_ROWS]
  events_header, event_rows = list(EVENTS_HEADER), [list(r) for r in EVENT_ROWS]
  items_name, events_name = "items.csv", "events.csv"
  expected = None
  if case == "missing_items_file":
    items_name = "nope.csv"
    expected = ("nope.csv", "file not found")
  elif case == "missing_events_file":
    events_name = "nope.csv"
    expected = ("nope.csv", "file not found")
  elif case == "missing_title_column":
    items_header = ["item_id", "description", "categories"]
    item_rows = [[r[0], r[2], r[3]] for r in item_rows]
    expected = ("items.csv", "missing column", "'title'")
  elif case == "missing_user_column":
    events_header = ["timestamp", "item_id", "kind", "query"]
    event_rows = [r[1:] for r in event_rows]
    expected = ("events.csv", "missing column", "'user_id'")
  elif case == "bad_timestamp":
    event_rows[1][1] = "next tuesday"
    expected = ("events.csv:2", "'timestamp'", "next tuesday")
  elif case == "bad_kind":
    event_rows[2][3] = "click"
    expected = ("events.csv:3", "'kind'", "'click'")
  elif case == "search_without_query":
    event_rows[1][4] = " "
    expected = ("events.csv:2", "'query'")
  elif case == "unknown_item":
    event_rows[2][2] = "i404"
    expected = ("events.csv:3", "'item_id'", "unknown item 'i404'")
  elif case == "duplicate_item":
    item_rows.append(["i2", "Again", "", ""])
    expected = ("items.csv", "'item_id'", "duplicate item id 'i2'", "entries 2 and 4")
  elif case == "empty_item_id":
    item_rows[1][0] = ""
    expected = ("items.csv:2", "'item_id'", "empty value")
  elif case == "empty_user_id":
    event_rows[1][0] = " "
    expected = ("events.csv:2", "'user_id'", "empty value")
  elif case == "ragged_row":
    expected = ("events.csv", "malformed table", "line 5")
  elif case == "empty_catalogue":
    item_rows = []
    expected = ("items.csv", "catalogue is empty")
  elif case == "no_events":
    event_rows = []
    expected = ("events.csv", "no events")
  elif case == "bad_extension":
    items_name = "items.tsv"
    expected = ("items.tsv", "unsupported extension")
  items = write_csv(tmp_path / items_name, items_header, item_rows)
  events = write_csv(tmp_path / events_name, events_header, event_rows)
  if case == "missing_items_file":
    os.remove(items)
  if case == "missing_events_file":
    os.remove(events)
  if case == "ragged_row":
    with open(events, "a") as f:
      f.write("u9,5,i1,rec,,extra\n")
  return items, events, expected


GENERIC_BAD = ["missing_items_file", "missing_events_file", "missing_title_column",
               "missing_user_column", "bad_timestamp", "bad_kind", "search_without_query",
               "unknown_item", "duplicate_item", "empty_item_id", "empty_user_id",
               "ragged_row", "empty_catalogue", "no_events", "bad_extension"]


@pytest.mark.parametrize("case", GENERIC_BAD)
def test_generic_bad_input(tmp_path, case):
  items, events, expected = _generic_case(tmp_path, case)
  with pytest.raises(DataError) as err:
    generic.load_generic(items_path=items, events_path=events)
  assert_names(err, str(tmp_path / expected[0]), *expected[1:])


def test_generic_bad_parquet_categories(tmp_path):
  items = tmp_path / "items.parquet"
  pd.DataFrame({"item_id": ["a", "b"], "title": ["A", "B"],
                "categories": [1.5, 2.5]}).to_parquet(items)
  events = write_csv(tmp_path / "events.csv", ["user_id", "timestamp", "item_id"],
                     [["u", "1", "a"]])
  with pytest.raises(DataError) as err:
    generic.load_generic(items_path=str(items), events_path=events)
  assert_names(err, f"{items}:1", "'categories'")


def test_generic_corrupt_parquet(tmp_path):
  items = tmp_path / "items.parquet"
  items.write_bytes(b"this is not parquet")
  events = write_csv(tmp_path / "events.csv", ["user_id", "timestamp", "item_id"],
                     [["u", "1", "a"]])
  with pytest.raises(DataError) as err:
    generic.load_generic(items_path=str(items), events_path=events)
  assert_names(err, str(items), "malformed table")


def test_generic_parquet_timestamp_column(tmp_path):
  """A native parquet timestamp column gives epoch seconds, not nanoseconds."""
  items = write_csv(tmp_path / "items.csv", ["item_id", "title"], [["a", "A"]])
  events = tmp_path / "events.parquet"
  pd.DataFrame({"user_id": ["u", "u"], "item_id": ["a", "a"],
                "timestamp": pd.to_datetime(["2020-01-01 00:00:00", "2020-01-01 00:01:00"])}
               ).to_parquet(events)
  log = generic.load_generic(items_path=items, events_path=str(events))
  assert list(log.events["timestamp"]) == [1577836800, 1577836860]


def test_generic_parquet_null_ids(tmp_path):
  items = tmp_path / "items.parquet"
  pd.DataFrame({"item_id": ["a", None], "title": ["A", "B"]}).to_parquet(items)
  events = tmp_path / "events.parquet"
  pd.DataFrame({"user_id": ["u", None], "timestamp": [1, 2], "item_id": ["a", "a"]}
               ).to_parquet(events)
  with pytest.raises(DataError) as err:
    generic.load_generic(items_path=str(items), events_path=str(events))
  assert_names(err, f"{items}:2", "'item_id'", "empty value")
  pd.DataFrame({"item_id": ["a"], "title": ["A"]}).to_parquet(items)
  with pytest.raises(DataError) as err:
    generic.load_generic(items_path=str(items), events_path=str(events))
  assert_names(err, f"{events}:2", "'user_id'", "empty value")


def test_schema_rejects_empty_user_id():
  from gensar_jax.data.schema import SearchRecLog, make_events, make_items
  items = make_items(["a"], ["A"], [""], [[]])
  events = make_events(["u", " "], [1, 2], [REC, REC], ["a", "a"], ["", ""], [0, 1], [2, 3])
  with pytest.raises(DataError) as err:
    SearchRecLog(items=items, events=events, items_path="i.tsv", events_path="e.tsv")
  assert_names(err, "e.tsv:3", "'user_id'", "empty user id")


# ------------------------------------------------- timestamps and encodings (issue 30, rows 1-4)

# Values that are not an event's time: each used to wrap silently to -2**63 or -1 (moving
# the event to the start of its user's history), crash with a traceback, or pass as
# negative; each is now a DataError naming the file, row and field.
BAD_TIMESTAMPS = [
    ("99999999999999999999", "out of range"),
    ("9223372036854775808", "out of range"),       # int64 max + 1
    ("18446744073709551615", "out of range"),      # uint64 max: wrapped to -1
    ("1600000000000", "out of range"),             # milliseconds
    ("1e19", "neither seconds since the epoch nor an ISO-8601 date"),
    ("inf", "neither seconds since the epoch nor an ISO-8601 date"),
    ("nan", "neither seconds since the epoch nor an ISO-8601 date"),
    ("-5", "is negative"),
    ("1969-12-31T23:59:59Z", "before 1970-01-01"),
]


@pytest.mark.parametrize("value,why", BAD_TIMESTAMPS, ids=[v for v, _ in BAD_TIMESTAMPS])
def test_generic_timestamp_outside_the_rule_names_file_row_and_field(tmp_path, value, why):
  items = write_csv(tmp_path / "items.csv", ["item_id", "title"], [["a", "A"]])
  events = write_csv(tmp_path / "events.csv", ["user_id", "timestamp", "item_id"],
                     [["u", "100", "a"], ["u", value, "a"]])
  with pytest.raises(DataError) as err:
    generic.load_generic(items_path=items, events_path=events)
  assert_names(err, f"{events}:2: field 'timestamp'", repr(value), why)
  assert "\n" not in gin_utils.user_message(err.value)


def test_generic_timestamp_rule_fractional_floored_bounds_accepted(tmp_path):
  """The documented rule: fractional seconds floor to the second (ties keep file order);
  0 and 9999-12-31T23:59:59Z are the bounds."""
  items = write_csv(tmp_path / "items.csv", ["item_id", "title"], [["a", "A"]])
  events = write_csv(tmp_path / "events.csv", ["user_id", "timestamp", "item_id"], [
      ["u", "1600000123.75", "a"], ["u", "1600000123.2", "a"], ["u", "0", "a"],
      ["u", "253402300799", "a"], ["u", "9999-12-31T23:59:59Z", "a"], ["u", "+7", "a"]])
  log = generic.load_generic(items_path=items, events_path=events)
  assert list(log.events["timestamp"]) == [1600000123, 1600000123, 0, 253402300799,
                                           253402300799, 7]
  assert "fractional seconds" in generic.__doc__ and "negative seconds" in generic.__doc__


def test_generic_parquet_timestamps_follow_the_same_rule(tmp_path):
  items = write_csv(tmp_path / "items.csv", ["item_id", "title"], [["a", "A"]])
  events = tmp_path / "events.parquet"
  pd.DataFrame({"user_id": ["u", "u"], "item_id": ["a", "a"],
                "timestamp": np.array([5, 2 ** 64 - 1], dtype=np.uint64)}).to_parquet(events)
  with pytest.raises(DataError) as err:
    generic.load_generic(items_path=items, events_path=str(events))
  assert_names(err, f"{events}:2: field 'timestamp'", "18446744073709551615", "out of range")
  pd.DataFrame({"user_id": ["u", "u"], "item_id": ["a", "a"],
                "timestamp": [5.5, float("inf")]}).to_parquet(events)
  with pytest.raises(DataError) as err:
    generic.load_generic(items_path=items, events_path=str(events))
  assert_names(err, f"{events}:2: field 'timestamp'", "'inf'")


@pytest.mark.parametrize("gz", [False, True], ids=["csv", "csv.gz"])
def test_generic_invalid_utf8_names_the_row_and_field(tmp_path, gz):
  """A quoted cell with a line break before the bad byte: the row is the data row pandas
  counts, not the physical line."""
  items = write_csv(tmp_path / "items.csv", ["item_id", "title"], [["a", "A"], ["b", "B"]])
  text = (b'user_id,timestamp,item_id,kind,query\nu,1,a,search,"two\nlines"\n'
          b'u,2,b,search,caf\xe9 au lait\n')
  events = tmp_path / ("events.csv.gz" if gz else "events.csv")
  events.write_bytes(gzip.compress(text) if gz else text)
  with pytest.raises(DataError) as err:
    generic.load_generic(items_path=items, events_path=str(events))
  assert_names(err, f"{events}:2: field 'query'", "not UTF-8", "0xe9")
  assert "position" not in str(err.value)


def test_generic_csv_with_a_byte_order_mark_loads(tmp_path):
  items = write_csv(tmp_path / "items.csv", ["item_id", "title"], [["a", "A"]])
  events = tmp_path / "events.csv"
  events.write_bytes(b"\xef\xbb\xbfuser_id,timestamp,item_id\nu,1,a\n")
  log = generic.load_generic(items_path=items, events_path=str(events))
  assert list(log.events["user_id"]) == ["u"]
