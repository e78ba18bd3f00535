"""Every benchmark in one command: one JSON and one markdown table under runs/bench/<time>/.

Run from the repository root (the scripts are modules of the `launch.bench` namespace):

  make bench                                               # = the next line
  .venv/bin/python -m launch.bench.bench_all               # --quick sizes (default)
  .venv/bin/python -m launch.bench.bench_all --full        # each script's own defaults
  .venv/bin/python -m launch.bench.bench_all --torch_python /tmp/hfvenv/bin/python  # + PyTorch
  .venv/bin/python -m launch.bench.bench_all --static_path /tmp/static  # + the STATIC peer
  .venv/bin/python -m launch.bench.bench_all --tiny --out /tmp/b        # seconds-sized smoke run
  .venv/bin/python -m launch.bench.bench_all --only bench_train \
      --torch_python /tmp/hfvenv/bin/python --train_rounds 5  # train vs PyTorch, 5 rounds each

How the scripts are run: each benchmark is its own subprocess, `python -m
launch.bench.<script> ... --json_out PATH` from the repository root (the peers too, with
their own Python), and bench_all reads that JSON; nothing is imported in-process. A
subprocess per script keeps gin's global configuration, XLA's compilation caches, the
accelerator's memory (JAX preallocates most of a GPU) and peak RSS each script's own, and
it keeps every script's CLI exactly the one a person runs (the full output of each run is
in logs/<name>.log beside the results). bench_all itself never imports JAX.

Run in order (all in launch/bench/): the machine description and its measured matmul peak
(bench_machine.py), bench_train.py (T5.1.1-small shape, random tokens),
bench_train_mixture.py (the quickstart mixture; skipped, with the reason recorded, until
`make demo` has prepared runs/ml100k_quickstart), bench_decode.py (constrained beam decode
with its FLOP ceiling, catalogue tries), bench_identifiers.py (RQ-VAE epoch, ID
assignment), and with --torch_python the PyTorch peer peers/bench_torch_t5.py at the same
shapes, its train step right after bench_train and its constrained `generate` (unless
--no_peer_decode) right after bench_decode, and the PyTorch RQ-VAE of the same
architecture peers/bench_torch_rqvae.py right after bench_identifiers, with its flags;
with --static_path the STATIC peer peers/bench_static.py (run with this Python: its JAX
code needs nothing else) on bench_decode's catalogues, right after bench_decode.
bench_serving.py is not run: it needs an exported model artifact and a server, not a fixed
synthetic shape.

Sizes: --quick (default) times each shape briefly (10 train steps, one decode batch of 8,
one 100k catalogue, 10k items): about 3 minutes on an idle 2-core CPU with the peers (6-8
when other work shares the cores); on an accelerator batch 256 for training and 8 and 64
for decoding (ACCELERATOR_QUICK), well under 8 minutes; --full uses each script's defaults
(tens of minutes on a CPU); --tiny is a tiny model on tiny shapes, for tests.

Peaks: throughput is set beside the measured fp32 matmul peak of the device (the CPU's
only ceiling) and, on a known accelerator, the data-sheet bf16 peak of
bench_machine.py's table (MFU of the bf16 train step). The peak is measured at the
start and again inside bench_decode just before its timing, which divides it by the decode
FLOPs per example (decode_flops.py) for its ceiling; the table's other rows use the
better of the two (on a shared machine either can come out low).

Writes bench.json (machine, peaks, one entry per benchmark: command, status, wall time,
headline metrics, the script's own JSON) and bench.md (the table, also printed), each
through a temporary file and a rename.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = "launch.bench"  # every script is run as `python -m launch.bench.<name>` from REPO
MIXTURE_DATA = os.path.join(REPO, "runs", "ml100k_quickstart", "data")

TINY_MODEL = ["--gin_file=gin/models/tiny.gin"]
# Script arguments per size; None: the benchmark is skipped at that size.
SIZES: Dict[str, Dict[str, Optional[List[str]]]] = {
    "tiny": {
        "bench_train": TINY_MODEL + ["--batch_size", "4", "--input_length", "16",
                                     "--target_length", "4", "--vocab_size", "256",
                                     "--warmup_steps", "1", "--steps", "2"],
        "bench_train_mixture": None,
        "bench_decode": ["--model", "tiny", "--batches", "2", "--input_length", "16",
                         "--vocab_size", "1152", "--catalogue_sizes", "1000",
                         "--mask_repeats", "5"],
        "bench_identifiers": ["--sizes", "2000", "--semantic-dim", "32",
                              "--collaborative-dim", "8", "--codebook-size", "16",
                              "--batch-size", "256"],
    },
    "quick": {
        "bench_train": ["--warmup_steps", "2", "--steps", "10"],
        "bench_train_mixture": ["--configs", "144,32,none,32,b8", "--warmup_steps", "2",
                                "--steps", "10"],
        "bench_decode": ["--batches", "8", "--catalogue_sizes", "100000",
                         "--mask_repeats", "50"],
        "bench_identifiers": ["--sizes", "10000"],
    },
    "full": {"bench_train": [], "bench_train_mixture": [], "bench_decode": [],
             "bench_identifiers": []},
}
PEER_OF = {"bench_train": "train", "bench_decode": "decode"}  # bench_torch_t5.py's modes
# --quick on a GPU/TPU: batch 16 leaves an accelerator idle between dispatches, so there the
# train step is timed at batch 256 (a batch at which MFU means something), decode at 8 and 64.
ACCELERATOR_QUICK = {
    "bench_train": ["--batch_size", "256", "--warmup_steps", "3", "--steps", "20"],
    "bench_decode": ["--batches", "8", "64", "--repeats", "3", "--catalogue_sizes", "100000",
                     "1000000", "--mask_repeats", "50"],
}
# The peer's arguments per size: the same shapes as bench_train / bench_decode above.
PEER_SIZES = {
    "tiny": {"train": ["--d_model", "32", "--d_kv", "16", "--d_ff", "64", "--num_layers",
                       "2", "--num_heads", "2", "--batch_size", "4", "--input_length", "16",
                       "--target_length", "4", "--vocab_size", "256", "--warmup_steps",
                       "1", "--steps", "2"],
             "decode": ["--d_model", "32", "--d_kv", "16", "--d_ff", "64", "--num_layers",
                        "2", "--num_heads", "2", "--batch_size", "2", "--input_length",
                        "16", "--vocab_size", "1152", "--warmup_steps", "0", "--steps", "1"]},
    "quick": {"train": ["--warmup_steps", "2", "--steps", "10"],
              "decode": ["--batch_size", "8", "--warmup_steps", "1", "--steps", "1"]},
    "full": {"train": [], "decode": ["--batch_size", "8"]},
    "accelerator_quick": {"train": ["--batch_size", "256", "--warmup_steps", "3", "--steps",
                                    "20"],
                          "decode": ["--batch_size", "8", "--warmup_steps", "1", "--steps",
                                     "3"]},
}


# ------------------------------------------------------------------------------ running


def module(name: str) -> List[str]:
  """The arguments after the Python that run launch/bench/<name>.py (dots for peers/)."""
  return ["-m", f"{PACKAGE}.{name}"]


def run_script(name: str, command: List[str], out_dir: str, timeout_s: float) -> Dict:
  """Runs one command with `--json_out` in REPO, its output to logs/<name>.log; the entry."""
  json_path = os.path.join(out_dir, "raw", f"{name}.json")
  log_path = os.path.join(out_dir, "logs", f"{name}.log")
  command = command + ["--json_out", json_path]
  entry = {"name": name, "command": " ".join(command), "log": os.path.relpath(log_path, out_dir)}
  print(f"[bench_all] {name}: {' '.join(command[1:])}", flush=True)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  start = time.perf_counter()
  with open(log_path, "w", encoding="utf-8") as log:
    try:
      rc = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                          timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
      rc = "timeout"
  entry["wall_s"] = round(time.perf_counter() - start, 2)
  entry["load_average_1m_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
  if rc == 0 and os.path.exists(json_path):
    with open(json_path, encoding="utf-8") as f:
      entry["result"] = json.load(f)
    entry["status"] = "ok"
  else:
    with open(log_path, encoding="utf-8") as f:
      tail = f.read()[-2000:]
    entry.update(status="failed", returncode=rc, log_tail=tail)
  print(f"[bench_all] {name}: {entry['status']} in {entry['wall_s']:.0f} s", flush=True)
  return entry


def median_round(name: str, rounds: List[Dict]) -> Dict:
  """Of several runs of one benchmark, the one with the median examples/s (the lower of
  the two middle ones for an even count), named `name`, every round's figure beside it.

  On a shared machine one run can meet a burst of other work; alternating ours and the
  peer's rounds and comparing medians keeps one burst from deciding the ratio.
  """
  ok = sorted((e for e in rounds if e["status"] == "ok"),
              key=lambda e: e["result"]["examples_per_s"])
  chosen = dict(ok[(len(ok) - 1) // 2] if ok else rounds[-1], name=name)
  chosen["rounds_examples_per_s"] = [e["result"]["examples_per_s"] for e in rounds
                                     if e["status"] == "ok"]
  chosen["rounds_failed"] = sum(e["status"] != "ok" for e in rounds)
  return chosen


def _rounds_note(entry: Optional[Dict]) -> str:
  figures = (entry or {}).get("rounds_examples_per_s") or []
  if len(figures) < 2:
    return ""
  return f" (median of {len(figures)}: {min(figures):.2f}-{max(figures):.2f})"


def skipped(name: str, reason: str) -> Dict:
  print(f"[bench_all] {name}: skipped ({reason})", flush=True)
  return {"name": name, "status": "skipped", "reason": reason}


# ------------------------------------------------------------------------------ metrics


def _percent(part: Optional[float], whole: Optional[float]) -> Optional[float]:
  return None if not part or not whole else 100.0 * part / whole


def best_peak(machine: Dict, decode: Optional[Dict]) -> None:
  """machine["matmul_peak_fp32"]["flops_per_s"] becomes the best of the start's measurement
  and bench_decode's own (a peak is a maximum; on a shared machine either can be low)."""
  peak = machine["matmul_peak_fp32"]
  peak["at_start_flops_per_s"] = peak["flops_per_s"]
  if decode and decode["status"] == "ok" and decode["result"].get("ceiling"):
    measured = decode["result"]["ceiling"]["matmul_peak_flops_per_s"]
    peak["in_bench_decode_flops_per_s"] = measured
    peak["flops_per_s"] = max(peak["flops_per_s"], measured)


