"""Read the tasks as the model will: decoded examples and token-length statistics per task.

  python -m gensar_tasks.show --gin_file=gin/runs/show_tasks.gin \
      --gin.PREPARED_DIR="'runs/ml100k/data'" --gin.IDENTIFIERS_DIR="'runs/ml100k/identifiers'" \
      --gin.VOCAB_PATH="'runs/ml100k/vocab/gensar.model'"

For every registered task it prints `num_examples` examples of `split` decoded from their
token ids (so what you read is exactly what the model gets, EOS shown as </s>), then a
table of the whole prompts' input and target lengths in tokens (EOS included) over
`stats_split`, with the share of examples longer than the lengths bound in gin
(TASK_FEATURE_LENGTHS), how many prompts the prompt budget shortens to fit them, and a
suggested pair of lengths (the largest 99th and 100th percentiles, rounded up to a
multiple of 8). A task that cannot be built (ad-hoc search before doc2query) is reported
with its error and skipped.
"""
from __future__ import annotations

if __name__ == "__main__":  # one gin registration: run as the importable module
  import gensar_jax.gin_utils as _gin_utils
  _gin_utils.run_module("gensar_tasks.show")

import math
from typing import Dict, List, Mapping, Optional, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from gensar_tasks.gensar import register_gensar


def _decode(vocab: seqio.Vocabulary, ids: np.ndarray) -> str:
  ids = [int(i) for i in ids]
  eos = ids and ids[-1] == vocab.eos_id
  text = vocab.decode(ids[:-1] if eos else ids)
  return text + ("</s>" if eos else "")


def decoded_examples(task_name: str, split: str, num_examples: int, seed: int
                     ) -> List[Dict[str, str]]:
  """The first examples of a task as text decoded from their token ids."""
  task = seqio.get_mixture_or_task(task_name)
  ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, seed=seed)
  vocab = task.output_features["inputs"].vocabulary
  out = []
  for ex in ds.take(num_examples).as_numpy_iterator():
    out.append({"inputs": _decode(vocab, ex["inputs"]), "targets": _decode(vocab, ex["targets"]),
                "template": int(ex.get("template", -1))})
  return out


def length_stats(task_name: str, split: str, seed: int,
                 max_examples: Optional[int] = None) -> Dict[str, np.ndarray]:
  """Token lengths (EOS included) of inputs and targets over a split."""
  task = seqio.get_mixture_or_task(task_name)
  ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, seed=seed)
  if max_examples:
    ds = ds.take(max_examples)
  ds = ds.map(lambda ex: (tf.size(ex["inputs"]), tf.size(ex["targets"])),
              num_parallel_calls=tf.data.AUTOTUNE).batch(4096)
  inputs, targets = [], []
  for i, t in ds.as_numpy_iterator():
    inputs.append(i)
    targets.append(t)
  return {"inputs": np.concatenate(inputs) if inputs else np.zeros(0, np.int32),
          "targets": np.concatenate(targets) if targets else np.zeros(0, np.int32)}


def shortened_count(task_name: str, split: str, feature_lengths: Mapping[str, int],
                    seed: int, max_examples: Optional[int] = None) -> Dict[str, int]:
  """{"examples", "shortened"}: how many prompts the budget at `feature_lengths` shortened
  (history events dropped, item text cut; tasks/preprocessors.py)."""
  task = seqio.get_mixture_or_task(task_name)
  ds = task.get_dataset(sequence_length=dict(feature_lengths), split=split, shuffle=False,
                        seed=seed)
  if max_examples:
    ds = ds.take(max_examples)
  ds = ds.map(lambda ex: ex.get("prompt_shortened", tf.constant(0, tf.int32)),
              num_parallel_calls=tf.data.AUTOTUNE).batch(4096)
  flags = [np.asarray(b) for b in ds.as_numpy_iterator()]
  flags = np.concatenate(flags) if flags else np.zeros(0, np.int32)
  return {"examples": int(flags.size), "shortened": int(flags.sum())}


