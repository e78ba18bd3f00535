"""The comparison's generative rows: GenSAR, its two single-task ends and its ablations,
several seeds each, then one table and trade-off plot with every baseline. One command:

  python -m gensar_jax.ablations --gin_file=gin/experiments/ml100k_ablations.gin

Each system is (row name, identifier mode, mixture variant):
  identifier mode   the RQ-VAE's `RQVAEConfig.mode`: dual (published), sid_only, cid_only,
                    dual_no_shared; one table per mode, built once and shared by the seeds
  mixture variant   gensar_jax/prompts.py MIXTURE_SUFFIXES: all (published), rec_only,
                    search_only, no_alignment, single_id

How it runs, so that a killed run resumes and nothing is done twice:
  1. the base experiment's pipeline (the gin files given here) in a subprocess: data,
     identifiers, vocabulary, baselines, doc2query, pseudo-queries, and the base system's
     own seed. Already complete when `make demo` ran with the same config: every stage
     skips itself.
  2. per extra identifier mode, the pipeline's identify stage alone, into
     `<run_dir>/ablations/identifiers_<mode>/`.
  3. per (system, seed), the pipeline's train and evaluate stages in
     `<run_dir>/ablations/<system>/seed<k>/`, with MIXTURE_VARIANT, IDENTIFIERS_DIR, SEED
     and DATA_SEED bound for it. The pipeline's fingerprints skip finished runs and resume
     a killed one from its last checkpoint.
  4. `gensar_jax.comparison` over the baselines, the base run and every ablation run.

The seeds vary the model's initialisation, dropout and data order (SEED, DATA_SEED); the
identifier tables stay fixed per mode, so the spread is the generative model's run-to-run
spread, not the RQ-VAE's. Every subprocess writes its whole output to `log.txt` beside its
artefacts, and all of them share one JAX compilation cache, so the seeds after the first
of a system skip most compilation. The vocabulary must hold the tokens of every mode's
table (`build_vocab.extra_levels`, set in the experiment file).
"""
from __future__ import annotations

if __name__ == "__main__":  # one gin registration: run as the importable module
  import gensar_jax.gin_utils as _gin_utils
  _gin_utils.run_module("gensar_jax.ablations")

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import gin
from tqdm import tqdm

from gensar_jax import comparison
from gensar_jax import gin_utils
from gensar_jax import learning_curves
from gensar_jax import results as results_lib
from gensar_jax.identifiers.rqvae import MODES
from gensar_jax.prompts import MIXTURE_SUFFIXES

BASE_MODE = "dual"
MIXTURES = tuple(MIXTURE_SUFFIXES) + ("single_id",)
LOG_FILE = "log.txt"
LOG_TAIL_LINES = 40


class AblationError(RuntimeError):
  """A run of the ablation grid failed; the message names it and its log."""


@dataclasses.dataclass(frozen=True)
class System:
  name: str         # the comparison row, e.g. "GenSAR (SID only)"
  identifiers: str  # RQVAEConfig.mode of its identifier table
  mixture: str      # MIXTURE_VARIANT it trains on (and is evaluated as)

  @property
  def slug(self) -> str:
    return re.sub(r"[^a-z0-9]+", "_", self.name.lower()).strip("_")


@dataclasses.dataclass(frozen=True)
class Job:
  """One pipeline subprocess: the stages it runs and the bindings that make it this job."""
  title: str
  run_dir: str
  stages: Tuple[str, ...]
  bindings: Tuple[str, ...]
  eval_dir: Optional[str] = None  # where its result JSON lands (train jobs)
  model_dir: Optional[str] = None  # its trained model (train jobs): the learning curve
  system: Optional[str] = None     # the comparison row it belongs to (train jobs)


def parse_systems(systems: Sequence[Sequence[str]]) -> List[System]:
  """Validates the gin list of (name, identifier mode, mixture variant) triples."""
  parsed: List[System] = []
  for i, entry in enumerate(systems):
    if len(entry) != 3:
      raise ValueError(f"ablations.systems[{i}] = {entry!r}: expected (name, identifier "
                       "mode, mixture variant)")
    system = System(*(str(x) for x in entry))
    if system.identifiers not in MODES:
      raise ValueError(f"ablations.systems[{i}] {system.name!r}: identifier mode "
                       f"{system.identifiers!r} is not one of {MODES}")
    if system.mixture not in MIXTURES:
      raise ValueError(f"ablations.systems[{i}] {system.name!r}: mixture variant "
                       f"{system.mixture!r} is not one of {MIXTURES}")
    if system.mixture == "single_id" and system.identifiers not in ("dual", "dual_no_shared"):
      raise ValueError(f"ablations.systems[{i}] {system.name!r}: single_id needs a table with "
                       "both SIDs and CIDs (mode dual or dual_no_shared)")
    parsed.append(system)
  for attr in ("name", "slug"):
    values = [getattr(s, attr) for s in parsed]
    clashes = sorted({v for v in values if values.count(v) > 1})
    if clashes:
      raise ValueError(f"ablations.systems: several systems share the {attr} {clashes}")
  if not parsed:
    raise ValueError("ablations.systems is empty")
  return parsed


