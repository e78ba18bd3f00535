"""launch/bench/bench_all.py: one JSON and one markdown table for every benchmark; the decode FLOPs.

The scripts are imported and run the way a person runs them: as modules of launch.bench from
the repository root (pytest.ini puts the root on sys.path).
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = ("bench_train", "bench_train_mixture", "bench_decode", "bench_identifiers")


def load(name):
  """launch/bench/<name>.py (peers/<name>.py as "peers.<name>"), imported as a module."""
  return importlib.import_module(f"launch.bench.{name}")


def test_decode_flops_of_the_benchmark_shape():
  """The docstring's t5-small figure, and that beams scale only the decoder term."""
  flops = load("decode_flops").constrained_decode_flops
  small = dict(emb_dim=512, num_heads=8, head_dim=64, mlp_dim=1024, num_encoder_layers=8,
               num_decoder_layers=8, vocab_size=8320, input_length=128)
  f30, f60 = flops(**small, beams=30), flops(**small, beams=60)
  assert f30["total"] / 1e9 == pytest.approx(15.93, abs=0.005)
  assert f30["encoder"] == f60["encoder"] and f30["cross_kv"] == f60["cross_kv"]
  # Step 0 runs beam 0 alone; each later step every beam.
  assert f30["decoder"] == (1 + 30 * 5) * f30["per_beam_step"]
  assert f60["decoder"] - f30["decoder"] == 30 * 5 * f30["per_beam_step"]


def test_decode_flops_agree_with_xla_cost_analysis():
  """The count against XLA's own: the encoder, the cross-attention K/V and one decode step
  over every beam; within 5% at this small width (norms and softmax weigh more), within
  0.6% at t5-small."""
  import jax
  import jax.numpy as jnp
  import seqio
  from flax.core import meta
  from gensar_jax.models import encoder_decoder, t5, t5_config

  size = dict(emb_dim=128, num_heads=2, head_dim=64, mlp_dim=256, num_encoder_layers=2,
              num_decoder_layers=2)
  vocab, length, beams, steps = 1024, 64, 6, 6
  model = encoder_decoder.EncoderDecoderModel(
      t5.Transformer(t5_config.T5Config(vocab_size=vocab, **size)),
      seqio.PassThroughVocabulary(vocab, eos_id=1))
  params = jax.eval_shape(lambda key: meta.unbox(model.get_initial_variables(
      key, {"encoder_input_tokens": (1, length), "decoder_input_tokens": (1, steps)})
      ["params"]), jax.random.PRNGKey(0))
  tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
  encoded = jax.ShapeDtypeStruct((1, length, size["emb_dim"]), jnp.float32)

  def xla_flops(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]

  def cross_kv_and_step(p, x, e):
    cache = model.init_decoder_cache(p, beams, steps)
    return model.decode_step(p, cache, model.cross_attention_kv(p, e), x,
                             jnp.zeros((beams, 1), jnp.int32))

  ours = load("decode_flops").constrained_decode_flops(
      **size, vocab_size=vocab, input_length=length, beams=beams, decode_steps=steps)
  encoder = xla_flops(model.encode, params, tokens)
  cross_kv = xla_flops(model.cross_attention_kv, params, encoded)
  step = xla_flops(cross_kv_and_step, params, tokens, encoded) - cross_kv
  assert encoder == pytest.approx(ours["encoder"], rel=0.05)
  assert cross_kv == pytest.approx(ours["cross_kv"], rel=0.05)
  assert step == pytest.approx(beams * ours["per_beam_step"], rel=0.05)


