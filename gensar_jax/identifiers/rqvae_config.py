"""What defines a GenSAR identifier model: the gin-configurable RQVAEConfig, its modes, the
quantiser layout a mode implies, and the checks on the embedding tables it is trained on.

Kept apart from the network and the training so that code which only reads or writes a
configuration (gin files, the ablation grid, identifier tables) needs neither Flax nor optax.
`RQVAEConfig` is registered with gin here, once, under the name gin files bind:
`RQVAEConfig.<field> = ...`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import gin
import numpy as np

SEMANTIC = "semantic"
COLLABORATIVE = "collaborative"
MODES = ("dual", "dual_no_shared", "sid_only", "cid_only")
# How the two spaces are put on an equal footing (see RQVAEConfig.balance).
BALANCES = ("inputs_and_latents", "inputs", "none")
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

  Two defaults depart from the published setup (docs/method.md, "Balanced identifiers"):
  - `balance`. The published model feeds both tables as they come; a sentence encoder's
    unit vectors have a per-dimension variance ~20x below a SASRec table's, so the
    semantic reconstruction error is tiny, the semantic encoder gets almost no gradient,
    and the shared levels quantise behaviour alone (the "semantic" ID becomes a second
    collaborative ID). "inputs" z-scores every dimension of each table over the
    catalogue, so both reconstruction losses start at ~1; "inputs_and_latents" also
    scales each space's latent to unit length, so both halves of the shared residual
    weigh the same in every distance; "none" is the published behaviour.
  - `reset_every`: dead codes restarted (codebook_reset.py); 0 is the published
    behaviour, under which most codes of the first shared level end unused.
  """
  mode: str = "dual"
  balance: str = "inputs_and_latents"
  reset_every: int = 5  # epochs between dead-code restarts; 0 = never
  reset_until: float = 0.8  # restarts only in this first share of the epochs
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
    if self.balance not in BALANCES:
      raise ValueError(f"RQVAEConfig.balance must be one of {BALANCES}, got {self.balance!r}")
    for name in ("latent_dim", "codebook_size", "epochs", "batch_size", "sinkhorn_iters",
                 "eval_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"RQVAEConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.reset_every < 0 or not 0.0 <= self.reset_until <= 1.0:
      raise ValueError(f"RQVAEConfig.reset_every must be >= 0 (got {self.reset_every}) and "
                       f"reset_until in [0, 1] (got {self.reset_until})")
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

  @property
  def standardizes_inputs(self) -> bool:
    return self.balance in ("inputs", "inputs_and_latents")

  @property
  def normalizes_latents(self) -> bool:
    return self.balance == "inputs_and_latents"

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
