"""The PyTorch peer of launch/bench/bench_identifiers.py: RQ-VAE training epochs, same model, data.

Runs under its own environment (PyTorch + numpy), never the project's and never imported by
it (run as a module from the repository root, it finds launch/ there: gensar_jax need not be
installed). It takes bench_identifiers' flags with the same defaults, so one set of arguments
runs both sides and their epoch times can be set side by side:

  /tmp/hfvenv/bin/python -m launch.bench.peers.bench_torch_rqvae --sizes 10000
  .venv/bin/python -m launch.bench.bench_identifiers --sizes 10000

Data: `synthetic_tables` imported from launch/bench/bench_identifiers.py (numpy only), so both
sides train on the same clustered, L2-normalised tables (768-d semantic, 64-d collaborative).

Model: the default RQVAEConfig in "dual" mode, as gensar_jax/identifiers/rqvae_model.py.
  - encoders: one MLP per space, input -> 512 -> 256 -> 128 -> 64 -> 32, ReLU between layers;
    decoders mirror them (32 -> 64 -> 128 -> 256 -> 512 -> input);
  - shared residual codebooks: 2 levels x K codes x 64 (on concat(z_s, z_c));
  - specific residual codebooks: per space 2 levels x K codes x 32 (on its half of the
    residual left by the shared levels); decoder input = its half of the shared
    quantisation + its specific quantisation;
  - per level: codes from squared distances of the detached residual, loss
    ||sg(r) - e||^2 + 0.25 ||r - sg(e)||^2 (means), straight-through output, next residual
    sg(r - e); the last specific level of each space is assigned by Sinkhorn (centred
    distances, epsilon 0.003, 50 log-domain row/column iterations, argmax of the plan),
    the others by argmin;
  - loss: MSE(v_s_hat, v_s) + MSE(v_c_hat, v_c) + mean of the 6 level losses;
  - initialisation: truncated LeCun-normal kernels, zero biases, codebooks k-means (k-means++
    then 25 Lloyd steps) on the first batch's residuals, level by level;
  - optimizer: global-norm clipping at 1.0, then AdamW (lr 1e-3, weight decay 1e-5 on every
    parameter, betas 0.9/0.999, eps 1e-8).

What differs from ours: the optimiser is torch.optim.AdamW over the parameter tensors (ours
updates one flat vector; the arithmetic is the same); torch's clipping divides by
(norm + 1e-6); k-means, Sinkhorn and initial weights use torch's random streams, so numbers
match in distribution, not bit for bit. Ours' per-epoch collision-rate evaluation (after
the epoch's clock stops) and ID assignment are not part of this peer.

Timing, per size: a warm-up (a throwaway model trained one epoch on the first batch, as
ours compiles on one), then a fresh model trained --epochs whole epochs; an epoch is a
seeded permutation wrapped to whole batches, and per batch: host gather, forward, backward,
clipping, optimizer step. The clock of an epoch starts before the permutation and stops
after the epoch's summed losses reach the host, as ours. epoch_s is the mean over epochs.

On a CUDA device (`--device`, default cuda when torch sees one) batches are gathered on the
host and copied over, as ours feeds its jitted step; everything computes in float32.
Prints one JSON object (the last line of stdout); `--json_out PATH` also writes it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

from launch.bench.bench_identifiers import synthetic_tables  # numpy only

HIDDEN_DIMS = (512, 256, 128, 64)
LATENT_DIM = 32
SHARED_LEVELS = 2
SPECIFIC_LEVELS = 2
COMMITMENT = 0.25
SINKHORN_EPSILON = 0.003
SINKHORN_ITERS = 50
KMEANS_ITERS = 25
LR, WEIGHT_DECAY, GRAD_CLIP = 1e-3, 1e-5, 1.0
SEED = 0


def mlp(widths) -> nn.Sequential:
  """Linear layers over consecutive widths, ReLU between them (none after the last)."""
  layers = []
  for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
    linear = nn.Linear(a, b)
    std = math.sqrt(1.0 / a) / 0.87962566103423978  # truncated LeCun normal, as Flax
    nn.init.trunc_normal_(linear.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(linear.bias)
    layers.append(linear)
    if i < len(widths) - 2:
      layers.append(nn.ReLU())
  return nn.Sequential(*layers)


def squared_distances(x: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
  """[n, d] x [k, d] -> [n, k] by the matmul expansion, clipped at 0."""
  d = (x * x).sum(-1, keepdim=True) - 2.0 * x @ books.T + (books * books).sum(-1)[None, :]
  return d.clamp_min(0.0)


@torch.no_grad()
def sinkhorn_codes(distances: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
  """Balanced assignment: [n, k] distances -> [n] codes (argmax of the transport plan)."""
  low, high = distances.min(), distances.max()
  middle = (high + low) / 2.0
  logits = -((distances - middle) / (high - middle + 1e-5)) / epsilon  # centred to [-1, 1]
  v = torch.zeros(distances.shape[1], device=distances.device)
  for _ in range(iterations):
    u = -torch.logsumexp(logits + v[None, :], dim=1)  # rows: equal mass per item
    v = -torch.logsumexp(logits + u[:, None], dim=0)  # columns: equal mass per code
    v = torch.where(torch.isfinite(v), v, torch.zeros_like(v))
  return torch.argmax(logits + v[None, :], dim=1)


def quantize_level(r: torch.Tensor, book: torch.Tensor, use_sinkhorn: bool):
  """One residual level -> (straight-through output, next residual, level loss)."""
  with torch.no_grad():
    distances = squared_distances(r, book)  # [batch, K]
    codes = (sinkhorn_codes(distances, SINKHORN_EPSILON, SINKHORN_ITERS) if use_sinkhorn
             else distances.argmin(dim=1))
  e = book[codes]  # [batch, dim]; the codebook gets its gradient here
  loss = (torch.mean((r.detach() - e) ** 2)
          + COMMITMENT * torch.mean((r - e.detach()) ** 2))
  st = r + (e - r).detach()  # value e, gradient identity to r
  return st, (r - e).detach(), loss


class RQVAE(nn.Module):
  """Two encoders, shared + per-space residual codebooks, two decoders (see the docstring)."""

  def __init__(self, input_dims, codebook_size: int):
    super().__init__()
    self.encoders = nn.ModuleList(mlp((d,) + HIDDEN_DIMS + (LATENT_DIM,)) for d in input_dims)
    self.decoders = nn.ModuleList(
        mlp((LATENT_DIM,) + HIDDEN_DIMS[::-1] + (d,)) for d in input_dims)
    k, spaces = codebook_size, len(input_dims)
    self.shared_codebook = nn.Parameter(  # [L_m, K, spaces * latent]
        torch.empty(SHARED_LEVELS, k, spaces * LATENT_DIM).uniform_(-1.0 / k, 1.0 / k))
    self.specific_codebook = nn.Parameter(  # [spaces, L_n, K, latent]
        torch.empty(spaces, SPECIFIC_LEVELS, k, LATENT_DIM).uniform_(-1.0 / k, 1.0 / k))

  def encode(self, inputs) -> torch.Tensor:
    return torch.cat([enc(x) for enc, x in zip(self.encoders, inputs)], dim=-1)

  def forward(self, inputs, use_sinkhorn: bool = True):
    """-> (reconstructions per space, the 2 + 2 * spaces level losses)."""
    r = self.encode(inputs)  # [batch, spaces * latent]
    shared_q, losses = torch.zeros_like(r), []
    for level in range(SHARED_LEVELS):
      st, r, loss = quantize_level(r, self.shared_codebook[level], False)
      shared_q, losses = shared_q + st, losses + [loss]
    recon = []
    for i, decoder in enumerate(self.decoders):
      part = r[:, i * LATENT_DIM:(i + 1) * LATENT_DIM]  # this space's half of the residual
      q = shared_q[:, i * LATENT_DIM:(i + 1) * LATENT_DIM]
      for level in range(SPECIFIC_LEVELS):
        last = use_sinkhorn and level == SPECIFIC_LEVELS - 1
        st, part, loss = quantize_level(part, self.specific_codebook[i, level], last)
        q, losses = q + st, losses + [loss]
      recon.append(decoder(q))
    return recon, torch.stack(losses)


def rqvae_loss(model: RQVAE, batch):
  recon, level_losses = model(batch)
  recon_loss = sum(torch.mean((y - x) ** 2) for y, x in zip(recon, batch))
  quant_loss = level_losses.mean()
  return recon_loss + quant_loss, recon_loss, quant_loss


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iterations: int, gen: torch.Generator) -> torch.Tensor:
  """k-means++ seeding then Lloyd steps; an empty cluster keeps its centre. -> [k, d]."""
  n = x.shape[0]
  uniforms = torch.rand(k, generator=gen).to(x.device)
  centres = x.new_zeros(k, x.shape[1])
  centres[0] = x[min(int(uniforms[0] * n), n - 1)]
  min_d2 = squared_distances(x, centres[:1])[:, 0]
  for i in range(1, k):
    weights = min_d2 if float(min_d2.sum()) > 0.0 else torch.ones_like(min_d2)
    cdf = torch.cumsum(weights, 0)
    idx = min(int(torch.searchsorted(cdf, uniforms[i] * cdf[-1], right=True)), n - 1)
    centres[i] = x[idx]
    min_d2 = torch.minimum(min_d2, squared_distances(x, centres[i:i + 1])[:, 0])
  for _ in range(iterations):
    assign = squared_distances(x, centres).argmin(1)
    sums = x.new_zeros(k, x.shape[1]).index_add_(0, assign, x)
    counts = torch.bincount(assign, minlength=k).to(x.dtype)[:, None]
    centres = torch.where(counts > 0, sums / counts.clamp_min(1.0), centres)
  return centres


@torch.no_grad()
def kmeans_init(model: RQVAE, first_batch, gen: torch.Generator) -> None:
  """Every codebook <- k-means centroids of its level's residuals on the first batch."""
  def fit(r, book):
    centres = kmeans(r, book.shape[0], KMEANS_ITERS, gen)
    book.copy_(centres)
    return r - centres[squared_distances(r, centres).argmin(1)]

  r = model.encode(first_batch)
  for level in range(SHARED_LEVELS):
    r = fit(r, model.shared_codebook[level])
  for i in range(len(model.encoders)):
    part = r[:, i * LATENT_DIM:(i + 1) * LATENT_DIM]
    for level in range(SPECIFIC_LEVELS):
      part = fit(part, model.specific_codebook[i, level])


