"""An independent NumPy T5 forward pass over Hugging Face tensor names, for the tests.

Why: the pretrained loaders (gensar_jax/pretrained/) are only right if our Flax network,
fed the mapped weights, computes what the checkpoint's own architecture computes. This
module is that architecture written again from the Hugging Face T5 definition, in plain
NumPy and float64, reading the checkpoint's tensors by their Hugging Face names
(`encoder.block.0.layer.0.SelfAttention.q.weight`, ...) and shapes (Linear weights are
[out, in]); it shares no code with gensar_jax, so a mapping mistake cannot cancel out.
It runs where only the project's dependencies are installed (no torch/transformers).

Covered: T5 v1.0 (ReLU `DenseReluDense.wi/wo`, tied `shared.weight` output with the
decoder output scaled by d_model**-0.5) and T5.1.1 (gated `wi_0/wi_1/wo` with the tanh
GELU, untied `lm_head.weight`); relative attention bias on block 0 of each stack; no
1/sqrt(d) attention scaling; RMS layer norms. Inference only (no dropout).
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

NEG = -1e9


def _act(name: str):
  if name == "relu":
    return lambda x: np.maximum(x, 0.0)
  if name in ("gelu_new", "gelu_pytorch_tanh"):
    return lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi)
                                              * (x + 0.044715 * x ** 3)))
  if name == "gelu":
    from math import erf
    verf = np.vectorize(erf)
    return lambda x: 0.5 * x * (1.0 + verf(x / math.sqrt(2.0)))
  raise ValueError(f"reference: activation {name!r} not covered")


def activation_of(config: Mapping) -> tuple:
  """(gated, activation name) as Hugging Face's T5Config derives them from
  feed_forward_proj (its dense_act_fn is recomputed from it, never read)."""
  proj = config.get("feed_forward_proj", "relu")
  act = "gelu_new" if proj == "gated-gelu" else proj.split("-")[-1]
  return proj.startswith("gated-"), act


def _norm(x, weight, eps):
  variance = np.mean(x * x, axis=-1, keepdims=True)
  return weight * (x / np.sqrt(variance + eps))


def _bucket(relative, bidirectional, num_buckets, max_distance):
  buckets = np.zeros_like(relative)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative > 0).astype(relative.dtype) * num_buckets
    relative = np.abs(relative)
  else:
    relative = -np.minimum(relative, 0)
  max_exact = num_buckets // 2
  small = relative < max_exact
  large = max_exact + (np.log(np.maximum(relative, 1).astype(np.float64) / max_exact)
                       / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return buckets + np.where(small, relative, large)


def _position_bias(table, q_len, k_len, bidirectional, config):
  """table [buckets, heads] -> [heads, q, k]."""
  context = np.arange(q_len)[:, None]
  memory = np.arange(k_len)[None, :]
  buckets = _bucket(memory - context, bidirectional, config["relative_attention_num_buckets"],
                    config.get("relative_attention_max_distance", 128))
  return table[buckets].transpose(2, 0, 1)


def _attention(w, prefix, x, kv, bias, mask, config):
  """x [b, q, d], kv [b, k, d], bias [h, q, k], mask [b, 1|q, k] (bool) -> [b, q, d]."""
  heads, d_kv = config["num_heads"], config["d_kv"]

  def split(t):  # [b, n, h * d_kv] -> [b, h, n, d_kv]
    return t.reshape(t.shape[0], t.shape[1], heads, d_kv).transpose(0, 2, 1, 3)

  q = split(x @ w[f"{prefix}.q.weight"].T)
  k = split(kv @ w[f"{prefix}.k.weight"].T)
  v = split(kv @ w[f"{prefix}.v.weight"].T)
  scores = q @ k.transpose(0, 1, 3, 2) + bias[None]  # [b, h, q, k], no 1/sqrt(d) scaling
  scores = np.where(mask[:, None], scores, NEG)
  scores = scores - scores.max(-1, keepdims=True)
  probs = np.exp(scores)
  probs /= probs.sum(-1, keepdims=True)
  context = (probs @ v).transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], heads * d_kv)
  return context @ w[f"{prefix}.o.weight"].T


def _ffn(w, prefix, x, config):
  gated, act = activation_of(config)
  f = _act(act)
  if gated:
    hidden = f(x @ w[f"{prefix}.wi_0.weight"].T) * (x @ w[f"{prefix}.wi_1.weight"].T)
  else:
    hidden = f(x @ w[f"{prefix}.wi.weight"].T)
  return hidden @ w[f"{prefix}.wo.weight"].T


def t5_logits(weights: Mapping[str, np.ndarray], config: Mapping, encoder_ids: np.ndarray,
              decoder_ids: np.ndarray) -> np.ndarray:
  """[b, q] encoder ids, [b, t] decoder input ids -> [b, t, vocab rows] float64 logits.

  Encoder keys with id 0 (padding) are masked; the decoder is causal only (T5's
  decoder_start id is the pad id 0, which must stay visible).
  """
  w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
  eps = config.get("layer_norm_epsilon", 1e-6)
  shared = w["shared.weight"] if "shared.weight" in w else w["encoder.embed_tokens.weight"]
  enc_layers = config["num_layers"]
  dec_layers = config.get("num_decoder_layers") or enc_layers
  b, q_len = encoder_ids.shape
  t_len = decoder_ids.shape[1]

  x = shared[encoder_ids]  # [b, q, d]
  enc_mask = np.broadcast_to((encoder_ids > 0)[:, None, :], (b, q_len, q_len))
  bias = _position_bias(
      w["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"], q_len, q_len,
      True, config)
  for i in range(enc_layers):
    p = f"encoder.block.{i}"
    h = _norm(x, w[f"{p}.layer.0.layer_norm.weight"], eps)
    x = x + _attention(w, f"{p}.layer.0.SelfAttention", h, h, bias, enc_mask, config)
    h = _norm(x, w[f"{p}.layer.1.layer_norm.weight"], eps)
    x = x + _ffn(w, f"{p}.layer.1.DenseReluDense", h, config)
  encoded = _norm(x, w["encoder.final_layer_norm.weight"], eps)

  y = shared[decoder_ids]  # [b, t, d]
  causal = np.broadcast_to(np.tril(np.ones((t_len, t_len), bool))[None], (b, t_len, t_len))
  cross_mask = np.broadcast_to((encoder_ids > 0)[:, None, :], (b, t_len, q_len))
  self_bias = _position_bias(
      w["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"], t_len, t_len,
      False, config)
  no_bias = np.zeros((config["num_heads"], t_len, q_len))
  for i in range(dec_layers):
    p = f"decoder.block.{i}"
    h = _norm(y, w[f"{p}.layer.0.layer_norm.weight"], eps)
    y = y + _attention(w, f"{p}.layer.0.SelfAttention", h, h, self_bias, causal, config)
    h = _norm(y, w[f"{p}.layer.1.layer_norm.weight"], eps)
    y = y + _attention(w, f"{p}.layer.1.EncDecAttention", h, encoded, no_bias, cross_mask,
                       config)
    h = _norm(y, w[f"{p}.layer.2.layer_norm.weight"], eps)
    y = y + _ffn(w, f"{p}.layer.2.DenseReluDense", h, config)
  y = _norm(y, w["decoder.final_layer_norm.weight"], eps)
  if config.get("tie_word_embeddings", True):
    return (y * config["d_model"] ** -0.5) @ shared.T
  return y @ w["lm_head.weight"].T
