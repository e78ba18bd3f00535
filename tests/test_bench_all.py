"""launch/bench_all.py: one JSON and one markdown table for every benchmark; the decode FLOPs."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
BENCHMARKS = ("bench_train", "bench_train_mixture", "bench_decode", "bench_identifiers")


def load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(LAUNCH, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_decode_flops_of_the_benchmark_shape():
  """The docstring's t5-small figure, and that beams scale only the decoder term."""
  flops = load("decode_flops").constrained_decode_flops
  small = dict(emb_dim=512, num_heads=8, head_dim=64, mlp_dim=1024, num_encoder_layers=8,
               num_decoder_layers=8, vocab_size=8320, input_length=128)
  f30, f60 = flops(**small, beams=30), flops(**small, beams=60)
  assert f30["total"] / 1e9 == pytest.approx(17.70, abs=0.005)
  assert f30["encoder"] == f60["encoder"] and f30["cross_kv"] == f60["cross_kv"]
  assert f60["decoder"] == 2 * f30["decoder"]
  assert f30["decoder"] == 30 * 6 * f30["per_beam_step"]


@pytest.mark.slow
def test_bench_all_tiny_writes_one_json_and_one_table(tmp_path):
  out = subprocess.run([sys.executable, os.path.join(LAUNCH, "bench_all.py"), "--tiny",
                        "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  (run,) = list(tmp_path.iterdir())
  report = json.loads((run / "bench.json").read_text())
  machine = report["machine"]
  for key in ("cpu_model", "cpu_logical_cores", "ram_gib", "platform", "device_kind",
              "python", "jax", "jaxlib", "flax", "git_commit"):
    assert key in machine, key
  assert machine["matmul_peak_fp32"]["flops_per_s"] > 0
  entries = {e["name"]: e for e in report["benchmarks"]}
  assert sorted(entries) == sorted(BENCHMARKS)
  assert entries["bench_train_mixture"]["status"] == "skipped"
  for name in ("bench_train", "bench_decode", "bench_identifiers"):
    assert entries[name]["status"] == "ok", entries[name]
    metrics = entries[name]["metrics"]
    assert metrics and all(isinstance(v, (int, float)) for v in metrics.values()
                           if v is not None), metrics
  assert entries["bench_train"]["metrics"]["examples_per_s"] > 0
  decode = entries["bench_decode"]["metrics"]
  assert decode["ceiling_examples_per_s"] > 0 and decode["flops_per_example"] > 0
  assert 0 < decode["percent_of_ceiling[batch 2]"]

  table = (run / "bench.md").read_text().splitlines()
  rows = [line for line in table if line.startswith("|")]
  assert rows[0].startswith("| script |") and set(rows[1]) <= set("|-: ")
  assert len({line.count("|") for line in rows}) == 1       # every row has every column
  assert len(rows) >= 2 + len(BENCHMARKS)
  assert not list(run.glob("*.tmp"))