def train(tables, epochs: int, batch_size: int, codebook_size: int, device: str):
  """Trains a fresh model; -> (per-epoch seconds, last epoch's mean losses, parameters)."""
  torch.manual_seed(SEED)
  gen = torch.Generator().manual_seed(SEED)
  n = tables[0].shape[0]
  batch_size = min(batch_size, n)
  steps = math.ceil(n / batch_size)
  rng = np.random.default_rng(SEED)
  host = [torch.from_numpy(t) for t in tables]  # shares the numpy memory

  def epoch_batches():
    perm = rng.permutation(n)
    perm = np.concatenate([perm, perm[:steps * batch_size - n]])  # wrap: fixed batch shape
    return torch.from_numpy(perm.reshape(steps, batch_size))

  def gather(idx):
    return [t.index_select(0, idx).to(device) for t in host]

  model = RQVAE([t.shape[1] for t in tables], codebook_size).to(device)
  batches = epoch_batches()
  kmeans_init(model, gather(batches[0]), gen)
  optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
  seconds, losses = [], None
  for epoch in range(epochs):
    t0 = time.perf_counter()
    if epoch:
      batches = epoch_batches()
    sums = torch.zeros(3, device=device)
    for idx in batches:
      loss, recon_loss, quant_loss = rqvae_loss(model, gather(idx))
      optimizer.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
      optimizer.step()
      sums += torch.stack([loss, recon_loss, quant_loss]).detach()
    losses = [x / steps for x in sums.tolist()]  # waits for the device
    seconds.append(time.perf_counter() - t0)
  return seconds, losses, sum(p.numel() for p in model.parameters())