def summarise(entry: Dict, machine: Dict) -> None:
  """Adds entry["metrics"]: the headline numbers of the script's JSON, and their peaks."""
  if entry["status"] != "ok":
    return
  r, name = entry["result"], entry["name"]
  fp32_peak = machine["matmul_peak_fp32"]["flops_per_s"]
  if name == "bench_train":
    on_cpu = r["platform"] == "cpu"
    matmul_peak = fp32_peak if on_cpu or r["dtype"] == "float32" else \
        machine.get("matmul_peak_bf16", {}).get("flops_per_s")
    entry["metrics"] = {
        "examples_per_s": r["examples_per_s"], "seconds_per_step": r["seconds_per_step"],
        "flops_per_step": r["model_flops_per_step"], "flops_per_s": r["flops_per_s"],
        "percent_of_matmul_peak": _percent(r["flops_per_s"], matmul_peak),
        "mfu_percent": None if r["mfu"] is None else 100.0 * r["mfu"]}
  elif name == "bench_train_mixture":
    entry["metrics"] = {f"examples_per_s[{row['config']}]": row["examples_per_s"]
                        for row in r}
  elif name == "bench_decode":
    metrics = {}
    if r.get("ceiling"):
      c = r["ceiling"]
      metrics.update(flops_per_example=c["flops_per_example"]["total"],
                     matmul_peak_flops_per_s=c["matmul_peak_flops_per_s"],
                     ceiling_examples_per_s=c["ceiling_examples_per_s"])
      peak = machine.get("peak_bf16_flops_per_chip")
      for row in r["model"]:
        b = row["batch"]
        metrics[f"examples_per_s[batch {b}]"] = row["examples_per_s"]
        metrics[f"flops_per_s[batch {b}]"] = row["flops_per_s"]
        metrics[f"percent_of_ceiling[batch {b}]"] = row["percent_of_ceiling"]
        metrics[f"percent_of_matmuls_alone[batch {b}]"] = row.get("percent_of_matmuls_alone")
        if peak:
          metrics[f"mfu_percent[batch {b}]"] = _percent(row["flops_per_s"], peak)
    for row in r["catalogue"]:
      n = row["sequences"]
      for key in ("build_s", "bytes_per_identifier", "mask_us_dense", "mask_us_csr",
                  "decode_ms"):
        metrics[f"{key}[{n} sequences]"] = row[key]
    entry["metrics"] = metrics
  elif name == "bench_identifiers":
    entry["metrics"] = {}
    for row in r:
      for key in ("epoch_s", "train_items_per_s", "assign_s", "assign_items_per_s"):
        entry["metrics"][f"{key}[{row['items']} items]"] = row[key]
  elif name == "peer_identifiers":
    entry["metrics"] = {f"epoch_s[{row['items']} items]": row["epoch_s"] for row in r["rows"]}
  elif name == "peer_static":
    entry["metrics"] = {}
    for row in r["catalogue"]:
      n = row["sequences"]
      for key in ("build_s", "bytes_per_identifier", "decode_ms", "native_build_s",
                  "native_bytes_per_identifier"):
        entry["metrics"][f"{key}[{n} sequences]"] = row[key]
  elif name.startswith("peer_"):
    entry["metrics"] = {"examples_per_s": r["examples_per_s"]}


