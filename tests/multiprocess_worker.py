"""One process of a 2-process training run (started by tests/test_multiprocess_training.py).

  python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_JSON [DATA MODEL]

Each process joins the loopback cluster, builds the global mesh, loads only its own rows
of every global batch (per_host_batch_slice), trains the tiny model of tests/task_world.py
a few steps and writes its losses. With PROCESS_ID=-1 it runs single-process (no
jax.distributed) on the same global batches, the reference the multi-process losses must
match.
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


if __name__ == "__main__":
  args = sys.argv[1:]
  if len(args) not in (4, 6):
    raise SystemExit(__doc__)
  data_size, model_size = (int(args[4]), int(args[5])) if len(args) == 6 else (-1, 1)
  _run(int(args[0]), int(args[1]), int(args[2]), args[3], data_size, model_size)
