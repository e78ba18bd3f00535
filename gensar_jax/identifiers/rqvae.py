"""The joint RQ-VAE of GenSAR: two embedding tables in, shared + specific codes out.

One model quantises what an item's text (semantic embedding) and its behaviour
(collaborative embedding) agree on into *shared* codes, and what only one of them knows
into *specific* codes. The semantic ID is shared + semantic codes, the collaborative ID
shared + collaborative codes, so the two IDs of an item start with the same tokens.

  z_s = MLP_s(v_s), z_c = MLP_c(v_c)               # [batch, 32] each
  r0 = concat(z_s, z_c)                            # [batch, 64]
  shared RQ: L_m levels of K codes, 64-d           # r0 -> r_{L_m}
  split r_{L_m} -> (semantic half, collab half)    # [batch, 32] each
  specific RQ: L_n levels of K codes, 32-d per half
  v_s_hat = Dec_s(shared_q[:, :32] + semantic_q), v_c_hat = Dec_c(shared_q[:, 32:] + collab_q)

Training follows the published recipe: k-means initialised codebooks (first batch),
Sinkhorn-balanced codes on the last specific level, straight-through gradients,
AdamW + clipping, and the parameters with the lowest collision rate are kept.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
import tqdm

from gensar_jax.identifiers import kmeans as kmeans_lib
from gensar_jax.identifiers import sinkhorn as sinkhorn_lib

SEMANTIC = "semantic"
COLLABORATIVE = "collaborative"
MODES = ("dual", "dual_no_shared", "sid_only", "cid_only")
# Token prefix letter of each quantiser: shared levels, then one per space.
TOKEN_LETTERS = {"shared": "m", SEMANTIC: "s", COLLABORATIVE: "c"}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RQVAEConfig:
  """Everything that defines the identifier model; defaults are the published setup.

  Modes (ablations of the paper): "dual" = shared + specific codebooks; "dual_no_shared"
  = both spaces quantised separately, all levels specific; "sid_only" / "cid_only" = one
  embedding table, one identifier space. In the last three the shared levels become
  extra specific levels, so every ID keeps shared_levels + specific_levels tokens.
  """
  mode: str = "dual"
  hidden_dims: Tuple[int, ...] = (512, 256, 128, 64)  # encoder widths; decoders mirror
  latent_dim: int = 32  # per-space encoder output (z_s, z_c)
  shared_levels: int = 2  # L_m
  specific_levels: int = 2  # L_n, per space
  codebook_size: int = 256  # K, codes per level
  # Codebook widths; None derives them (shared = spaces * latent_dim, specific = latent_dim).
  # They are listed so gin files can state them, and must agree with latent_dim.
  shared_dim: Optional[int] = None
  specific_dim: Optional[int] = None
  epochs: int = 500
  batch_size: int = 1024
  lr: float = 1e-3
  weight_decay: float = 1e-5
  grad_clip: float = 1.0
  commitment: float = 0.25  # beta of ||r - sg(e)||^2
  sinkhorn_epsilon: float = 0.003
  sinkhorn_iters: int = 50
  kmeans_iters: int = 25
  eval_every: int = 10  # epochs between collision-rate evaluations (keep-best)
  collision_rounds: int = 20  # Sinkhorn re-assignment rounds when assigning IDs
  eval_chunk: int = 1024  # rows per jitted encode call (cache-sized chunks are fastest on CPU)
  seed: int = 0
  progress: bool = True  # tqdm bar over epochs

  def __post_init__(self):
    # gin binds sequences as lists; a tuple keeps the config hashable (programs are cached on it).
    object.__setattr__(self, "hidden_dims", tuple(int(d) for d in self.hidden_dims))
    if self.mode not in MODES:
      raise ValueError(f"RQVAEConfig.mode must be one of {MODES}, got {self.mode!r}")
    for name in ("latent_dim", "codebook_size", "epochs", "batch_size", "sinkhorn_iters",
                 "eval_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"RQVAEConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.shared_levels < 0 or self.specific_levels < 0:
      raise ValueError("RQVAEConfig level counts must be >= 0")
    if self.mode == "dual" and self.specific_levels < 1:
      raise ValueError("dual mode needs specific_levels >= 1 (collisions are fixed there)")
    if self.shared_levels + self.specific_levels < 1:
      raise ValueError("RQVAEConfig needs at least one quantisation level")
    layout = self.layout()
    if self.shared_dim is not None and layout.shared_levels and (
        self.shared_dim != layout.shared_dim):
      raise ValueError(f"shared_dim={self.shared_dim} must equal number of spaces x "
                       f"latent_dim = {layout.shared_dim}")
    if self.specific_dim is not None and self.specific_dim != self.latent_dim:
      raise ValueError(f"specific_dim={self.specific_dim} must equal latent_dim="
                       f"{self.latent_dim} (each space's half of the residual)")

  def layout(self) -> "QuantizerLayout":
    total = self.shared_levels + self.specific_levels
    if self.mode == "dual":
      return QuantizerLayout((SEMANTIC, COLLABORATIVE), self.shared_levels,
                             self.specific_levels, self.codebook_size, self.latent_dim)
    spaces = {"dual_no_shared": (SEMANTIC, COLLABORATIVE), "sid_only": (SEMANTIC,),
              "cid_only": (COLLABORATIVE,)}[self.mode]
    return QuantizerLayout(spaces, 0, total, self.codebook_size, self.latent_dim)


@dataclasses.dataclass(frozen=True)
class QuantizerLayout:
  """Which identifier spaces exist and how many levels of which width each has."""
  spaces: Tuple[str, ...]
  shared_levels: int
  specific_levels: int
  codebook_size: int
  latent_dim: int

  @property
  def shared_dim(self) -> int:
    return len(self.spaces) * self.latent_dim

  @property
  def id_length(self) -> int:
    return self.shared_levels + self.specific_levels

  def level_names(self, space: str) -> Tuple[str, ...]:
    """Token prefix per level of one space's ID, e.g. ("m0", "m1", "s0", "s1")."""
    shared = tuple(f"m{i}" for i in range(self.shared_levels))
    letter = TOKEN_LETTERS[space]
    return shared + tuple(f"{letter}{i}" for i in range(self.specific_levels))