# ------------------------------------------------------------------------------ the table


def _f(x: Optional[float], fmt: str = "{:.2f}") -> str:
  return "n/a" if x is None else fmt.format(x)


def _ratio(ours: Optional[float], peer: Optional[Dict]) -> List[str]:
  if not peer or peer["status"] != "ok":
    return ["-", "-"]
  theirs = peer["result"]["examples_per_s"]
  return [f"{theirs:.2f} ex/s", f"**{ours / theirs:.2f}x**" if ours else "n/a"]


def static_rows_against(ours: Dict, theirs: Dict, args: Dict) -> List[List[str]]:
  """Two table rows setting a bench_decode catalogue row beside STATIC's on the same
  sequences (peers/bench_static.py): our catalogue at vocab 2,048, and STATIC's own
  4-level setting. Ratios are how many times faster / smaller ours is."""
  def times(peer: float, own: float) -> str:
    return f"**{peer / own:.1f}x**" if own else "n/a"

  same = (f"STATIC on the same {theirs['sequences']:,} sequences: build "
          f"{theirs['build_s']:.2f} s (sort included), {theirs['bytes_per_identifier']:.1f} "
          f"B/id, decode {theirs['decode_ms']:.2f} ms at vocab 2,048")
  native = (f"STATIC: build {theirs['native_build_s']:.2f} s, "
            f"{theirs['native_bytes_per_identifier']:.1f} B/id")
  return [
      ["`bench_decode.py` vs `peers/bench_static.py`",
       f"the catalogue above, batch {args['mask_batch']} x {args['mask_beams']} beams, vocab "
       "2,048", f"build {ours['build_s']:.2f} s, {ours['bytes_per_identifier']:.1f} B/id, "
       f"decode {ours['decode_ms_static_vocab']:.2f} ms", "-", "-", same,
       f"build {times(theirs['build_s'], ours['build_s'])}, bytes "
       f"{times(theirs['bytes_per_identifier'], ours['bytes_per_identifier'])}, decode "
       f"{times(theirs['decode_ms'], ours['decode_ms_static_vocab'])}"],
      ["`bench_decode.py` vs `peers/bench_static.py`",
       f"STATIC's setting: {ours['native_identifiers']:,} IDs of 4 codes in [0, 256)",
       f"build {ours['native_build_s']:.2f} s, {ours['native_bytes_per_identifier']:.1f} B/id",
       "-", "-", native,
       f"build {times(theirs['native_build_s'], ours['native_build_s'])}, bytes "
       f"{times(theirs['native_bytes_per_identifier'], ours['native_bytes_per_identifier'])}"],
  ]


