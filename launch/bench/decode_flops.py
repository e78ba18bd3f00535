"""FLOPs per example of constrained beam decoding: the numerator of the decode ceiling.

Decoding is compute-bound only if its FLOPs, divided by the machine's matmul peak, come
close to the measured time; this module counts those FLOPs for the way
`gensar_jax.decoding.beam_search.identifier_search` runs a T5.1.1 encoder-decoder, so a
benchmark can state ceiling examples/s = peak FLOP/s / FLOPs per example and how far from
it the measured decode is.

Counting (a multiply-add is 2 FLOPs; d = emb_dim, a = num_heads x head_dim, f = mlp_dim, g
= number of MLP input projections (2 for gated GELU), L = input length, n_e / n_d = encoder
/ decoder layers, k = beams, T = decode steps (the identifier length, 6 for behaviour token
+ 4 codes + EOS), V = vocabulary):

  encoder, once per example (not per beam):
    n_e x [ L x 2 x (4 d a)              Q, K, V, O projections
          + 2 x 2 x L^2 x a              scores QK^T and the weighted sum AV
          + L x 2 x (g + 1) d f ]        MLP: g input projections and the output one
  cross-attention keys/values, once per example (identifier_search precomputes them and the
  decoder's cross-attention groups an example's beams against its one copy):
    n_d x L x 2 x (2 d a)
  decoder, per beam per step, with a key/value cache of T positions: 1 + k x (T - 1) of
  them, since step 0 runs beam 0 alone (every beam starts from the same PAD token and only
  beam 0 is alive; the search copies its cache to the others):
    n_d x [ 2 x (4 d a) + 2 x 2 x T x a  self-attention: projections, scores over the cache
          + 2 x (2 d a) + 2 x 2 x L x a  cross-attention: Q and O, scores over the input
          + 2 x (g + 1) d f ]            MLP
    + 2 d V                              output projection (the logits)

Left out as negligible (well under 1%): norms, softmax, relative position biases, the
embedding lookups (gathers), the trie's masking and the top-k. The cache is counted at its
full length T, as the decode step computes it (positions not yet written are masked, not
skipped). For t5-small (d = a = 512, f = 1024, 8 + 8 layers), L = 128, k = 30, T = 6,
V = 8320 this is 5.64 + 1.07 + 9.22 = 15.93 GFLOP per example (17.70 when step 0 ran all
30 beams); the decoder term is 58%, so beams, not the encoder, set the cost. XLA's cost
analysis of the compiled encoder, cross-attention K/V projection and one decode step over 30
beams counts 5.67, 1.07 and 1.837 GFLOP against this count's 5.64, 1.07 and 1.831
(tests/test_bench_all.py checks a smaller shape).
"""
from __future__ import annotations

from typing import Dict


def constrained_decode_flops(*, emb_dim: int, num_heads: int, head_dim: int, mlp_dim: int,
                             num_encoder_layers: int, num_decoder_layers: int,
                             vocab_size: int, input_length: int, beams: int,
                             decode_steps: int = 6, mlp_inputs: int = 2) -> Dict[str, float]:
  """FLOPs per example, split as the module docstring derives them ("total" is the sum)."""
  d, a, f, g = emb_dim, num_heads * head_dim, mlp_dim, mlp_inputs
  L, T = input_length, decode_steps
  mlp = 2 * (g + 1) * d * f
  encoder = num_encoder_layers * (L * 2 * 4 * d * a + 4 * L * L * a + L * mlp)
  cross_kv = num_decoder_layers * L * 2 * 2 * d * a
  per_beam_step = (num_decoder_layers * (2 * 4 * d * a + 4 * T * a + 2 * 2 * d * a
                                         + 4 * L * a + mlp)
                   + 2 * d * vocab_size)
  decoder = (1 + beams * (T - 1)) * per_beam_step
  return {"encoder": float(encoder), "cross_kv": float(cross_kv), "decoder": float(decoder),
          "per_beam_step": float(per_beam_step),
          "total": float(encoder + cross_kv + decoder)}


def describe(flops: Dict[str, float], beams: int, steps: int) -> str:
  return (f"{flops['total'] / 1e9:.2f} GFLOP per example (encoder "
          f"{flops['encoder'] / 1e9:.2f}, cross-attention K/V {flops['cross_kv'] / 1e9:.2f}, "
          f"decoder {flops['decoder'] / 1e9:.2f}: 1 beam at step 0, {beams} beams at each of "
          f"the other {steps - 1} steps)")
