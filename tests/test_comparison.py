"""Tests of the result schema (gensar_jax/results.py) and the comparison table and plot."""
import json
import math
import os

import numpy as np
import pytest

from gensar_jax import comparison
from gensar_jax import results as results_lib
from gensar_jax.results import ResultError, SystemResult

NAMES = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")


def block(base, n=100):
  """Distinct, recognisable values per metric: base + 0.01 * position."""
  out = {name: round(base + 0.01 * i, 6) for i, name in enumerate(NAMES)}
  out["num_examples"] = n
  return out


def result(system, family="baseline", seed=None, rec=None, search=None, split="test",
           dataset="ml100k"):
  return SystemResult(system=system, family=family, seed=seed, split=split, dataset=dataset,
                      rec=rec, search=search, wall_seconds=1.5)


GENSAR_SEARCH_NDCG10 = [0.30, 0.36, 0.33]
GENSAR_REC_HR1 = [0.10, 0.14, 0.15]


def write_all(folder):
  results_lib.write_result(os.path.join(folder, "bm25.json"),
                           result("BM25", search=block(0.20)))
  results_lib.write_result(os.path.join(folder, "sasrec.json"),
                           result("SASRec", rec=block(0.12)))
  results_lib.write_result(os.path.join(folder, "pop.json"),
                           result("Popularity", rec=block(0.02), search=block(0.04)))
  for seed, (s, r) in enumerate(zip(GENSAR_SEARCH_NDCG10, GENSAR_REC_HR1)):
    search = block(0.2)
    search["NDCG@10"] = s
    rec = block(0.1)
    rec["HR@1"] = r
    results_lib.write_result(os.path.join(folder, results_lib.result_filename("GenSAR", seed)),
                             result("GenSAR", "generative", seed, rec=rec, search=search))


def hand_sample_std(values):
  mean = sum(values) / len(values)
  return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


# -------------------------------------------------------------------------------- schema

def test_write_and_read_round_trip(tmp_path):
  r = result("BM25", search=block(0.2))
  path = results_lib.write_result(str(tmp_path / "bm25.json"), r)
  assert results_lib.read_results(str(tmp_path)) == [r]
  assert os.listdir(tmp_path) == ["bm25.json"]  # no temporary file left behind
  assert results_lib.result_filename("Dense (MiniLM) + history") == "dense_minilm_history.json"
  assert results_lib.result_filename("GenSAR", 3) == "gensar_seed3.json"
  with open(path) as f:
    assert json.load(f)["rec"] is None


def test_write_refuses_an_invalid_result_and_leaves_no_file(tmp_path):
  bad = result("BM25", search={"HR@1": 0.5})
  with pytest.raises(ResultError, match="missing metric"):
    results_lib.write_result(str(tmp_path / "x.json"), bad)
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("mutate, message", [
    (lambda o: o.pop("split"), r"missing field\(s\) \['split'\]"),
    (lambda o: o.update(family="other"), "family: expected one of"),
    (lambda o: o.update(seed="1"), "seed: expected null or an integer"),
    (lambda o: o["search"].update({"NDCG@10": 1.5}), r"search.NDCG@10: expected a number"),
    (lambda o: o["search"].update(num_examples=0), "num_examples: expected a positive"),
    (lambda o: o.update(search=None), "both rec and search are null"),
    (lambda o: o.update(extra=1), r"unknown field\(s\) \['extra'\]"),
])
def test_read_names_the_bad_file_and_field(tmp_path, mutate, message):
  obj = result("BM25", search=block(0.2)).to_json()
  mutate(obj)
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(obj))
  with pytest.raises(ResultError, match=message) as info:
    results_lib.read_results(str(tmp_path))
  assert str(path) in str(info.value)


def test_read_errors_for_broken_json_empty_and_missing_dirs(tmp_path):
  (tmp_path / "broken.json").write_text("{not json")
  with pytest.raises(ResultError, match="broken.json: not valid JSON"):
    results_lib.read_results(str(tmp_path))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ResultError, match="no result files"):
    results_lib.read_results(str(empty))
  with pytest.raises(ResultError, match="results directory not found"):
    results_lib.read_results(str(tmp_path / "absent"))


# ---------------------------------------------------------------------------- comparison

