"""Every pipeline stage on synthetic logs of growing size, up to Amazon-Electronics size.

  make bench-scale                                   # sizes 0.1, 0.3, 1.0 x Electronics
  .venv/bin/python -m launch.bench.bench_scale --scales 0.05,0.15,0.5 --out /tmp/scale/b

Why: users train on logs of 62k items / 192k users / 1.6M interactions and larger, while
the stages had only ever run at MovieLens-100K size; a stage that grows faster than linear
(a per-user lookup over the catalogue, a whole split held in memory) is invisible there and
takes hours here. This runs each stage at several sizes and reports how its cost grows.

Per size (a multiple of Electronics: 62,671 items, 192,000 users, 1.62M interactions):
  generate   the seeded synthetic catalogue and log (gensar_jax/data/synthetic.py), CSV
  prepare, identify, build_vocab, baselines
             through the real entry point, `python -m gensar_jax.pipeline` with the
             quickstart's settings (gin/experiments/ml100k_quickstart.gin: SASRec 30 epochs,
             RQ-VAE 150 epochs) and the generic loader on the synthetic CSVs
  train      GenSAR for --train_steps steps (the quickstart's mini model, batch 32, no
             ad-hoc task: doc2query is not run), reported per step: the steady step time
             of the last logged period, after the compile
  evaluate   the trained model on --eval_examples test examples (ranking the candidates
             and the whole catalogue), reported per example, compile included

Each stage is its own subprocess, so its peak resident memory is that process's
(`os.wait4`'s ru_maxrss), and its wall time includes its imports, as a user sees it. Written
to --out: scale.json (every measurement), scale.md (the table, with each stage's growth
exponent between consecutive sizes: 1.0 is linear), scale.png (log-log CPU time and memory
against interactions), and per stage and size the stage's log under logs/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Dict, List

from tqdm import tqdm

from gensar_jax.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PIPELINE_STAGES = ("prepare", "identify", "build_vocab", "baselines", "train", "evaluate")
DATA_STAGES = ("generate", "prepare", "identify", "build_vocab", "baselines")


def size_gin(run_dir: str, data_dir: str, train_steps: int, eval_examples: int) -> str:
  """The experiment file of one size: the quickstart on the synthetic CSVs, every output
  under `run_dir`, GenSAR trained for `train_steps` and evaluated on `eval_examples`."""
  return f"""# Written by launch/bench/bench_scale.py.
