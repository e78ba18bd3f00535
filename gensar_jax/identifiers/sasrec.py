"""SASRec (Kang & McAuley, 2018): the collaborative item encoder and the SASRec baseline.

GenSAR's RQ-VAE needs a collaborative embedding `v_c` per item: a vector that encodes how
the item is *used* (which items precede and follow it in user histories), independent of
its text. The paper takes the item table of a trained sequential recommender; we train
SASRec for that, because its output layer is the item embedding table itself (tied
weights), so the table is directly optimised so that `h_user . e_item` ranks the next item.
The same trained model is the SASRec row of the evaluation table, scored on exactly the
candidates (target first, 99 negatives) that the generative model sees.

Conventions:
  * Callers use 0-based item indices into the catalogue, `0 .. num_items - 1`. Internally
    every index is shifted by +1 so that 0 can be the padding token; `item_embeddings`
    removes the padding row again, so row i belongs to item index i.
  * Sequences are left-padded (right-aligned): the most recent item always sits at
    position `max_len - 1`, which is where the user representation is read.
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
from tqdm.auto import tqdm

from gensar_jax import metrics as metrics_lib

PAD = 0  # Internal padding token; real items are shifted to 1 .. num_items.
LOSSES = ("auto", "full_softmax", "sampled_softmax")
# "auto" uses the full softmax up to this many items, the sampled one above: the full
# softmax costs batch * max_len * items per step, so over a whole epoch it grows as
# users x items -- about 38 hours for 30 epochs at Amazon-Electronics size on 2 cores.
FULL_SOFTMAX_MAX_ITEMS = 20_000

Params = Any
Validation = Tuple[Sequence[Sequence[int]], np.ndarray]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SASRecConfig:
  """Hyper-parameters of SASRec and its training loop.

  Attributes:
    max_len: longest history the model reads; older items are dropped.
    embed_dim: width of item/position embeddings and of the transformer; also the
      dimension of the collaborative embedding handed to the RQ-VAE.
    num_blocks: number of causal self-attention blocks.
    num_heads: attention heads per block (must divide embed_dim).
    dropout: dropout on embeddings, attention weights and block outputs.
    lr: AdamW learning rate.
    weight_decay: AdamW decoupled weight decay.
    batch_size: training windows per step.
    epochs: maximum number of passes over the training windows.
    loss: "full_softmax" (cross-entropy over the whole catalogue; best quality, time and
      memory grow as batch_size * max_len * num_items per step), "sampled_softmax" (target
      against `num_negatives` uniformly sampled items shared by the batch; per-step cost
      independent of the catalogue) or "auto" (full up to FULL_SOFTMAX_MAX_ITEMS items,
      sampled above: an epoch's cost then grows linearly with the log).
    num_negatives: negatives per step for "sampled_softmax".
    all_windows: if True, a history longer than max_len + 1 is cut into several
      right-aligned windows so every interaction is a training target; if False, only the
      most recent window is used (the original SASRec recipe).
    seed: seeds parameter init, dropout, negative sampling and the shuffling order.
    patience: early stopping: stop after this many epochs without a better validation
      NDCG@10 (only when validation data is given); the best epoch's parameters are kept.
    max_validation_rows: the per-epoch validation that drives early stopping scores at
      most this many held-out rows, a seeded sample fixed for the whole run. Why: at
      Amazon-Electronics size every user has a validation row (192,000), and scoring them
      all each epoch costs about a third of the training epoch, for an NDCG@10 whose
      standard error is already ~0.003 at 10,000 rows. Smaller logs are scored whole.
    eval_batch_size: rows per jitted scoring call.
    progress: show a tqdm bar with the running loss.
  """
  max_len: int = 50
  embed_dim: int = 64
  num_blocks: int = 2
  num_heads: int = 1
  dropout: float = 0.2
  lr: float = 1e-3
  weight_decay: float = 0.0
  batch_size: int = 128
  epochs: int = 200
  loss: str = "auto"
  num_negatives: int = 256
  all_windows: bool = True
  seed: int = 0
  patience: int = 10
  max_validation_rows: int = 10_000
  eval_batch_size: int = 256
  progress: bool = True

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f"loss must be one of {LOSSES}; got {self.loss!r}")
    for name in ("max_len", "embed_dim", "num_blocks", "num_heads", "batch_size", "epochs",
                 "num_negatives", "patience", "max_validation_rows", "eval_batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
    if self.embed_dim % self.num_heads:
      raise ValueError(
          f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1); got {self.dropout}")


class SASRec(nn.Module):
  """Causal transformer over item sequences with a tied item-embedding output layer.

  Pre-LN blocks (LN -> attention -> residual, LN -> FFN -> residual) train more stably
  than the post-LN original and need no warm-up; the rest follows Kang & McAuley: learned
  absolute positions, embeddings scaled by sqrt(d), padding positions zeroed after every
  block, scores = dot product with the (shared) item embedding table.
  """
  num_items: int  # Catalogue size without the padding row.
  max_len: int
  embed_dim: int
  num_blocks: int
  num_heads: int
  dropout_rate: float

  def setup(self):
    # Std 1/sqrt(d): after the sqrt(d) input scaling entries are O(1), and initial output
    # logits h . e are O(1) too, so the softmax starts close to uniform.
    init = nn.initializers.normal(stddev=1.0 / math.sqrt(self.embed_dim))
    self.item_embed = nn.Embed(self.num_items + 1, self.embed_dim, embedding_init=init)
    self.pos_embed = nn.Embed(self.max_len, self.embed_dim, embedding_init=init)
    self.attn_norms = [nn.LayerNorm(epsilon=1e-8) for _ in range(self.num_blocks)]
    self.attns = [
        nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, qkv_features=self.embed_dim,
            out_features=self.embed_dim, dropout_rate=self.dropout_rate)
        for _ in range(self.num_blocks)
    ]
    self.ffn_norms = [nn.LayerNorm(epsilon=1e-8) for _ in range(self.num_blocks)]
    self.ffn_in = [nn.Dense(self.embed_dim) for _ in range(self.num_blocks)]
    self.ffn_out = [nn.Dense(self.embed_dim) for _ in range(self.num_blocks)]
    self.final_norm = nn.LayerNorm(epsilon=1e-8)
    self.drop = nn.Dropout(self.dropout_rate)

  def __call__(self, seqs: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
    """Hidden state at every position; position t only sees items 0..t.

    Args:
      seqs: [batch, length] shifted item ids (0 = padding), length <= max_len.
      deterministic: disables dropout (evaluation).

    Returns:
      [batch, length, embed] the representation used to predict the item after t.
    """
    length = seqs.shape[1]
    valid = (seqs != PAD)  # [batch, length]
    keep = valid[..., None].astype(jnp.float32)  # [batch, length, 1]
    x = self.item_embed(seqs) * math.sqrt(self.embed_dim)  # [batch, length, embed]
    # Positions are counted so that the last column is always max_len - 1: the newest item
    # of a right-aligned sequence gets the same position whatever the input length.
    positions = jnp.arange(self.max_len - length, self.max_len)  # [length]
    x = x + self.pos_embed(positions)[None]  # [batch, length, embed]
    x = self.drop(x, deterministic=deterministic) * keep
    # Query t may attend to key s iff s <= t and s is a real item.
    mask = nn.combine_masks(
        nn.make_causal_mask(seqs),
        nn.make_attention_mask(jnp.ones_like(valid), valid))  # [batch, 1, length, length]
    for i in range(self.num_blocks):
      h = self.attn_norms[i](x)  # [batch, length, embed]
      h = self.attns[i](h, h, mask=mask, deterministic=deterministic)
      x = x + self.drop(h, deterministic=deterministic)
      h = self.ffn_norms[i](x)
      h = nn.relu(self.ffn_in[i](h))
      h = self.drop(h, deterministic=deterministic)
      h = self.ffn_out[i](h)
      x = x + self.drop(h, deterministic=deterministic)
      x = x * keep  # Padding stays exactly zero, so it cannot leak through residuals.
    return self.final_norm(x)  # [batch, length, embed]

  def item_table(self) -> jnp.ndarray:
    """[num_items, embed] output embeddings of the real items (padding row dropped)."""
    return self.item_embed.embedding[1:]

  def embed_items(self, shifted_ids: jnp.ndarray) -> jnp.ndarray:
    """[..., embed] output embeddings of shifted item ids (used for candidate scoring)."""
    return self.item_embed(shifted_ids)


@dataclasses.dataclass
class SASRecResult:
  """A trained SASRec.

  Attributes:
    params: Flax parameters of `SASRec` (those of the best validation epoch if
      validation was given, else of the last epoch).
    config: the config it was trained with.
    num_items: catalogue size.
    item_embeddings: [num_items, embed_dim] float32, row i = item index i: the
      collaborative embedding v_c for the RQ-VAE.
    history: one dict per epoch: epoch, loss, seconds, and validation metrics if given.
    best_epoch: 1-based epoch whose parameters were kept.
  """
  params: Params
  config: SASRecConfig
  num_items: int
  item_embeddings: np.ndarray
  history: List[Dict[str, float]]
  best_epoch: int

  @property
  def model(self) -> SASRec:
    return _make_model(self.num_items, self.config)


def _make_model(num_items: int, config: SASRecConfig) -> SASRec:
  return SASRec(num_items=num_items, max_len=config.max_len, embed_dim=config.embed_dim,
                num_blocks=config.num_blocks, num_heads=config.num_heads,
                dropout_rate=config.dropout)


def _check_sequence(seq, num_items: int, what: str, index: int) -> np.ndarray:
  """Return seq as int64, or raise naming which sequence is wrong and why."""
  arr = np.asarray(seq)
  if arr.size == 0:
    return np.zeros((0,), np.int64)
  if arr.ndim != 1:
    raise ValueError(f"{what}[{index}] must be a 1-D sequence of item indices; "
                     f"got shape {arr.shape}")
  if arr.dtype.kind not in "iu":
    if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
      arr = arr.astype(np.int64)
    else:
      raise ValueError(f"{what}[{index}] must hold integer item indices; got dtype {arr.dtype}")
  arr = arr.astype(np.int64)
  bad = (arr < 0) | (arr >= num_items)
  if bad.any():
    raise ValueError(
        f"{what}[{index}] contains item index {int(arr[bad.argmax()])}, outside the "
        f"catalogue [0, {num_items}) (indices are 0-based)")
  return arr


def _training_windows(sequences: Sequence[np.ndarray], max_len: int,
                      all_windows: bool) -> Tuple[np.ndarray, np.ndarray]:
  """Right-aligned (input, target) windows for next-item prediction at every position.

  A sequence s yields inputs s[:-1] and targets s[1:]; both are cut from the right into
  chunks of max_len (only the last chunk unless all_windows) and left-padded with 0.
  Ids are shifted by +1.

  Returns:
    inputs: [windows, max_len] int32, targets: [windows, max_len] int32 (0 = no loss).
  """
  inputs, targets = [], []
  for seq in sequences:
    if len(seq) < 2:
      continue  # A single interaction has nothing to predict.
    shifted = seq + 1
    end = len(seq) - 1  # Inputs are shifted[:end], targets shifted[1:end + 1].
    while end > 0:
      start = max(0, end - max_len)
      inp = np.zeros(max_len, np.int32)
      tgt = np.zeros(max_len, np.int32)
      inp[max_len - (end - start):] = shifted[start:end]
      tgt[max_len - (end - start):] = shifted[start + 1:end + 1]
      inputs.append(inp)
      targets.append(tgt)
      if not all_windows:
        break
      end = start
  if not inputs:
    return np.zeros((0, max_len), np.int32), np.zeros((0, max_len), np.int32)
  return np.stack(inputs), np.stack(targets)


def resolved_loss(config: SASRecConfig, num_items: int) -> str:
  """The loss `config.loss` means for a catalogue of `num_items` ("auto" resolved)."""
  if config.loss != "auto":
    return config.loss
  return "full_softmax" if num_items <= FULL_SOFTMAX_MAX_ITEMS else "sampled_softmax"


def length_widths(max_len: int) -> np.ndarray:
  """The few input widths batches are cut to: powers of two from 8, and max_len."""
  widths = [w for w in (8, 16, 32, 64, 128, 256, 512) if w < max_len]
  return np.array(widths + [max_len], np.int64)


def width_of(lengths: np.ndarray, max_len: int) -> np.ndarray:
  """[n] the narrowest width of `length_widths` that holds each length.

  Why: windows and histories are right-aligned and left-padded to max_len (50), but a
  5-core log's users have ~8 interactions, so ~85% of a full-width batch is padding. The
  model counts positions from the right and masks padding, so cutting a batch's leading
  padding columns gives the same outputs at a fraction of the cost.
  """
  widths = length_widths(max_len)
  return widths[np.searchsorted(widths, np.asarray(lengths), side="left").clip(
      0, len(widths) - 1)]


def _pad_histories(histories: Sequence[np.ndarray], max_len: int) -> np.ndarray:
  """[n, max_len] int32: the last max_len items of each history, shifted, left-padded."""
  out = np.zeros((len(histories), max_len), np.int32)
  for row, hist in enumerate(histories):
    tail = hist[-max_len:] + 1 if len(hist) else hist
    if len(tail):
      out[row, max_len - len(tail):] = tail
  return out


def _loss_fn(params, model: SASRec, config: SASRecConfig, inputs, targets, rng):
  """Mean next-item cross-entropy over the non-padding positions of the batch."""
  dropout_rng, neg_rng = jax.random.split(rng)
  hidden = model.apply({"params": params}, inputs, deterministic=False,
                       rngs={"dropout": dropout_rng})  # [batch, length, embed]
  valid = (targets != PAD).astype(jnp.float32)  # [batch, length]
  labels = jnp.maximum(targets - 1, 0)  # [batch, length] 0-based items
  table = model.apply({"params": params}, method=SASRec.item_table)  # [items, embed]
  if resolved_loss(config, model.num_items) == "full_softmax":
    logits = jnp.einsum("ble,ne->bln", hidden, table)  # [batch, length, items]
    token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  else:
    # Uniform negatives shared by the batch: the proposal is uniform, so no log-Q
    # correction is needed; accidental hits of the target are masked out.
    negatives = jax.random.randint(neg_rng, (config.num_negatives,), 0, model.num_items)
    pos_logit = jnp.einsum("ble,ble->bl", hidden, table[labels])  # [batch, length]
    neg_logits = jnp.einsum("ble,ke->blk", hidden, table[negatives])  # [batch, length, k]
    hit = labels[..., None] == negatives[None, None, :]  # [batch, length, k]
    neg_logits = jnp.where(hit, -1e9, neg_logits)
    logits = jnp.concatenate([pos_logit[..., None], neg_logits], axis=-1)  # [b, l, 1 + k]
    token_loss = -jax.nn.log_softmax(logits, axis=-1)[..., 0]  # [batch, length]
  return jnp.sum(token_loss * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def _init_fn(model: SASRec):
  """Jitted init; dropout does not change parameter shapes, so it is not part of the key."""
  return _cached_init_fn(model.clone(dropout_rate=0.0))


@functools.lru_cache(maxsize=None)
def _cached_init_fn(model: SASRec):
  return jax.jit(functools.partial(model.init, deterministic=True))


@functools.lru_cache(maxsize=None)
def _score_fn(model: SASRec):
  """Jitted scorer for one model shape; cached so repeated evaluations reuse the compile."""

  @jax.jit
  def score(params, seqs, candidates):
    # seqs: [batch, width <= max_len] shifted; candidates: [batch, c] shifted.
    hidden = model.apply({"params": params}, seqs, deterministic=True)[:, -1]  # [b, e]
    cand = model.apply({"params": params}, candidates,
                       method=SASRec.embed_items)  # [batch, c, embed]
    return jnp.einsum("be,bce->bc", hidden, cand)  # [batch, c]

  return score


def _score(params, model: SASRec, config: SASRecConfig, histories, candidates) -> np.ndarray:
  """Scores with fixed-size batches (the last one padded) so jit compiles once."""
  score = _score_fn(model.clone(dropout_rate=0.0))  # Scoring never uses dropout.
  seqs = _pad_histories(histories, config.max_len)  # [n, max_len]
  cands = (candidates + 1).astype(np.int32)  # [n, c]
  bs = config.eval_batch_size
  out = np.zeros(cands.shape, np.float32)
  # Rows grouped by the width their history needs (at least 1 column: empty histories).
  widths = width_of(np.maximum((seqs != PAD).sum(axis=1), 1), config.max_len)  # [n]
  for width in np.unique(widths):
    rows = np.flatnonzero(widths == width)
    for start in range(0, len(rows), bs):
      chosen = rows[start:start + bs]
      seq_b = np.zeros((bs, width), np.int32)
      cand_b = np.ones((bs, cands.shape[1]), np.int32)
      seq_b[:len(chosen)] = seqs[chosen, config.max_len - width:]
      cand_b[:len(chosen)] = cands[chosen]
      out[chosen] = np.asarray(score(params, seq_b, cand_b))[:len(chosen)]
  return out


def _check_eval_inputs(histories, candidates, num_items: int):
  candidates = np.asarray(candidates)
  if candidates.ndim != 2 or candidates.shape[1] < 1:
    raise ValueError(f"candidates must be an int array [n, num_candidates] with the target "
                     f"in column 0; got shape {candidates.shape}")
  if candidates.shape[0] != len(histories):
    raise ValueError(f"candidates has {candidates.shape[0]} rows but there are "
                     f"{len(histories)} histories")
  if candidates.dtype.kind not in "iu":
    raise ValueError(f"candidates must hold integer item indices; got dtype {candidates.dtype}")
  bad = (candidates < 0) | (candidates >= num_items)
  if bad.any():
    row = int(np.argwhere(bad)[0, 0])
    raise ValueError(f"candidates[{row}] contains item index "
                     f"{int(candidates[bad][0])}, outside the catalogue [0, {num_items})")
  hists = [_check_sequence(h, num_items, "histories", i) for i, h in enumerate(histories)]
  return hists, candidates.astype(np.int64)


def score_candidates(result: SASRecResult, histories: Sequence[Sequence[int]],
                     candidates: np.ndarray) -> np.ndarray:
  """Dot-product scores of each candidate given the user's history.

  Args:
    result: a trained model from `train_sasrec`.
    histories: n sequences of 0-based item indices, oldest first; only the last
      max_len are read. An empty history is allowed (the score then depends on the
      items alone, a learned popularity prior).
    candidates: [n, c] 0-based item indices (prepared data: c = 100, target first).

  Returns:
    [n, c] float32 scores, higher = more likely next item.
  """
  hists, cands = _check_eval_inputs(histories, candidates, result.num_items)
  return _score(result.params, result.model, result.config, hists, cands)


def evaluate_sasrec(result: SASRecResult, histories: Sequence[Sequence[int]],
                    candidates: np.ndarray) -> Dict[str, float]:
  """HR@{1,5,10} and NDCG@{5,10} with the target in candidate column 0."""
  scores = score_candidates(result, histories, candidates)  # [n, c]
  return metrics_lib.ranking_metrics(metrics_lib.ranks_from_scores(scores, target_column=0))


def validation_sample(num_rows: int, max_rows: int, seed: int) -> np.ndarray:
  """[min(num_rows, max_rows)] sorted row indices early stopping scores (all if it fits)."""
  if num_rows <= max_rows:
    return np.arange(num_rows)
  return np.sort(np.random.default_rng(seed).choice(num_rows, max_rows, replace=False))


def _optimizer(config: SASRecConfig) -> optax.GradientTransformation:
  # b2 = 0.98 as in the SASRec reference code: item embeddings see sparse, bursty gradients.
  return optax.adamw(config.lr, b1=0.9, b2=0.98, weight_decay=config.weight_decay)


@functools.lru_cache(maxsize=None)
def _train_step_fn(model: SASRec, config: SASRecConfig):
  """Jitted AdamW step, cached per (model, config) so retraining skips recompilation."""
  optimizer = _optimizer(config)

  @jax.jit
  def train_step(params, opt_state, inputs, targets, step_key, step):
    # inputs, targets: [batch, width <= max_len] shifted ids; targets 0 = no loss there.
    rng = jax.random.fold_in(step_key, step)
    loss, grads = jax.value_and_grad(_loss_fn)(params, model, config, inputs, targets, rng)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


def train_sasrec(train_sequences: Sequence[Sequence[int]], num_items: int,
                 config: Optional[SASRecConfig] = None,
                 validation: Optional[Validation] = None) -> SASRecResult:
  """Train SASRec for next-item prediction at every position.

  Deterministic for a given config.seed: the shuffling order comes from a numpy
  Generator and every random draw inside the step from jax keys folded with the step.

  Args:
    train_sequences: per-user item sequences, 0-based indices into the catalogue,
      oldest first. Sequences shorter than 2 contribute nothing but are allowed.
    num_items: catalogue size; every index must be in [0, num_items).
    config: hyper-parameters; defaults to the gin-configured `SASRecConfig()`.
    validation: optional (histories, candidates [n, c], target in column 0). Enables
      per-epoch metrics, early stopping on NDCG@10, and keeps the best epoch's params;
      at most `config.max_validation_rows` of its rows are scored each epoch.

  Returns:
    SASRecResult with params, item_embeddings [num_items, embed_dim] and history.
  """
  config = config if config is not None else SASRecConfig()
  if num_items < 1:
    raise ValueError(f"num_items must be >= 1; got {num_items}")
  if len(train_sequences) == 0:
    raise ValueError("train_sequences is empty: nothing to train SASRec on")
  seqs = [_check_sequence(s, num_items, "train_sequences", i)
          for i, s in enumerate(train_sequences)]
  inputs, targets = _training_windows(seqs, config.max_len, config.all_windows)
  if len(inputs) == 0:
    raise ValueError("no train sequence has at least 2 items: no next-item pairs to learn")
  val = None
  if validation is not None:
    val = _check_eval_inputs(validation[0], validation[1], num_items)
    keep = validation_sample(len(val[0]), config.max_validation_rows, config.seed)
    val = ([val[0][i] for i in keep], val[1][keep])

  model = _make_model(num_items, config)
  key = jax.random.PRNGKey(config.seed)
  init_key, step_key = jax.random.split(key)
  # Jitted init: eager Flax init dispatches op by op and is several times slower on CPU.
  params = _init_fn(model)(init_key, jnp.asarray(inputs[:1]))["params"]
  optimizer = _optimizer(config)
  opt_state = optimizer.init(params)
  # Fields that do not change the step function are normalised so that retraining with
  # another seed or epoch budget reuses the compiled step.
  train_step = _train_step_fn(model, dataclasses.replace(
      config, epochs=1, seed=0, patience=1, eval_batch_size=1, progress=False,
      max_validation_rows=1,
      all_windows=True, batch_size=1))

  shuffle_rng = np.random.default_rng(config.seed)
  num_windows, bs = len(inputs), config.batch_size
  # Each window is trained at the narrowest width that holds it (see `width_of`).
  widths = width_of((inputs != PAD).sum(axis=1), config.max_len)  # [windows]
  steps_per_epoch = sum(-(-int((widths == w).sum()) // bs) for w in np.unique(widths))
  history: List[Dict[str, float]] = []
  best_params, best_ndcg, best_epoch, stale = params, -1.0, config.epochs, 0
  step = 0
  bar = tqdm(total=config.epochs * steps_per_epoch, desc="SASRec", unit="step",
             disable=not config.progress)
  for epoch in range(1, config.epochs + 1):
    start_time = time.time()
    order = shuffle_rng.permutation(num_windows)
    # Batches of one width each, from the shuffled order; then the batches shuffled.
    batches = []
    for w in np.unique(widths):
      same = order[widths[order] == w]
      batches += [(int(w), same[b:b + bs]) for b in range(0, len(same), bs)]
    losses = []
    for b in shuffle_rng.permutation(len(batches)):
      width, idx = batches[b]
      # The last batch of a width is padded with all-padding rows (no loss), so each
      # width compiles once.
      batch_in = np.zeros((bs, width), np.int32)
      batch_tgt = np.zeros((bs, width), np.int32)
      batch_in[:len(idx)] = inputs[idx, config.max_len - width:]
      batch_tgt[:len(idx)] = targets[idx, config.max_len - width:]
      params, opt_state, loss = train_step(params, opt_state, batch_in, batch_tgt, step_key,
                                           step)
      losses.append(loss)
      step += 1
      bar.update(1)
    epoch_loss = float(np.mean(jax.device_get(losses)))
    record = {"epoch": epoch, "loss": epoch_loss}
    if val is not None:
      record.update(metrics_lib.ranking_metrics(metrics_lib.ranks_from_scores(
          _score(params, model, config, val[0], val[1]), target_column=0)))
    record["seconds"] = time.time() - start_time
    history.append(record)
    postfix = {"epoch": epoch, "loss": f"{epoch_loss:.4f}"}
    if val is not None:
      postfix["val_ndcg10"] = f"{record['NDCG@10']:.4f}"
    bar.set_postfix(postfix)
    if val is not None:
      if record["NDCG@10"] > best_ndcg:
        best_ndcg, best_epoch, stale = record["NDCG@10"], epoch, 0
        best_params = jax.device_get(params)
      else:
        stale += 1
        if stale >= config.patience:
          break
  bar.close()
  if val is None:
    best_params, best_epoch = jax.device_get(params), len(history)
  table = model.apply({"params": best_params}, method=SASRec.item_table)
  return SASRecResult(params=best_params, config=config, num_items=num_items,
                      item_embeddings=np.asarray(table, dtype=np.float32),
                      history=history, best_epoch=best_epoch)
