"""One process of a 2-process training run (started by tests/test_multiprocess_training.py).

  python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_JSON [DATA MODEL]
  python tests/multiprocess_worker.py restore PROCESS_ID NUM_PROCESSES PORT OUT_JSON DIR

Each process joins the loopback cluster, builds the global mesh, loads only its own rows
of every global batch (per_host_batch_slice), trains the tiny model of tests/task_world.py
a few steps and writes its losses. With PROCESS_ID=-1 it runs single-process (no
jax.distributed) on the same global batches, the reference the multi-process losses must
match.

`restore`: the processes save checkpoints 1, 2 and 3 of a state sharded over both of them
into DIR, process 0 truncates step 3's array files (a corrupt newest checkpoint, seen by
every host), and step 2 fails to restore on process 1 only (a transient bucket error on
one host); then each restores the latest checkpoint and writes which step it got.
"""
from __future__ import annotations

import json
import os
import sys

GLOBAL_BATCH = 8
STEPS = 3


def _run(process_id: int, num_processes: int, port: int, out_path: str, data: int,
         model: int) -> None:
  import jax
  if process_id >= 0:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=60)
  # Only after jax.distributed.initialize: task_world's imports (bm25s, through the prepare
  # stage) run a JAX computation at import, which fixes the backend to this process alone.
  from gensar_jax import optimizers, partitioning, trainer as trainer_lib
  from task_world import input_shapes, synthetic_batch, tiny_model

  mesh = partitioning.create_mesh(data=data, model=model)
  partitioner = partitioning.Partitioner(mesh=mesh, fsdp=True)
  optimizer = optimizers.create_optimizer(
      learning_rate_fn=optimizers.create_learning_rate_schedule(
          peak_learning_rate=1e-2, warmup_steps=1, decay_steps=10))
  trainer = trainer_lib.Trainer(tiny_model(), partitioner, optimizer, seed=0)
  state = trainer.init_state(input_shapes(GLOBAL_BATCH))
  rows = partitioner.per_host_batch_slice(GLOBAL_BATCH)
  losses = []
  for step in range(STEPS):
    global_batch = synthetic_batch(100 + step, GLOBAL_BATCH)
    local_batch = {k: v[rows] for k, v in global_batch.items()}
    state, metrics = trainer.train_step(state, local_batch)
    losses.append(float(metrics["loss"]))
  result = {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "global_devices": jax.device_count(), "local_devices": jax.local_device_count(),
            "rows": [rows.start, rows.stop], "losses": losses,
            "step": int(jax.device_get(state.step))}
  with open(out_path + ".tmp", "w") as f:
    json.dump(result, f)
  os.replace(out_path + ".tmp", out_path)
  if process_id >= 0:
    jax.distributed.shutdown()


def _restore(process_id: int, num_processes: int, port: int, out_path: str,
             directory: str) -> None:
  import glob
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=60)
  import numpy as np
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding, PartitionSpec
  from gensar_jax import checkpoints as checkpoints_lib
  from gensar_jax.partitioning import create_mesh

  mesh = create_mesh(data=jax.device_count(), model=1)
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  shape = (2 * jax.device_count(), 3)

  def state_of(step):
    return {"w": jax.make_array_from_callback(
        shape, sharding, lambda index: np.full(shape, float(step), np.float32)[index])}

  checkpoints = checkpoints_lib.TrainCheckpoints(directory, keep_last=5)
  for step in (1, 2, 3):
    checkpoints.save(step, state_of(step), {"examples_consumed": 8 * step})
  checkpoints.wait_until_finished()
  multihost_utils.sync_global_devices("saved")
  if process_id == 0:
    files = glob.glob(os.path.join(directory, "3", "state", "**", "d", "*"), recursive=True)
    assert files, os.listdir(os.path.join(directory, "3", "state"))
    for path in files:
      with open(path, "r+b") as f:
        f.truncate(max(os.path.getsize(path) // 3, 1))
  multihost_utils.sync_global_devices("corrupted")

  real_restore = checkpoints_lib.TrainCheckpoints.restore

  def transient_failure_of_step_2_here(self, step, target):
    restored = real_restore(self, step, target)  # the same reads on every host
    if process_id == 1 and step == 2:
      raise OSError("simulated: transient read error of step 2 on this host only")
    return restored

  checkpoints_lib.TrainCheckpoints.restore = transient_failure_of_step_2_here
  target = {"w": jax.ShapeDtypeStruct(shape, np.float32, sharding=sharding)}
  restored = checkpoints.restore_latest(target)
  local = [float(np.asarray(s.data).mean()) for s in restored.state["w"].addressable_shards]
  multihost_utils.sync_global_devices("restored")
  result = {"step": restored.step, "data_position": restored.data_position,
            "local_values": local, "skipped": [s for s, _ in restored.skipped],
            "steps_after": checkpoints.all_steps(),
            "corrupt": sorted(os.listdir(directory + ".corrupt"))
            if os.path.isdir(directory + ".corrupt") else []}
  checkpoints.close()
  with open(out_path + ".tmp", "w") as f:
    json.dump(result, f)
  os.replace(out_path + ".tmp", out_path)
  jax.distributed.shutdown()


if __name__ == "__main__":
  args = sys.argv[1:]
  if args[:1] == ["restore"] and len(args) == 6:
    _restore(int(args[1]), int(args[2]), int(args[3]), args[4], args[5])
    sys.exit(0)
  if len(args) not in (4, 6):
    raise SystemExit(__doc__)
  data_size, model_size = (int(args[4]), int(args[5])) if len(args) == 6 else (-1, 1)
  _run(int(args[0]), int(args[1]), int(args[2]), args[3], data_size, model_size)