def catalogue_sizes(script_args: List[str]) -> List[str]:
  """bench_decode's --catalogue_sizes values in `script_args` (its default when absent)."""
  if "--catalogue_sizes" not in script_args:
    return ["100000", "1000000"]
  values = script_args[script_args.index("--catalogue_sizes") + 1:]
  return [v for v in values[:next((i for i, v in enumerate(values) if v.startswith("--")),
                                   len(values))]]


def table_rows(entries: Dict[str, Dict], machine: Dict) -> List[List[str]]:
  on_cpu = machine["platform"] == "cpu"
  rows = []
  for name in ("bench_train", "bench_train_mixture", "bench_decode", "bench_identifiers"):
    e = entries.get(name)
    if e is None:
      continue
    if e["status"] != "ok":
      why = e.get("reason") or f"failed ({e.get('returncode')}), see {e['log']}"
      rows.append([f"`{name}.py`", e["status"], why, "-", "-", "-", "-"])
      continue
    r = e["result"]
    if name == "bench_train":
      m = e["metrics"]
      shape = (f"{r['emb_dim']}-wide {r['num_encoder_layers']}+{r['num_decoder_layers']} "
               f"layers ({r['params'] / 1e6:.1f}M, {r['dtype']}), batch {r['batch_size']}, "
               f"input {r['input_length']}, target {r['target_length']}, vocab "
               f"{r['vocab_size']}")
      peak = (f"{_f(m['percent_of_matmul_peak'], '{:.0f}')}% of matmul peak" if on_cpu else
              f"MFU {_f(m['mfu_percent'], '{:.1f}')}%, "
              f"{_f(m['percent_of_matmul_peak'], '{:.0f}')}% "
              "of matmul peak")
      rows.append(["`bench_train.py`", shape,
                   f"{m['examples_per_s']:.2f} train ex/s{_rounds_note(e)}",
                   f"{m['flops_per_s'] / 1e9:.1f} GFLOP/s", peak,
                   *_ratio(m["examples_per_s"], entries.get("peer_train"))])
    elif name == "bench_train_mixture":
      for row in r:
        rows.append(["`bench_train_mixture.py`", f"quickstart mixture, config {row['config']}",
                     f"{row['examples_per_s']:.1f} train ex/s", "-", "-", "-", "-"])
    elif name == "bench_decode":
      args = r["args"]
      c = r.get("ceiling")
      for row in r["model"]:
        shape = (f"model {args['model']}, input {args['input_length']}, beam {args['beams']}, "
                 f"{args['candidates']} candidates, vocab {args['vocab_size']}, batch "
                 f"{row['batch']}")
        peak = (f"{row['percent_of_ceiling']:.0f}% of ceiling "
                f"{c['ceiling_examples_per_s']:.2f} ex/s "
                f"({c['flops_per_example']['total'] / 1e9:.2f} GFLOP/ex)")
        if row.get("matmuls_alone"):
          peak += (f"; {row['percent_of_matmuls_alone']:.0f}% of its matmuls alone "
                   f"({row['matmuls_alone']['examples_per_s']:.2f} ex/s)")
        rows.append(["`bench_decode.py`", shape, f"{row['examples_per_s']:.2f} ex/s",
                     f"{row['flops_per_s'] / 1e9:.1f} GFLOP/s", peak,
                     *_ratio(row["examples_per_s"], entries.get("peer_decode"))])
      static = entries.get("peer_static")
      static_rows = ({p["sequences"]: p for p in static["result"]["catalogue"]}
                     if static and static["status"] == "ok" else {})
      for row in r["catalogue"]:
        rows.append(["`bench_decode.py`", f"catalogue trie, {row['sequences']:,} SIDs + CIDs",
                     f"build {row['build_s']:.2f} s, {row['bytes_per_identifier']:.1f} B/id, "
                     f"mask {row['mask_us_dense']:.0f} / {row['mask_us_csr']:.0f} us, decode "
                     f"{row['decode_ms']:.2f} ms (batch {args['mask_batch']} x "
                     f"{args['mask_beams']} beams)", "-", "-", "-", "-"])
        if row["sequences"] in static_rows:
          rows += static_rows_against(row, static_rows[row["sequences"]], args)
      if static and static["status"] != "ok":
        rows.append(["`peers/bench_static.py`", "STATIC", static["status"],
                     "-", "-", "-", "-"])
    elif name == "bench_identifiers":
      peer = entries.get("peer_identifiers")
      peer_rows = ({p["items"]: p for p in peer["result"]["rows"]}
                   if peer and peer["status"] == "ok" else {})
      for row in r:
        theirs = peer_rows.get(row["items"])
        rows.append(["`bench_identifiers.py`", f"RQ-VAE + assignment, {row['items']:,} items",
                     f"epoch {row['epoch_s']:.2f} s ({row['train_items_per_s']:.0f} items/s), "
                     f"assign {row['assign_s']:.1f} s", "-", "-",
                     f"PyTorch RQ-VAE epoch {theirs['epoch_s']:.2f} s" if theirs else "-",
                     f"**{theirs['epoch_s'] / row['epoch_s']:.2f}x**" if theirs else "-"])
      if peer and peer["status"] != "ok":
        rows.append(["`peers/bench_torch_rqvae.py`", "PyTorch RQ-VAE", peer["status"],
                     "-", "-", "-", "-"])
  return rows