def validate_embeddings(semantic: Optional[np.ndarray], collaborative: Optional[np.ndarray],
                        config: RQVAEConfig) -> Tuple[np.ndarray, ...]:
  """Checks the embedding tables the mode needs and returns them in layout order.

  Raises ValueError naming the table and its first bad row (NaN / inf), or both counts
  when the tables disagree, before any training or writing happens.
  """
  given = {SEMANTIC: semantic, COLLABORATIVE: collaborative}
  tables = []
  for space in config.layout().spaces:
    table = given[space]
    if table is None:
      raise ValueError(f"mode {config.mode!r} needs the {space} embedding table, got None")
    table = np.asarray(table)
    if table.ndim != 2 or table.shape[0] < 1 or table.shape[1] < 1:
      raise ValueError(f"{space} embedding table must be [items, dim], got {table.shape}")
    if not np.issubdtype(table.dtype, np.number):
      raise ValueError(f"{space} embedding table must be numeric, got {table.dtype}")
    table = table.astype(np.float32, copy=False)
    bad_rows = ~np.isfinite(table).all(axis=1)  # [items]
    if bad_rows.any():
      row = int(np.argmax(bad_rows))
      kind = "NaN" if np.isnan(table[row]).any() else "inf"
      raise ValueError(f"{space} embedding table has non-finite values ({kind}) at row "
                       f"{row} ({int(bad_rows.sum())} bad rows in all)")
    tables.append(table)
  if len(tables) == 2 and tables[0].shape[0] != tables[1].shape[0]:
    raise ValueError(f"item counts differ: semantic table has {tables[0].shape[0]} rows, "
                     f"collaborative table has {tables[1].shape[0]}")
  return tuple(tables)


