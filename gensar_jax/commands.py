"""The installed `gensar` command: one subcommand per stage, the same flags as `python -m`.

  gensar train --gin_file=gin/runs/train.gin --gin_file=gin/models/tiny.gin \
      --gin.MODEL_DIR="'runs/tiny'" --gin.TRAIN_STEPS=100
  gensar train --help        # what the stage does and the values it needs
  gensar --help              # every stage

`gensar <stage> ...` and `python -m gensar_jax.<stage> ...` run the same code: both go
through `gin_utils.run_module`, which imports the stage as its importable module (so gin
registers each configurable once). The stages themselves are listed in
gensar_jax/stages.py.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from gensar_jax.stages import STAGES, overview


def main(argv: Optional[Sequence[str]] = None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(overview())
    raise SystemExit(0 if argv else 2)
  name, rest = argv[0], argv[1:]
  if name not in STAGES:
    print(f"error: unknown stage {name!r}\n\n{overview()}", file=sys.stderr)
    raise SystemExit(2)
  from gensar_jax import gin_utils  # pylint: disable=g-import-not-at-top
  sys.argv = [f"gensar {name}", *rest]
  gin_utils.run_module(STAGES[name].module)
