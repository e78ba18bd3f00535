"""One-off check (never run in CI, never a dependency): our loaded model vs Hugging Face
transformers' T5ForConditionalGeneration on the random fixtures.

The tests compare our model with an independent NumPy T5 (tests/t5_reference.py); this
script closes the loop against the real thing once. It runs in two interpreters: this
project's venv writes the fixtures (launch/make_pretrained_fixtures.py) and computes our
logits for the Hugging Face and the T5X checkpoint of each variant; a separate venv with
torch + transformers (no JAX) computes the reference logits of the Hugging Face folders.

  python3 -m venv /tmp/hfvenv
  /tmp/hfvenv/bin/pip install torch transformers safetensors sentencepiece numpy
  .venv/bin/python launch/check_pretrained_against_transformers.py \\
      --transformers_python /tmp/hfvenv/bin/python [--out_dir /tmp/pretrained_check]

Prints the max absolute logit difference per variant and format.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ENCODER_IDS = [[5, 6, 7, 8, 150, 1, 0, 0], [9, 10, 11, 1, 0, 0, 0, 0]]
DECODER_IDS = [[0, 12, 13, 14, 200, 1], [0, 15, 1, 0, 0, 0]]
VARIANTS = ("t5", "t5_1_1")


def transformers_logits(folder: str, out_path: str) -> None:
  """(torch venv) T5ForConditionalGeneration's logits of the fixed ids -> .npy."""
  import torch
  from transformers import T5ForConditionalGeneration

  model = T5ForConditionalGeneration.from_pretrained(folder).eval()
  encoder = torch.tensor(ENCODER_IDS)
  with torch.no_grad():
    logits = model(input_ids=encoder, attention_mask=(encoder > 0).long(),
                   decoder_input_ids=torch.tensor(DECODER_IDS)).logits
  np.save(out_path, logits.numpy())


def our_logits(path: str, fmt: str, hf_folder: str) -> np.ndarray:
  import jax

  from gensar_jax.models import Transformer
  from gensar_jax.pretrained import load_pretrained, t5_config_from_hf

  config = t5_config_from_hf(hf_folder)
  params = load_pretrained(path, fmt, config)
  apply = jax.jit(lambda p, e, d: Transformer(config).apply({"params": p}, e, d))
  return np.asarray(apply(params, np.asarray(ENCODER_IDS, np.int32),
                          np.asarray(DECODER_IDS, np.int32)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--transformers_python", required=True,
                      help="python of a venv with torch + transformers")
  parser.add_argument("--out_dir", default=None)
  parser.add_argument("--hf_only", default=None, help=argparse.SUPPRESS)  # child mode
  parser.add_argument("--save", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.hf_only:
    transformers_logits(args.hf_only, args.save)
    return

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import make_pretrained_fixtures

  out_dir = args.out_dir or tempfile.mkdtemp(prefix="pretrained_check_")
  paths = make_pretrained_fixtures.write_all(out_dir)
  rows = []
  for variant in VARIANTS:
    folder = paths[f"hf_{variant}"]
    saved = os.path.join(out_dir, f"transformers_{variant}.npy")
    subprocess.run([args.transformers_python, os.path.abspath(__file__),
                    "--transformers_python", args.transformers_python,
                    "--hf_only", folder, "--save", saved], check=True)
    theirs = np.load(saved)
    for fmt in ("hf", "t5x"):
      ours = our_logits(paths[f"{fmt}_{variant}"], fmt, folder)
      rows.append({"variant": variant, "format": fmt, "shape": list(ours.shape),
                   "max_abs_diff": float(np.abs(ours - theirs).max()),
                   "max_abs_logit": float(np.abs(theirs).max())})
  for row in rows:
    print(json.dumps(row))


if __name__ == "__main__":
  main()
