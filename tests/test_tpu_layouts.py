"""The mesh of `create_mesh` on real TPU slice layouts, read with fake device objects.

A pod is not needed to know which host holds which rows: `jax.experimental.mesh_utils`
only reads plain attributes of a device (id, process_index, coords, core_on_chip, platform,
device_kind). The fakes below lay out v4-8, v4-16, v5e-16, v5p-64 and v6e-16 the way the
TPU runtime numbers them (hosts of 2 x 2 chips, processes numbered along x, then y, then
z), and every test asks of the mesh what a multi-host input pipeline needs: each host
loads one slice of the global batch, its devices hold exactly those rows, and the hosts'
slices put together are the global batch, no row twice or missing.
"""
from __future__ import annotations

import dataclasses
import os
import random
import re
from typing import List, Tuple

import numpy as np
import pytest
from jax.experimental import mesh_utils

from gensar_jax import partitioning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class FakeTpu:
  """The attributes of a jax TPU device that mesh construction reads."""
  id: int
  process_index: int
  coords: Tuple[int, int, int]
  device_kind: str
  core_on_chip: int = 0
  platform: str = "tpu"


def slice_devices(device_kind: str, topology: Tuple[int, int, int],
                  host: Tuple[int, int, int] = (2, 2, 1)) -> List[FakeTpu]:
  """One device per chip of a `topology` (x, y, z) slice, hosts of `host` chips each;
  ids process by process as `jax.devices()` lists them."""
  hosts = [t // h for t, h in zip(topology, host)]

  def process_of(c):
    hx, hy, hz = (c[i] // host[i] for i in range(3))
    return (hz * hosts[1] + hy) * hosts[0] + hx

  chips = [(x, y, z) for z in range(topology[2]) for y in range(topology[1])
           for x in range(topology[0])]
  chips.sort(key=lambda c: (process_of(c), c[2], c[1], c[0]))
  return [FakeTpu(i, process_of(c), c, device_kind) for i, c in enumerate(chips)]


SLICES = {
    "v4-8": ("TPU v4", (2, 2, 1)),        # 4 chips, one host
    "v4-16": ("TPU v4", (2, 2, 2)),       # 8 chips, 2 hosts
    "v5e-16": ("TPU v5 lite", (4, 4, 1)),  # 16 chips, 4 hosts
    "v5p-64": ("TPU v5", (2, 4, 4)),      # 32 chips, 8 hosts
    "v6e-16": ("TPU v6 lite", (4, 4, 1)),  # 16 chips, 4 hosts
}


def shipped_mesh(name: str) -> Tuple[int, int]:
  """(data, model) as gin/mesh/<name>.gin binds them."""
  with open(os.path.join(REPO, "gin", "mesh", f"{name}.gin"), encoding="utf-8") as f:
    text = f.read()
  return tuple(int(re.search(rf"^create_mesh\.{axis}\s*=\s*(-?\d+)", text, re.M).group(1))
               for axis in ("data", "model"))


# (slice, data, model): the shipped mesh files on their slices, then tensor-parallel
# shapes whose model groups sit inside one host or span two.
CASES = [
    ("v4-8", *shipped_mesh("v4_8")),
    ("v4-16", -1, 1),
    ("v5e-16", *shipped_mesh("v5e_16")),
    ("v6e-16", *shipped_mesh("v5e_16")),
    ("v5p-64", *shipped_mesh("v5p_64")),
    ("v5e-16", 8, 2),
    ("v5e-16", 4, 4),
    ("v5e-16", 2, 8),
    ("v5p-64", 8, 4),
    ("v5p-64", 4, 8),
    ("v4-16", 1, 8),
]


def device_rows(grid: np.ndarray, batch: int) -> dict:
  """{device id: (start, stop)} of a batch sharded P('data'), as JAX lays it out."""
  data = grid.shape[0]
  rows = batch // data
  return {d.id: (i * rows, (i + 1) * rows) for (i, _), d in np.ndenumerate(grid)}


@pytest.mark.parametrize("name,data,model", CASES)
@pytest.mark.parametrize("shuffled", [False, True], ids=["ids", "shuffled"])
def test_every_host_feeds_one_slice_and_the_slices_make_the_batch(name, data, model,
                                                                  shuffled):
  kind, topology = SLICES[name]
  devices = slice_devices(kind, topology)
  if shuffled:  # the grid must not depend on the order the devices are listed in
    random.Random(0).shuffle(devices)
  grid = partitioning.device_grid(data, model, devices)
  data = grid.shape[0]
  assert grid.shape[1] == model and grid.size == len(devices)
  assert sorted(d.id for d in grid.flat) == sorted(d.id for d in devices)

  batch = 4 * data
  global_batch = np.arange(batch * 3).reshape(batch, 3)            # [batch, features]
  rows_of = device_rows(grid, batch)
  processes = sorted({d.process_index for d in devices})
  assembled = np.full_like(global_batch, -1)
  owners = np.zeros(batch, int)          # how many data indices (not replicas) hold a row
  for process in processes:
    rows = partitioning.process_batch_rows(grid, process, batch)
    local = global_batch[rows]                                     # what this host loads
    mine = [d for d in grid.flat if d.process_index == process]
    # The host's devices hold exactly its slice: every row of it, nothing outside.
    held = set()
    for d in mine:
      start, stop = rows_of[d.id]
      assert rows.start <= start and stop <= rows.stop, (process, d, rows)
      held.update(range(start, stop))
      # make_array_from_process_local_data's mapping: a device's rows, offset into local.
      shard = local[start - rows.start:stop - rows.start]
      np.testing.assert_array_equal(shard, global_batch[start:stop])
      assembled[start:stop] = shard
    assert held == set(range(rows.start, rows.stop))
  for i in range(data):
    start, stop = rows_of[grid[i, 0].id]
    owners[start:stop] += 1
  np.testing.assert_array_equal(assembled, global_batch)           # no row missing
  assert (owners == 1).all()                                       # none twice
  if len(processes) > 1:
    sizes = {p: partitioning.process_batch_rows(grid, p, batch) for p in processes}
    lengths = {s.stop - s.start for s in sizes.values()}
    assert len(lengths) == 1                                       # equal shares


@pytest.mark.parametrize("name", ["v4-16", "v5e-16", "v5p-64", "v6e-16"])
def test_inside_a_host_the_order_is_mesh_utils_own(name):
  """Host-major tiling keeps the ICI-aware order mesh_utils gives a host's devices."""
  kind, topology = SLICES[name]
  devices = slice_devices(kind, topology)
  grid = partitioning.device_grid(-1, 1, devices)
  per_host = len(devices) // (1 + max(d.process_index for d in devices))
  for start in range(0, grid.shape[0], per_host):
    block = list(grid[start:start + per_host, 0])
    host = [d for d in devices if d.process_index == block[0].process_index]
    expected = mesh_utils.create_device_mesh((per_host, 1), devices=host)[:, 0]
    assert [d.id for d in block] == [d.id for d in expected]


def test_single_host_keeps_the_torus_order_of_mesh_utils():
  devices = slice_devices(*SLICES["v4-8"])
  grid = partitioning.device_grid(4, 1, devices)
  expected = mesh_utils.create_device_mesh((4, 1), devices=devices)
  assert [d.id for d in grid.flat] == [d.id for d in expected.flat]


def test_layouts_that_cannot_be_tiled_by_hosts_are_clear_errors():
  devices = slice_devices(*SLICES["v5e-16"])
  with pytest.raises(ValueError, match="model=3 neither divides"):
    partitioning.device_grid(-1, 3, devices[:12])
  uneven = devices[:-1] + [dataclasses.replace(devices[-1], process_index=0)]
  with pytest.raises(ValueError, match="different numbers of devices"):
    partitioning.device_grid(-1, 1, uneven)
  # A hand-built mesh that interleaves hosts (what create_device_mesh gives a v5e-16) is
  # refused by name rather than fed the wrong rows.
  torus = mesh_utils.create_device_mesh((16, 1), devices=devices)
  with pytest.raises(ValueError, match=r"process 0 sit at data indices \[0, 1, 6, 15\]"):
    partitioning.process_batch_rows(torus, 0, 32)
  # A batch that 'data' does not divide is replicated: every host loads all of it.
  assert partitioning.process_batch_rows(torus, 3, 24) == slice(0, 24)
