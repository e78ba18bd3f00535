"""Cloud TPU slices: what an accelerator type such as v5p-64 is made of, for tpu_pod.py.

The launcher needs the number of TPU VMs (workers) of a slice to decide whether training is
distributed and whether MODEL_DIR must be a bucket, the runtime image to create it with, and
the mesh gin file that fits its chips. gcloud takes the accelerator type as a name and
reports none of this before the slice exists, so it is tabulated here from the Cloud TPU
documentation. Standard library only: this runs on a laptop that has gcloud, not the
training dependencies.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, Tuple


class LaunchError(Exception):
  """A bad flag or an unusable slice; printed as one line, exit code 2.

  Defined in this module, the one every other TPU launcher module imports, so that the
  slice table, the command runner and the launch flow all raise the one error main() reports.
  """


@dataclasses.dataclass(frozen=True)
class Generation:
  """How one TPU generation's accelerator types map to chips and TPU VMs."""
  cores_per_chip_in_name: int  # v4/v5p names count TensorCores (2 per chip); v5e/v6e chips
  chips_per_worker: int        # chips on each TPU VM of a multi-host slice
  single_host_max_chips: int   # slices up to this many chips are one TPU VM
  sizes: Tuple[int, ...]       # the number in the accelerator type, as documented
  runtime: str                 # default --version (TPU VM software image)


# From the Cloud TPU system-architecture pages (v4, v5e, v5p, v6e). v4-8 is 4 chips on one
# VM and v5p-64 is 32 chips on 8 VMs (topology 2x4x4). v5e/v6e slices of up to 8 chips are
# one VM; larger ones are made of 4-chip VMs, so v5litepod-16 has 4 workers (the "hosts"
# column of the v5e page counts 8-chip machines, not the TPU VMs that gcloud ssh reaches).
GENERATIONS: Dict[str, Generation] = {
    "v4": Generation(2, 4, 4, (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
                     "tpu-ubuntu2204-base"),
    "v5p": Generation(2, 4, 4, (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192,
                                12288), "v2-alpha-tpuv5"),
    "v5litepod": Generation(1, 4, 8, (1, 4, 8, 16, 32, 64, 128, 256), "v2-alpha-tpuv5-lite"),
    "v6e": Generation(1, 4, 8, (1, 4, 8, 16, 32, 64, 128, 256), "v2-alpha-tpuv6e"),
}
GENERATION_ALIASES = {"v5e": "v5litepod"}  # what people say -> what gcloud accepts
# Mesh files shipped for the common slices; any other type needs --mesh_gin.
MESH_GIN_FILES = {
    "v4-8": "gin/mesh/v4_8.gin",
    "v5litepod-16": "gin/mesh/v5e_16.gin",
    "v5p-64": "gin/mesh/v5p_64.gin",
}


@dataclasses.dataclass(frozen=True)
class SliceShape:
  """One accelerator type as the launcher uses it."""
  accelerator_type: str  # normalised, as gcloud wants it
  chips: int
  workers: int
  runtime: str


def slice_shape(accelerator_type: str) -> SliceShape:
  """Chips and TPU VM workers of an accelerator type such as v5p-64 or v5e-16."""
  match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator_type.strip())
  known = ", ".join(f"{g}-N" for g in GENERATIONS)
  if not match:
    raise LaunchError(f"--accelerator_type={accelerator_type!r}: expected GENERATION-SIZE "
                      f"such as v4-8, v5litepod-16 or v5p-64 (known: {known})")
  name = GENERATION_ALIASES.get(match.group(1), match.group(1))
  size = int(match.group(2))
  if name not in GENERATIONS:
    raise LaunchError(f"--accelerator_type={accelerator_type!r}: unknown TPU generation "
                      f"{match.group(1)!r} (known: {known}, and v5e-N for v5litepod-N)")
  gen = GENERATIONS[name]
  if size not in gen.sizes:
    raise LaunchError(f"--accelerator_type={accelerator_type!r}: {name} comes in sizes "
                      f"{', '.join(map(str, gen.sizes))}")
  chips = size // gen.cores_per_chip_in_name
  workers = 1 if chips <= gen.single_host_max_chips else chips // gen.chips_per_worker
  return SliceShape(f"{name}-{size}", chips, workers, gen.runtime)
