"""SeqIO tasks and mixtures: shapes through the feature converter, behaviour tokens, honest
histories, evaluation candidates, template sampling, mixtures, ablations and the CLIs.

One small synthetic log (real search sessions, distinct timestamps per user) is prepared
once per module; identifier tables are written by hand (a dual one and a SID-only one) and
the vocabulary is built with the real CLI function from gin/runs/build_vocab.gin.
"""
import json
import math
import os
import re

import numpy as np
import pandas as pd
import pytest
import seqio

from gensar_jax import vocabulary as vocab_lib
from gensar_jax.data.prepared import load_prepared
from gensar_jax import prompts
from gensar_tasks import gensar, metrics, show, sources

from task_world import (CODEBOOK, DUAL_LEVELS, LENGTHS, NUM_ITEMS, NUM_NEGATIVES, REPO,
                        SID_ONLY_LEVELS, build_world, parse_and_call, write_table)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return build_world(tmp_path_factory.mktemp("tasks"), prefix="t4")


def task(world, key, reg=None):
  return seqio.get_mixture_or_task((reg or world["reg"]).tasks[key])


def examples(t, split, seed=0, lengths=None):
  ds = t.get_dataset(lengths, split=split, shuffle=False, seed=seed)
  return list(ds.as_numpy_iterator())