class MLP(nn.Module):
  """Dense layers with ReLU between them (none after the last)."""
  features: Tuple[int, ...]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i, width in enumerate(self.features):
      x = nn.Dense(width)(x)
      if i < len(self.features) - 1:
        x = nn.relu(x)
    return x


def _quantize_level(r: jax.Array, codebook: jax.Array, commitment: float,
                    sinkhorn: Optional[Tuple[float, int]]):
  """One residual level: pick a code per row, return codes, ST output, next residual, loss.

  Args:
    r: [batch, dim] residual entering the level.
    codebook: [codes, dim].
    sinkhorn: (epsilon, iterations) for balanced assignment, or None for argmin.
  """
  distances = kmeans_lib.squared_distances(jax.lax.stop_gradient(r), codebook)  # [b, K]
  if sinkhorn is None:
    codes = jnp.argmin(distances, axis=-1).astype(jnp.int32)  # [batch]
  else:
    codes = sinkhorn_lib.sinkhorn_codes(distances, sinkhorn[0], sinkhorn[1])  # [batch]
  e = codebook[codes]  # [batch, dim]
  loss = (jnp.mean(jnp.square(jax.lax.stop_gradient(r) - e))
          + commitment * jnp.mean(jnp.square(r - jax.lax.stop_gradient(e))))
  st = r + jax.lax.stop_gradient(e - r)  # value e, gradient identity to r
  # As in the published code the next residual is r - st, i.e. sg(r - e): deeper levels
  # train their codebooks but send no gradient back to the encoder.
  return codes, st, r - st, loss


def residual_quantize(r: jax.Array, codebooks: jax.Array, commitment: float,
                      last_sinkhorn: Optional[Tuple[float, int]] = None):
  """Residual quantisation through stacked codebooks, as a scan over levels.

  A scan (not a Python loop) keeps the compiled program one level long: on CPU, XLA
  compile time grows with every unrolled op, and it dominates small runs.

  Args:
    r: [batch, dim] input.
    codebooks: [levels, codes, dim].
    last_sinkhorn: (epsilon, iterations) to assign the last level with Sinkhorn.

  Returns:
    codes [batch, levels], quantised sum (straight-through) [batch, dim],
    final residual [batch, dim], per-level losses [levels].
  """
  levels = codebooks.shape[0]
  scanned = levels - (1 if last_sinkhorn is not None else 0)

  def body(r, book):
    codes, st, r_next, loss = _quantize_level(r, book, commitment, None)
    return r_next, (codes, st, loss)

  r, (codes, sts, losses) = jax.lax.scan(body, r, codebooks[:scanned])
  q = jnp.sum(sts, axis=0)  # [batch, dim]
  codes = codes.T  # [batch, scanned]
  if last_sinkhorn is not None:
    c, st, r, loss = _quantize_level(r, codebooks[-1], commitment, last_sinkhorn)
    codes = jnp.concatenate([codes, c[:, None]], axis=1)  # [batch, levels]
    q, losses = q + st, jnp.concatenate([losses, loss[None]])
  return codes, q, r, losses