def markdown(entries: Dict[str, Dict], machine: Dict, size: str, stamp: str) -> str:
  peak = machine["matmul_peak_fp32"]
  head = [f"Benchmarks, `--{size}`, {stamp} UTC", "",
          f"Machine: {machine_line(machine)}. Measured fp32 matmul peak "
          f"{peak['flops_per_s'] / 1e9:.1f} GFLOP/s ({peak['n']}x{peak['n']}, best of "
          f"{peak['repeats']}; {peak['at_start_flops_per_s'] / 1e9:.1f} at the start"
          + (f", {peak['in_bench_decode_flops_per_s'] / 1e9:.1f} in bench_decode"
             if "in_bench_decode_flops_per_s" in peak else "") + ")"
          + (f"; data-sheet bf16 peak "
                                   f"{machine['peak_bf16_flops_per_chip'] / 1e12:.0f} "
                                   "TFLOP/s per chip" if machine.get("peak_bf16_flops_per_chip")
                                   else "") + ".", ""]
  for name in ("peer_train", "peer_decode"):
    e = entries.get(name)
    if e and e["status"] == "ok":
      p = e["result"]
      head.append(f"Peer `{name}`: {p['peer']} (torch {p['torch']}, transformers "
                  f"{p['transformers']}, {p['threads']} threads), {p['shape']}, batch "
                  f"{p['batch_size']}: {p['examples_per_s']:.2f} ex/s{_rounds_note(e)}.")
    elif e:
      head.append(f"Peer `{name}`: {e['status']} ({e.get('reason') or e.get('log')}).")
  loads = [e.get("load_average_1m_after") for e in entries.values()]
  loads = [x for x in loads + [(machine.get("load_average_1_5_15") or [None])[0]]
           if x is not None]
  cores = machine.get("cpu_usable_cores") or 1
  if machine["platform"] == "cpu" and loads and max(loads) > 1.5 * cores + 0.5:
    # A benchmark alone adds about `cores` to the 1-minute load average (its threads, the
    # main thread now and then); half as much again means other work.
    head.append(f"**Loaded machine**: the 1-minute load average reached {max(loads):.1f} on "
                f"{cores} cores (each benchmark alone adds about {cores}); other work "
                "shared the cores, so these timings, and the ratios most (PyTorch's "
                "threads slow down more than XLA's when cores are shared), are unreliable.")
  if head[-1]:
    head.append("")
  lines = ["| script | shape | measured | model FLOP/s | of peak | peer | ours / peer |",
           "|---|---|---|---:|---|---:|---:|"]
  lines += ["| " + " | ".join(row) + " |" for row in table_rows(entries, machine)]
  return "\n".join(head + lines) + "\n"


