"""The main job: every stage in order, each skipped when its output is complete for the
same configuration.

  python -m gensar_jax.pipeline --gin_file=gin/experiments/ml100k_quickstart.gin

Stages (docs/architecture.md), each named as its command (gensar_jax/stages.py):
  prepare          raw log -> prepared dataset (splits, histories, candidates)
  identify         -> dual-purpose identifiers (+ the SASRec baseline's metrics)
  build_vocab      -> SentencePiece vocabulary with every identifier token whole
  baselines        -> popularity, SASRec, BM25, dense retrieval on the test candidates
  train_doc2query  -> a text -> query model (`train` inside the gin scope "doc2query")
  doc2query        -> one sampled pseudo-query per item, for the ad-hoc search task
  train            -> the GenSAR model; the kept checkpoint is the best mean validation NDCG@5
  evaluate         -> test metrics of that checkpoint (candidates and whole catalogue)
  comparison       -> one table and a trade-off plot of every system

The run directory holds `config.gin` (the resolved config of the latest invocation) and
`pipeline.log`: every invocation appended, with its start time, each stage's
run/skip/resume decision, its wall time and its report (each training stage also writes
TensorBoard events and a JSONL metric log into its own directory).

After a stage lands, the pipeline records a fingerprint of the gin bindings the stage (and
everything upstream) depends on in `<run_dir>/stages/<stage>.json`; a stage is skipped when
its output exists and the fingerprint matches. A stage killed half-way has no marker and
runs again: the data stages overwrite their atomic outputs, and the two training stages
resume from their last checkpoint when the configuration they started with (recorded in
`<stage>.started.json`) is unchanged, or start afresh in an emptied directory when it is not.
"""
from __future__ import annotations

if __name__ == "__main__":  # one gin registration: run as the importable module
  import gensar_jax.gin_utils as _gin_utils
  _gin_utils.run_module("gensar_jax.pipeline")

import dataclasses
import hashlib
import os
import re
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import gin

# Every stage's module is imported up front: gin must know their configurables before it
# parses an experiment file.
from gensar_jax import build_vocab as build_vocab_lib
from gensar_jax import comparison
from gensar_jax import doc2query as doc2query_lib
from gensar_jax import evaluate as evaluate_lib
from gensar_jax import identify as identify_lib
from gensar_jax import io_utils
from gensar_jax import prepare as prepare_lib
from gensar_jax import train as train_lib
from gensar_jax.baselines import run as baselines_lib
from gensar_jax.data.stats import format_stats_table

STAGES = ("prepare", "identify", "build_vocab", "baselines", "train_doc2query", "doc2query",
          "train", "evaluate", "comparison")
DOC2QUERY_SCOPE = "doc2query"

# Configurables whose bindings change each stage's output (upstream stages chain in).
STAGE_CONFIGURABLES: Dict[str, Tuple[str, ...]] = {
    "prepare": ("prepare", "build_samples", "make_candidates", "add_semi_synthetic_search",
                "ItemTextConfig",
                "load_movielens_100k", "load_amazon_2014", "load_generic"),
    "identify": ("identify", "RQVAEConfig", "SASRecConfig", "SentenceEncoder"),
    "build_vocab": ("build_vocab",),
    "baselines": ("run_baselines", "SentenceEncoder"),
    "train_doc2query": ("train", "register_doc2query", "T5Config", "build_model", "Trainer",
                  "create_optimizer", "create_learning_rate_schedule", "Partitioner",
                  "create_mesh", "TrainCheckpoints"),
    "doc2query": ("generate_pseudo_queries",),
    "train": ("train", "register_gensar", "mixture_rates", "gensar_mixture", "T5Config",
              "build_model", "Trainer", "create_optimizer", "create_learning_rate_schedule",
              "Partitioner", "create_mesh", "TrainCheckpoints", "RankingEvalHook",
              "ranking_setup", "IdentifierEmbeddingInit", "PretrainedT5Init"),
    "evaluate": ("evaluate", "ranking_setup"),
    "comparison": (),
}
# Configurables whose string arguments name input files: the stage's fingerprint covers
# those files' contents, so a changed input file reruns the stage instead of reusing
# outputs made from the old one.
STAGE_INPUT_FILES: Dict[str, Tuple[str, ...]] = {
    "prepare": ("load_movielens_100k", "load_amazon_2014", "load_generic"),
    "train": ("PretrainedT5Init",),  # a fresh run started from pretrained weights
}
_HASH_CONTENT_UP_TO = 1 << 30  # larger files count by size and modification time
# The stages the baselines and the comparison do not depend on (they chain past them).
_UPSTREAM = {"baselines": "identify", "train_doc2query": "build_vocab", "comparison": "evaluate"}
RESUMABLE = ("train_doc2query", "train")
LOG_FILE = "pipeline.log"