def format_shortened(counts: Mapping[str, Dict[str, int]], inputs_length: int) -> str:
  lines = [f"prompts shortened to fit inputs={inputs_length} (oldest history events dropped, "
           "item text cut; instruction and query kept whole):"]
  for task, c in counts.items():
    share = c["shortened"] / max(c["examples"], 1)
    lines.append(f"  {task:<34}{c['shortened']:>8} of {c['examples']:<8}{share:>7.1%}")
  return "\n".join(lines)


def _round_up(x: float, multiple: int = 8) -> int:
  return int(math.ceil(x / multiple) * multiple)


def format_length_table(stats: Mapping[str, Dict[str, np.ndarray]],
                        feature_lengths: Optional[Mapping[str, int]] = None) -> str:
  """One row per task and feature: n, mean, p50, p90, p99, max, % over the bound length."""
  header = (f"{'task':<34}{'feature':<9}{'n':>8}{'mean':>8}{'p50':>6}{'p90':>6}{'p99':>6}"
            f"{'max':>6}{'>len':>8}")
  lines = [header, "-" * len(header)]
  worst = {"inputs": [0, 0], "targets": [0, 0]}
  for task, lengths in stats.items():
    for feature in ("inputs", "targets"):
      x = lengths[feature]
      if not x.size:
        lines.append(f"{task:<34}{feature:<9}{0:>8}")
        continue
      p50, p90, p99 = np.percentile(x, [50, 90, 99])
      bound = (feature_lengths or {}).get(feature)
      over = f"{100 * np.mean(x > bound):.1f}%" if bound else "-"
      lines.append(f"{task:<34}{feature:<9}{x.size:>8}{x.mean():>8.1f}{p50:>6.0f}{p90:>6.0f}"
                   f"{p99:>6.0f}{x.max():>6}{over:>8}")
      worst[feature][0] = max(worst[feature][0], p99)
      worst[feature][1] = max(worst[feature][1], int(x.max()))
  lines.append("")
  lines.append("bound in gin: " + (", ".join(f"{k}={v}" for k, v in feature_lengths.items())
                                   if feature_lengths else "none"))
  lines.append("suggested (p99 / max over tasks, multiple of 8): " + ", ".join(
      f"{k}={_round_up(p99)} / {_round_up(mx)}" for k, (p99, mx) in worst.items()))
  return "\n".join(lines)


@gin.configurable
def show_tasks(num_examples: int = 3, split: str = "train", stats_split: str = "train",
               max_stat_examples: Optional[int] = None, seed: int = 0,
               feature_lengths: Optional[Mapping[str, int]] = None,
               tasks: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, np.ndarray]]:
  """Prints examples and length statistics of the registered tasks; returns the lengths.

  Args:
    num_examples: decoded examples printed per task.
    split: the split the examples come from (train draws templates; eval uses template 0);
      tasks without it (the per-item tasks are train-only) show train examples.
    stats_split: the split the length statistics run over.
    max_stat_examples: cap per task (None = the whole split).
    seed: the template draw seed.
    feature_lengths: {"inputs": n, "targets": m} to report truncation against.
    tasks: task keys to show (default all six).
  """
  registration = register_gensar()
  names = registration.tasks
  keys = list(tasks) if tasks else list(names)
  all_stats = {}
  shortened = {}
  for key in keys:
    name = names[key]
    print(f"=== {name}")
    splits = seqio.get_mixture_or_task(name).splits
    example_split = split if split in splits else "train"
    try:
      for i, ex in enumerate(decoded_examples(name, example_split, num_examples, seed)):
        print(f"--- example {i} ({example_split}, template {ex['template']})")
        print(f"inputs:  {ex['inputs']}")
        print(f"targets: {ex['targets']}")
      task_split = stats_split if stats_split in splits else "train"
      all_stats[f"{name}:{task_split}"] = length_stats(name, task_split, seed,
                                                        max_stat_examples)
      if feature_lengths:
        shortened[f"{name}:{task_split}"] = shortened_count(
            name, task_split, feature_lengths, seed, max_stat_examples)
    except FileNotFoundError as e:
      print(f"(skipped: {e})")
    print()
  print(format_length_table(all_stats, feature_lengths))
  if shortened:
    print()
    print(format_shortened(shortened, feature_lengths["inputs"]))
  return all_stats


def main() -> None:
  show_tasks()

