"""Mesh and logical-axis rules: how every array of the model is laid out on devices.

The model names the dimensions of its parameters and activations with logical axis names
(`batch`, `embed`, `mlp`, ...). This module owns the single table that maps those names to
the two mesh axes, `data` and `model`, and turns it into `NamedSharding`s for the train
state and the input batches. Parallelism is configuration: the same code runs data
parallel (`data=-1, model=1`), tensor parallel (`model>1`) or FSDP (`fsdp=True`, which also
shards the `embed` dimension of every parameter over `data`).

Activation vs parameter rules under FSDP. Flax assigns mesh axes to the dimensions of an
array in the order of the rules table, and never gives the same mesh axis to two dimensions
of one array. We put `('batch', 'data')` first and `('embed', 'data')` last, so:

  * a parameter `[embed, mlp]` (no batch dimension) gets `P('data', 'model')`: FSDP;
  * an activation `[batch, length, embed]` gets `P('data', None, None)`: `data` is taken by
    `batch` already, so `embed` stays whole and activations are never sharded over the
    feature dimension.

One table therefore serves both, which is why there is no separate `activation_embed` name.

Dimensions whose size is not divisible by the mesh axes they map to (a vocabulary of 32100
on a model axis of 8, a global batch of 6 on 4 data shards) are replicated instead, with a
logged note; nothing here raises on such a shape.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

from absl import logging
import flax.linen as nn
import gin
import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

DATA_AXIS = "data"
MODEL_AXIS = "model"
MESH_AXES = (DATA_AXIS, MODEL_AXIS)

LogicalRules = Tuple[Tuple[str, Union[str, Tuple[str, ...], None]], ...]
MeshAxes = Union[str, Tuple[str, ...], None]


@gin.configurable
def create_mesh(data: int = -1,
                model: int = 1,
                devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ('data', 'model') mesh over all devices of all processes; -1 takes what is left.

  The device order is `device_grid`'s: each process owns a contiguous block of the data
  axis, so it feeds a contiguous slice of the global batch (`per_host_batch_slice`).
  """
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(device_grid(data, model, devices), MESH_AXES)


def _mesh_shape(data: int, model: int, num_devices: int) -> Tuple[int, int]:
  """(data, model) with a -1 filled in; a clear error for sizes that do not fit."""
  sizes = {DATA_AXIS: data, MODEL_AXIS: model}
  for name, size in sizes.items():
    if not isinstance(size, int) or (size < 1 and size != -1):
      raise ValueError(f"create_mesh: {name}={size!r}; each axis size must be a positive int "
                       "or -1 (fill with the remaining devices)")
  if data == -1 and model == -1:
    raise ValueError("create_mesh: at most one of data, model may be -1")
  known = math.prod(s for s in sizes.values() if s != -1)
  if num_devices % known:
    raise ValueError(f"create_mesh: {num_devices} devices cannot be split into "
                     f"data={data} x model={model}")
  if data == -1:
    data = num_devices // known
  if model == -1:
    model = num_devices // known
  if data * model != num_devices:
    raise ValueError(f"create_mesh: data={data} x model={model} = {data * model} does not "
                     f"match the {num_devices} available devices")
  return data, model


