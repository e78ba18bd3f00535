"""Postprocessors and SeqIO metric functions of the GenSAR evaluation tasks.

Evaluation ranks the candidates by beam score (docs/evaluation.md): the model
decodes, constrained to the example's candidate identifiers, a ranked list of beams, best
first. SeqIO hands each metric function the postprocessed targets and predictions of the
whole split:
  targets:     [batch] target identifier strings ("<rec_item><m0_1><m1_2><c0_3><c1_4>")
  predictions: [batch, beams] ranked identifier strings (ragged lists are padded; a single
               string per example counts as one beam)
and `ranking_metrics` returns HR@{1,5,10} and NDCG@{5,10} exactly as
`gensar_jax.metrics.ranking_metrics` defines them for every other system.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Union

import numpy as np

from gensar_jax import metrics as metrics_lib

Beams = Union[str, bytes, Sequence[Union[str, bytes]]]


def _text(value: Union[str, bytes]) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def normalise_identifier(value: Union[str, bytes]) -> str:
  """An identifier string without whitespace (decoders may emit "▁" pieces as spaces)."""
  return "".join(_text(value).split())


def postprocess_identifier(output: Beams, example: Any = None, is_target: bool = False):
  """Decoded output -> identifier string, or list of them when the model returns beams."""
  del example, is_target
  if isinstance(output, (str, bytes)):
    return normalise_identifier(output)
  return [normalise_identifier(o) for o in output]


def postprocess_query(output: Beams, example: Any = None, is_target: bool = False):
  """Decoded output -> query text (surrounding whitespace removed), or list of them."""
  del example, is_target
  if isinstance(output, (str, bytes)):
    return _text(output).strip()
  return [_text(o).strip() for o in output]


def _beam_matrix(predictions: Sequence[Beams]) -> np.ndarray:
  rows: List[List[str]] = [[p] if isinstance(p, (str, bytes)) else list(p)
                           for p in predictions]
  width = max((len(r) for r in rows), default=0)
  matrix = np.full((len(rows), max(width, 1)), "", dtype=object)  # [batch, beams]
  for i, row in enumerate(rows):
    matrix[i, :len(row)] = [_text(b) for b in row]
  return matrix


def ranking_metrics(targets: Sequence[Union[str, bytes]],
                    predictions: Sequence[Beams]) -> Dict[str, float]:
  """HR@{1,5,10}, NDCG@{5,10} of the target among ranked beams ([batch, beams])."""
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
  target_array = np.asarray([_text(t) for t in targets], dtype=object)  # [batch]
  beams = _beam_matrix(predictions)  # [batch, beams]
  # An empty beam slot ("") never equals a target: targets are non-empty identifiers.
  if (target_array == "").any():
    raise ValueError("empty target identifier")
  ranks = metrics_lib.target_ranks(beams, target_array)  # [batch], -1 = not returned
  return metrics_lib.ranking_metrics(ranks)


def query_exact_match(targets: Sequence[Union[str, bytes]],
                      predictions: Sequence[Beams]) -> Dict[str, float]:
  """Share of examples whose top prediction is exactly the next query."""
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
  if not len(targets):
    raise ValueError("no examples")
  top = _beam_matrix(predictions)[:, 0]
  hits = [_text(p) == _text(t) for p, t in zip(top, targets)]
  return {"exact_match": float(np.mean(hits))}