def _string(value: str) -> str:
  return json.dumps(value)  # a gin string literal (JSON escaping is valid gin)


def plan(systems: Sequence[System], seeds: Sequence[int], run_dir: str, identifiers_dir: str,
         base_system: str, base_seed: int, base_mixture: str,
         base_eval_dir: str, catalogue: bool = False, subdir: str = "ablations",
         base_stages: Sequence[str] = (), base_model_dir: Optional[str] = None
         ) -> Tuple[List[Job], List[Job], List[Job]]:
  """(base, identifier, train) jobs. The base system at the base seed is the base run,
  unless `base_stages` stops the base pipeline before it trains (then every system is a
  job of its own)."""
  if len(set(seeds)) != len(seeds) or not seeds:
    raise ValueError(f"ablations.seeds must be distinct and non-empty, got {list(seeds)}")
  root = os.path.join(run_dir, subdir)
  base_trains = not base_stages or "train" in base_stages
  base = [Job("base pipeline", run_dir, tuple(base_stages), (),
              eval_dir=base_eval_dir if base_trains else None,
              model_dir=base_model_dir if base_trains else None,
              system=base_system if base_trains else None)]
  tables = {BASE_MODE: identifiers_dir}
  identify = []
  for mode in dict.fromkeys(s.identifiers for s in systems):
    if mode == BASE_MODE:
      continue
    job_dir = os.path.join(root, f"identifiers_{mode}")
    tables[mode] = os.path.join(job_dir, "table")
    identify.append(Job(f"identifiers ({mode})", job_dir, ("identify",),
                        (f"IDENTIFIERS_DIR = {_string(tables[mode])}",
                         f"RQVAEConfig.mode = {_string(mode)}")))
  train = []
  for system in systems:
    for seed in seeds:
      if (base_trains and system.name == base_system and seed == base_seed
          and system.mixture == base_mixture and system.identifiers == BASE_MODE):
        continue  # this row's run is the base pipeline's own
      job_dir = os.path.join(root, system.slug, f"seed{seed}")
      eval_dir = os.path.join(job_dir, "results")
      train.append(Job(
          f"{system.name} seed {seed}", job_dir, ("train", "evaluate"),
          (f"IDENTIFIERS_DIR = {_string(tables[system.identifiers])}",
           f"MIXTURE_VARIANT = {_string(system.mixture)}",
           f"SEED = {int(seed)}", f"DATA_SEED = {int(seed)}",
           f"SYSTEM_NAME = {_string(system.name)}",
           f"MODEL_DIR = {_string(os.path.join(job_dir, 'model'))}",
           f"pipeline.eval_dir = {_string(eval_dir)}",
           f"evaluate.catalogue = {bool(catalogue)}"),
          eval_dir=eval_dir, model_dir=os.path.join(job_dir, "model"), system=system.name))
  return base, identify, train


def job_command(job: Job, gin_files: Sequence[str], user_bindings: Sequence[str]) -> List[str]:
  """The pipeline command line of a job: the experiment, the user's flags, then the job's."""
  command = [sys.executable, "-m", "gensar_jax.pipeline"]
  command += [f"--gin_file={f}" for f in gin_files]
  job_bindings = list(job.bindings) + [f"pipeline.run_dir = {_string(job.run_dir)}"]
  if job.stages:
    job_bindings.append(f"pipeline.stages = {list(job.stages)!r}")
  command += [f"--gin_bindings={b}" for b in [*user_bindings, *job_bindings]]
  return command


def run_job(job: Job, command: Sequence[str], env: Dict[str, str]) -> float:
  """Runs one job with its output in `<run_dir>/log.txt`; returns seconds. Raises with the
  log's tail when it fails."""
  os.makedirs(job.run_dir, exist_ok=True)
  log_path = os.path.join(job.run_dir, LOG_FILE)
  start = time.time()
  with open(log_path, "a", encoding="utf-8") as log:
    log.write(f"\n$ {' '.join(command)}\n")
    log.flush()
    code = subprocess.call(list(command), stdout=log, stderr=subprocess.STDOUT, env=env,
                           cwd=gin_utils.REPO_ROOT)
  if code != 0:
    with open(log_path, encoding="utf-8", errors="replace") as f:
      tail = "".join(f.readlines()[-LOG_TAIL_LINES:])
    raise AblationError(f"{job.title} failed (exit {code}); its log is {log_path}; "
                        f"last lines:\n{tail}")
  return time.time() - start


def _result_summary(eval_dir: Optional[str]) -> str:
  if not eval_dir or not os.path.isdir(eval_dir):
    return ""
  parts = []
  for result in results_lib.read_results(eval_dir):
    for task in results_lib.TASKS:
      block = getattr(result, task)
      if block is not None:
        parts.append(f"{task} NDCG@10 {block['NDCG@10']:.4f}")
  return ", ".join(parts)