def text(x):
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def identifier_maps(world):
  """{space: {identifier string: item id}} and {space: {item id: identifier string}}."""
  forward = {"sid": {}, "cid": {}}
  with open(os.path.join(world["dual"], "identifiers.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      for space in ("sid", "cid"):
        forward[space][row["item_id"]] = "".join(row[space])
  inverse = {s: {v: k for k, v in m.items()} for s, m in forward.items()}
  return forward, inverse


# --------------------------------------------------------------------------- vocabulary


def test_build_vocab_holds_every_table_token_whole(world):
  summary = world["summary"]
  assert summary["identifier_tokens"] == 64  # m0 m1 s0 s1 c0 c1 s2 s3 x 8 codes
  assert summary["special_tokens"] == 67
  vocab = vocab_lib.load_vocabulary(world["vocab_path"])
  for levels in (DUAL_LEVELS, SID_ONLY_LEVELS):
    tokens = vocab_lib.identifier_token_inventory(
        [n for space in levels.values() for n in space or ()], CODEBOOK)
    assert vocab_lib.missing_tokens(vocab, tokens) == []
    for token in tokens[:10]:
      assert vocab.encode(token) == [vocab_lib.token_id(vocab, token)]
  assert os.listdir(os.path.dirname(world["vocab_path"])) == ["gensar.model"]


# --------------------------------------------------------------------------- shapes, tokens


BEHAVIOUR = {prompts.NEXT_REC_ITEM: vocab_lib.REC_ITEM,
             prompts.NEXT_SEARCH_ITEM: vocab_lib.SRC_ITEM,
             prompts.QUERY: vocab_lib.SRC_QUERY, prompts.ADHOC: vocab_lib.SRC_ITEM}
TASK_SPLITS = [(k, s) for k in prompts.TASK_KINDS for s in ("train", "validation")
               if s == "train"
               or k in (prompts.NEXT_REC_ITEM, prompts.NEXT_SEARCH_ITEM, prompts.QUERY)]


@pytest.mark.parametrize("key,split", TASK_SPLITS)
def test_feature_converter_shapes_and_behaviour_tokens(world, key, split):
  t = task(world, key)
  vocab = t.output_features["targets"].vocabulary
  ds = t.get_dataset(LENGTHS, split=split, shuffle=False, seed=0)
  converted = seqio.EncDecFeatureConverter(pack=False)(ds, LENGTHS)
  batches = list(converted.batch(64).as_numpy_iterator())
  assert batches, f"{key}/{split} is empty"
  batch = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  n = len(batch["encoder_input_tokens"])
  assert batch["encoder_input_tokens"].shape == (n, LENGTHS["inputs"])
  for k in ("decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights"):
    assert batch[k].shape == (n, LENGTHS["targets"])
  assert batch["encoder_input_tokens"].dtype == np.int32
  first = batch["decoder_target_tokens"][:, 0]
  if key in BEHAVIOUR:
    assert (first == vocab_lib.token_id(vocab, BEHAVIOUR[key])).all()
  elif key == prompts.ITEM_TO_ID:  # SID rows and CID rows alternate
    ids = {vocab_lib.token_id(vocab, t) for t in (vocab_lib.SRC_ITEM, vocab_lib.REC_ITEM)}
    assert set(first.tolist()) == ids
  else:  # id -> item: text, never a special token
    special = set(vocab_lib.special_token_ids(vocab).values())
    assert not set(first.tolist()) & special
  # Identifier targets are behaviour token + 4 identifier tokens + EOS.
  if key != prompts.QUERY and key != prompts.ID_TO_ITEM:
    assert (batch["decoder_loss_weights"].sum(1) == 6).all()
  # Every input starts with the prefix that names the task.
  raw = next(ds.as_numpy_iterator())
  assert text(raw["inputs_pretokenized"]).startswith(prompts.PREFIXES[key] + ": ")


# --------------------------------------------------------------------------- histories

EVENT = re.compile(r"<rec_item>((?:<\w+?>){4})|<src_query> ([^<]*)<src_item>((?:<\w+?>){4})")


def prompt_events(prompt, inverse):
  out = []
  for m in EVENT.finditer(prompt):
    if m.group(1):
      out.append(("rec", inverse["cid"][m.group(1)], ""))
    else:
      out.append(("search", inverse["sid"][m.group(3)], m.group(2)))
  return out


def expected_history(events, user, timestamp):
  """Last 5 rec and last 5 search events strictly before the target, oldest first."""
  mine = events[(events["user_id"] == user) & (events["timestamp"] < timestamp)]
  mine = mine.sort_values("timestamp")
  keep = pd.concat([mine[mine["kind"] == "rec"].tail(5), mine[mine["kind"] == "search"].tail(5)])
  keep = keep.sort_values("timestamp")
  return [(k, i, q) for k, i, q in zip(keep["kind"], keep["item_id"], keep["query"])]


def check_candidates(ex, space, behaviour, forward):
  """Eval examples carry their candidates' item ids and full identifier strings."""
  items = [text(c) for c in ex["candidate_items"]]
  ids = [text(c) for c in ex["candidate_identifiers"]]
  assert len(items) == NUM_NEGATIVES + 1 and len(set(items)) == len(items)
  assert items[0] == text(ex["target_item"])
  assert ids == [behaviour + forward[space][i] for i in items]
  assert text(ex["targets_pretokenized"]) == ids[0]


def python_prompt(key, ex, raw, forward):
  """The same prompt rendered by gensar_jax/prompts.py from the raw prepared example."""
  history = prompts.history_text([
      (text(k), forward["cid" if text(k) == "rec" else "sid"][text(i)], text(q))
      for k, i, q in zip(raw["history_kind"], raw["history_item"], raw["history_query"])])
  slots = {"history": history, "query": prompts.query_text(text(raw["query"]))}
  return prompts.render(key, int(ex["template"]), **{s: slots[s] for s in prompts.SLOTS[key]})


@pytest.mark.parametrize("key", [prompts.NEXT_REC_ITEM, prompts.NEXT_SEARCH_ITEM, prompts.QUERY])
def test_history_holds_only_earlier_events(world, key):
  """Against the raw CSV log: the prompt's history is exactly the last 5 rec and last 5
  search events strictly before the target, oldest first; TF and Python render the same
  prompt; eval examples use template 0 and carry their candidates."""
  forward, inverse = identifier_maps(world)
  events = world["events"]
  source = sources.PreparedExampleSource(world["prepared"])
  seen = 0
  for split in ("train", "validation", "test"):
    raw = {(text(ex["user_id"]), int(ex["timestamp"])): ex for ex in
           source.get_dataset(split, shuffle=False).as_numpy_iterator()}
    for ex in examples(task(world, key), split):
      user, ts = text(ex["user_id"]), int(ex["timestamp"])
      prompt = text(ex["inputs_pretokenized"])
      assert prompt_events(prompt, inverse) == expected_history(events, user, ts)
      assert all(t < ts for t in ex["history_timestamp"])
      assert prompt == python_prompt(key, ex, raw[(user, ts)], forward)
      target = events[(events["user_id"] == user) & (events["timestamp"] == ts)]
      assert len(target) == 1 and target["item_id"].iloc[0] == text(ex["target_item"])
      if key == prompts.QUERY:
        assert text(ex["targets_pretokenized"]) == "<src_query> " + target["query"].iloc[0]
      if key == prompts.NEXT_SEARCH_ITEM:  # the current query is in the prompt too
        assert "<src_query> " + target["query"].iloc[0] in prompt
      if split != "train":
        assert ex["template"] == 0
        if key == prompts.NEXT_REC_ITEM:
          check_candidates(ex, "cid", vocab_lib.REC_ITEM, forward)
        if key == prompts.NEXT_SEARCH_ITEM:
          check_candidates(ex, "sid", vocab_lib.SRC_ITEM, forward)
      elif key != prompts.QUERY:
        assert len(ex["candidate_items"]) == 0
      seen += 1
  assert seen > 30


def test_templates_sampled_in_train_fixed_in_eval(world):
  t = task(world, prompts.ID_TO_ITEM)
  first = [int(ex["template"]) for ex in examples(t, "train", seed=3)]
  again = [int(ex["template"]) for ex in examples(t, "train", seed=3)]
  other = [int(ex["template"]) for ex in examples(t, "train", seed=4)]
  assert first == again and first != other
  assert len(set(first)) >= 5 and max(first) < prompts.num_templates(prompts.ID_TO_ITEM)
  history = [int(ex["template"])
             for ex in examples(task(world, prompts.NEXT_REC_ITEM), "train", seed=3)]
  assert len(set(history)) >= 5
  # (eval splits always use template 0: checked in test_history_holds_only_earlier_events)


# --------------------------------------------------------------------------- per-item tasks


def test_alignment_and_adhoc_tasks(world):
  forward, _ = identifier_maps(world)
  items = world["items"].set_index("item_id")
  rows = examples(task(world, prompts.ITEM_TO_ID), "train")
  assert len(rows) == 2 * NUM_ITEMS
  assert [text(r["space"]) for r in rows[:4]] == ["sid", "cid", "sid", "cid"]
  for r in rows:
    item, space = text(r["target_item"]), text(r["space"])
    assert text(r["targets_pretokenized"]) == (prompts.BEHAVIOUR_OF_SPACE[space]
                                               + forward[space][item])
    assert items.loc[item, "title"] in text(r["inputs_pretokenized"])
    assert prompts.SPACE_NAMES[space] + " identifier" in text(r["inputs_pretokenized"])
  rows = examples(task(world, prompts.ID_TO_ITEM), "train")
  assert len(rows) == 2 * NUM_ITEMS
  # The target is the prepared item text (gensar_jax/data/item_text.py): title first, then
  # description and categories where the item has them.
  prepared = load_prepared(world["prepared"])
  item_text = dict(zip(prepared.items["item_id"], prepared.item_texts()))
  for r in rows:
    item, space = text(r["target_item"]), text(r["space"])
    assert text(r["targets_pretokenized"]) == item_text[item]
    assert item_text[item].startswith(items.loc[item, "title"])
    assert prompts.BEHAVIOUR_OF_SPACE[space] + forward[space][item] in text(
        r["inputs_pretokenized"])
  rows = examples(task(world, prompts.ADHOC), "train")
  assert len(rows) == NUM_ITEMS
  for r in rows:
    assert text(r["targets_pretokenized"]) == "<src_item>" + forward["sid"][text(r["target_item"])]
    assert "<src_query> " in text(r["inputs_pretokenized"])
    assert "<rec_item>" not in text(r["inputs_pretokenized"])  # no history


def test_adhoc_without_pseudo_queries_fails_loudly(world, tmp_path):
  reg = gensar.register_gensar(world["prepared"], world["dual"], world["vocab_path"],
                               pseudo_queries_path=str(tmp_path / "not_yet.jsonl"),
                               prefix="t4_nopq", single_id_space=None)
  with pytest.raises(sources.PseudoQueriesMissingError, match="not_yet.jsonl.*doc2query"):
    task(world, prompts.ADHOC, reg).get_dataset(LENGTHS, split="train")
  with pytest.raises(sources.PseudoQueriesMissingError, match="doc2query"):
    seqio.get_mixture_or_task(reg.mixtures["all"]).get_dataset(LENGTHS, split="train")
  # The mixture without it is there to train before doc2query has run.
  no_adhoc = seqio.get_mixture_or_task(reg.mixtures["no_adhoc"])
  assert reg.tasks[prompts.ADHOC] not in [t.name for t in no_adhoc.tasks]
  assert len(no_adhoc.tasks) == 5
  (tmp_path / "empty.jsonl").write_text("\n")
  reg = gensar.register_gensar(world["prepared"], world["dual"], world["vocab_path"],
                               pseudo_queries_path=str(tmp_path / "empty.jsonl"),
                               prefix="t4_nopq", single_id_space=None)
  with pytest.raises(sources.PseudoQueriesMissingError, match="holds no queries"):
    task(world, prompts.ADHOC, reg).get_dataset(LENGTHS, split="train")


# --------------------------------------------------------------------------- mixtures


def test_mixtures_and_rates(world):
  reg = world["reg"]
  with open(os.path.join(world["prepared"], "stats.json")) as f:
    rows = json.load(f)["rows"]
  assert reg.rates == {
      prompts.NEXT_REC_ITEM: rows["rec"]["train"],
      prompts.NEXT_SEARCH_ITEM: min(100_000, rows["search"]["train"]),
      prompts.QUERY: min(1_000, rows["search"]["train"]),
      prompts.ADHOC: 1_000,
      prompts.ITEM_TO_ID: 2 * NUM_ITEMS,  # 1,000 per space, capped by the catalogue
      prompts.ID_TO_ITEM: 2 * NUM_ITEMS,
  }
  assert reg.mixtures == {"all": "t4", "no_adhoc": "t4_no_adhoc",
                          "no_alignment": "t4_no_alignment", "rec_only": "t4_rec_only",
                          "search_only": "t4_search_only", "single_id": "t4_single_id"}
  names = lambda m: sorted(t.name for t in seqio.get_mixture_or_task(m).tasks)
  assert names("t4") == sorted(reg.tasks.values())
  assert names("t4_rec_only") == ["t4_next_rec_item"]
  assert names("t4_search_only") == ["t4_next_search_item"]
  assert names("t4_no_alignment") == sorted(
      reg.tasks[k] for k in (prompts.NEXT_REC_ITEM, prompts.NEXT_SEARCH_ITEM, prompts.QUERY,
                             prompts.ADHOC))
  mixture = seqio.get_mixture_or_task("t4")
  assert (mixture.get_rate(seqio.get_mixture_or_task("t4_next_rec_item"))
          == reg.rates[prompts.NEXT_REC_ITEM])
  ds = mixture.get_dataset(LENGTHS, split="train", seed=0, num_epochs=None)
  batch = next(seqio.EncDecFeatureConverter(pack=True)(ds, LENGTHS).batch(4)
               .as_numpy_iterator())
  assert batch["encoder_input_tokens"].shape == (4, LENGTHS["inputs"])
  assert "encoder_segment_ids" in batch


def test_mixture_rates_from_gin(world):
  rates = parse_and_call([], ["mixture_rates.search_rows = 7", "mixture_rates.rec_rows = 5"],
                         lambda: gensar.mixture_rates({"rows": {"rec": {"train": 50},
                                                                "search": {"train": 40}}},
                                                      num_items=3, num_spaces=2))
  assert rates[prompts.NEXT_REC_ITEM] == 5 and rates[prompts.NEXT_SEARCH_ITEM] == 7
  assert rates[prompts.QUERY] == 40 and rates[prompts.ITEM_TO_ID] == 6


def test_gensar_mixture_registers_from_gin(world):
  bindings = [f"PREPARED_DIR = '{world['prepared']}'", f"IDENTIFIERS_DIR = '{world['dual']}'",
              f"VOCAB_PATH = '{world['vocab_path']}'", "TASK_PREFIX = 't4_gin'",
              "gensar_mixture.variant = 'rec_only'"]
  name = parse_and_call([os.path.join(REPO, "gin", "tasks.gin")], bindings,
                        gensar.gensar_mixture)
  assert name == "t4_gin_rec_only"
  assert [t.name for t in seqio.get_mixture_or_task(name).tasks] == ["t4_gin_next_rec_item"]


def test_ranking_setup_evaluates_only_the_task_a_single_task_model_trains(world):
  from gensar_jax import ranking
  bindings = [f"ranking_setup.prepared_dir = '{world['prepared']}'",
              f"ranking_setup.identifiers_dir = '{world['dual']}'",
              "ranking_setup.register_tasks = @register_gensar",
              f"register_gensar.prepared_dir = '{world['prepared']}'",
              f"register_gensar.identifiers_dir = '{world['dual']}'",
              f"register_gensar.vocab_path = '{world['vocab_path']}'",
              "register_gensar.prefix = 't4_setup'"]
  tasks_by_variant = {}
  for variant in ("all", "no_alignment", "rec_only", "search_only"):
    setup = parse_and_call([], bindings + [f"ranking_setup.variant = '{variant}'"],
                           ranking.ranking_setup)
    tasks_by_variant[variant] = setup.task_names
  assert tasks_by_variant["all"] == {"rec": "t4_setup_next_rec_item",
                                     "search": "t4_setup_next_search_item"}
  assert tasks_by_variant["no_alignment"] == tasks_by_variant["all"]
  assert tasks_by_variant["rec_only"] == {"rec": "t4_setup_next_rec_item"}
  assert tasks_by_variant["search_only"] == {"search": "t4_setup_next_search_item"}


def test_single_identifier_ablations(world):
  forward, _ = identifier_maps(world)
  single = world["reg"].single_id
  assert single.rec_space == single.search_space == "sid"
  for ex in examples(task(world, prompts.NEXT_REC_ITEM, single), "test"):
    expected = "<rec_item>" + forward["sid"][text(ex["target_item"])]
    assert text(ex["targets_pretokenized"]) == expected
    assert "<c0_" not in text(ex["inputs_pretokenized"])
  assert len(examples(task(world, prompts.ITEM_TO_ID, single), "train")) == NUM_ITEMS
  # A SID-only table (RQ-VAE mode sid_only): both tasks use it, no _single_id variant.
  reg = gensar.register_gensar(world["prepared"], world["sid_only"], world["vocab_path"],
                               prefix="t4_sidonly")
  assert reg.single_id is None and "single_id" not in reg.mixtures
  ex = examples(task(world, prompts.NEXT_REC_ITEM, reg), "test")[0]
  assert re.fullmatch(r"<rec_item><s0_\d><s1_\d><s2_\d><s3_\d>", text(ex["targets_pretokenized"]))


def test_registration_checks_its_inputs(world, tmp_path):
  items = list(world["items"]["item_id"])
  partial = write_table(str(tmp_path / "partial"), items[:-1], DUAL_LEVELS)
  with pytest.raises(ValueError, match="1 items without identifiers"):
    gensar.register_gensar(world["prepared"], partial, world["vocab_path"], prefix="t4_bad")
  wide = write_table(str(tmp_path / "wide"), items, {"sid": ["m0", "m1", "x0", "x1"],
                                                     "cid": ["m0", "m1", "c0", "c1"]})
  with pytest.raises(vocab_lib.VocabularyError, match="lacks .* identifier tokens"):
    gensar.register_gensar(world["prepared"], wide, world["vocab_path"], prefix="t4_bad")
  with pytest.raises(FileNotFoundError, match="build_vocab"):
    gensar.register_gensar(world["prepared"], world["dual"], str(tmp_path / "none.model"))
  with pytest.raises(ValueError, match="not a valid SeqIO name"):
    gensar.register_gensar(world["prepared"], world["dual"], world["vocab_path"],
                           prefix="bad name")


# --------------------------------------------------------------------------- metrics


def test_ranking_metrics_equal_hand_computed(world):
  targets = ["<a>", "<b>", "<c>", "<d>"]
  predictions = [["<a>", "<x>"],                   # rank 0
                 ["<x>", " <b> "],                 # rank 1 (whitespace normalised below)
                 ["<x>"] * 6 + ["<c>"],            # rank 6
                 "<y>"]                            # not returned
  predictions = [metrics.postprocess_identifier(p) for p in predictions]
  got = metrics.ranking_metrics(targets, predictions)
  expected = {"HR@1": 1 / 4, "HR@5": 2 / 4, "HR@10": 3 / 4,
              "NDCG@5": (1 + 1 / math.log2(3)) / 4,
              "NDCG@10": (1 + 1 / math.log2(3) + 1 / math.log2(8)) / 4}
  assert got.keys() == expected.keys()
  for k in expected:
    assert got[k] == pytest.approx(expected[k])
  assert metrics.query_exact_match(["a b", "c"], [["a b", "c"], " d"]) == {"exact_match": 0.5}
  t = task(world, prompts.NEXT_REC_ITEM)
  assert t.predict_metric_fns == [metrics.ranking_metrics]
  assert task(world, prompts.QUERY).predict_metric_fns == [metrics.query_exact_match]
  assert t.postprocess_fn(b"<rec_item> <m0_1>", example={}, is_target=True) == "<rec_item><m0_1>"


# --------------------------------------------------------------------------- CLI


def test_show_prints_examples_and_length_stats(world, capsys):
  bindings = [f"PREPARED_DIR = '{world['prepared']}'", f"IDENTIFIERS_DIR = '{world['dual']}'",
              f"VOCAB_PATH = '{world['vocab_path']}'", "TASK_PREFIX = 't4_show'",
              "show_tasks.num_examples = 3", f"TASK_FEATURE_LENGTHS = {LENGTHS}",
              "show_tasks.tasks = ['next_rec_item', 'adhoc_search', 'next_query']"]
  stats = parse_and_call([os.path.join(REPO, "gin", "runs", "show_tasks.gin")], bindings,
                         show.show_tasks)
  out = capsys.readouterr().out
  for key in ("next_rec_item", "adhoc_search", "next_query"):
    assert f"=== t4_show_{key}" in out
  assert out.count("--- example") == 3 * 2  # ad-hoc search is skipped: no pseudo-queries
  assert "(skipped: pseudo-queries file None does not exist" in out
  assert "targets: <rec_item><m0_" in out and "targets: <src_query> " in out
  assert "suggested (p99 / max over tasks" in out and "bound in gin: inputs=" in out
  rec = stats["t4_show_next_rec_item:train"]
  assert (rec["targets"] == 6).all() and rec["inputs"].min() > 10
  # Whole 10-event prompts do not fit 48 tokens: the budget shortened some, and says so.
  assert f"prompts shortened to fit inputs={LENGTHS['inputs']}" in out
  line = next(ln for ln in out.splitlines() if ln.startswith("  t4_show_next_rec_item:"))
  shortened, total = int(line.split()[1]), int(line.split()[3])
  assert 0 < shortened <= total == rec["inputs"].size
  assert shortened == int((rec["inputs"] > LENGTHS["inputs"]).sum())


def slot_values(key, ex, prompt):
  """The slot values of `prompt`, parsed with the example's own template."""
  pattern, names = "", []
  for literal, field in prompts.segments(key, int(ex["template"])):
    pattern += re.escape(literal)
    if field is not None:
      pattern += "(.*)"
      names.append(field)
  match = re.fullmatch(pattern, prompt)
  assert match, (prompt, pattern)
  return dict(zip(names, match.groups()))


@pytest.mark.parametrize("key", [prompts.NEXT_REC_ITEM, prompts.NEXT_SEARCH_ITEM])
def test_prompt_budget_drops_the_oldest_history_first(world, key):
  """With an input length shorter than the whole prompt, the oldest events go; the task
  prefix, the instruction and the query stay whole, and nothing is cut from the end."""
  t = task(world, key)
  whole = examples(t, "train")
  budgeted = examples(t, "train", lengths=LENGTHS)
  assert len(whole) == len(budgeted) > 10
  separator = prompts.HISTORY_SEPARATOR
  shortened = 0
  for full, short in zip(whole, budgeted):
    assert len(short["inputs"]) <= LENGTHS["inputs"]
    assert short["inputs"][-1] == 1  # EOS kept: the prompt fitted, no trim from the end
    full_prompt, prompt = text(full["inputs_pretokenized"]), text(short["inputs_pretokenized"])
    shortened += int(short["prompt_shortened"])
    if not short["prompt_shortened"]:
      assert prompt == full_prompt
      continue
    # Same template, whole instruction and query: only the history slot differs.
    full_slots, slots = slot_values(key, short, full_prompt), slot_values(key, short, prompt)
    assert slots.get("query") == full_slots.get("query")
    events = full_slots["history"].split(separator)
    kept = slots["history"].split(separator) if slots["history"] else []
    assert len(kept) < len(events) and events[len(events) - len(kept):] == kept
  assert shortened > 0


def test_prompt_budget_cuts_item_text_not_the_instruction(world):
  t = task(world, prompts.ITEM_TO_ID)
  lengths = {"inputs": 20, "targets": LENGTHS["targets"]}
  whole = examples(t, "train")
  budgeted = examples(t, "train", lengths=lengths)
  cut = 0
  for full, short in zip(whole, budgeted):
    assert len(short["inputs"]) <= lengths["inputs"] and short["inputs"][-1] == 1
    template = prompts.template(prompts.ITEM_TO_ID, int(short["template"]))
    closing = template.split("}")[-1]  # the words after the last slot
    assert text(short["inputs_pretokenized"]).endswith(closing)
    cut += int(short["prompt_shortened"])
    if short["prompt_shortened"]:
      assert len(short["inputs_pretokenized"]) < len(full["inputs_pretokenized"])
  assert cut > 0
