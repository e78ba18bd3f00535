"""What `identify` costs at a given log size, part by part, in CPU seconds.

The identifiers stage at Amazon-Electronics size runs for most of an hour on a 2-core CPU,
too long to repeat for every change; its cost is three loops whose time per unit does not
depend on how many units there are: the sentence encoder per item text, SASRec per epoch
and the RQ-VAE per epoch. This measures each unit on the real code at the real size, with
the quickstart's settings, and multiplies out the quickstart's epochs:

  python -m launch.bench.bench_identify_parts --scale 1.0          # Electronics size
  python -m launch.bench.bench_identify_parts --scale 0.01 --texts 256 --rqvae_epochs 2

CPU time is user + system of this process over all its threads, so it compares between
runs on a shared machine; wall time is printed beside it. The log is the seeded synthetic
one of `gensar_jax/data/synthetic.py` read through the generic loader, as `make
bench-scale` does; the RQ-VAE reads random tables of the encoder's and SASRec's widths
(its cost does not depend on their values).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import gin
import numpy as np

from gensar_jax.data import synthetic
from gensar_jax.data.item_text import build_item_texts
from gensar_jax.data.loaders.generic import load_generic
from gensar_jax.identifiers import rqvae as rqvae_lib
from gensar_jax.identifiers import sasrec as sasrec_lib
from gensar_jax.identifiers.text_encoder import SentenceEncoder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _timed(fn):
  cpu, wall = time.process_time(), time.time()
  result = fn()
  return result, time.process_time() - cpu, time.time() - wall


def _rec_sequences(events, item_ids) -> list:
  """Per-user item-index sequences in time order (what identify trains SASRec on)."""
  index = {item: i for i, item in enumerate(item_ids)}
  ordered = events.sort_values(["user_id", "timestamp", "interaction"])
  items = ordered["item_id"].map(index).to_numpy()
  users = ordered["user_id"].to_numpy()
  bounds = np.flatnonzero(np.r_[True, users[1:] != users[:-1], True])
  return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def measure(scale: float, texts: int, epochs: int, rqvae_epochs: int, seed: int = 0) -> dict:
  size = synthetic.SyntheticSize.electronics(scale)
  with tempfile.TemporaryDirectory() as tmp:
    paths = synthetic.generate(tmp, size, seed=seed)
    log = load_generic(paths["items_path"], paths["events_path"])
  item_ids = log.items["item_id"].to_numpy()
  n = len(item_ids)
  rows = []

  # The encoder: time per text on `texts` of the catalogue's own texts.
  item_texts, _ = build_item_texts(log.items)
  sample = item_texts[:texts]
  encoder = SentenceEncoder()
  encoder.encode(sample[:64], show_progress=False)  # the first batch shapes' compiles
  _, cpu, wall = _timed(lambda: encoder.encode(sample, show_progress=False))
  rows.append({"part": "MiniLM encoder", "unit": "text", "units_measured": len(sample),
               "cpu_per_unit": cpu / len(sample), "wall_per_unit": wall / len(sample),
               "units_in_stage": n})

  # SASRec: epochs after the first (which holds the compiles), validation as identify has it.
  sequences = _rec_sequences(log.events, item_ids)
  train = [s[:-1] for s in sequences if len(s) > 2]
  heldout = [s for s in sequences if len(s) > 2]
  rng = np.random.default_rng(seed)
  candidates = np.concatenate([np.array([[s[-1]] for s in heldout]),
                               rng.integers(0, n, (len(heldout), 99))], axis=1)
  config = sasrec_lib.SASRecConfig(epochs=epochs + 1, progress=False)
  cpu_marks = []
  original_time = sasrec_lib.time

  class _CpuClock:  # each epoch's "seconds" in the history become CPU seconds
    @staticmethod
    def time():
      cpu_marks.append(time.process_time())
      return cpu_marks[-1]

  sasrec_lib.time = _CpuClock
  try:
    result, _, wall = _timed(lambda: sasrec_lib.train_sasrec(
        train, n, config, validation=([s[:-1] for s in heldout], candidates)))
  finally:
    sasrec_lib.time = original_time
  steady = [h["seconds"] for h in result.history[1:]]
  rows.append({"part": "SASRec", "unit": "epoch", "units_measured": len(steady),
               "cpu_per_unit": float(np.mean(steady)), "wall_per_unit": None,
               "first_epoch_cpu": result.history[0]["seconds"], "units_in_stage":
               gin.query_parameter("SASRecConfig.epochs"),
               "loss": sasrec_lib.resolved_loss(config, n)})

  # The RQ-VAE: 1 epoch against 1 + rqvae_epochs, both after a warm-up run, so compiles
  # and the k-means initialisation cancel; rqvae_epochs = 10 holds one collision
  # evaluation and two dead-code restarts, as every 10 epochs of the stage do.
  semantic = rng.standard_normal((n, encoder.dim)).astype(np.float32)
  semantic /= np.linalg.norm(semantic, axis=1, keepdims=True)
  collaborative = rng.standard_normal((n, config.embed_dim)).astype(np.float32)
  base = rqvae_lib.RQVAEConfig(progress=False)

  def rqvae(num_epochs):
    return rqvae_lib.train_rqvae(semantic, collaborative,
                                 dataclasses.replace(base, epochs=num_epochs))

  rqvae(1)
  _, cpu_1, _ = _timed(lambda: rqvae(1))
  _, cpu_k, _ = _timed(lambda: rqvae(1 + rqvae_epochs))
  rows.append({"part": "RQ-VAE", "unit": "epoch", "units_measured": rqvae_epochs,
               "cpu_per_unit": (cpu_k - cpu_1) / rqvae_epochs, "wall_per_unit": None,
               "units_in_stage": gin.query_parameter("RQVAEConfig.epochs")})
  for row in rows:
    row["cpu_in_stage_min"] = row["cpu_per_unit"] * row["units_in_stage"] / 60
  return {"scale": scale, "items": n, "users": size.users, "events": int(len(log.events)),
          "parts": rows}


def format_table(result: dict) -> str:
  lines = [f"identify at {result['scale']:g}x Electronics: {result['items']:,} items, "
           f"{result['users']:,} users, {result['events']:,} events",
           "| part | unit | CPU s per unit | units measured | units at the quickstart's "
           "settings | CPU min for the stage |", "|---|---|---:|---:|---:|---:|"]
  for row in result["parts"]:
    lines.append(f"| {row['part']} | {row['unit']} | {row['cpu_per_unit']:.4g} | "
                 f"{row['units_measured']:,} | {row['units_in_stage']:,} | "
                 f"{row['cpu_in_stage_min']:.1f} |")
  total = sum(row["cpu_in_stage_min"] for row in result["parts"])
  lines.append(f"| total | | | | | {total:.1f} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--scale", type=float, default=1.0, help="multiple of Electronics")
  parser.add_argument("--texts", type=int, default=2048, help="item texts to encode")
  parser.add_argument("--epochs", type=int, default=2,
                      help="timed SASRec epochs (after a first, untimed one)")
  parser.add_argument("--rqvae_epochs", type=int, default=10, help="timed RQ-VAE epochs")
  parser.add_argument("--json", help="also write the result here")
  args = parser.parse_args(argv)
  # The quickstart's identifier settings (its SASRec and RQ-VAE epochs among them).
  gin.parse_config_files_and_bindings(
      [os.path.join(REPO, "gin", "experiments", "ml100k_quickstart.gin")], [],
      skip_unknown=True)
  result = measure(args.scale, args.texts, args.epochs, args.rqvae_epochs)
  print(format_table(result))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
