"""The tiny model and batches the trainer tests share, and one process of a 2-process run.

As a script (started twice by tests/test_multiprocess_training.py):

  python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_JSON [DATA MODEL]

each process joins the loopback cluster, builds the global mesh, loads only its own rows
of every global batch (per_host_batch_slice), trains a few steps and writes its losses.
With PROCESS_ID=-1 it runs single-process (no jax.distributed) on the same global batches,
the reference the multi-process losses must match.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Dict

import numpy as np

TINY_VOCAB = 128
INPUT_LENGTH = 12
TARGET_LENGTH = 6


def tiny_model(dropout_rate: float = 0.0, dtype: str = "float32", z_loss: float = 1e-4):
  """A 1+1-layer T5 with widths divisible by a model axis of 2 (vocab 128, heads 2)."""
  import seqio
  from gensar_jax.models.encoder_decoder import EncoderDecoderModel
  from gensar_jax.models.t5 import Transformer
  from gensar_jax.models.t5_config import T5Config
  config = T5Config(vocab_size=TINY_VOCAB, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=64,
                    num_encoder_layers=1, num_decoder_layers=1, dropout_rate=dropout_rate,
                    dtype=dtype)
  vocabulary = seqio.PassThroughVocabulary(size=TINY_VOCAB, eos_id=1)
  return EncoderDecoderModel(Transformer(config), vocabulary, z_loss=z_loss)


def input_shapes(batch_size: int) -> Dict[str, tuple]:
  return {"encoder_input_tokens": (batch_size, INPUT_LENGTH),
          "decoder_input_tokens": (batch_size, TARGET_LENGTH)}


def synthetic_batch(seed: int, batch_size: int) -> Dict[str, np.ndarray]:
  """A learnable batch: the target is the reversed prefix of the input, then EOS and PAD.

  Targets have varying lengths so microbatches carry different token weights, which is
  what makes exact gradient accumulation non-trivial.
  """
  rng = np.random.default_rng(seed)
  inputs = rng.integers(2, TINY_VOCAB, size=(batch_size, INPUT_LENGTH), dtype=np.int32)
  lengths = rng.integers(1, TARGET_LENGTH, size=batch_size)  # tokens before EOS
  targets = np.zeros((batch_size, TARGET_LENGTH), np.int32)
  weights = np.zeros((batch_size, TARGET_LENGTH), np.int32)
  for row, n in enumerate(lengths):
    targets[row, :n] = inputs[row, :n][::-1]
    targets[row, n] = 1
    weights[row, :n + 1] = 1
  decoder_inputs = np.zeros_like(targets)
  decoder_inputs[:, 1:] = targets[:, :-1]
  return {"encoder_input_tokens": inputs, "decoder_input_tokens": decoder_inputs,
          "decoder_target_tokens": targets, "decoder_loss_weights": weights}


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
  from gensar_jax import optimizers, partitioning, trainer as trainer_lib

  mesh = partitioning.create_mesh(data=data, model=model)
  partitioner = partitioning.Partitioner(mesh=mesh, fsdp=True)
  optimizer = optimizers.create_optimizer(
      learning_rate_fn=optimizers.create_learning_rate_schedule(
          peak_learning_rate=1e-2, warmup_steps=1, decay_steps=10))
  trainer = trainer_lib.Trainer(tiny_model(), partitioner, optimizer, seed=0,
                                compiler_options={"xla_backend_optimization_level": 0})
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
