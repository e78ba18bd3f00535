"""Training the joint RQ-VAE: initialisation, loss, the cached jitted programs, keep-best.

Training follows the published recipe: k-means initialised codebooks (first batch),
Sinkhorn-balanced codes on the last specific level, straight-through gradients,
AdamW + clipping, and the parameters with the lowest collision rate are kept. Unlike the
published code, each embedding table is first standardised per dimension
(`RQVAEConfig.balance`); the statistics travel with the trained model, so items
added later are scaled exactly as the catalogue was.

The network is in `rqvae_model.py` and the configuration in `rqvae_config.py`; the config
names are re-exported here because callers (gin setups, ablations, tests) import them from
`gensar_jax.identifiers.rqvae` together with `train_rqvae`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
import tqdm

from gensar_jax.identifiers import codebook_reset
from gensar_jax.identifiers import kmeans as kmeans_lib
from gensar_jax.identifiers.rqvae_config import (  # noqa: F401  (re-exported: see the docstring)
    COLLABORATIVE, MODES, SEMANTIC, QuantizerLayout, RQVAEConfig, validate_embeddings)
from gensar_jax.identifiers.rqvae_model import RQVAE, build_model

# Per space, in layout order: (mean [d], standard deviation [d]) of its embedding table.
InputStats = Tuple[Tuple[np.ndarray, np.ndarray], ...]


def input_statistics(tables: Sequence[np.ndarray], standardize: bool) -> Optional[InputStats]:
  """What `scale_inputs` needs to standardise every table, or None when it should not.

  A dimension that is constant over the catalogue carries nothing; it is divided by 1
  rather than by ~0, so it stays ~0 instead of turning rounding noise into signal.
  """
  if not standardize:
    return None
  stats = []
  for table in tables:
    mean = table.mean(axis=0, dtype=np.float64)  # [d]
    std = table.std(axis=0, dtype=np.float64)  # [d]
    floor = 1e-6 * max(float(std.max(initial=0.0)), np.finfo(np.float32).tiny)
    std = np.where(std > floor, std, 1.0)
    stats.append((mean.astype(np.float32), std.astype(np.float32)))
  return tuple(stats)


def scale_inputs(tables: Sequence[np.ndarray], stats: Optional[InputStats]
                 ) -> Tuple[np.ndarray, ...]:
  """The tables as the encoders see them: [items, d] each, standardised with `stats`."""
  if stats is None:
    return tuple(tables)
  return tuple(((t - mean) / std).astype(np.float32) for t, (mean, std) in zip(tables, stats))


@dataclasses.dataclass
class TrainedRQVAE:
  """What `train_rqvae` returns: the kept (lowest-collision) parameters and the history."""
  params: Any
  config: RQVAEConfig
  input_dims: Tuple[int, ...]
  history: List[Dict[str, float]]
  best_epoch: int
  best_collision_rate: float
  final_params: Any = None
  # Statistics every input table is standardised with before the encoders (None: the
  # tables enter as they are, RQVAEConfig.balance = "none").
  input_stats: Optional[InputStats] = None

  @property
  def model(self) -> RQVAE:
    return build_model(self.config, self.input_dims)


def _init_params(model: RQVAE, example: Tuple[np.ndarray, ...], seed: int):
  """Parameters drawn on the host with numpy, shapes taken from `jax.eval_shape`.

  Same distributions as Flax's defaults (truncated LeCun-normal kernels, zero biases;
  codebooks uniform in [-1/K, 1/K] as the published code), but no XLA program: on a
  CPU machine, compiling `model.init` costs far more than training a small model.
  """
  shapes = jax.eval_shape(functools.partial(model.init, use_sinkhorn=False),
                          jax.random.PRNGKey(0), example)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = str(path[-1].key)
    if name == "kernel":
      std = np.sqrt(1.0 / leaf.shape[0]) / 0.87962566103423978
      values = rng.normal(size=leaf.shape)
      while (bad := np.abs(values) > 2.0).any():  # truncate at two standard deviations
        values[bad] = rng.normal(size=int(bad.sum()))
      return jnp.asarray(values * std, jnp.float32)
    if name == "bias":
      return jnp.zeros(leaf.shape, jnp.float32)
    k = model.codebook_size
    return jnp.asarray(rng.uniform(-1.0 / k, 1.0 / k, size=leaf.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _kmeans_init(model: RQVAE, params, r: np.ndarray, key: jax.Array, iterations: int):
  """Replaces every codebook by k-means centroids of its level's residuals.

  Level by level, as the residuals of level i+1 depend on the centroids of level i.

  Args:
    r: [batch, spaces * latent] encoder outputs of the first batch.
  """
  tree = dict(params["params"])
  k, lat, s = model.codebook_size, model.latent_dim, len(model.spaces)
  width = r.shape[1]

  def fit(r):
    nonlocal key
    key, sub = jax.random.split(key)
    # Zero columns change no distance, so padding every level's residual to one width
    # gives identical centroids and a single compiled k-means program.
    padded = np.pad(r, ((0, 0), (0, width - r.shape[1])))
    centroids, assign = jax.device_get(
        kmeans_lib.kmeans(padded, sub, k=k, iterations=iterations))
    centroids = centroids[:, :r.shape[1]]
    return centroids, r - centroids[assign]

  if model.shared_levels:
    books = []
    for _ in range(model.shared_levels):
      centroids, r = fit(r)
      books.append(centroids)
    tree["shared_codebook"] = jnp.asarray(np.stack(books))  # [L_m, K, spaces * latent]
  specific = np.zeros((s, model.specific_levels, k, lat), np.float32)
  for i in range(s):
    part = r[:, i * lat:(i + 1) * lat]  # [batch, latent]
    for level in range(model.specific_levels):
      specific[i, level], part = fit(part)
  tree["specific_codebook"] = jnp.asarray(specific)  # [spaces, L_n, K, latent]
  return {"params": tree}


def init_rqvae(semantic: Optional[np.ndarray], collaborative: Optional[np.ndarray],
               config: RQVAEConfig = RQVAEConfig(), batch: Optional[np.ndarray] = None
               ) -> "TrainedRQVAE":
  """An untrained RQ-VAE: random MLPs, codebooks k-means initialised on one batch.

  `train_rqvae` starts from this; on its own it gives a quick baseline for the
  identifier pipeline (0 epochs of training).

  Args:
    batch: row indices of the batch to fit k-means on (default: the first
      min(batch_size, n) rows of a seeded permutation).
  """
  tables = validate_embeddings(semantic, collaborative, config)
  n = tables[0].shape[0]
  input_dims = tuple(t.shape[1] for t in tables)
  model = build_model(config, input_dims)
  if batch is None:
    batch = np.random.default_rng(config.seed).permutation(n)[:min(config.batch_size, n)]
  first = tuple(t[batch] for t in tables)
  params = _init_params(model, first, config.seed)
  trained = TrainedRQVAE(params, config, input_dims, [], -1, float("inf"), params,
                         input_statistics(tables, config.standardizes_inputs))
  # Same chunk shape as whole-catalogue evaluation, so the encoder compiles once.
  r = encode_and_quantize(trained, first, chunk=min(config.eval_chunk, n))[0]
  trained.params = trained.final_params = _kmeans_init(
      model, params, r, jax.random.PRNGKey(config.seed), config.kmeans_iters)
  return trained


def rqvae_loss(model: RQVAE, params, batch: Sequence[jax.Array], use_sinkhorn: bool = True):
  """MSE(v_s_hat, v_s) + MSE(v_c_hat, v_c) + mean over levels of the quantisation loss.

  Returns:
    (total loss, (reconstruction loss, quantisation loss)).
  """
  recon, quantized = model.apply(params, batch, use_sinkhorn=use_sinkhorn)
  recon_loss = sum(jnp.mean(jnp.square(y - x)) for y, x in zip(recon, batch))
  quant_loss = jnp.mean(quantized["level_losses"])  # mean over all levels
  return recon_loss + quant_loss, (recon_loss, quant_loss)


def _program_key(config: RQVAEConfig) -> RQVAEConfig:
  """The config with every field that does not change a compiled program normalised.

  Jitted programs are cached per (program key, input dims): a second run that only
  changes epochs or the seed reuses them instead of compiling again.
  """
  return dataclasses.replace(config, epochs=1, eval_every=1, seed=0, progress=False,
                             collision_rounds=0, kmeans_iters=1, reset_every=0,
                             reset_until=0.0,
                             balance="inputs_and_latents" if config.normalizes_latents
                             else "none")


def _optimizer(config: RQVAEConfig) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(config.grad_clip),
                     optax.adamw(config.lr, weight_decay=config.weight_decay))


@functools.lru_cache(maxsize=8)
def _train_step_fn(config: RQVAEConfig, input_dims: Tuple[int, ...]):
  """The jitted train step, cached per (program key, input dims).

  Its shapes depend only on the batch size and input widths, never on the catalogue
  size, so catalogues of any size (and every test) share one compiled program. The
  optimiser sees the parameters as one flat vector (AdamW and global-norm clipping are
  unchanged by that): one fused update instead of one per parameter leaf, which roughly
  halves XLA compile time on CPU.

  Returns:
    (step, unravel): step(flat, opt_state, metric_sums, batch) -> same three, updated;
    unravel (jitted) maps the flat vector back to the parameter tree.
  """
  model = build_model(config, input_dims)
  tx = _optimizer(config)
  shapes = jax.eval_shape(functools.partial(model.init, use_sinkhorn=False),
                          jax.random.PRNGKey(0), tuple(jnp.zeros((1, d)) for d in input_dims))
  _, unravel = ravel_pytree(jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), shapes))

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(flat, opt_state, metric_sums, batch):
    """batch: [batch, d_in] per space; metric_sums [3] accumulates (loss, recon, quant)."""
    (loss, (rl, ql)), grads = jax.value_and_grad(
        lambda p: rqvae_loss(model, unravel(p), batch), has_aux=True)(flat)
    updates, opt_state = tx.update(grads, opt_state, flat)
    return (optax.apply_updates(flat, updates), opt_state,
            metric_sums + jnp.stack([loss, rl, ql]))

  return step, jax.jit(unravel)  # eagerly, every leaf's slice would compile on its own


@functools.lru_cache(maxsize=8)
def _encode_codes_fn(config: RQVAEConfig, input_dims: Tuple[int, ...]):
  """Jitted encoder + argmin quantiser, cached so repeated evaluations compile once."""
  model = build_model(config, input_dims)

  @jax.jit
  def encode_codes(params, chunk):
    r0 = model.apply(params, chunk, method=RQVAE.encode)  # [chunk, spaces * latent]
    q = model.apply(params, r0, False, method=RQVAE.quantize)
    return r0, q["shared_codes"], q["specific_codes"]
  return encode_codes


def encode_and_quantize(trained: TrainedRQVAE, tables: Sequence[np.ndarray],
                        params=None, chunk: Optional[int] = None
                        ) -> Tuple[np.ndarray, Optional[np.ndarray], Dict[str, np.ndarray]]:
  """Latents and argmin codes for a whole catalogue, in fixed-size jitted chunks.

  Args:
    tables: the embedding tables as given to `train_rqvae` (unscaled: the model's
      `input_stats` are applied here).
    chunk: rows per call (default min(eval_chunk, n)); the last chunk is zero-padded.

  Returns:
    r0 [n, spaces * latent] float32, shared codes [n, L_m] (None without shared levels),
    and {space: specific codes [n, L_n]}.
  """
  params = trained.params if params is None else params
  model = trained.model
  fn = _encode_codes_fn(_program_key(trained.config), tuple(trained.input_dims))
  tables = scale_inputs(tables, trained.input_stats)
  n = tables[0].shape[0]
  chunk = min(trained.config.eval_chunk, n) if chunk is None else chunk
  r0s, shared, specific = [], [], {s: [] for s in model.spaces}
  for lo in range(0, n, chunk):
    part = [t[lo:lo + chunk] for t in tables]
    size = part[0].shape[0]
    if size < chunk:  # pad the last chunk to keep one compiled shape
      part = [np.concatenate([p, np.zeros((chunk - size, p.shape[1]), p.dtype)]) for p in part]
    r0, sc, spec = jax.device_get(fn(params, tuple(part)))
    r0s.append(r0[:size])
    if sc is not None:
      shared.append(sc[:size])
    for i, s in enumerate(model.spaces):
      specific[s].append(spec[i, :size])
  shared_codes = np.concatenate(shared).astype(np.int64) if shared else None
  return (np.concatenate(r0s), shared_codes,
          {s: np.concatenate(v).astype(np.int64) for s, v in specific.items()})


def collision_rate(codes: np.ndarray) -> float:
  """Share of items that would have to be dropped to make the IDs unique: 1 - unique / n."""
  codes = np.asarray(codes)
  if codes.shape[0] == 0:
    return 0.0
  return 1.0 - np.unique(codes, axis=0).shape[0] / codes.shape[0]


def _collision_rates(trained: TrainedRQVAE, tables, params) -> Dict[str, float]:
  _, shared, specific = encode_and_quantize(trained, tables, params)
  rates = {}
  for space, codes in specific.items():
    full = codes if shared is None else np.concatenate([shared, codes], axis=1)
    rates[space] = collision_rate(full)
  return rates


def _reset_due(config: RQVAEConfig, epoch: int) -> bool:
  """Whether dead codes are restarted after `epoch` (0-based)."""
  return bool(config.reset_every) and (epoch + 1) % config.reset_every == 0 and (
      epoch + 1 < config.reset_until * config.epochs)


def _reset_dead_codes(trained: TrainedRQVAE, tables, params, rng: np.random.Generator
                      ) -> Tuple[jax.Array, int]:
  """The flat parameters after moving every level's unused codes (codebook_reset.py)."""
  r0, shared, specific = encode_and_quantize(trained, tables, params)
  spaces = trained.model.spaces
  params, moved = codebook_reset.reseed_dead_codes(
      params, r0, shared, [specific[s] for s in spaces], rng)
  return jnp.asarray(ravel_pytree(params)[0]), int(sum(moved.values()))