def test_table_values_equal_inputs_and_seeds_aggregate(tmp_path):
  results_dir = str(tmp_path / "results")
  write_all(results_dir)
  out = str(tmp_path / "cmp")
  summaries = comparison.compare([results_dir], out)
  assert [s.system for s in summaries] == ["BM25", "Popularity", "SASRec", "GenSAR"]

  with open(os.path.join(out, "comparison.json")) as f:
    data = json.load(f)
  systems = {s["system"]: s for s in data["systems"]}
  assert data["split"] == "test" and data["dataset"] == "ml100k"
  # Single runs: the numbers pass through unchanged, std null.
  for name, value in block(0.20).items():
    if name != "num_examples":
      assert systems["BM25"]["search"][name] == {"mean": value, "std": None}
  assert systems["BM25"]["rec"] is None and systems["SASRec"]["search"] is None
  assert systems["Popularity"]["rec"]["NDCG@10"]["mean"] == block(0.02)["NDCG@10"]
  # Three seeds: mean and sample std, against the hand formula.
  gensar = systems["GenSAR"]
  assert gensar["seeds"] == [0, 1, 2] and gensar["num_runs"] == 3
  assert gensar["search"]["NDCG@10"]["mean"] == pytest.approx(0.33)
  assert gensar["search"]["NDCG@10"]["std"] == pytest.approx(
      hand_sample_std(GENSAR_SEARCH_NDCG10))
  assert gensar["search"]["NDCG@10"]["std"] == pytest.approx(0.03)
  assert gensar["rec"]["HR@1"]["mean"] == pytest.approx(0.13)
  assert gensar["rec"]["HR@1"]["std"] == pytest.approx(hand_sample_std(GENSAR_REC_HR1))
  assert gensar["rec"]["HR@5"]["std"] == pytest.approx(0.0)

  with open(os.path.join(out, "comparison.md"), encoding="utf-8") as f:
    md = f.read()
  rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")]
          for line in md.splitlines() if line.startswith("| ") and "---" not in line}
  header = rows.pop("system")
  col = {name: i for i, name in enumerate(header)}
  assert rows["BM25"][col["search HR@1"]] == "0.2000"
  assert rows["BM25"][col["search NDCG@10"]] == "0.2400"
  assert rows["BM25"][col["rec HR@1"]] == "—"
  assert rows["SASRec"][col["search NDCG@5"]] == "—"
  assert rows["SASRec"][col["rec HR@10"]] == "0.1400"
  assert rows["GenSAR"][col["search NDCG@10"]] == "0.3300 ± 0.0300"
  assert rows["GenSAR"][col["rec HR@1"]] == f"0.1300 ± {hand_sample_std(GENSAR_REC_HR1):.4f}"
  assert rows["GenSAR"][col["runs"]] == "3"
  assert rows["Popularity"][col["runs"]] == "1"

  with open(os.path.join(out, "tradeoff.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(os.path.join(out, "tradeoff.png")) > 5000


def test_several_results_dirs_and_cli(tmp_path, capsys):
  baselines, generative = tmp_path / "b", tmp_path / "g"
  results_lib.write_result(str(baselines / "bm25.json"), result("BM25", search=block(0.2)))
  results_lib.write_result(str(generative / "gensar_seed0.json"),
                           result("GenSAR", "generative", 0, rec=block(0.1),
                                  search=block(0.3)))
  out = tmp_path / "out"
  comparison.main([f"--results_dir={baselines}", f"--results_dir={generative}",
                   f"--output_dir={out}"])
  printed = capsys.readouterr().out
  assert "| BM25 | baseline | 1 | 0.2000" in printed
  assert "| GenSAR | generative | 1 | 0.3000" in printed  # one seed: no ± shown
  assert sorted(os.listdir(out)) == ["comparison.json", "comparison.md", "tradeoff.png"]


@pytest.mark.parametrize("second, message", [
    (result("BM25", search=block(0.3)), "need distinct integer seeds"),
    (result("GenSAR", "generative", 1, rec=block(0.1)), "present in some runs and null"),
    (result("GenSAR", "baseline", 1, rec=block(0.1), search=block(0.3)),
     "several families"),
    (result("X", search=block(0.1), split="validation"), "mix several splits"),
    (result("X", search=block(0.1), dataset="electronics"), "mix several datasets"),
])
def test_inconsistent_results_are_errors_naming_the_files(tmp_path, second, message):
  folder = tmp_path / "r"
  results_lib.write_result(str(folder / "a.json"),
                           result("GenSAR", "generative", 0, rec=block(0.1),
                                  search=block(0.3))
                           if second.system == "GenSAR" else result("BM25", search=block(0.2)))
  results_lib.write_result(str(folder / "b.json"), second)
  with pytest.raises(ResultError, match=message) as info:
    comparison.compare([str(folder)], str(tmp_path / "out"))
  assert "b.json" in str(info.value)
  assert not (tmp_path / "out").exists()


def test_cli_bad_input_exits_2_with_message(tmp_path, capsys):
  folder = tmp_path / "r"
  folder.mkdir()
  (folder / "oops.json").write_text('{"system": "BM25"}')
  with pytest.raises(SystemExit) as info:
    comparison.main([f"--results_dir={folder}", f"--output_dir={tmp_path / 'out'}"])
  assert info.value.code == 2
  err = capsys.readouterr().err
  assert "oops.json" in err and "missing field" in err
  with pytest.raises(ResultError, match="must differ"):
    comparison.compare([str(folder)], str(folder))


def test_plot_places_single_task_systems_on_the_axis(tmp_path, monkeypatch):
  """The plotted coordinates, read back from the figure: (rec, search) NDCG@10 or 0."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  captured = {}
  real_savefig = plt.Figure.savefig

  def spy(fig, path, *args, **kwargs):
    captured["points"] = {}
    for line in fig.axes[0].lines:
      x, y = line.get_xdata(), line.get_ydata()
      if len(x) == 1:
        captured["points"][tuple(np.round([x[0], y[0]], 6))] = line
    return real_savefig(fig, path, *args, **kwargs)

  monkeypatch.setattr(plt.Figure, "savefig", spy)
  results_dir = str(tmp_path / "results")
  write_all(results_dir)
  comparison.compare([results_dir], str(tmp_path / "out"))
  points = set(captured["points"])
  assert (0.0, block(0.20)["NDCG@10"]) in points  # BM25: search only -> x = 0
  assert (block(0.12)["NDCG@10"], 0.0) in points  # SASRec: rec only -> y = 0
  assert (block(0.02)["NDCG@10"], block(0.04)["NDCG@10"]) in points
  assert (block(0.1)["NDCG@10"], 0.33) in points  # GenSAR: the seed means
