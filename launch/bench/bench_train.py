"""Training throughput of the sharded train step, and model FLOPs utilisation on accelerators.

  .venv/bin/python -m launch.bench.bench_train                            # t5-small, CPU
  .venv/bin/python -m launch.bench.bench_train --batch_size 256 --gin.ACTIVATION_DTYPE="'bfloat16'"

Random tokens through the real Trainer (same jit, shardings and donation as training) for
the T5.1.1-small shape of gin/models/small.gin with a vocabulary of 32128 (the T5 size)
unless --sentencepiece_model is given. Warm-up steps (compilation included) are excluded;
the timed steps end with a device sync.

Model FLOPs per step (the MFU numerator; forward + backward = 3 x forward, each
multiply-add 2 FLOPs, hence the 6):
  6 x (P_enc x B x L_in + P_cross_kv x B x L_in + (P_dec + P_logits) x B x L_tgt)
  + 12 x B x H x D x (n_enc x L_in^2 + n_dec x (L_tgt^2 + L_tgt x L_in))   attention scores
where P_enc / P_dec are the encoder / decoder parameters without the embedding table (a
lookup, no FLOPs), P_cross_kv the decoder's cross-attention key and value kernels (they
project the L_in encoder outputs, not the targets; P_dec excludes them), P_logits the
output projection, H x D the joined head width, and
attention counts QK^T and AV (2 x 2 x Lq x Lk x H x D forward) in every self- and
cross-attention block, the causal mask not discounted. MFU = model FLOPs per second /
(peak dense bf16 FLOP/s per chip x chips); remat or padding work is not credited. XLA's own
FLOP count of the compiled step is printed beside it as a cross-check. `--json_out PATH`
also writes the figures as JSON (launch/bench/bench_all.py reads it).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict

import jax
import numpy as np
import seqio

from gensar_jax import gin_utils
from gensar_jax import optimizers
from gensar_jax import partitioning
from gensar_jax import trainer as trainer_lib
from gensar_jax.models import encoder_decoder
from gensar_jax.models.t5_config import T5Config
from launch.bench.bench_machine import peak_flops_per_chip


def _count(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _cross_attention_kv(decoder_params: Any) -> int:
  """Parameters of the decoder's cross-attention key and value kernels."""
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(decoder_params)[0]:
    names = {getattr(entry, "key", None) for entry in path}
    if "encoder_decoder_attention" in names and names & {"key", "value"}:
      total += int(np.prod(leaf.shape))
  return total


def model_flops_per_step(params_shape: Any, config: T5Config, batch_size: int,
                         input_length: int, target_length: int) -> Dict[str, float]:
  """The formula of the module docstring, from the abstract params."""
  embedding = _count(params_shape.get("token_embedder", {}))
  encoder = _count(params_shape.get("encoder", {}))
  decoder_all = _count(params_shape.get("decoder", {}))
  cross_kv = _cross_attention_kv(params_shape.get("decoder", {}))
  dense = 6 * batch_size * ((encoder + cross_kv) * input_length
                            + (decoder_all - cross_kv) * target_length)
  joined = config.num_heads * config.head_dim
  attention = 12 * batch_size * joined * (
      config.num_encoder_layers * input_length ** 2
      + config.num_decoder_layers * (target_length ** 2 + target_length * input_length))
  return {"dense": float(dense), "attention": float(attention),
          "total": float(dense + attention), "params": float(_count(params_shape)),
          "embedding_params": float(embedding)}


def random_batch(rng: np.random.Generator, vocab_size: int, batch_size: int,
                 input_length: int, target_length: int) -> Dict[str, np.ndarray]:
  targets = rng.integers(2, vocab_size, size=(batch_size, target_length), dtype=np.int32)
  decoder_inputs = np.zeros_like(targets)
  decoder_inputs[:, 1:] = targets[:, :-1]
  return {
      "encoder_input_tokens": rng.integers(2, vocab_size, size=(batch_size, input_length),
                                           dtype=np.int32),
      "decoder_input_tokens": decoder_inputs,
      "decoder_target_tokens": targets,
      "decoder_loss_weights": np.ones_like(targets),
  }


def add_shape_flags(parser: argparse.ArgumentParser) -> None:
  """Flags that fix the benchmarked step (shape, mesh), shared with profile_train_step.py."""
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--input_length", type=int, default=128)
  parser.add_argument("--target_length", type=int, default=8)
  parser.add_argument("--num_microbatches", type=int, default=1)
  parser.add_argument("--vocab_size", type=int, default=32128)
  parser.add_argument("--sentencepiece_model", default=None)
  parser.add_argument("--data", type=int, default=-1, help="mesh data axis (-1: the rest)")
  parser.add_argument("--model", type=int, default=1, help="mesh model axis")
  parser.add_argument("--fsdp", action="store_true")


