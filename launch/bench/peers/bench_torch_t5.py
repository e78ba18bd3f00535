"""The PyTorch peer: Hugging Face T5 train step and constrained `generate`, same shapes as ours.

Runs under its own environment (PyTorch + transformers), never the project's and never
imported by it; launch/bench/bench_all.py runs it with `--torch_python PATH` and sets its
examples/s beside launch/bench/bench_train.py's and launch/bench/bench_decode.py's. From the
repository root:

  /tmp/hfvenv/bin/python -m launch.bench.peers.bench_torch_t5 train    # T5.1.1-small, batch 16
  /tmp/hfvenv/bin/python -m launch.bench.peers.bench_torch_t5 decode --batch_size 4

train: `T5ForConditionalGeneration(T5Config(feed_forward_proj="gated-gelu"))` with random
weights, the shape of launch/bench/bench_train.py's default (8 + 8 layers, 512 wide, 8 heads of
64, gated-GELU 1024, untied output layer, dropout 0.1 like gin/models/small.gin), AdamW,
random tokens: batch 16 x (input 128 + target 8), vocabulary 32128. One step is forward
with labels, backward, optimizer step, zero_grad. Warm-up steps are not timed.

decode: the shape of launch/bench/bench_decode.py's model table (vocabulary 8320, input 128, beam
30 over 100 random candidate identifiers per example: behaviour token, 4 codes, EOS), with
`generate(num_beams=30, prefix_allowed_tokens_fn=...)` walking a per-example prefix dict,
the way the published GenSAR code constrains beams. All 30 beams are returned.

On a CUDA device (`--device`, default cuda when torch sees one) the train step runs under
bf16 autocast, as ours computes in bf16 on accelerators; decode stays fp32 on both sides.
Prints one JSON object (the last line of stdout); `--json_out PATH` also writes it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
import transformers

EOS, SRC_ITEM, CODE_BASE = 1, 3, 10  # as launch/bench/bench_decode.py


def build_model(args) -> transformers.T5ForConditionalGeneration:
  config = transformers.T5Config(
      vocab_size=args.vocab_size, d_model=args.d_model, d_kv=args.d_kv, d_ff=args.d_ff,
      num_layers=args.num_layers, num_decoder_layers=args.num_layers,
      num_heads=args.num_heads, feed_forward_proj="gated-gelu",
      dropout_rate=args.dropout_rate, decoder_start_token_id=0, pad_token_id=0,
      eos_token_id=EOS)
  # transformers 5 ignores tie_word_embeddings=False as a constructor argument (the model
  # came out tied, 66.8M parameters instead of 83.3M), and setting it afterwards unties the
  # encoder and decoder input tables as well. T5.1.1, like ours, shares one input table and
  # has its own output layer: untie, then share the input table again.
  config.tie_word_embeddings = False
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(config)
  model.set_input_embeddings(model.shared)
  if model.lm_head.weight is model.shared.weight:
    raise SystemExit("bench_torch_t5: the output layer is still tied to the embedding table")
  return model.to(args.device)


def sync(args) -> None:
  if args.device.startswith("cuda"):
    torch.cuda.synchronize()


def bench_train(args) -> dict:
  model = build_model(args)
  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
  gen = torch.Generator().manual_seed(0)
  batches = [(torch.randint(2, args.vocab_size, (args.batch_size, args.input_length),
                            generator=gen),
              torch.randint(2, args.vocab_size, (args.batch_size, args.target_length),
                            generator=gen)) for _ in range(4)]
  batches = [(x.to(args.device), y.to(args.device)) for x, y in batches]
  autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                            enabled=args.device.startswith("cuda"))

  def step(i):
    inputs, labels = batches[i % len(batches)]
    with autocast:
      loss = model(input_ids=inputs, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach().item()

  start = time.perf_counter()
  for i in range(args.warmup_steps):
    step(i)
  sync(args)
  warmup_s = time.perf_counter() - start
  start = time.perf_counter()
  for i in range(args.steps):
    loss = step(i)
  sync(args)
  elapsed = time.perf_counter() - start
  return {"mode": "train", "examples_per_s": args.batch_size * args.steps / elapsed,
          "seconds_per_step": elapsed / args.steps, "warmup_s": warmup_s,
          "steps": args.steps, "final_loss": loss,
          "params": sum(p.numel() for p in model.parameters())}


def random_candidates(rng, count: int, codebook: int) -> np.ndarray:
  """[count, 6] distinct identifiers: behaviour token, 4 codes, EOS."""
  rows = set()
  while len(rows) < count:
    codes = rng.integers(0, codebook, 4) + CODE_BASE + np.arange(4) * codebook
    rows.add((SRC_ITEM, *map(int, codes), EOS))
  return np.array(sorted(rows), np.int64)


def bench_decode(args) -> dict:
  model = build_model(args)
  model.eval()
  rng = np.random.default_rng(0)
  codebook = min(256, (args.vocab_size - CODE_BASE) // 4)
  candidates = [random_candidates(rng, args.candidates, codebook)
                for _ in range(args.batch_size)]
  allowed = []  # per example: decoder prefix (after the start token) -> allowed next tokens
  for rows in candidates:
    prefixes = {}
    for row in rows.tolist():
      for t in range(len(row)):
        prefixes.setdefault(tuple(row[:t]), set()).add(row[t])
    allowed.append({k: sorted(v) for k, v in prefixes.items()})

  def prefix_allowed_tokens_fn(batch_id, sent):
    return allowed[batch_id].get(tuple(sent[1:].tolist()), [0])

  inputs = torch.as_tensor(rng.integers(2, args.vocab_size,
                                        size=(args.batch_size, args.input_length)),
                           device=args.device)

  def decode():
    with torch.no_grad():
      return model.generate(input_ids=inputs, num_beams=args.beams,
                            num_return_sequences=args.beams, max_new_tokens=6,
                            do_sample=False, early_stopping=True,
                            prefix_allowed_tokens_fn=prefix_allowed_tokens_fn)

  for _ in range(args.warmup_steps):
    decode()
  sync(args)
  start = time.perf_counter()
  for _ in range(args.steps):
    out = decode()
  sync(args)
  elapsed = time.perf_counter() - start
  sequences = out.reshape(args.batch_size, args.beams, -1)[:, :, 1:7].cpu().numpy()
  valid = np.mean([tuple(s) in {tuple(r) for r in candidates[b].tolist()}
                   for b in range(args.batch_size) for s in sequences[b].tolist()])
  return {"mode": "decode", "examples_per_s": args.batch_size * args.steps / elapsed,
          "seconds_per_batch": elapsed / args.steps, "valid_beams": float(valid)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("mode", choices=("train", "decode"))
  parser.add_argument("--batch_size", type=int, default=None, help="16 train, 8 decode")
  parser.add_argument("--input_length", type=int, default=128)
  parser.add_argument("--target_length", type=int, default=8)
  parser.add_argument("--vocab_size", type=int, default=None, help="32128 train, 8320 decode")
  parser.add_argument("--d_model", type=int, default=512)
  parser.add_argument("--d_kv", type=int, default=64)
  parser.add_argument("--d_ff", type=int, default=1024)
  parser.add_argument("--num_layers", type=int, default=8)
  parser.add_argument("--num_heads", type=int, default=8)
  parser.add_argument("--dropout_rate", type=float, default=0.1)
  parser.add_argument("--beams", type=int, default=30)
  parser.add_argument("--candidates", type=int, default=100)
  parser.add_argument("--warmup_steps", type=int, default=None, help="3 train, 1 decode")
  parser.add_argument("--steps", type=int, default=None, help="20 train, 2 decode")
  parser.add_argument("--threads", type=int, default=None,
                      help="torch intra-op threads (default: the usable cores)")
  parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if any)")
  parser.add_argument("--json_out", default=None)
  args = parser.parse_args()
  args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
  train = args.mode == "train"
  args.batch_size = args.batch_size or (16 if train else 8)
  args.vocab_size = args.vocab_size or (32128 if train else 8320)
  args.warmup_steps = (args.warmup_steps if args.warmup_steps is not None
                       else (3 if train else 1))
  args.steps = args.steps or (20 if train else 2)
  threads = args.threads or len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  result = bench_train(args) if train else bench_decode(args)
  result.update({
      "peer": "PyTorch + transformers T5", "torch": torch.__version__,
      "transformers": transformers.__version__, "python": platform.python_version(),
      "threads": threads, "device": (torch.cuda.get_device_name() if args.device == "cuda"
                                     else args.device), "batch_size": args.batch_size,
      "input_length": args.input_length, "vocab_size": args.vocab_size,
      "shape": f"{args.num_layers}+{args.num_layers} layers, d_model {args.d_model}, "
               f"{args.num_heads} x {args.d_kv} heads, gated-GELU {args.d_ff}"})
  if args.json_out:
    with open(args.json_out, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