@gin.configurable
def ablations(gin_files: Sequence[str], user_bindings: Sequence[str] = (),
              systems: Sequence[Sequence[str]] = gin.REQUIRED,
              seeds: Sequence[int] = (0, 1, 2), run_dir: str = gin.REQUIRED,
              identifiers_dir: str = gin.REQUIRED, baselines_dir: str = gin.REQUIRED,
              base_eval_dir: str = gin.REQUIRED, base_system: str = gin.REQUIRED,
              base_seed: int = gin.REQUIRED, base_mixture: str = gin.REQUIRED,
              comparison_dir: Optional[str] = None, catalogue: bool = False,
              subdir: str = "ablations", base_stages: Sequence[str] = (),
              base_model_dir: Optional[str] = None, curves_dir: Optional[str] = None,
              dry_run: bool = False,
              runner: Callable[[Job, Sequence[str], Dict[str, str]], float] = run_job
              ) -> List[comparison.SystemSummary]:
  """Runs the grid (skipping what is done) and writes the comparison; returns its rows.

  Args:
    gin_files / user_bindings: the experiment as given on this command line; every job's
      pipeline gets them first, then its own bindings.
    systems: (row name, identifier mode, mixture variant) per generative system.
    seeds: the seeds every system is trained with.
    run_dir, identifiers_dir, baselines_dir: the base experiment's directories.
    base_eval_dir, base_system, base_seed, base_mixture: the base pipeline's own GenSAR run,
      which is that system's row at that seed.
    comparison_dir: default `<run_dir>/ablations/comparison`.
    catalogue: also rank each ablation run against the whole catalogue (slower; the
      comparison's columns are the candidate metrics).
    subdir: the grid's directory under run_dir (several grids can share one base run).
    base_stages: the base pipeline's stages; () runs all of them (the base system's run is
      then the base pipeline's own). Stopping before "train" makes every system a job here.
    base_model_dir: the base run's MODEL_DIR (its learning curve), when it trains.
    curves_dir: also write learning curves (gensar_jax/learning_curves.py) of the first
      seed of every system here.
    dry_run: print every job's command line and stop.
    runner: runs one job (tests swap it).
  """
  parsed = parse_systems(systems)
  base, identify, train = plan(parsed, list(seeds), run_dir, identifiers_dir, base_system,
                               base_seed, base_mixture, base_eval_dir, catalogue, subdir,
                               base_stages, base_model_dir)
  comparison_dir = comparison_dir or os.path.join(run_dir, subdir, "comparison")
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR",
                 os.path.abspath(os.path.join(run_dir, subdir, "jax_cache")))
  jobs = base + identify + train
  if dry_run:
    for job in jobs:
      print(f"# {job.title}\n" + " ".join(shlex.quote(c) for c in
                                            job_command(job, gin_files, user_bindings)))
    return []
  print(f"[ablations] {len(parsed)} systems x {len(seeds)} seeds: {len(jobs)} pipeline runs "
        f"(logs in each run's {LOG_FILE})", flush=True)
  bar = tqdm(jobs, desc="ablations", unit="run", dynamic_ncols=True)
  for job in bar:
    bar.set_postfix_str(job.title)
    seconds = runner(job, job_command(job, gin_files, user_bindings), env)
    summary = _result_summary(job.eval_dir) if job.stages != ("identify",) else ""
    tqdm.write(f"[ablations] {job.title}: {seconds:.0f} s" + (f"; {summary}" if summary
                                                               else ""))
  results_dirs = [baselines_dir] + [j.eval_dir for j in base + train if j.eval_dir]
  rows = comparison.compare(results_dirs, comparison_dir)
  with open(os.path.join(comparison_dir, comparison.MD_FILE), encoding="utf-8") as f:
    print(f.read(), flush=True)
  print(f"[ablations] table, JSON and plot in {comparison_dir}", flush=True)
  if curves_dir:
    runs: Dict[str, str] = {}
    for job in base + train:  # the first seed of each system (the base run first)
      if job.system and job.model_dir and job.system not in runs:
        runs[job.system] = job.model_dir
    learning_curves.write_curves(runs, curves_dir)
    with open(os.path.join(curves_dir, learning_curves.MD_FILE), encoding="utf-8") as f:
      print(f.read().split("\n\n")[0], flush=True)
    print(f"[ablations] learning curves in {curves_dir}", flush=True)
  return rows


def cli(argv: Optional[Sequence[str]] = None) -> None:
  argv = sys.argv[1:] if argv is None else list(argv)
  files, bindings = gin_utils.parse_gin_flags(argv)

  def main():
    try:
      ablations(gin_files=files, user_bindings=bindings)
    except (AblationError, results_lib.ResultError, learning_curves.CurveError,
            ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      raise SystemExit(1) from None

  gin_utils.run(main, argv)

