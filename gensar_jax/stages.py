"""The stage table: which modules are stages, and what `--help` says about each.

One place says which modules are stages, which of them compute on accelerators (they join
the distributed runtime first), which take gin flags, and which gin file declares a stage's
required values. Both the installed `gensar` command (gensar_jax/commands.py) and every
`python -m gensar_jax.<stage>` entry point (gensar_jax/gin_utils.py) read it; it imports
neither, so neither imports the other.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Dict, List, Optional


@dataclasses.dataclass(frozen=True)
class Stage:
  module: str
  purpose: str
  devices: bool = False        # joins the distributed runtime before main
  gin_file: Optional[str] = None  # the run file whose %gin.REQUIRED macros --help lists
  gin_flags: bool = True       # False: the stage has its own argparse flags


STAGES: Dict[str, Stage] = {
    "prepare": Stage("gensar_jax.prepare", "raw logs -> the prepared dataset",
                     gin_file="gin/runs/prepare.gin"),
    "identify": Stage("gensar_jax.identify", "prepared items -> semantic and collaborative IDs",
                      devices=True, gin_file="gin/runs/identify.gin"),
    "add_items": Stage("gensar_jax.add_items",
                       "identifiers for new catalogue items, nothing retrained",
                       gin_file="gin/runs/add_items.gin"),
    "build_vocab": Stage("gensar_jax.build_vocab",
                         "the SentencePiece vocabulary with every identifier token",
                         gin_file="gin/runs/build_vocab.gin"),
    "baselines": Stage("gensar_jax.baselines.run",
                       "popularity, SASRec, BM25 and dense retrieval on the same candidates",
                       devices=True, gin_file="gin/runs/baselines.gin"),
    "doc2query": Stage("gensar_jax.doc2query", "one pseudo-query per item (doc2query model)",
                       devices=True, gin_file="gin/runs/doc2query.gin"),
    "train": Stage("gensar_jax.train", "train the encoder-decoder on a SeqIO mixture",
                   devices=True, gin_file="gin/runs/train.gin"),
    "evaluate": Stage("gensar_jax.evaluate", "test metrics of a trained run (the protocol)",
                      devices=True, gin_file="gin/runs/evaluate.gin"),
    "infer": Stage("gensar_jax.infer", "predictions of a trained run, one JSON line each",
                   devices=True, gin_file="gin/runs/infer.gin"),
    "export": Stage("gensar_jax.export", "a trained run -> a self-contained serving artifact",
                    devices=True, gin_file="gin/runs/export.gin"),
    "pipeline": Stage("gensar_jax.pipeline", "every stage in order, skipping complete ones",
                      devices=True),
    "ablations": Stage("gensar_jax.ablations", "GenSAR, its single-task ends and ablations"),
    "show_tasks": Stage("gensar_tasks.show", "decode a few examples of every SeqIO task",
                        gin_file="gin/runs/show_tasks.gin"),
    "comparison": Stage("gensar_jax.comparison", "one table and plot from result files",
                        gin_flags=False),
    "serve": Stage("gensar_jax.serve", "serve an exported artifact over HTTP",
                   gin_flags=False),
}


def stage_of_module(module: str) -> Optional[Stage]:
  for stage in STAGES.values():
    if stage.module == module:
      return stage
  return None


def _required_macros(path: str, root: str, seen: Optional[set] = None) -> List[str]:
  """The `NAME = %gin.REQUIRED` macros of a gin file and the files it includes."""
  seen = set() if seen is None else seen
  full = path if os.path.isabs(path) else os.path.join(root, path)
  if full in seen or not os.path.isfile(full):
    return []
  seen.add(full)
  names: List[str] = []
  with open(full, encoding="utf-8") as f:
    for line in f:
      include = re.match(r"\s*include\s+['\"]([^'\"]+)['\"]", line)
      if include:
        names += [n for n in _required_macros(include.group(1), root, seen) if n not in names]
      required = re.match(r"\s*([A-Za-z_][\w.]*)\s*=\s*%gin\.REQUIRED\b", line)
      if required and required.group(1) not in names:
        names.append(required.group(1))
  return names


def stage_help(name: str, doc: Optional[str], root: str) -> str:
  """`--help` of a gin stage: its purpose, the usage line and the values it requires."""
  stage = STAGES[name]
  summary = (doc or stage.purpose).strip().split("\n\n")[0]
  lines = [f"gensar {name} (python -m {stage.module}): {summary}", "",
           f"usage: gensar {name} --gin_file=FILE [--gin_file=FILE ...] [--gin.NAME=VALUE ...]",
           "  --gin_file=FILE     a gin file (repository-relative or absolute); repeatable",
           "  --gin.NAME=VALUE    a binding; strings need inner quotes: "
           "--gin.MODEL_DIR=\"'runs/x'\"",
           "  --gin_bindings=B    a binding written out (NAME = VALUE)"]
  if stage.gin_file:
    required = _required_macros(stage.gin_file, root)
    lines += ["", f"config: {stage.gin_file}"]
    if required:
      lines.append("required values (an experiment file or --gin.NAME=...): "
                   + ", ".join(required))
  lines += ["", "Documents: docs/architecture.md (stages and files), docs/method.md."]
  return "\n".join(lines)


def overview() -> str:
  width = max(len(n) for n in STAGES)
  rows = [f"  {name:<{width}}  {stage.purpose}" for name, stage in STAGES.items()]
  return "\n".join(["usage: gensar <stage> [flags]   (gensar <stage> --help for its values)",
                    "", "stages:", *rows])
