"""The main job: every stage in order, each skipped when its output is complete for the
same configuration.

  python -m gensar_jax.pipeline --gin_file=gin/experiments/ml100k_quickstart.gin

Stages so far: prepare -> identify -> vocab. A stage's output directory is written atomically by
the stage itself; after it lands, the pipeline records a fingerprint of the gin bindings
the stage depends on in `<run_dir>/stages/<stage>.json`. A stage is skipped when its
output exists and the fingerprint matches, and re-run (overwriting) otherwise, so a run
killed mid-stage resumes at that stage.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import gin

from gensar_jax import build_vocab as build_vocab_lib
from gensar_jax import gin_utils
from gensar_jax import identify as identify_lib
from gensar_jax import prepare as prepare_lib
from gensar_jax.data.stats import format_stats_table
from gensar_jax.io_utils import write_json

# Configurables whose bindings change each stage's output (upstream stages chain in).
STAGE_CONFIGURABLES: Dict[str, Tuple[str, ...]] = {
    "prepare": ("prepare", "build_samples", "make_candidates", "add_semi_synthetic_search",
                "load_movielens_100k", "load_amazon_2014", "load_generic"),
    "identify": ("identify", "RQVAEConfig", "SASRecConfig", "SentenceEncoder"),
    "vocab": ("build_vocab",),
}


def _binding_lines() -> Dict[str, List[str]]:
  """gin's operative-or-full config as {binding key: its lines} (multi-line values kept)."""
  blocks: Dict[str, List[str]] = {}
  key = None
  for line in gin.config_str().splitlines():
    if not line.strip() or line.startswith("#"):
      continue
    if line.startswith((" ", "\t", ")", "]", "}")) and key is not None:
      blocks[key].append(line)
      continue
    key = line.split("=", 1)[0].strip()
    blocks[key] = [line]
  return blocks


def stage_fingerprint(stage: str, upstream: str = "") -> str:
  """Hash of the gin bindings a stage reads, the macros they use, and its upstream's hash.

  Only macros the stage's bindings refer to (transitively) count, so adding a later stage's
  macros to an experiment file does not invalidate the earlier stages' outputs.
  """
  names = STAGE_CONFIGURABLES[stage]
  blocks = _binding_lines()
  chosen = {k for k in blocks if "." in k and k.rsplit(".", 1)[0].split("/")[-1] in names}
  pending = list(chosen)
  while pending:
    for macro in re.findall(r"%([\w./]+)", "\n".join(blocks[pending.pop()])):
      if macro in blocks and macro not in chosen:
        chosen.add(macro)
        pending.append(macro)
  lines = [line for k in sorted(chosen) for line in blocks[k]]
  return hashlib.sha256("\n".join([upstream] + lines).encode()).hexdigest()[:16]


def _marker(run_dir: str, stage: str) -> str:
  return os.path.join(run_dir, "stages", f"{stage}.json")


def is_complete(run_dir: str, stage: str, output_dir: str, fingerprint: str) -> bool:
  try:
    with open(_marker(run_dir, stage), encoding="utf-8") as f:
      marker = json.load(f)
  except (OSError, json.JSONDecodeError):
    return False
  return os.path.exists(output_dir) and marker.get("fingerprint") == fingerprint


@gin.configurable
def pipeline(run_dir: str = gin.REQUIRED, prepared_dir: str = gin.REQUIRED,
             identifiers_dir: str = gin.REQUIRED, vocab_path: Optional[str] = None,
             stages: Sequence[str] = ("prepare", "identify", "vocab")) -> List[str]:
  """Runs the stages in order; returns the report lines it printed."""
  if "vocab" in stages and not vocab_path:
    raise ValueError("pipeline.vocab_path is required for the vocab stage")
  os.makedirs(os.path.join(run_dir, "stages"), exist_ok=True)
  steps: List[Tuple[str, str, Callable[[], Dict], Callable[[Dict], str]]] = [
      ("prepare", prepared_dir, lambda: prepare_lib.prepare(overwrite=True),
       format_stats_table),
      ("identify", identifiers_dir, lambda: identify_lib.identify(overwrite=True),
       identify_lib.format_identifier_stats),
      ("vocab", vocab_path, lambda: build_vocab_lib.build_vocab(overwrite=True),
       build_vocab_lib.format_summary),
  ]
  report, upstream = [], ""
  for stage, output_dir, run_stage, fmt in steps:
    if stage not in stages:
      continue
    fingerprint = stage_fingerprint(stage, upstream)
    upstream = fingerprint
    stats_path = os.path.join(run_dir, "stages", f"{stage}_stats.json")
    if is_complete(run_dir, stage, output_dir, fingerprint):
      print(f"[{stage}] complete for this config, skipped ({output_dir})", flush=True)
      with open(stats_path, encoding="utf-8") as f:
        stats = json.load(f)
    else:
      print(f"[{stage}] running -> {output_dir}", flush=True)
      start = time.time()
      stats = run_stage()
      write_json(stats_path, stats)
      write_json(_marker(run_dir, stage), {"fingerprint": fingerprint,
                                           "seconds": round(time.time() - start, 1)})
    text = fmt(stats)
    print(text, flush=True)
    report.append(text)
  with open(os.path.join(run_dir, "config.gin"), "w", encoding="utf-8") as f:
    f.write(gin.config_str())
  return report


def main() -> None:
  pipeline()


if __name__ == "__main__":
  gin_utils.run(main)
