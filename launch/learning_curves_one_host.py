"""The learning-curves experiment on one accelerator host, every output in one folder.

  python launch/learning_curves_one_host.py --out=/tmp/gensar_curves            # the run
  python launch/learning_curves_one_host.py --out=/tmp/curves_tiny --size=tiny  # CPU check
  python launch/learning_curves_one_host.py --out=... --dry_run                 # commands

One prepared command for a lent GPU or TPU VM: the quickstart's data, identifiers,
vocabulary, baselines and pseudo-queries, then GenSAR and its single-task and
single-identifier variants trained until validation NDCG stops improving, their test
evaluation, the comparison table and the learning curves (gensar_jax/ablations.py with
gin/experiments/ml100k_learning_curves_accelerator.gin). Everything lands under --out:

  data/ identifiers/ vocab/ baselines/ doc2query/ ...  the base pipeline
  learning_curves/<system>/seed0/{model,results,log.txt}
  learning_curves/comparison/   the test comparison (table, JSON, plot)
  learning_curves/curves/       curves.png, curves.md, curves.json
  log.txt                       this command's output (each run's seconds and results)
  timing.json                   seconds in all, the exit code and the JAX devices used

Killed, the same command resumes (finished stages skip themselves). `--size=tiny` runs the
same code path at a size that finishes on a 2-core CPU in minutes (a tiny model, a few
steps, a few epochs of the identifier models), to try the script before spending device
time. Extra gin flags (`--gin.NAME=VALUE`) are passed to every stage after the size's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "launch"))

from gin_flags import quote_gin_string, split_gin_flags  # noqa: E402

EXPERIMENT = "gin/experiments/ml100k_learning_curves_accelerator.gin"
TINY_MODEL = "gin/models/tiny.gin"

# The quickstart's directory macros, each under --out.
PATH_MACROS = {
    "RUN_DIR": "",
    "PREPARED_DIR": "data",
    "IDENTIFIERS_DIR": "identifiers",
    "VOCAB_PATH": "vocab/gensar.model",
    "BASELINES_DIR": "baselines",
    "DOC2QUERY_DIR": "doc2query",
    "PSEUDO_QUERIES_PATH": "pseudo_queries.jsonl",
    "MODEL_DIR": "gensar",
    "EVAL_DIR": "results/gensar",
    "pipeline.comparison_dir": "comparison",
    "ablations.curves_dir": "learning_curves/curves",
}

# Small enough to run the whole path on 2 CPU cores in a few minutes; not a result.
TINY_BINDINGS = (
    "TRAIN_STEPS = 12", "WARMUP_STEPS = 2", "BATCH_SIZE = 8", "EVAL_PERIOD = 6",
    "CHECKPOINT_PERIOD = 6", "EARLY_STOPPING_EVALS = 1", "RankingEvalHook.max_examples = 8",
    "NUM_BEAMS = 4", "evaluate.max_examples = 16", "SASRecConfig.epochs = 1",
    "RQVAEConfig.epochs = 2", "DOC2QUERY_STEPS = 4",
)


def path_bindings(out: str) -> List[str]:
  out = os.path.abspath(out)
  return [f"{name} = {quote_gin_string(os.path.join(out, rel) if rel else out)}"
          for name, rel in PATH_MACROS.items()]


def command(out: str, size: str, gin_flags: Sequence[str], dry_run: bool) -> List[str]:
  """The ablations command line: the experiment, the size, the paths, the user's flags."""
  cmd = [sys.executable, "-m", "gensar_jax.ablations", f"--gin_file={EXPERIMENT}"]
  bindings = list(path_bindings(out))
  if size == "tiny":
    cmd.append(f"--gin_file={TINY_MODEL}")
    bindings += TINY_BINDINGS
  cmd += [f"--gin_bindings={b}" for b in bindings]
  cmd += list(gin_flags)
  if dry_run:
    cmd.append("--gin_bindings=ablations.dry_run = True")
  return cmd


def _echo(log, text: str) -> None:
  sys.stdout.write(text)
  sys.stdout.flush()
  log.write(text)
  log.flush()


def _devices() -> List[str]:
  probe = "import jax; print('\\n'.join(str(d) for d in jax.devices()))"
  result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=REPO)
  return result.stdout.split("\n")[:-1] if result.returncode == 0 else []


def main(argv: Sequence[str]) -> int:
  gin_flags, own = split_gin_flags(argv, error=SystemExit)
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="the one folder every output goes to")
  parser.add_argument("--size", choices=("full", "tiny"), default="full",
                      help="full: the accelerator run; tiny: a minutes-long CPU check")
  parser.add_argument("--dry_run", action="store_true",
                      help="print every pipeline command and stop")
  args = parser.parse_args(own)
  cmd = command(args.out, args.size, gin_flags, args.dry_run)
  if args.dry_run:
    return subprocess.call(cmd, cwd=REPO)
  os.makedirs(args.out, exist_ok=True)
  start = time.time()
  with open(os.path.join(args.out, "log.txt"), "a", encoding="utf-8") as log:
    _echo(log, f"[one host] {' '.join(cmd)}\n")
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1)
    for line in process.stdout:
      _echo(log, line)
    code = process.wait()
  timing: Dict[str, object] = {"size": args.size, "exit_code": code,
                               "seconds": round(time.time() - start, 1),
                               "devices": _devices()}
  path = os.path.join(args.out, "timing.json")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(timing, f, indent=1)
  os.replace(path + ".tmp", path)
  print(f"[one host] exit {code} after {timing['seconds']} s; outputs in {args.out}",
        flush=True)
  return code


if __name__ == "__main__":
  raise SystemExit(main(sys.argv[1:]))