class RQVAE(nn.Module):
  """Encoders, shared + per-space residual codebooks, decoders (see module docstring).

  Parameters: `{space}_encoder`, `{space}_decoder` (MLPs), `shared_codebook`
  [L_m, K, spaces * latent] (absent when L_m = 0) and `specific_codebook`
  [spaces, L_n, K, latent] (index = position of the space in `spaces`).
  """
  spaces: Tuple[str, ...]
  input_dims: Tuple[int, ...]  # one per space
  hidden_dims: Tuple[int, ...]
  latent_dim: int
  shared_levels: int
  specific_levels: int
  codebook_size: int
  commitment: float = 0.25
  sinkhorn_epsilon: float = 0.003
  sinkhorn_iters: int = 50

  def setup(self):
    init = nn.initializers.uniform(1.0 / self.codebook_size)
    self.encoders = [MLP(tuple(self.hidden_dims) + (self.latent_dim,)) for _ in self.spaces]
    self.decoders = [MLP(tuple(reversed(self.hidden_dims)) + (d,)) for d in self.input_dims]
    k, s = self.codebook_size, len(self.spaces)
    if self.shared_levels:
      self.shared_codebook = self.param(
          "shared_codebook", init, (self.shared_levels, k, s * self.latent_dim))
    self.specific_codebook = self.param(
        "specific_codebook", init, (s, self.specific_levels, k, self.latent_dim))

  def encode(self, inputs: Sequence[jax.Array]) -> jax.Array:
    """[batch, d_in] per space -> r0 [batch, spaces * latent]."""
    return jnp.concatenate([enc(x) for enc, x in zip(self.encoders, inputs)], -1)

  def quantize(self, r0: jax.Array, use_sinkhorn: bool) -> Dict[str, Any]:
    """Shared levels on r0, then every space's levels on its part of the residual."""
    b, s, lat = r0.shape[0], len(self.spaces), self.latent_dim
    if self.shared_levels:
      shared_codes, shared_q, r, shared_losses = residual_quantize(
          r0, self.shared_codebook, self.commitment)
    else:
      shared_codes, shared_q, r, shared_losses = None, jnp.zeros_like(r0), r0, jnp.zeros((0,))
    sk = (self.sinkhorn_epsilon, self.sinkhorn_iters) if use_sinkhorn else None
    per_space = r.reshape(b, s, lat).transpose(1, 0, 2)  # [spaces, batch, latent]
    codes, q, _, losses = jax.vmap(
        lambda x, books: residual_quantize(x, books, self.commitment, sk))(
            per_space, self.specific_codebook)  # codes [spaces, batch, L_n], q [spaces, b, lat]
    decoder_inputs = shared_q.reshape(b, s, lat).transpose(1, 0, 2) + q  # [spaces, b, lat]
    return {"shared_codes": shared_codes,  # [batch, L_m] or None
            "specific_codes": codes,  # [spaces, batch, L_n]
            "decoder_inputs": decoder_inputs,
            "level_losses": jnp.concatenate([shared_losses, losses.reshape(-1)])}  # [levels]

  def __call__(self, inputs: Sequence[jax.Array], use_sinkhorn: bool = True):
    quantized = self.quantize(self.encode(inputs), use_sinkhorn)
    recon = tuple(dec(quantized["decoder_inputs"][i]) for i, dec in enumerate(self.decoders))
    return recon, quantized


def build_model(config: RQVAEConfig, input_dims: Sequence[int]) -> RQVAE:
  layout = config.layout()
  return RQVAE(spaces=layout.spaces, input_dims=tuple(int(d) for d in input_dims),
               hidden_dims=tuple(config.hidden_dims), latent_dim=config.latent_dim,
               shared_levels=layout.shared_levels, specific_levels=layout.specific_levels,
               codebook_size=config.codebook_size, commitment=config.commitment,
               sinkhorn_epsilon=config.sinkhorn_epsilon, sinkhorn_iters=config.sinkhorn_iters)


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
  trained = TrainedRQVAE(params, config, input_dims, [], -1, float("inf"), params)
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
                             collision_rounds=0, kmeans_iters=1)


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
    chunk: rows per call (default min(eval_chunk, n)); the last chunk is zero-padded.

  Returns:
    r0 [n, spaces * latent] float32, shared codes [n, L_m] (None without shared levels),
    and {space: specific codes [n, L_n]}.
  """
  params = trained.params if params is None else params
  model = trained.model
  fn = _encode_codes_fn(_program_key(trained.config), tuple(trained.input_dims))
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
      flat, opt_state, sums = train_step(flat, opt_state, sums, tuple(t[idx] for t in tables))
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
    trained.history.append(record)
  trained.final_params = unravel(flat)
  return trained
