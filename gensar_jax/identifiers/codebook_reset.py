"""Dead-code restarts: codebook entries no item uses move to where items are badly served.

Why: a code is trained only by the rows assigned to it. The encoders drift during training,
so codes that k-means placed on the first batch's latents soon lie where no item is, never
win an argmin again and never move: on MovieLens-100K the first shared level ended with
~40-60 of its 256 codes in use, so thousands of items shared a handful of prefixes and the
prefix carried little. Every `RQVAEConfig.reset_every` epochs (during the first
`reset_until` share of training) each unused code of every level is moved onto the residual
of an item drawn with probability proportional to that item's squared residual at the
level, as k-means++ seeds centroids: a new code lands where quantisation error is largest,
and the next epochs train it like any other. Codes that are used are never touched, so a
restart cannot undo what training learned, and late in training the codebooks are left to
settle.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np


def _reseed_level(codebook: np.ndarray, residual: np.ndarray, codes: np.ndarray,
                  rng: np.random.Generator) -> Tuple[np.ndarray, int]:
  """Moves the unused rows of one level's codebook onto residuals of badly served items.

  Args:
    codebook: [K, dim] the level's codes.
    residual: [items, dim] what enters the level.
    codes: [items] each item's argmin code at the level.

  Returns:
    (the new codebook [K, dim], number of codes moved).
  """
  k = codebook.shape[0]
  dead = np.flatnonzero(np.bincount(codes, minlength=k) == 0)  # [dead]
  if dead.size == 0:
    return codebook, 0
  error = np.sum(np.square(residual - codebook[codes]), axis=1)  # [items]
  if not np.isfinite(error).all() or error.sum() <= 0:
    return codebook, 0
  take = min(dead.size, residual.shape[0])
  picks = rng.choice(residual.shape[0], size=take, replace=False, p=error / error.sum())
  books = codebook.copy()
  books[dead[:take]] = residual[picks]
  return books, int(take)


def reseed_dead_codes(params: Dict, r0: np.ndarray, shared_codes, specific_codes,
                      rng: np.random.Generator) -> Tuple[Dict, Dict[str, int]]:
  """Every level's unused codes moved (see module docstring); returns (params, moved).

  Args:
    params: {"params": {...}} of an RQVAE (`shared_codebook` [L_m, K, spaces * latent] if
      it has shared levels, `specific_codebook` [spaces, L_n, K, latent]).
    r0: [items, spaces * latent] encoder outputs of the whole catalogue.
    shared_codes: [items, L_m] argmin codes, or None without shared levels.
    specific_codes: [spaces, items, L_n] argmin codes, spaces in the model's order.

  Returns:
    new params (other leaves shared with the input) and {level name: codes moved}.
  """
  tree = dict(params["params"])
  moved = {}
  r = np.asarray(r0, np.float32)  # [items, spaces * latent]
  if shared_codes is not None:
    books = np.array(tree["shared_codebook"], np.float32)  # [L_m, K, spaces * latent]
    for level in range(books.shape[0]):
      codes = shared_codes[:, level]
      books[level], moved[f"shared{level}"] = _reseed_level(books[level], r, codes, rng)
      r = r - books[level][codes]
    tree["shared_codebook"] = books
  specific = np.array(tree["specific_codebook"], np.float32)  # [spaces, L_n, K, latent]
  spaces, levels, _, latent = specific.shape
  for s in range(spaces):
    part = r[:, s * latent:(s + 1) * latent]  # [items, latent]
    for level in range(levels):
      codes = specific_codes[s][:, level]
      specific[s, level], moved[f"space{s}_{level}"] = _reseed_level(
          specific[s, level], part, codes, rng)
      part = part - specific[s, level][codes]
  tree["specific_codebook"] = specific
  return {"params": tree}, moved