def machine_line(m: Dict) -> str:
  accelerator = ("no accelerator" if m["platform"] == "cpu" else
                 f"{m['device_count']} x {m['device_kind']}")
  load = m.get("load_average_1_5_15")
  flags = m.get("cpu_vector_flags")
  return (f"{m['cpu_model']} ("
          + (f"family/model {m['cpu_family_model']}, {'/'.join(flags) or 'no AVX2'}; "
             if flags is not None else "")
          + f"{m['cpu_usable_cores']} usable of {m['cpu_logical_cores']} cores"
          + (f", load average {load[0]:.1f} at the start" if load else "")
          + f"), {m['ram_gib']} GiB RAM, {accelerator}; Python {m['python']}, jax "
          f"{m['jax']}, jaxlib {m['jaxlib']}, flax {m['flax']}; commit {m['git_commit']}")


def write_atomic(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


# ------------------------------------------------------------------------------ main


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  size = parser.add_mutually_exclusive_group()
  size.add_argument("--quick", dest="size", action="store_const", const="quick")
  size.add_argument("--full", dest="size", action="store_const", const="full")
  size.add_argument("--tiny", dest="size", action="store_const", const="tiny")
  parser.add_argument("--out", default=os.path.join(REPO, "runs", "bench"),
                      help="parent folder of the <timestamp>/ run folder")
  parser.add_argument("--only", nargs="+", choices=list(SIZES["full"]), default=None,
                      help="run only these benchmarks (the peers follow their shapes)")
  parser.add_argument("--torch_python", default=None,
                      help="a Python with torch + transformers: also run the PyTorch peers "
                           "(T5 train step and generate, RQ-VAE)")
  parser.add_argument("--static_path", default=None,
                      help="a checkout of youtube/static-constraint-decoding: also run the "
                           "STATIC peer on bench_decode's catalogues")
  parser.add_argument("--no_peer_decode", action="store_true",
                      help="with --torch_python, skip the (slow on CPU) generate() peer")
  parser.add_argument("--train_rounds", type=int, default=1,
                      help="run bench_train (and its peer, alternating) this many times and "
                           "report the medians; 3 or 5 on a shared machine")
  parser.add_argument("--timeout_s", type=float, default=3600, help="per script")
  args = parser.parse_args(argv)
  args.size = args.size or "quick"
  if args.train_rounds < 1:
    parser.error(f"--train_rounds must be at least 1, got {args.train_rounds}")
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
  out_dir = os.path.join(os.path.abspath(args.out), stamp)
  for sub in ("raw", "logs"):
    os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
  python = sys.executable
  start = time.perf_counter()

  machine_entry = run_script("machine", [python, *module("bench_machine")], out_dir,
                             args.timeout_s)
  if machine_entry["status"] != "ok":
    print(machine_entry["log_tail"], file=sys.stderr)
    return 1
  machine = machine_entry["result"]

  sizes, peer_sizes = dict(SIZES[args.size]), PEER_SIZES[args.size]
  if args.size == "quick" and machine["platform"] != "cpu":
    sizes.update(ACCELERATOR_QUICK)
    peer_sizes = PEER_SIZES["accelerator_quick"]
  entries: Dict[str, Dict] = {}
  for name, script_args in sizes.items():
    if args.only and name not in args.only:
      continue
    if script_args is None:
      entries[name] = skipped(name, f"not run at --{args.size}")
    elif name == "bench_train_mixture" and not os.path.isdir(MIXTURE_DATA):
      entries[name] = skipped(name, "needs the quickstart's prepared data "
                                    "(runs/ml100k_quickstart; `make demo`)")
    mode = PEER_OF.get(name)
    with_peer = bool(args.torch_python and mode
                     and not (mode == "decode" and args.no_peer_decode))
    if script_args is None or name in entries:
      continue
    ours_command = [python, *module(name)] + script_args
    peer_command = ([args.torch_python, *module("peers.bench_torch_t5"), mode]
                    + peer_sizes[mode]) if with_peer else None
    rounds = args.train_rounds if name == "bench_train" else 1
    if rounds == 1:
      entries[name] = run_script(name, ours_command, out_dir, args.timeout_s)
      if peer_command:
        # Right after ours, so that both sides meet about the same load on a shared machine.
        entries[f"peer_{mode}"] = run_script(f"peer_{mode}", peer_command, out_dir,
                                             args.timeout_s)
      if name == "bench_identifiers" and args.torch_python:
        # The PyTorch RQ-VAE of the same architecture takes bench_identifiers' own flags.
        entries["peer_identifiers"] = run_script(
            "peer_identifiers", [args.torch_python, *module("peers.bench_torch_rqvae")]
            + script_args, out_dir, args.timeout_s)
      if name == "bench_decode" and args.static_path:
        static_command = [python, *module("peers.bench_static"),
                          "--static_path", os.path.abspath(args.static_path),
                          "--catalogue_sizes", *catalogue_sizes(script_args)]
        entries["peer_static"] = run_script("peer_static", static_command, out_dir,
                                            args.timeout_s)
      continue
    ours, theirs = [], []
    for i in range(rounds):  # alternating, so a burst of other work hits both sides alike
      ours.append(run_script(f"{name}.{i}", ours_command, out_dir, args.timeout_s))
      if peer_command:
        theirs.append(run_script(f"peer_{mode}.{i}", peer_command, out_dir, args.timeout_s))
    entries[name] = median_round(name, ours)
    if theirs:
      entries[f"peer_{mode}"] = median_round(f"peer_{mode}", theirs)
  best_peak(machine, entries.get("bench_decode"))
  for entry in entries.values():
    summarise(entry, machine)

  table = markdown(entries, machine, args.size, stamp)
  report = {"created_utc": stamp, "size": args.size, "machine": machine,
            "wall_s": round(time.perf_counter() - start, 1),
            "benchmarks": list(entries.values())}
  write_atomic(os.path.join(out_dir, "bench.json"), json.dumps(report, indent=1) + "\n")
  write_atomic(os.path.join(out_dir, "bench.md"), table)
  print()
  print(table)
  print(f"[bench_all] {report['wall_s']:.0f} s; wrote {out_dir}/bench.json and bench.md")
  return 1 if any(e["status"] == "failed" for e in entries.values()) else 0


if __name__ == "__main__":
  sys.exit(main())
