"""The joint RQ-VAE network of GenSAR: two embedding tables in, shared + specific codes out.

One model quantises what an item's text (semantic embedding) and its behaviour
(collaborative embedding) agree on into *shared* codes, and what only one of them knows
into *specific* codes. The semantic ID is shared + semantic codes, the collaborative ID
shared + collaborative codes, so the two IDs of an item start with the same tokens.

  z_s = MLP_s(v_s), z_c = MLP_c(v_c)               # [batch, 32] each (unit length when
                                                   # RQVAEConfig.balance scales latents)
  r0 = concat(z_s, z_c)                            # [batch, 64]
  shared RQ: L_m levels of K codes, 64-d           # r0 -> r_{L_m}
  split r_{L_m} -> (semantic half, collab half)    # [batch, 32] each
  specific RQ: L_n levels of K codes, 32-d per half
  v_s_hat = Dec_s(shared_q[:, :32] + semantic_q), v_c_hat = Dec_c(shared_q[:, 32:] + collab_q)

Only the forward pass lives here (Flax modules and residual quantisation); initialisation,
the loss and training are in `rqvae.py`, the configuration in `rqvae_config.py`.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from gensar_jax.identifiers import kmeans as kmeans_lib
from gensar_jax.identifiers import sinkhorn as sinkhorn_lib
from gensar_jax.identifiers.rqvae_config import RQVAEConfig


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
  normalize_latents: bool = False

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
    latents = [enc(x) for enc, x in zip(self.encoders, inputs)]  # [batch, latent] each
    if self.normalize_latents:
      latents = [z * jax.lax.rsqrt(jnp.sum(jnp.square(z), -1, keepdims=True) + 1e-12)
                 for z in latents]
    return jnp.concatenate(latents, -1)

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
               sinkhorn_epsilon=config.sinkhorn_epsilon, sinkhorn_iters=config.sinkhorn_iters,
               normalize_latents=config.normalizes_latents)