def device_grid(data: int, model: int, devices: Sequence[Any]) -> np.ndarray:
  """The [data, model] array of devices behind `create_mesh`, host-major along `data`.

  Every process must own one contiguous block of the data axis, or no process can load
  "its" rows as one slice of the global batch. Off TPU, devices are grouped by process
  (stable, so `jax.devices()` order within a process). On a single-host TPU the order is
  `mesh_utils.create_device_mesh`'s, which follows the torus. On a multi-host TPU that
  order interleaves hosts along `data` (v5e-16: process 0 at data indices 0, 1, 6, 15), so
  hosts are tiled instead, as T5X does: `create_hybrid_device_mesh` with the process as
  the granule keeps the torus order inside each host and stacks the hosts along `data`.
  Only plain attributes of the devices are read (platform, process_index, and for
  mesh_utils coords, core_on_chip, device_kind), so a layout can be checked without a pod.
  """
  devices = list(devices)
  data, model = _mesh_shape(data, model, len(devices))
  processes = sorted({d.process_index for d in devices})
  if devices[0].platform != "tpu":
    grouped = sorted(devices, key=lambda d: d.process_index)  # stable: keeps local order
    return np.asarray(grouped, dtype=object).reshape(data, model)
  if len(processes) == 1:
    return mesh_utils.create_device_mesh((data, model), devices=devices)
  per_host = len(devices) // len(processes)
  counts = {p: sum(d.process_index == p for d in devices) for p in processes}
  if set(counts.values()) != {per_host}:
    raise ValueError(f"create_mesh: processes hold different numbers of devices {counts}; "
                     "a TPU mesh needs the same number on every host")
  if per_host % model == 0:      # each host holds whole model groups: [per_host/model, model]
    host_shape, hosts_shape = (per_host // model, model), (len(processes), 1)
  elif model % per_host == 0:    # a model group spans model/per_host hosts: [1, per_host]
    host_shape = (1, per_host)
    hosts_shape = (len(devices) // model, model // per_host)
  else:
    raise ValueError(f"create_mesh: model={model} neither divides nor is a multiple of the "
                     f"{per_host} devices of each host, so hosts cannot tile the mesh")
  return mesh_utils.create_hybrid_device_mesh(host_shape, hosts_shape, devices=devices,
                                              process_is_granule=True)


def process_batch_rows(grid: np.ndarray, process_index: int,
                       global_batch_size: int) -> slice:
  """The rows of a global batch sharded P('data') over `grid` that `process_index` holds.

  Data index i of D holds rows [i * B / D, (i + 1) * B / D); a batch that D does not
  divide is replicated (see `fit_spec_to_shape`), so every process holds all of it. A
  process whose data indices are not one contiguous run cannot be fed a slice: that is
  an error naming them, never a silent wrong batch.
  """
  grid = np.asarray(grid, dtype=object)                             # [data, model]
  data_size = grid.shape[0]
  if global_batch_size % data_size:
    return slice(0, global_batch_size)
  mine = sorted({i for (i, _), d in np.ndenumerate(grid) if d.process_index == process_index})
  if not mine:
    raise ValueError(f"process {process_index} holds no device of the mesh")
  if mine != list(range(mine[0], mine[-1] + 1)):
    raise ValueError(f"per_host_batch_slice: the devices of process {process_index} sit at "
                     f"data indices {mine}, a non-contiguous part of the batch; build the "
                     "mesh with create_mesh so each process owns a contiguous block of 'data'")
  rows = global_batch_size // data_size
  return slice(mine[0] * rows, (mine[-1] + 1) * rows)


@gin.configurable
def standard_logical_axis_rules(fsdp: bool = False) -> LogicalRules:
  """The one table from logical axis names to mesh axes (order = priority, see module doc)."""
  rules = [
      ("batch", DATA_AXIS),
      # Tensor parallelism: the wide dimensions of each layer.
      ("vocab", MODEL_AXIS),
      ("mlp", MODEL_AXIS),
      ("heads", MODEL_AXIS),
      ("joined_kv", MODEL_AXIS),
      # Never sharded: sequence positions, per-head features, relative-position buckets.
      ("length", None),
      ("kv", None),
      ("relpos_buckets", None),
  ]
  # Last on purpose: only arrays without a batch dimension (parameters) get embed -> data.
  rules.append(("embed", DATA_AXIS if fsdp else None))
  return tuple(rules)


def _axis_size(mesh: Mesh, axes: MeshAxes) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def fit_spec_to_shape(mesh: Mesh, spec: PartitionSpec, shape: Sequence[int],
                      what: str = "array") -> PartitionSpec:
  """`spec` with every dimension that its mesh axes do not divide evenly replicated."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  fitted = []
  for dim, (size, axes) in enumerate(zip(shape, entries)):
    n = _axis_size(mesh, axes)
    if n > 1 and size % n:
      logging.info("partitioning: %s dim %d has size %d, not divisible by mesh axes %s "
                   "(%d shards); replicating that dimension", what, dim, size, axes, n)
      axes = None
    fitted.append(axes)
  while fitted and fitted[-1] is None:
    fitted.pop()
  return PartitionSpec(*fitted)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                  for k in path)


@gin.configurable
class Partitioner:
  """Owns the mesh and the rules; every sharding of the trainer comes from here."""

  def __init__(self,
               mesh: Optional[Mesh] = None,
               logical_axis_rules: Optional[LogicalRules] = None,
               fsdp: bool = False):
    self.mesh = create_mesh() if mesh is None else mesh
    missing = [a for a in MESH_AXES if a not in self.mesh.axis_names]
    if missing:
      raise ValueError(f"Partitioner: mesh axes {self.mesh.axis_names} lack {missing}; "
                       f"build the mesh with create_mesh()")
    self.fsdp = fsdp
    self.rules: LogicalRules = tuple(
        standard_logical_axis_rules(fsdp=fsdp) if logical_axis_rules is None
        else logical_axis_rules)

  # ---------------------------------------------------------------- shardings of state
  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def logical_to_mesh_axes(self, logical_names: Sequence[Optional[str]]) -> PartitionSpec:
    return nn.logical_to_mesh_axes(tuple(logical_names), self.rules)

  def params_shardings(self, boxed_params_shape: Any) -> Any:
    """NamedShardings (unboxed tree) for params carrying nn.LogicallyPartitioned boxes.

    Works on abstract shapes (from jax.eval_shape), so nothing is materialised on the host.
    """
    logical_specs = nn.get_partition_spec(boxed_params_shape)
    shardings = nn.logical_to_mesh_sharding(logical_specs, self.mesh, self.rules)
    shapes = nn.meta.unbox(boxed_params_shape)

    def fit(path, sharding, leaf):
      spec = fit_spec_to_shape(self.mesh, sharding.spec, leaf.shape, what=_path_str(path))
      return NamedSharding(self.mesh, spec)

    return jax.tree_util.tree_map_with_path(fit, shardings, shapes)

  def derived_shardings(self, tree_shape: Any, params_shape: Any,
                        params_shardings: Any) -> Any:
    """Shardings for a tree (an optimizer state) whose leaves mirror the params.

    A leaf takes the sharding of the parameter whose tree path ends its own path (optax
    keeps `mu`, `nu`, ... as copies of the params tree) when the shapes agree; any other
    leaf (step counts, Adafactor's factored row/column statistics) is replicated. Those are
    scalars or vectors, small next to the parameters.
    """
    by_path: Dict[Tuple[str, ...], Tuple[Tuple[int, ...], NamedSharding]] = {}
    flat_params = jax.tree_util.tree_flatten_with_path(params_shape)[0]
    flat_shardings = jax.tree_util.tree_leaves(params_shardings)
    for (path, leaf), sharding in zip(flat_params, flat_shardings):
      by_path[tuple(_path_str([k]) for k in path)] = (tuple(leaf.shape), sharding)
    max_len = max((len(p) for p in by_path), default=0)

    def choose(path, leaf):
      keys = tuple(_path_str([k]) for k in path)
      for n in range(min(len(keys), max_len), 0, -1):
        hit = by_path.get(keys[-n:])
        if hit is not None and hit[0] == tuple(leaf.shape):
          return hit[1]
      return self.replicated

    return jax.tree_util.tree_map_with_path(choose, tree_shape)

  # ---------------------------------------------------------------- input batches
  def batch_sharding(self, global_shape: Sequence[int], name: str = "batch") -> NamedSharding:
    """Batch dimension over `data` (replicated if `data` does not divide it)."""
    spec = fit_spec_to_shape(self.mesh, PartitionSpec(DATA_AXIS), global_shape, what=name)
    return NamedSharding(self.mesh, spec)

  def per_host_batch_slice(self, global_batch_size: int) -> slice:
    """The rows of the global batch this process must load (`process_batch_rows` on this
    mesh): block `process_index` of `process_count` equal blocks with `create_mesh`'s
    host-major mesh; every row when the batch cannot be split over `data`."""
    return process_batch_rows(self.mesh.devices, jax.process_index(), global_batch_size)

  def shard_batch(self, host_local_batch: Mapping[str, np.ndarray],
                  global_batch_size: Optional[int] = None) -> Dict[str, jax.Array]:
    """Host-local numpy features -> global jax.Arrays sharded over `data`.

    Each process passes the rows `per_host_batch_slice(global_batch_size)`; the global batch
    size defaults to local rows x (number of processes that feed distinct rows).
    """
    if not host_local_batch:
      raise ValueError("shard_batch: empty batch")
    local_sizes = {k: np.shape(v)[0] if np.ndim(v) else None
                   for k, v in host_local_batch.items()}
    if None in local_sizes.values() or len(set(local_sizes.values())) != 1:
      raise ValueError(f"shard_batch: every feature needs the same leading batch dimension; "
                       f"got {local_sizes}")
    local_rows = next(iter(local_sizes.values()))
    if global_batch_size is None:
      global_batch_size = self._infer_global_batch_size(local_rows)
    host_slice = self.per_host_batch_slice(global_batch_size)
    if host_slice.stop - host_slice.start != local_rows:
      raise ValueError(
          f"shard_batch: process {jax.process_index()} passed {local_rows} rows but owns rows "
          f"{host_slice.start}:{host_slice.stop} of the global batch of {global_batch_size}")
    out = {}
    for name, value in host_local_batch.items():
      value = np.asarray(value)
      global_shape = (global_batch_size,) + value.shape[1:]
      sharding = self.batch_sharding(global_shape, name=name)
      out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out

  def _infer_global_batch_size(self, local_rows: int) -> int:
    """Local rows times the number of distinct data blocks across processes."""
    data_size = self.mesh.shape[DATA_AXIS]
    blocks_per_process = {}
    for coords, device in np.ndenumerate(self.mesh.devices):
      data_index = coords[self.mesh.axis_names.index(DATA_AXIS)]
      blocks_per_process.setdefault(device.process_index, set()).add(data_index)
    local_blocks = len(blocks_per_process.get(jax.process_index(), {0}))
    candidate = local_rows * data_size // local_blocks
    if (local_rows * data_size) % local_blocks or candidate % data_size:
      # Not evenly divisible: the batch is replicated, every process holds all of it.
      return local_rows
    return candidate

  # ---------------------------------------------------------------- tracing context
  @contextlib.contextmanager
  def activation_context(self) -> Iterator[None]:
    """Mesh + rules in scope so nn.with_logical_constraint in the model takes effect."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def describe(self) -> str:
    return (f"mesh {dict(self.mesh.shape)} on {self.mesh.devices.size} devices "
            f"({jax.process_count()} processes), fsdp={self.fsdp}")