include 'gin/experiments/ml100k_quickstart.gin'
include 'gin/data/generic.gin'
prepare.name = "synthetic"
ITEMS_TABLE = '{data_dir}/items.csv'
EVENTS_TABLE = '{data_dir}/events.csv'
RUN_DIR = '{run_dir}'
PREPARED_DIR = '{run_dir}/data'
IDENTIFIERS_DIR = '{run_dir}/identifiers'
VOCAB_PATH = '{run_dir}/vocab/gensar.model'
BASELINES_DIR = '{run_dir}/baselines'
MODEL_DIR = '{run_dir}/gensar'
EVAL_DIR = '{run_dir}/results/gensar'
pipeline.comparison_dir = '{run_dir}/comparison'
MIXTURE_VARIANT = "no_adhoc"
TRAIN_STEPS = {train_steps}
WARMUP_STEPS = 1
EVAL_PERIOD = 0
CHECKPOINT_PERIOD = {train_steps}
LOG_PERIOD = {max(1, train_steps // 2)}
evaluate.checkpoint = "latest"
evaluate.max_examples = {eval_examples}
"""


def stage_output(run_dir: str, stage: str) -> str:
  return {"prepare": "data", "identify": "identifiers", "build_vocab": "vocab",
          "baselines": "baselines", "train": "gensar", "evaluate": "results/gensar"}[stage]


def du(path: str) -> int:
  """Bytes under `path` (a file or a folder)."""
  if os.path.isfile(path):
    return os.path.getsize(path)
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files
                 if os.path.isfile(os.path.join(root, f)))
  return total


def run_measured(command: List[str], log_path: str) -> Dict:
  """Runs `command`, output to `log_path`; its wall time, exit status and peak RSS."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", HF_HUB_OFFLINE="1", TFDS_DISABLE_GCS="1")
  with open(log_path, "w", encoding="utf-8") as log:
    start = time.time()
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                               env=env)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.time() - start
  process.returncode = os.waitstatus_to_exitcode(status)
  return {"seconds": round(wall, 2), "returncode": process.returncode,
          # ru_maxrss is in kilobytes on Linux: the largest resident set of the process
          # (and of any descendant it waited for).
          "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
          "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2)}


def stage_seconds(run_dir: str, stage: str):
  """The stage's own time as the pipeline recorded it (without the process start-up)."""
  path = os.path.join(run_dir, "stages", f"{stage}.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f).get("seconds")


def train_seconds_per_step(model_dir: str):
  """Seconds per step of the last logged train period (after the compile), or None."""
  path = os.path.join(model_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    rates = [r.get("steps_per_sec") for r in map(json.loads, f)
             if r.get("split") == "train" and r.get("steps_per_sec")]
  return 1.0 / rates[-1] if rates else None


def machine() -> Dict:
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                          capture_output=True, text=True).stdout.strip()
  try:
    with open("/proc/meminfo", encoding="utf-8") as f:
      mem_gb = int(f.readline().split()[1]) / 2**20
  except OSError:
    mem_gb = None
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
  except OSError:
    pass
  return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_gb or 0, 1),
          "python": platform.python_version(), "commit": commit,
          "date_utc": datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M")}


def growth(rows: List[Dict], stage: str, key: str = "seconds") -> List:
  """Per consecutive pair of sizes: log(t2/t1) / log(n2/n1) over interactions (1 = linear).

  For train and evaluate the per-step / per-example cost is compared (ideally flat, 0)."""
  points = [(r["events"], r["stages"][stage][key]) for r in rows
            if stage in r["stages"] and r["stages"][stage].get(key)]
  return [round(math.log(b[1] / a[1]) / math.log(b[0] / a[0]), 2)
          for a, b in zip(points, points[1:]) if b[0] != a[0]]


def _mb(nbytes) -> str:
  return f"{nbytes / 2**20:,.1f}" if nbytes is not None else ""


def write_table(result: Dict, path: str) -> None:
  rows, m = result["sizes"], result["machine"]
  lines = [f"# Scale benchmark ({m['date_utc']} UTC, commit {m['commit']})", "",
           f"{m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; Python {m['python']}.",
           f"Command: `{result['command']}`", ""]
  lines += ["| size | items | users | events | stage | wall s | CPU s | in-stage s "
            "| per unit s | peak RSS MB | output MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    for stage, s in r["stages"].items():
      unit = s.get("per_unit")
      lines.append(
          f"| {r['scale']} | {r['items']:,} | {r['users']:,} | {r['events']:,} | {stage} "
          f"| {s['seconds']:,.1f} | {s.get('cpu_seconds', 0):,.1f} "
          f"| {s.get('stage_seconds') or ''} "
          f"| {'' if unit is None else f'{unit:.3f}'} | {s['peak_rss_mb']:,.0f} "
          f"| {_mb(s.get('output_bytes'))} |" + (" FAILED" if s["returncode"] else ""))
    data_total = sum(r["stages"][s]["seconds"] for s in DATA_STAGES[1:]
                     if s in r["stages"])
    lines.append(f"| {r['scale']} | | | | prepare..baselines total | {data_total:,.1f} "
                 "| | | | | |")
  lines += ["", "Growth exponent between consecutive sizes (d log t / d log events; 1.0 = "
            "linear; train/evaluate: per step / per example, 0 = flat), of wall time and of "
            "CPU time (user + system, less sensitive to other load on the machine):", ""]
  for stage in ("generate",) + PIPELINE_STAGES:
    key = "per_unit" if stage in ("train", "evaluate") else "seconds"
    g, c = growth(rows, stage, key), growth(rows, stage, "cpu_seconds")
    if g:
      lines.append(f"- {stage}: wall {', '.join(str(x) for x in g)}"
                   + ("" if stage in ("train", "evaluate")
                      else f"; CPU {', '.join(str(x) for x in c)}"))
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def write_plot(result: Dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = result["sizes"]
  fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
  for stage in ("generate",) + PIPELINE_STAGES:
    pts = [(r["events"], r["stages"][stage]) for r in rows if stage in r["stages"]]
    if not pts:
      continue
    # CPU time, not wall: on a shared machine wall time says how busy it was.
    key = "per_unit" if stage in ("train", "evaluate") else "cpu_seconds"
    label = stage + (" (per step)" if stage == "train" else " (per example)"
                     if stage == "evaluate" else "")
    ax_t.plot([p[0] for p in pts], [p[1].get(key) or float("nan") for p in pts], "o-",
              label=label)
    ax_m.plot([p[0] for p in pts], [p[1]["peak_rss_mb"] / 1024 for p in pts], "o-",
              label=stage)
  if len(rows) > 1:  # a linear reference through the first size's prepare time
    n0 = rows[0]["events"]
    t0 = rows[0]["stages"].get("prepare", {}).get("cpu_seconds")
    if t0:
      xs = [r["events"] for r in rows]
      ax_t.plot(xs, [t0 * x / n0 for x in xs], "k--", lw=0.8, label="linear")
  for ax, title in ((ax_t, "CPU time (s); train/evaluate: wall per step/example"),
                    (ax_m, "peak RSS (GB)")):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("interactions")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
  ax_t.legend(fontsize=7)
  fig.suptitle(f"Stages vs log size (synthetic, Electronics = 1.62M interactions); "
               f"commit {result['machine']['commit']}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--scales", default="0.1,0.3,1.0",
                      help="sizes as multiples of Amazon-Electronics, comma-separated")
  parser.add_argument("--out", default=None,
                      help="output folder (default runs/bench_scale/<UTC time>)")
  parser.add_argument("--data_root", default="/tmp/scale",
                      help="where the synthetic CSVs and the run directories go")
  parser.add_argument("--stages", default=",".join(PIPELINE_STAGES),
                      help=f"pipeline stages to run, of {','.join(PIPELINE_STAGES)}")
  parser.add_argument("--train_steps", type=int, default=20)
  parser.add_argument("--eval_examples", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--render", default=None,
                      help="only rewrite scale.md and scale.png of this --out folder")
  args = parser.parse_args(argv)
  if args.render:
    with open(os.path.join(args.render, "scale.json"), encoding="utf-8") as f:
      result = json.load(f)
    for row in result["sizes"]:  # train's steady step time, if its run is still there
      model_dir = os.path.join(args.data_root, f"run_x{row['scale']:g}_seed{args.seed}",
                               "gensar")
      if "train" in row["stages"] and train_seconds_per_step(model_dir):
        row["stages"]["train"]["per_unit"] = train_seconds_per_step(model_dir)
    with open(os.path.join(args.render, "scale.json"), "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
    write_table(result, os.path.join(args.render, "scale.md"))
    write_plot(result, os.path.join(args.render, "scale.png"))
    print(open(os.path.join(args.render, "scale.md"), encoding="utf-8").read())
    return
  scales = [float(s) for s in args.scales.split(",")]
  stages = [s for s in args.stages.split(",") if s]
  unknown = [s for s in stages if s not in PIPELINE_STAGES]
  if unknown:
    parser.error(f"unknown stage(s) {unknown}")
  out = args.out or os.path.join(
      REPO, "runs", "bench_scale", datetime.datetime.utcnow().strftime("%Y%m%d-%H%M%S"))
  os.makedirs(os.path.join(out, "logs"), exist_ok=True)
  result = {"command": " ".join([os.path.relpath(sys.executable, REPO)] + sys.argv),
            "machine": machine(), "train_steps": args.train_steps,
            "eval_examples": args.eval_examples, "sizes": []}

  def save():
    with open(os.path.join(out, "scale.json"), "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
    write_table(result, os.path.join(out, "scale.md"))
    write_plot(result, os.path.join(out, "scale.png"))

  bar = tqdm(total=len(scales) * (1 + len(stages)), desc="bench-scale", unit=" stage")
  for scale in scales:
    size = synthetic.SyntheticSize.electronics(scale)
    tag = f"x{scale:g}"
    data_dir = os.path.join(args.data_root, f"data_{tag}_seed{args.seed}")
    run_dir = os.path.join(args.data_root, f"run_{tag}_seed{args.seed}")
    subprocess.run(["rm", "-rf", run_dir], check=True)
    os.makedirs(run_dir)
    bar.set_postfix_str(f"{tag} generate")
    gen = run_measured([sys.executable, "-m", "gensar_jax.data.synthetic", "--out", data_dir,
                        "--scale", str(scale), "--seed", str(args.seed)],
                       os.path.join(out, "logs", f"{tag}_generate.log"))
    gen["output_bytes"] = du(data_dir)
    row = {"scale": scale, "items": size.items, "users": size.users, "events": 0,
           "stages": {"generate": gen}}
    with open(os.path.join(out, "logs", f"{tag}_generate.log"), encoding="utf-8") as f:
      tail = f.read().strip().splitlines()
    try:  # the generator prints its counts as a dict on its last line
      row["events"] = int(json.loads(tail[-1])["events"])
    except (IndexError, KeyError, ValueError):
      row["events"] = size.events
    result["sizes"].append(row)
    bar.update()
    gin_path = os.path.join(run_dir, "scale.gin")
    with open(gin_path, "w", encoding="utf-8") as f:
      f.write(size_gin(run_dir, data_dir, args.train_steps, args.eval_examples))
    for stage in stages:
      bar.set_postfix_str(f"{tag} {stage}")
      measured = run_measured(
          [sys.executable, "-m", "gensar_jax.pipeline", f"--gin_file={gin_path}",
           f"--gin.pipeline.stages=['{stage}']"],
          os.path.join(out, "logs", f"{tag}_{stage}.log"))
      measured["stage_seconds"] = stage_seconds(run_dir, stage)
      output = os.path.join(run_dir, stage_output(run_dir, stage))
      measured["output_bytes"] = du(output) if os.path.exists(output) else None
      # Train: the steady step time from its metric log (the first period holds the
      # compile); evaluate: the stage's time over its examples (compile included).
      if stage == "train":
        measured["per_unit"] = train_seconds_per_step(output)
      elif stage == "evaluate" and measured["stage_seconds"]:
        measured["per_unit"] = measured["stage_seconds"] / args.eval_examples
      row["stages"][stage] = measured
      bar.update()
      save()
      if measured["returncode"]:
        tqdm.write(f"{tag} {stage} failed (exit {measured['returncode']}); see "
                   f"{os.path.join(out, 'logs', f'{tag}_{stage}.log')}")
        break
  bar.close()
  save()
  print(open(os.path.join(out, "scale.md"), encoding="utf-8").read())
  print(f"wrote {out}/scale.json, scale.md, scale.png")


if __name__ == "__main__":
  main()