def _binding_lines() -> Dict[str, List[str]]:
  """gin's config as {binding key: its lines} (multi-line values kept)."""
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
  macros to an experiment file does not invalidate the earlier stages' outputs. Scoped
  bindings (`doc2query/train.x`) count for the configurable they bind.
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
  lines += input_file_digests(stage, blocks)
  return hashlib.sha256("\n".join([upstream] + lines).encode()).hexdigest()[:16]


def _bound_strings(keys: Sequence[str], blocks: Dict[str, List[str]]) -> List[str]:
  """String literals of these bindings and of the macros they use (transitively)."""
  chosen, pending = set(keys), list(keys)
  while pending:
    for macro in re.findall(r"%([\w./]+)", "\n".join(blocks[pending.pop()])):
      if macro in blocks and macro not in chosen:
        chosen.add(macro)
        pending.append(macro)
  text = "\n".join(line for k in sorted(chosen) for line in blocks[k])
  return [a or b for a, b in re.findall(r"'([^'\n]*)'|\"([^\"\n]*)\"", text)]


def _file_digest(path: str) -> str:
  stat = os.stat(path)
  if stat.st_size > _HASH_CONTENT_UP_TO:
    return f"size={stat.st_size} mtime_ns={stat.st_mtime_ns}"
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def input_file_digests(stage: str, blocks: Optional[Dict[str, List[str]]] = None) -> List[str]:
  """`input <path> <digest>` for every existing local file (or file under a directory)
  that the stage's input configurables name."""
  names = STAGE_INPUT_FILES.get(stage, ())
  if not names:
    return []
  blocks = _binding_lines() if blocks is None else blocks
  keys = [k for k in blocks if "." in k and k.rsplit(".", 1)[0].split("/")[-1] in names]
  digests = []
  for value in sorted(set(_bound_strings(keys, blocks))):
    if io_utils.is_remote(value) or not value or not os.path.exists(value):
      continue
    paths = [value] if os.path.isfile(value) else sorted(
        os.path.join(d, n) for d, _, files in os.walk(value) for n in files)
    digests += [f"input {p} {_file_digest(p)}" for p in paths]
  return digests


def _marker(run_dir: str, stage: str, suffix: str = "") -> str:
  return io_utils.join(run_dir, "stages", f"{stage}{suffix}.json")


def _read_fingerprint(path: str) -> Optional[str]:
  marker = io_utils.read_json_if_valid(path)
  return marker.get("fingerprint") if isinstance(marker, dict) else None


def is_complete(run_dir: str, stage: str, output: str, fingerprint: str) -> bool:
  return io_utils.exists(output) and _read_fingerprint(_marker(run_dir, stage)) == fingerprint


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  output: str                       # a path that exists once the stage is done
  run: Callable[[], Dict]           # does the work; returns JSON-able statistics
  report: Callable[[Dict], str]     # statistics -> the lines the pipeline prints


def _scoped(scope: str, fn: Callable[[], Dict]) -> Callable[[], Dict]:
  def run():
    with gin.config_scope(scope):
      return fn()
  return run


def _train_summary(summary) -> Dict:
  return {"start_step": summary.start_step, "final_step": summary.final_step,
          "train": summary.train_metrics, "eval": summary.eval_metrics,
          "checkpoints": summary.checkpoint_steps}


def _format_train(title: str) -> Callable[[Dict], str]:
  def fmt(stats: Dict) -> str:
    train, ev = stats.get("train", {}), stats.get("eval", {})
    parts = [f"{title}: steps {stats['start_step']}-{stats['final_step']}"]
    if "loss" in train:
      parts.append(f"train loss {train['loss']:.4f}")
    for key in ("eval/loss", "eval/mean_ndcg@5"):
      if key in ev:
        parts.append(f"{key} {ev[key]:.4f}")
    parts.append(f"checkpoints {stats['checkpoints']}")
    return ", ".join(parts)
  return fmt


