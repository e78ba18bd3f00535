"""How far each parameter group has moved from where training started.

Why: a parameter that hardly moves is one the model cannot use. Under AdamW the token
embedding initialised N(0, 1) is such a parameter (gensar_jax/optimizers.py,
T5Config.embedding_init_stddev): in the ML-100K demo the identifier tokens' input rows
moved a median 5% of their norm, their output columns 67%. This module measures it, per
group, as ||theta_t - theta_0|| / ||theta_0|| (Frobenius norms over the whole group):

  embedding/<kind>             rows of the token embedding, by token kind
  embedding/identifier_row_median   median over identifier tokens of each row's own ratio
  output/<kind>, output/identifier_row_median   the same for the untied output layer's
                               columns (absent in a tied model)
  <stack>/<module>             every other parameter, grouped by stack and module family
                               with the layer index dropped: encoder/attention,
                               encoder/mlp, encoder/norm, encoder/relpos_bias,
                               decoder/self_attention, decoder/encoder_decoder_attention,
                               decoder/mlp, decoder/norm, decoder/relpos_bias

Token kinds: `identifier` (user-defined pieces `<level_code>` such as `<m0_12>`, `<s1_7>`,
`<c0_255>`), `behaviour` (the other user-defined pieces, `<rec_item>` ...), `word_piece`
(every other piece of the SentencePiece model: text, bytes, pad/eos/unk). Rows past the
vocabulary's size (the model's padding to a multiple of 128) are in no group.

Cost: the reference is a device copy of the parameters with their shardings (one more
float32 copy; AdamW already keeps two), and a measurement is one jitted pass of squared
differences reduced to scalars on the devices; only those scalars reach the host, so it
works on a mesh whose arrays no process can address whole.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from gensar_jax import io_utils
from gensar_jax import train_logging
from gensar_jax import vocabulary as vocab_lib
from gensar_jax.optimizers import EMBEDDING_PATH, is_embedding_path  # noqa: F401  (re-exported)

PREFIX = "movement/"
REFERENCE_STEP = PREFIX + "reference_step"
JSON_NAME = "param_movement.json"
OUTPUT_PATH = ("decoder", "logits_dense", "kernel")
ROW_MEDIAN_KIND = "identifier"
# An identifier token: `<{level}_{code}>` (gensar_jax/identifiers, vocabulary.py).
_IDENTIFIER_TOKEN = re.compile(r"^<[^<>\s]+_\d+>$")
_LAYER = re.compile(r"^layers_\d+$")

TokenGroups = Mapping[str, np.ndarray]  # token kind -> ids [n] int32


def token_groups(vocabulary: Any) -> Dict[str, np.ndarray]:
  """{kind: token ids} of a SeqIO vocabulary; empty kinds are left out.

  A vocabulary without a SentencePiece model (e.g. a PassThroughVocabulary) has only
  word pieces: every id below its size.
  """
  size = int(vocabulary.vocab_size)
  special = (vocab_lib.special_token_ids(vocabulary)
             if getattr(vocabulary, "sp_model", None) is not None else {})
  identifier = [i for t, i in special.items()
                if _IDENTIFIER_TOKEN.match(t) and t not in vocab_lib.BEHAVIOUR_TOKENS]
  behaviour = sorted(set(special.values()) - set(identifier))
  word_piece = np.setdiff1d(np.arange(size), list(special.values()))
  groups = {"identifier": np.asarray(sorted(identifier), np.int32),
            "behaviour": np.asarray(behaviour, np.int32),
            "word_piece": word_piece.astype(np.int32)}
  return {kind: ids for kind, ids in groups.items() if ids.size}


def module_group(path: Sequence[str]) -> str:
  """A parameter path -> its family: the stack and the module below it, layer index
  dropped, every norm one family ('encoder/layers_3/mlp/wo/kernel' -> 'encoder/mlp')."""
  names = [n for n in path if not _LAYER.match(n)]
  if len(names) < 3:  # a parameter directly under a stack or at the top
    return "/".join(names[:1])
  module = "norm" if names[1].endswith("norm") else names[1]
  return f"{names[0]}/{module}"


def _ratio(diff_sq: jax.Array, ref_sq: jax.Array) -> jax.Array:
  """||d|| / ||ref|| from squared norms; NaN where the reference is zero."""
  return jnp.where(ref_sq > 0, jnp.sqrt(diff_sq / jnp.where(ref_sq > 0, ref_sq, 1.0)),
                   jnp.nan)


def _token_table_movement(name: str, table: jax.Array, reference: jax.Array, token_axis: int,
                          groups: TokenGroups) -> Dict[str, jax.Array]:
  """Per token kind movement of a [vocab, embed] (token_axis 0) or [embed, vocab]
  (token_axis 1) table, and the median row ratio of the identifier tokens."""
  other = 1 - token_axis
  diff_sq = jnp.sum(jnp.square(table - reference), axis=other)  # [vocab]
  ref_sq = jnp.sum(jnp.square(reference), axis=other)           # [vocab]
  out = {}
  for kind, ids in groups.items():
    out[f"{name}/{kind}"] = _ratio(jnp.sum(diff_sq[ids]), jnp.sum(ref_sq[ids]))
  if ROW_MEDIAN_KIND in groups:
    ids = groups[ROW_MEDIAN_KIND]
    out[f"{name}/{ROW_MEDIAN_KIND}_row_median"] = jnp.median(_ratio(diff_sq[ids], ref_sq[ids]))
  return out


def movement(params: Any, reference: Any, groups: TokenGroups) -> Dict[str, jax.Array]:
  """{group: ||params - reference|| / ||reference||} as float32 scalars (jit-able).

  `params` and `reference` are parameter trees of one structure; `groups` the token kinds'
  ids (token_groups). Names are those of the module docstring, without the prefix.
  """
  flat = flax.traverse_util.flatten_dict(params)
  flat_ref = flax.traverse_util.flatten_dict(reference)
  out: Dict[str, jax.Array] = {}
  sums: Dict[str, Tuple[jax.Array, jax.Array]] = {}
  for path, value in flat.items():
    value = jnp.asarray(value, jnp.float32)
    ref = jnp.asarray(flat_ref[path], jnp.float32)
    if is_embedding_path(path):
      out.update(_token_table_movement("embedding", value, ref, 0, groups))
    elif tuple(path[-len(OUTPUT_PATH):]) == OUTPUT_PATH:
      out.update(_token_table_movement("output", value, ref, 1, groups))
    else:
      group = module_group([str(p) for p in path])
      diff_sq, ref_sq = sums.get(group, (0.0, 0.0))
      sums[group] = (diff_sq + jnp.sum(jnp.square(value - ref)), ref_sq + jnp.sum(jnp.square(ref)))
  out.update({group: _ratio(d, r) for group, (d, r) in sums.items()})
  return out


class MovementTracker:
  """Holds the reference parameters and measures the current ones against them.

  Args:
    params: the parameters training starts from (copied: the train step donates the
      state, so the reference must not share its buffers).
    groups: token kinds' ids (`token_groups` of the model's vocabulary).
    reference_step: the step `params` belong to: 0 for a fresh run, the restored step
      for a resumed one (its step-0 parameters are gone; movement is then relative to
      the restored step, and every report says so).
    replicated: the mesh's replicated sharding (Partitioner.replicated), where the
      scalars are put so every process can read them; None lets jit choose.
  """

  def __init__(self, params: Any, groups: TokenGroups, reference_step: int,
               replicated: Optional[jax.sharding.Sharding] = None):
    shardings = jax.tree.map(lambda x: x.sharding, params)
    # jnp.copy, not the identity: jit would hand back the input buffers themselves.
    copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)
    self.reference = copy(params)
    self.reference_step = int(reference_step)
    self._measure = jax.jit(functools.partial(movement, groups=dict(groups)),
                            out_shardings=replicated)

  @property
  def relative_to(self) -> str:
    return ("initialisation" if self.reference_step == 0
            else f"the restored step {self.reference_step}")

  def measure(self, params: Any) -> Dict[str, float]:
    """{movement/<group>: ratio} plus movement/reference_step, as host floats."""
    values = jax.device_get(self._measure(params, self.reference))
    out = {PREFIX + name: float(values[name]) for name in sorted(values)}
    out[REFERENCE_STEP] = float(self.reference_step)
    return out

  def report(self, step: int, metrics: Mapping[str, float]) -> Dict[str, Any]:
    """The JSON record of a measurement at `step`."""
    return {"step": int(step), "reference_step": self.reference_step,
            "relative_to": self.relative_to,
            "movement": {name[len(PREFIX):]: train_logging.json_number(value)
                         for name, value in metrics.items() if name != REFERENCE_STEP}}


def format_table(report: Mapping[str, Any]) -> str:
  """A small text table of a `MovementTracker.report`."""
  rows = report["movement"]
  width = max((len(name) for name in rows), default=5)
  lines = [f"parameter movement ||theta - theta_ref|| / ||theta_ref|| at step "
           f"{report['step']}, relative to {report['relative_to']}:"]
  for name, value in rows.items():
    shown = f"{'n/a':>9}" if value is None else f"{100 * value:8.2f}%"
    lines.append(f"  {name:<{width}}  {shown}")
  return "\n".join(lines)


def write_report(model_dir: str, report: Mapping[str, Any]) -> Optional[str]:
  """Writes MODEL_DIR/param_movement.json atomically (process 0 only); its path."""
  if jax.process_index() != 0:
    return None
  path = io_utils.join(model_dir, JSON_NAME)
  io_utils.write_json(path, dict(report))
  return path