def train_rqvae(semantic: Optional[np.ndarray], collaborative: Optional[np.ndarray],
                config: RQVAEConfig = RQVAEConfig()) -> TrainedRQVAE:
  """Trains the joint RQ-VAE and keeps the parameters with the lowest collision rate.

  Args:
    semantic: [items, d_s] text embeddings (may be None in "cid_only" mode).
    collaborative: [items, d_c] behaviour embeddings (may be None in "sid_only" mode).
    config: model and training settings.

  Returns:
    TrainedRQVAE with the kept params; `history` holds per-epoch losses and, every
    `eval_every` epochs and at the end, the collision rate per space (argmin codes).
  """
  tables = validate_embeddings(semantic, collaborative, config)
  n = tables[0].shape[0]
  batch_size = min(config.batch_size, n)
  steps = math.ceil(n / batch_size)
  rng = np.random.default_rng(config.seed)

  def epoch_batches():
    perm = rng.permutation(n)
    # Wrap around so every item is seen each epoch with a fixed batch shape.
    perm = np.concatenate([perm, perm[:steps * batch_size - n]])
    return perm.reshape(steps, batch_size).astype(np.int32)  # [steps, batch]

  batches = epoch_batches()
  trained = init_rqvae(semantic, collaborative, config, batch=batches[0])
  scaled = scale_inputs(tables, trained.input_stats)  # what the encoders read
  train_step, unravel = _train_step_fn(_program_key(config), trained.input_dims)
  flat = ravel_pytree(trained.params)[0]  # [num_params]
  opt_state = jax.jit(_optimizer(config).init)(flat)
  bar = tqdm.trange(config.epochs, desc="rqvae", disable=not config.progress)
  for epoch in bar:
    t0 = time.perf_counter()
    if epoch:
      batches = epoch_batches()
    sums = np.zeros((3,), np.float32)
    for idx in batches:  # dispatch is asynchronous: the next gather overlaps this step
      flat, opt_state, sums = train_step(flat, opt_state, sums, tuple(t[idx] for t in scaled))
    loss, recon, quant = (float(x) / steps for x in jax.device_get(sums))
    record = {"epoch": epoch, "loss": loss, "recon_loss": recon, "quant_loss": quant,
              "seconds": time.perf_counter() - t0}
    if (epoch + 1) % config.eval_every == 0 or epoch == config.epochs - 1:
      params = unravel(flat)
      rates = _collision_rates(trained, tables, params)
      rate = float(np.mean(list(rates.values())))
      record.update({f"collision_rate_{s}": r for s, r in rates.items()})
      record["collision_rate"] = rate
      if rate <= trained.best_collision_rate:  # ties: keep the longer-trained params
        trained.params, trained.best_epoch, trained.best_collision_rate = params, epoch, rate
      bar.set_postfix(loss=f"{loss:.4f}", collisions=f"{rate:.4f}")
    else:
      bar.set_postfix(loss=f"{loss:.4f}")
    if _reset_due(config, epoch):
      flat, record["codes_reset"] = _reset_dead_codes(trained, tables, unravel(flat), rng)
    trained.history.append(record)
  trained.final_params = unravel(flat)
  return trained