def _stages(run_dir: str, prepared_dir: str, identifiers_dir: str, vocab_path: Optional[str],
            baselines_dir: Optional[str], doc2query_dir: Optional[str],
            pseudo_queries_path: Optional[str], model_dir: Optional[str],
            eval_dir: Optional[str], comparison_dir: Optional[str]) -> List[Stage]:
  stages = [
      Stage("prepare", prepared_dir, lambda: prepare_lib.prepare(overwrite=True),
            format_stats_table),
      Stage("identify", identifiers_dir, lambda: identify_lib.identify(overwrite=True),
            identify_lib.format_identifier_stats),
      Stage("build_vocab", vocab_path or "",
            lambda: build_vocab_lib.build_vocab(overwrite=True), build_vocab_lib.format_summary),
  ]

  def baselines():
    results, notes = baselines_lib.run_baselines()
    return {"table": baselines_lib.format_results(results, notes)}

  def doc2query():
    return _train_summary(train_lib.train())

  def pseudo_queries():
    return doc2query_lib.generate_pseudo_queries()

  def train():
    return _train_summary(train_lib.train())

  def evaluate():
    return evaluate_lib.evaluate(output_dir=eval_dir)

  def compare():
    comparison.compare([d for d in (baselines_dir, eval_dir) if d], comparison_dir)
    return {"table": io_utils.read_text(io_utils.join(comparison_dir, "comparison.md"))}

  stages += [
      Stage("baselines", baselines_dir or "", baselines, lambda s: s["table"]),
      Stage("train_doc2query", doc2query_dir or "", _scoped(DOC2QUERY_SCOPE, doc2query),
            _format_train("doc2query")),
      Stage("doc2query", pseudo_queries_path or "",
            _scoped(DOC2QUERY_SCOPE, pseudo_queries), doc2query_lib.format_stats),
      Stage("train", model_dir or "", train, _format_train("GenSAR")),
      Stage("evaluate", eval_dir or "", evaluate, lambda s: s["table"]),
      Stage("comparison", comparison_dir or "", compare, lambda s: s["table"]),
  ]
  return stages


@gin.configurable
def pipeline(run_dir: str = gin.REQUIRED, prepared_dir: str = gin.REQUIRED,
             identifiers_dir: str = gin.REQUIRED, vocab_path: Optional[str] = None,
             baselines_dir: Optional[str] = None, doc2query_dir: Optional[str] = None,
             pseudo_queries_path: Optional[str] = None, model_dir: Optional[str] = None,
             eval_dir: Optional[str] = None, comparison_dir: Optional[str] = None,
             stages: Sequence[str] = STAGES) -> List[str]:
  """Runs the stages in order; returns the report lines it printed."""
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise ValueError(f"pipeline.stages: unknown stage(s) {unknown}; known: {list(STAGES)}")
  outputs = {"build_vocab": ("vocab_path", vocab_path),
             "baselines": ("baselines_dir", baselines_dir),
             "train_doc2query": ("doc2query_dir", doc2query_dir),
             "doc2query": ("pseudo_queries_path", pseudo_queries_path),
             "train": ("model_dir", model_dir), "evaluate": ("eval_dir", eval_dir),
             "comparison": ("comparison_dir", comparison_dir)}
  missing = [f"pipeline.{outputs[s][0]}" for s in stages if s in outputs and not outputs[s][1]]
  if missing:
    raise ValueError(f"the pipeline's stages {list(stages)} need {missing} to be bound")
  io_utils.makedirs(io_utils.join(run_dir, "stages"))
  io_utils.write_text(io_utils.join(run_dir, "config.gin"), gin.config_str())
  log_path = io_utils.join(run_dir, LOG_FILE)

  def say(text: str) -> None:
    print(text, flush=True)
    io_utils.append_text(log_path, text + "\n")

  say(f"=== pipeline {time.strftime('%Y-%m-%d %H:%M:%S %Z')}: stages {list(stages)}")
  report: List[str] = []
  fingerprints: Dict[str, str] = {}
  previous = ""
  for stage in _stages(run_dir, prepared_dir, identifiers_dir, vocab_path, baselines_dir,
                       doc2query_dir, pseudo_queries_path, model_dir, eval_dir,
                       comparison_dir):
    upstream = fingerprints.get(_UPSTREAM.get(stage.name, ""), previous)
    fingerprint = stage_fingerprint(stage.name, upstream)
    fingerprints[stage.name] = fingerprint
    if stage.name not in ("baselines", "comparison"):
      previous = fingerprint
    if stage.name not in stages:
      continue
    stats_path = io_utils.join(run_dir, "stages", f"{stage.name}_stats.json")
    if is_complete(run_dir, stage.name, stage.output, fingerprint):
      say(f"[{stage.name}] complete for this config, skipped ({stage.output})")
      stats = io_utils.read_json(stats_path)
    else:
      started = _marker(run_dir, stage.name, ".started")
      if stage.name in RESUMABLE and io_utils.exists(stage.output):
        if _read_fingerprint(started) == fingerprint:
          say(f"[{stage.name}] resuming in {stage.output}")
        else:  # checkpoints of another configuration: never resume from them
          io_utils.rmtree(stage.output)
      say(f"[{stage.name}] running -> {stage.output}")
      io_utils.write_json(started, {"fingerprint": fingerprint})
      start = time.time()
      stats = stage.run()
      io_utils.write_json(stats_path, stats)
      seconds = round(time.time() - start, 1)
      io_utils.write_json(_marker(run_dir, stage.name), {"fingerprint": fingerprint,
                                                "seconds": seconds})
      say(f"[{stage.name}] done in {seconds} s")
    text = stage.report(stats)
    say(text)
    report.append(text)
  return report


def main() -> None:
  pipeline()