def run_one(n: int, args) -> dict:
  sem, col = synthetic_tables(n, args.semantic_dim, args.collaborative_dim)
  load_before = os.getloadavg()[0]
  t0 = time.perf_counter()
  warm = min(n, args.batch_size)
  train((sem[:warm], col[:warm]), 1, args.batch_size, args.codebook_size, args.device)
  warmup_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  seconds, (loss, recon, quant), params = train(
      (sem, col), args.epochs, args.batch_size, args.codebook_size, args.device)
  train_s = time.perf_counter() - t0
  epoch_s = float(np.mean(seconds))
  return {"items": n, "epochs": args.epochs, "warmup_s": warmup_s, "epoch_s": epoch_s,
          "epoch_seconds": seconds, "train_items_per_s": n / epoch_s, "train_total_s": train_s,
          "loss": loss, "recon_loss": recon, "quant_loss": quant, "params": params,
          # Other work on the cores slows torch's OpenMP threads far more than its share
          # (one 10k epoch: 17.6 s beside a test run, 2.0 s alone on 2 cores). The run's
          # own threads count in the second figure; load beyond that marks a suspect row.
          "load_avg_1m": [load_before, os.getloadavg()[0]]}


def write_json(path: str, result: dict) -> None:
  """Whole or not at all: a temporary file in the same folder, then os.replace."""
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".bench_torch_rqvae_", suffix=".json")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default="10000,100000,1000000",
                      help="comma-separated catalogue sizes")
  parser.add_argument("--semantic-dim", type=int, default=768)
  parser.add_argument("--collaborative-dim", type=int, default=64)
  parser.add_argument("--epochs", type=int, default=1, help="timed RQ-VAE epochs per size")
  parser.add_argument("--codebook-size", type=int, default=256)
  parser.add_argument("--batch-size", type=int, default=1024)
  parser.add_argument("--threads", type=int, default=None,
                      help="torch intra-op threads (default: the usable cores)")
  parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if any)")
  parser.add_argument("--json_out", "--json", dest="json_out", default=None,
                      help="also write the JSON object to this file")
  args = parser.parse_args(argv)
  args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
  threads = args.threads or len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)

  rows = []
  for n in (int(s) for s in args.sizes.split(",")):
    row = run_one(n, args)
    print(f"# {n} items: warm-up {row['warmup_s']:.1f}s, epoch {row['epoch_s']:.2f}s "
          f"({row['train_items_per_s']:.0f} items/s), loss {row['loss']:.4f}",
          file=sys.stderr, flush=True)
    rows.append(row)
  result = {
      "peer": "PyTorch RQ-VAE", "torch": torch.__version__, "python": platform.python_version(),
      "threads": threads, "device": (torch.cuda.get_device_name() if args.device == "cuda"
                                     else args.device),
      "semantic_dim": args.semantic_dim, "collaborative_dim": args.collaborative_dim,
      "codebook_size": args.codebook_size, "batch_size": args.batch_size,
      "shape": f"MLP {'-'.join(map(str, HIDDEN_DIMS))} -> {LATENT_DIM} per space, "
               f"{SHARED_LEVELS} shared x {args.codebook_size} x {2 * LATENT_DIM} + "
               f"{SPECIFIC_LEVELS} specific x {args.codebook_size} x {LATENT_DIM} per space, "
               f"Sinkhorn on the last specific level",
      "rows": rows}
  if args.json_out:
    write_json(args.json_out, result)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