@pytest.mark.slow
def test_bench_all_tiny_writes_one_json_and_one_table(tmp_path):
  out = subprocess.run([sys.executable, "-m", "launch.bench.bench_all", "--tiny",
                        "--train_rounds", "2", "--out", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True,
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
  rounds = entries["bench_train"]["rounds_examples_per_s"]
  assert len(rounds) == 2 and entries["bench_train"]["metrics"]["examples_per_s"] == min(rounds)
  assert sorted(p.name for p in (run / "raw").glob("bench_train*.json")) == [
      "bench_train.0.json", "bench_train.1.json"]
  decode = entries["bench_decode"]["metrics"]
  assert decode["ceiling_examples_per_s"] > 0 and decode["flops_per_example"] > 0
  assert 0 < decode["percent_of_ceiling[batch 2]"]
  assert 0 < decode["percent_of_matmuls_alone[batch 2]"]

  table = (run / "bench.md").read_text().splitlines()
  rows = [line for line in table if line.startswith("|")]
  assert rows[0].startswith("| script |") and set(rows[1]) <= set("|-: ")
  assert len({line.count("|") for line in rows}) == 1       # every row has every column
  assert len(rows) >= 2 + len(BENCHMARKS)
  assert any("median of 2" in line for line in rows if "bench_train.py" in line)
  assert any("of its matmuls alone" in line for line in rows if "bench_decode.py" in line)
  assert not list(run.glob("*.tmp"))


def test_median_round_picks_the_middle_run_and_keeps_every_figure():
  bench_all = load("bench_all")
  runs = [{"name": f"bench_train.{i}", "status": "ok", "result": {"examples_per_s": v}}
          for i, v in enumerate([5.0, 7.0, 6.0])]
  runs.append({"name": "bench_train.3", "status": "failed"})
  chosen = bench_all.median_round("bench_train", runs)
  assert chosen["name"] == "bench_train" and chosen["result"]["examples_per_s"] == 6.0
  assert chosen["rounds_examples_per_s"] == [5.0, 7.0, 6.0] and chosen["rounds_failed"] == 1
  assert "median of 3: 5.00-7.00" in bench_all._rounds_note(chosen)
  failed = bench_all.median_round("peer_train", runs[3:])
  assert failed["status"] == "failed" and failed["name"] == "peer_train"


def test_profile_parts_follow_the_op_names():
  profile = load("profile_train_step")
  hlo = "\n".join([
      '  %ynn_fusion.4 = f32[8,32]{1,0} fusion(%a), kind=kCustom, metadata={op_name='
      '"jit(f)/transpose(jvp(Transformer))/encoder/layers_0/attention/_attend_heads_major/'
      'dot_general"}',
      '  ROOT %dot.2 = f32[2048,1024]{1,0} dot(%x, %w), metadata={op_name="jit(f)/jvp('
      'Transformer)/encoder/layers_0/mlp/wi_0/dot_general"}',
      '  %multiply_add_fusion = f32[512]{0} fusion(%p), kind=kLoop, metadata={op_name='
      '"jit(f)/add"}',
      '  %bits = u32[4]{0} fusion(%k), metadata={op_name="jit(f)/jvp(Transformer)/mlp/'
      'Dropout_0/threefry2x32"}'])
  table = profile.instruction_metadata(hlo)
  assert table["dot.2"][0] == "f32[2048,1024]{1,0}"
  events = [{"ph": "X", "name": "ynn_fusion.4", "dur": 3000},
            {"ph": "X", "name": "dot.2", "dur": 8000}, {"ph": "X", "name": "dot.2", "dur": 2000},
            {"ph": "X", "name": "multiply_add_fusion", "dur": 1000},
            {"ph": "X", "name": "bits", "dur": 500},
            {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 99000}]  # not an instruction
  parts, top = profile.summarise(events, table, steps=2)
  assert parts == {"dense matmuls (q, k, v, out, MLP)": 5.0,
                   "attention core (QK^T, softmax, AV)": 1.5,
                   profile.OPTIMIZER_PART: 0.5, "dropout": 0.25}
  assert top[0][:2] == (5.0, "dot.2")


def test_profile_train_step_runs_on_a_tiny_model(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "launch.bench.profile_train_step",
       "--gin_file=gin/models/tiny.gin", "--batch_size", "4", "--input_length", "16",
       "--target_length", "4", "--vocab_size", "256", "--warmup_steps", "1", "--steps", "2",
       "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  report = json.loads((tmp_path / "profile.json").read_text())
  parts = report["parts_ms_per_step"]
  assert parts["dense matmuls (q, k, v, out, MLP)"] > 0 and report["wall_ms_per_step"] > 0
  assert (tmp_path / "profile.png").stat().st_size > 0
  assert "| part | ms per step | share |" in (tmp_path / "profile.md").read_text()


def test_train_flops_count_cross_attention_keys_and_values_per_input_token():
  import jax
  import seqio
  from gensar_jax.models import EncoderDecoderModel, T5Config, Transformer
  bench_train = load("bench_train")
  config = T5Config(vocab_size=128, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                    num_encoder_layers=2, num_decoder_layers=3, dropout_rate=0.0)
  model = EncoderDecoderModel(Transformer(config), seqio.PassThroughVocabulary(128, eos_id=1))
  shapes = {"encoder_input_tokens": (2, 8), "decoder_input_tokens": (2, 4)}
  params = jax.eval_shape(
      lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"])
  cross_kv = bench_train._cross_attention_kv(params["decoder"])
  assert cross_kv == 3 * 2 * 16 * 16   # layers x (key, value) x [embed, heads * head_dim]

  def dense(li, lt):
    return bench_train.model_flops_per_step(params, config, 2, li, lt)["dense"]

  encoder = bench_train._count(params["encoder"])
  assert dense(9, 4) - dense(8, 4) == 6 * 2 * (encoder + cross_kv)


def test_static_peer_reads_bench_decodes_catalogues_and_sets_ratios_beside_ours():
  """The STATIC peer builds from exactly bench_decode's sequences (same every run), takes
  bench_decode's --catalogue_sizes, and its table rows say how many times faster / smaller
  ours is."""
  import numpy as np
  bench_decode, bench_all = load("bench_decode"), load("bench_all")
  a, b = bench_decode.catalogue_sequences(500), bench_decode.catalogue_sequences(500)
  np.testing.assert_array_equal(a, b)
  assert a.shape[1] == 6 and set(a[:, 0]) == {bench_decode.SRC_ITEM, bench_decode.REC_ITEM}
  assert len(np.unique(a, axis=0)) == len(a) and a.max() < 2048  # fits STATIC's vocab
  native = bench_decode.native_identifiers(500)
  assert native.shape[1] == 4 and native.min() >= 0 and native.max() < 256
  assert len(np.unique(native, axis=0)) == len(native)
  assert bench_all.catalogue_sizes(["--batches", "8", "--catalogue_sizes", "100", "2000",
                                    "--mask_repeats", "5"]) == ["100", "2000"]
  assert bench_all.catalogue_sizes(["--batches", "8"]) == ["100000", "1000000"]
  ours = {"sequences": 2000, "build_s": 0.5, "bytes_per_identifier": 10.0,
          "decode_ms_static_vocab": 1.0, "native_identifiers": 1000, "native_build_s": 0.1,
          "native_bytes_per_identifier": 12.0}
  theirs = {"sequences": 2000, "build_s": 1.0, "bytes_per_identifier": 40.0, "decode_ms": 2.5,
            "native_build_s": 0.3, "native_bytes_per_identifier": 24.0}
  same, own = bench_all.static_rows_against(ours, theirs, {"mask_batch": 2, "mask_beams": 70})
  assert same[-1] == "build **2.0x**, bytes **4.0x**, decode **2.5x**"
  assert own[-1] == "build **3.0x**, bytes **2.0x**"


def test_static_peer_model_feeds_each_step_its_own_logits():
  import jax.numpy as jnp
  import numpy as np
  bench_static = load("peers.bench_static")
  logits = jnp.arange(3 * 4 * 5, dtype=jnp.float32).reshape(3, 4, 5)  # [steps, rows, vocab]
  model = bench_static.precomputed_logits_model(logits)
  first, key = model(jnp.zeros((2, 1), jnp.int32), jnp.int32(0))  # step 0: batch rows only
  assert first.shape == (2, 1, 5) and int(key) == 1
  np.testing.assert_array_equal(first[:, 0], logits[0, :2])
  second, key = model(jnp.zeros((4, 1), jnp.int32), key)
  np.testing.assert_array_equal(second[:, 0], logits[1])
  assert int(key) == 2
  with pytest.raises(SystemExit, match="no static_decoding"):
    bench_static.main(["--static_path", "/nonexistent", "--catalogue_sizes", "10"])


def test_identifier_rows_set_the_pytorch_rqvae_epoch_beside_ours():
  bench_all = load("bench_all")
  ours = {"name": "bench_identifiers", "status": "ok",
          "result": [{"items": 10000, "epoch_s": 0.5, "train_items_per_s": 20000.0,
                      "assign_s": 1.0}]}
  peer = {"name": "peer_identifiers", "status": "ok",
          "result": {"rows": [{"items": 10000, "epoch_s": 1.25}]}}
  machine = {"platform": "cpu"}
  (row,) = bench_all.table_rows({"bench_identifiers": ours, "peer_identifiers": peer}, machine)
  assert row[-2:] == ["PyTorch RQ-VAE epoch 1.25 s", "**2.50x**"]
  failed = dict(peer, status="failed")
  rows = bench_all.table_rows({"bench_identifiers": ours, "peer_identifiers": failed}, machine)
  assert rows[0][-1] == "-" and rows[1][:3] == ["`peers/bench_torch_rqvae.py`",
                                                 "PyTorch RQ-VAE", "failed"]