def build_step(args, gin_args):
  """Parses gin and builds the Trainer, its initial state and 4 sharded random batches.

  Returns (trainer, state, batches, config, partitioner).
  """
  if not any(a.startswith("--gin_file") for a in gin_args):
    gin_args = ["--gin_file=gin/models/small.gin"] + gin_args
  on_cpu = jax.devices()[0].platform == "cpu"
  if on_cpu and not any("ACTIVATION_DTYPE" in a for a in gin_args):
    # bfloat16 is emulated on CPU and only slows it down.
    gin_args.append("--gin.ACTIVATION_DTYPE='float32'")
  gin_utils.parse_gin(gin_args)

  if args.sentencepiece_model:
    vocabulary = seqio.SentencePieceVocabulary(args.sentencepiece_model)
  else:
    vocabulary = seqio.PassThroughVocabulary(args.vocab_size, eos_id=1)
  model = encoder_decoder.build_model(vocabulary)
  config = model.module.config
  partitioner = partitioning.Partitioner(
      partitioning.create_mesh(data=args.data, model=args.model), fsdp=args.fsdp)
  optimizer = optimizers.create_optimizer(
      learning_rate_fn=optimizers.create_learning_rate_schedule(
          peak_learning_rate=1e-3, warmup_steps=10, decay_steps=1000))
  trainer = trainer_lib.Trainer(model, partitioner, optimizer,
                                num_microbatches=args.num_microbatches)
  batch_size, li, lt = args.batch_size, args.input_length, args.target_length
  state = trainer.init_state({"encoder_input_tokens": (batch_size, li),
                              "decoder_input_tokens": (batch_size, lt)})
  rng = np.random.default_rng(0)
  host_batches = [random_batch(rng, config.vocab_size, batch_size, li, lt) for _ in range(4)]
  rows = partitioner.per_host_batch_slice(batch_size)
  batches = [partitioner.shard_batch({k: v[rows] for k, v in b.items()}, batch_size)
             for b in host_batches]
  return trainer, state, batches, config, partitioner


def main(argv) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_shape_flags(parser)
  parser.add_argument("--warmup_steps", type=int, default=3)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--json_out", default=None, help="also write the figures as JSON here")
  args, gin_args = parser.parse_known_args(argv)
  trainer, state, batches, config, partitioner = build_step(args, gin_args)
  batch_size, li, lt = args.batch_size, args.input_length, args.target_length

  start = time.perf_counter()
  for i in range(args.warmup_steps):
    state, metrics = trainer.train_step(state, batches[i % len(batches)])
  jax.block_until_ready(metrics)
  warmup_s = time.perf_counter() - start
  start = time.perf_counter()
  for i in range(args.steps):
    state, metrics = trainer.train_step(state, batches[i % len(batches)])
  jax.block_until_ready((state, metrics))
  elapsed = time.perf_counter() - start

  flops = model_flops_per_step(trainer.state_shape.params, config, batch_size, li, lt)
  xla_flops = None
  try:
    compiled = next(iter(trainer._train_steps.values())).lower(state, batches[0]).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops")) if cost and cost.get("flops") else None
  except Exception:  # cost analysis is best effort: not every backend reports it
    xla_flops = None
  steps_per_s = args.steps / elapsed
  devices = jax.devices()
  peak = peak_flops_per_chip(devices[0])
  rows_out = [
      ("device", f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})"),
      ("mesh", partitioner.describe()),
      ("model", f"T5.1.1 emb {config.emb_dim}, {config.num_encoder_layers}+"
                f"{config.num_decoder_layers} layers, vocab {config.vocab_size}, "
                f"{config.dtype} compute, {flops['params'] / 1e6:.1f}M params"),
      ("batch", f"{batch_size} x (input {li} + target {lt}), microbatches "
                f"{args.num_microbatches}"),
      ("warm-up", f"{args.warmup_steps} steps in {warmup_s:.1f} s (compilation included)"),
      ("timed", f"{args.steps} steps in {elapsed:.2f} s ({1e3 * elapsed / args.steps:.1f} "
                "ms/step)"),
      ("train examples/s", f"{batch_size * steps_per_s:.2f}"),
      ("train tokens/s (input + target)", f"{batch_size * (li + lt) * steps_per_s:.0f}"),
      ("target tokens/s", f"{batch_size * lt * steps_per_s:.0f}"),
      ("model TFLOP per step", f"{flops['total'] / 1e12:.4f} (dense {flops['dense'] / 1e12:.4f},"
                               f" attention {flops['attention'] / 1e12:.4f})"),
      ("XLA TFLOP per step", "n/a" if xla_flops is None else f"{xla_flops / 1e12:.4f}"),
      ("achieved TFLOP/s", f"{flops['total'] * steps_per_s / 1e12:.3f}"),
  ]
  if peak is not None:
    mfu = flops["total"] * steps_per_s / (peak * len(devices))
    rows_out.append(("MFU", f"{100 * mfu:.1f}% of {peak / 1e12:.0f} TFLOP/s x {len(devices)}"))
  else:
    rows_out.append(("MFU", "n/a on CPU (no peak FLOP/s table entry)"))
  rows_out.append(("final loss", f"{float(metrics['loss']):.3f}"))
  width = max(len(k) for k, _ in rows_out)
  print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows_out))
  if args.json_out:
    result = {
        "device_kind": devices[0].device_kind, "platform": devices[0].platform,
        "devices": len(devices), "params": flops["params"], "batch_size": batch_size,
        "input_length": li, "target_length": lt, "vocab_size": config.vocab_size,
        "emb_dim": config.emb_dim, "num_encoder_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers, "dtype": str(config.dtype),
        "warmup_steps": args.warmup_steps, "warmup_s": warmup_s, "steps": args.steps,
        "seconds": elapsed, "seconds_per_step": elapsed / args.steps,
        "examples_per_s": batch_size * steps_per_s,
        "tokens_per_s": batch_size * (li + lt) * steps_per_s,
        "model_flops_per_step": flops["total"], "xla_flops_per_step": xla_flops,
        "flops_per_s": flops["total"] * steps_per_s, "peak_bf16_flops_per_chip": peak,
        "mfu": (None if peak is None else flops["total"] * steps_per_s / (peak * len(devices))),
        "final_loss": float(metrics["loss"]),
    }
    with open(args.json_out, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1:])
