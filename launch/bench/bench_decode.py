"""Benchmarks constrained decoding: model decode throughput and catalogue trie costs.

Prints two tables:
1. Per-example candidate tries (target + negatives) with a T5.1.1-small-shaped model
   (random weights; speed does not depend on their values): examples/s and memory, per batch.
2. Catalogue-wide tries of random 4-level IDs (SID under <src_item>, CID under <rec_item>):
   build time, device bytes per edge and per identifier, per-step cost at STATIC's serving
   shape (batch 2 x 70 beams) of a vocab mask and of the candidate lookup the decode uses
   (neither should grow with the catalogue), and a whole constrained decode at that shape
   (random logits, every level, top-70 each step): the figure to set beside STATIC's
   per-decode latency, at this vocabulary and at STATIC's benchmark vocabulary (2,048; most
   of a decode is the log-softmax normaliser over the vocabulary).
The model table also states the decode ceiling: FLOPs per example (launch/bench/decode_flops.py
derives them), the device's measured fp32 matmul peak (launch/bench/bench_machine.py), ceiling
examples/s = peak / FLOPs per example, and each batch's examples/s as a share of it; and a
second, shape-aware limit: the same decode's dense matmuls timed alone at their own shapes
(`matmuls_alone_seconds`; a decoder step's 240-row products read ~120 MB of weights that
no cache holds, so they run well below the square-matmul peak), with each batch's
examples/s as a share of that.
`--json_out PATH` also writes both tables and the ceiling as JSON (launch/bench/bench_all.py).

  .venv/bin/python -m launch.bench.bench_decode                 # full run (minutes on CPU)
  .venv/bin/python -m launch.bench.bench_decode --batches 8 --catalogue_sizes 100000 --model tiny
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import seqio
from flax.core import meta

from gensar_jax.decoding import beam_search as bs
from gensar_jax.decoding import candidate_tries, trie as trie_lib
from gensar_jax.models import encoder_decoder, t5, t5_config
from launch.bench import bench_machine, decode_flops

EOS, SRC_ITEM, REC_ITEM = 1, 3, 4
CODE_BASE = 10  # level l's codes are CODE_BASE + l * codebook + code
ID_LENGTH = 6  # behaviour token, 4 codes, EOS: the decode's steps
# Sizes of gin/models/small.gin, mini.gin and tiny.gin, by hand so the bench needs no gin parsing.
MODEL_SIZES = {
    "small": dict(emb_dim=512, num_heads=8, head_dim=64, mlp_dim=1024, num_encoder_layers=8,
                  num_decoder_layers=8),
    "tiny": dict(emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=2,
                 num_decoder_layers=2),
    "mini": dict(emb_dim=128, num_heads=4, head_dim=32, mlp_dim=512, num_encoder_layers=2,
                 num_decoder_layers=2),
}


def random_identifiers(rng, n: int, codebook: int, behaviour: int) -> np.ndarray:
  """[~n, 6] distinct random IDs: behaviour token, 4 codes, EOS."""
  codes = rng.integers(0, codebook, size=(n, 4)) + CODE_BASE + np.arange(4) * codebook
  rows = np.concatenate([np.full((n, 1), behaviour), codes, np.full((n, 1), EOS)], axis=1)
  return np.unique(rows.astype(np.int32), axis=0)


def catalogue_sequences(n: int) -> np.ndarray:
  """The catalogue of an n-item benchmark: n random SIDs under <src_item> and n CIDs under
  <rec_item> (4 levels x 256 codes each), the same for every run and for the STATIC peer
  (launch/bench/peers/bench_static.py), which builds its index from exactly these sequences."""
  rng = np.random.default_rng((1, n))
  return np.concatenate([random_identifiers(rng, n, 256, SRC_ITEM),
                         random_identifiers(rng, n, 256, REC_ITEM)])  # [~2n, 6]


def native_identifiers(n: int) -> np.ndarray:
  """[~n, 4] distinct identifiers of 4 codes in [0, 256), no behaviour token, no EOS, codes
  shared across levels: STATIC's own benchmark setting, where its build and bytes were
  first measured; the STATIC peer builds from exactly these too."""
  rng = np.random.default_rng((2, n))
  return np.unique(rng.integers(0, 256, size=(n, 4)).astype(np.int32), axis=0)


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench_model(args) -> list:
  config = t5_config.T5Config(vocab_size=args.vocab_size, dtype=args.dtype,
                              **MODEL_SIZES[args.model])
  model = encoder_decoder.EncoderDecoderModel(
      t5.Transformer(config), seqio.PassThroughVocabulary(args.vocab_size, eos_id=EOS))
  shapes = {"encoder_input_tokens": (1, args.input_length), "decoder_input_tokens": (1, ID_LENGTH)}
  params = jax.jit(lambda key: meta.unbox(model.get_initial_variables(key, shapes)["params"]))(
      jax.random.PRNGKey(0))
  codebook = min(256, (args.vocab_size - CODE_BASE) // 4)
  rng = np.random.default_rng(0)
  rows = []
  for batch in args.batches:
    candidates = np.stack([random_identifiers(rng, args.candidates + 8, codebook, SRC_ITEM)
                           [:args.candidates] for _ in range(batch)])     # [batch, cands, 6]
    start = time.perf_counter()
    tries = candidate_tries.build_candidate_tries(candidates)
    build_s = time.perf_counter() - start
    inputs = jnp.asarray(rng.integers(2, args.vocab_size, size=(batch, args.input_length)),
                         jnp.int32)
    decode = jax.jit(lambda p, x, c: bs.identifier_search(model, p, x, c, args.beams),
                     compiler_options=bs.decode_compiler_options())
    start = time.perf_counter()
    compiled = decode.lower(params, inputs, tries).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    device_gib = float("nan")
    if memory is not None:
      device_gib = (memory.temp_size_in_bytes + memory.argument_size_in_bytes +
                    memory.output_size_in_bytes) / 2**30
    # One untimed decode, then each decode timed to completion: queued asynchronous calls
    # would overlap on the same cores and the first one pays one-time setup.
    out = jax.block_until_ready(compiled(params, inputs, tries))
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      out = jax.block_until_ready(compiled(params, inputs, tries))
      times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    valid = float((np.asarray(out.items) >= 0).mean())
    rows.append((batch, batch / seconds, seconds, compile_s, build_s * 1e3, device_gib,
                 peak_rss_gib(), valid))
  return rows


MODEL_COLUMNS = ("batch", "examples_per_s", "seconds_per_batch", "compile_s", "trie_ms",
                 "xla_gib", "peak_rss_gib", "valid_beams")
CATALOGUE_COLUMNS = ("sequences", "build_s", "edges", "mib", "bytes_per_edge",
                     "bytes_per_identifier", "mask_us_dense", "mask_us_csr",
                     "candidates_us_dense", "candidates_us_csr", "decode_ms",
                     "decode_ms_static_vocab", "native_identifiers", "native_build_s",
                     "native_bytes_per_identifier")


def model_flops(args) -> dict:
  """decode_flops' count for this run's model shape (6 decode steps: the ID length)."""
  size = MODEL_SIZES[args.model]
  return decode_flops.constrained_decode_flops(
      **size, vocab_size=args.vocab_size, input_length=args.input_length, beams=args.beams,
      decode_steps=ID_LENGTH)


def matmuls_alone_seconds(args, batch: int, repeats: int = 5) -> dict:
  """Best seconds per batch of the decode's dense matmuls alone, at the decode's own shapes.

  The ceiling above divides by a large square matmul's rate with its operands in cache. A
  decode's matmuls are smaller ([batch x input_length] rows in the encoder, [batch x beams]
  in each decoder step) and read every layer's own weights (about 120 MB per decoder step
  for t5-small, more than the caches hold). This chains exactly those products, one
  distinct weight matrix per layer and projection as in the model, plus only the
  elementwise work that links them: the encoder once (with the cross-attention K/V
  projections), one decoder step over beam 0 of each example (step 0) and one over every
  beam (with the output logits), the latter times the later steps. Its
  examples/s is what this device allows for these shapes, the machine's limit for this
  decode.
  """
  size = MODEL_SIZES[args.model]
  emb, mlp = size["emb_dim"], size["mlp_dim"]
  joined = size["num_heads"] * size["head_dim"]
  key = iter(jax.random.split(jax.random.PRNGKey(3), 1000))

  def weights(*shape):
    return jax.random.normal(next(key), shape, jnp.float32) / shape[0] ** 0.5

  def layer_weights(cross: bool):
    names = {"q": (emb, joined), "k": (emb, joined), "v": (emb, joined), "o": (joined, emb),
             "wi_0": (emb, mlp), "wi_1": (emb, mlp), "wo": (mlp, emb)}
    if cross:
      names.update(cq=(emb, joined), co=(joined, emb))
    return {name: weights(*shape) for name, shape in names.items()}

  def layer(w, x):  # [rows, emb] -> [rows, emb]
    x = x + (x @ w["q"] + x @ w["k"] + x @ w["v"]) @ w["o"]
    if "cq" in w:
      x = x + (x @ w["cq"]) @ w["co"]
    return x + (jax.nn.gelu(x @ w["wi_0"]) * (x @ w["wi_1"])) @ w["wo"]

  encoder = [layer_weights(False) for _ in range(size["num_encoder_layers"])]
  cross_kv = [(weights(emb, joined), weights(emb, joined))
              for _ in range(size["num_decoder_layers"])]
  decoder = [layer_weights(True) for _ in range(size["num_decoder_layers"])]
  logits_kernel = weights(emb, args.vocab_size)

  @jax.jit
  def encode(encoder, cross_kv, x):
    for w in encoder:
      x = layer(w, x)
    return x, [(x @ k, x @ v) for k, v in cross_kv]

  @jax.jit
  def decoder_step(decoder, logits_kernel, x):
    for w in decoder:
      x = layer(w, x)
    return x @ logits_kernel

  def best(fn, *operands) -> float:
    return best_us(fn, *operands, repeats=1, trials=repeats) / 1e6

  rng = np.random.default_rng(4)
  encoder_s = best(encode, encoder, cross_kv, jnp.asarray(
      rng.normal(size=(batch * args.input_length, emb)), jnp.float32))
  first_s, step_s = (best(decoder_step, decoder, logits_kernel, jnp.asarray(
      rng.normal(size=(rows, emb)), jnp.float32)) for rows in (batch, batch * args.beams))
  # Step 0 runs beam 0 alone, as the search does; every later step every beam.
  seconds = encoder_s + first_s + (ID_LENGTH - 1) * step_s
  return {"encoder_s": encoder_s, "first_step_s": first_s, "decoder_step_s": step_s,
          "seconds_per_batch": seconds, "examples_per_s": batch / seconds}


def best_us(fn, *args, repeats: int, trials: int = 3) -> float:
  """Best of `trials` mean times of `repeats` calls, in microseconds (after one warm-up)."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(trials):
    start = time.perf_counter()
    for _ in range(repeats):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / repeats * 1e6)
  return best


def bench_catalogue(args) -> list:
  rng = np.random.default_rng(1)
  rows = []
  for n in args.catalogue_sizes:
    sequences = catalogue_sequences(n)  # SIDs + CIDs
    start = time.perf_counter()
    host_trie = trie_lib.build_trie(sequences)
    build_s = time.perf_counter() - start
    trie = jax.device_put(host_trie)
    edges = host_trie.num_edges()
    mask_us, candidates_us = [], []
    for step in (1, 3):  # a dense level and a CSR level
      depth_states = np.unique(sequences[:, :step], axis=0, return_inverse=True)[1].ravel()
      state = jnp.asarray(rng.choice(depth_states.max() + 1, size=(args.mask_batch,
                                                                   args.mask_beams)), jnp.int32)
      mask_fn = jax.jit(lambda t, s, step=step: trie_lib.allowed_token_mask(
          t, step, s, args.vocab_size))                       # [batch, beams, vocab] bool
      lookup_fn = jax.jit(lambda t, s, step=step: trie_lib.level_candidates(t, step, s))
      mask_us.append(best_us(mask_fn, trie, state, repeats=args.mask_repeats))
      candidates_us.append(best_us(lookup_fn, trie, state, repeats=args.mask_repeats))
    decode_ms = [full_decode_ms(args, trie, rng, vocab)
                 for vocab in (args.vocab_size, args.static_vocab_size)]
    native = native_identifiers(n)
    start = time.perf_counter()
    native_trie = trie_lib.build_trie(native)
    native_build_s = time.perf_counter() - start
    rows.append((len(sequences), build_s, edges, host_trie.nbytes() / 2**20,
                 host_trie.bytes_per_edge(), host_trie.nbytes() / len(sequences),
                 *mask_us, *candidates_us, *decode_ms, len(native), native_build_s,
                 native_trie.nbytes() / len(native)))
  return rows


def full_decode_ms(args, trie, rng, vocab_size: int) -> float:
  """Milliseconds per constrained beam search over the whole catalogue trie, with the
  decoder replaced by random logits (the trie, the normaliser and the top-k are what cost)."""
  b, k, length = args.mask_batch, args.mask_beams, trie.num_levels
  logits = jnp.asarray(rng.normal(size=(length, b * k, vocab_size)), jnp.float32)

  @jax.jit
  def decode(trie, logits):  # logits an argument, so XLA cannot fold them at compile time
    def tokens_to_logits(tokens, cache):  # [b * k, 1] -> [b * k, vocab]; cache: the step
      del tokens
      return logits[cache], cache + 1

    return bs.beam_search(tokens_to_logits, jnp.int32(0), b, k, length, constraint=trie).scores

  return best_us(decode, trie, logits, repeats=max(args.mask_repeats // 10, 1)) / 1e3


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="small", choices=sorted(MODEL_SIZES))
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="activation dtype (bfloat16 pays on CPUs with AVX-512 BF16)")
  parser.add_argument("--vocab_size", type=int, default=8320, help="~8.2k, padded to 128")
  parser.add_argument("--input_length", type=int, default=128)
  parser.add_argument("--beams", type=int, default=30)
  parser.add_argument("--candidates", type=int, default=100, help="target + 99 negatives")
  parser.add_argument("--batches", type=int, nargs="+", default=[8, 64])
  parser.add_argument("--repeats", type=int, default=3,
                      help="timed decodes per batch size (after one warm-up); the median is "
                           "reported")
  parser.add_argument("--catalogue_sizes", type=int, nargs="+", default=[100_000, 1_000_000])
  parser.add_argument("--mask_batch", type=int, default=2)
  parser.add_argument("--mask_beams", type=int, default=70)
  parser.add_argument("--mask_repeats", type=int, default=200,
                      help="calls per timed trial of a mask / lookup (a tenth for a decode)")
  parser.add_argument("--static_vocab_size", type=int, default=2048,
                      help="vocabulary of the second catalogue decode: STATIC's benchmark "
                           "default, so its per-decode latency compares like for like")
  parser.add_argument("--skip_model", action="store_true")
  parser.add_argument("--peak_flops", type=float, default=None,
                      help="fp32 matmul FLOP/s of the ceiling (default: measured here)")
  parser.add_argument("--json_out", default=None, help="also write the tables as JSON here")
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}")
  result = {"args": vars(args), "model": [], "catalogue": []}

  if not args.skip_model:
    flops = model_flops(args)
    peak = args.peak_flops or bench_machine.measure_matmul_peak()["flops_per_s"]
    ceiling = peak / flops["total"]
    result["ceiling"] = {"flops_per_example": flops, "matmul_peak_flops_per_s": peak,
                         "ceiling_examples_per_s": ceiling}
    print(f"\n1. Candidate tries, model={args.model}, input {args.input_length}, beams "
          f"{args.beams}, {args.candidates} candidates/example, vocab {args.vocab_size}")
    print(f"   decode: {decode_flops.describe(flops, args.beams, ID_LENGTH)}; fp32 matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s -> ceiling {ceiling:.2f} examples/s")
    print(f"{'batch':>6} {'ex/s':>8} {'s/batch':>8} {'compile s':>9} {'trie ms':>8} "
          f"{'XLA GiB':>8} {'peak RSS GiB':>12} {'valid beams':>11} {'GFLOP/s':>8} "
          f"{'% ceiling':>9} {'matmuls ex/s':>13} {'% them':>8}")
    for row in bench_model(args):
      record = dict(zip(MODEL_COLUMNS, row))
      record["flops_per_s"] = row[1] * flops["total"]
      record["percent_of_ceiling"] = 100 * row[1] / ceiling
      alone = matmuls_alone_seconds(args, row[0])
      record["matmuls_alone"] = alone
      record["percent_of_matmuls_alone"] = 100 * row[1] / alone["examples_per_s"]
      result["model"].append(record)
      print("{:>6} {:>8.2f} {:>8.2f} {:>9.1f} {:>8.1f} {:>8.2f} {:>12.2f} {:>11.2f}".format(*row)
            + f" {record['flops_per_s'] / 1e9:>8.1f} {record['percent_of_ceiling']:>8.1f}%"
            + f" {alone['examples_per_s']:>13.2f} {record['percent_of_matmuls_alone']:>7.1f}%")

  print(f"\n2. Catalogue tries (SIDs + CIDs, 4 levels x 256 codes); masking at batch "
        f"{args.mask_batch} x beams {args.mask_beams}, vocab {args.vocab_size}")
  print(f"{'sequences':>10} {'build s':>8} {'edges':>10} {'MiB':>8} {'B/edge':>7} {'B/id':>6} "
        f"{'mask us (dense)':>15} {'mask us (CSR)':>13} {'lookup us (dense)':>17} "
        f"{'lookup us (CSR)':>15} {'decode ms':>9} {f'at vocab {args.static_vocab_size}':>14} "
        f"{'native ids':>10} {'build s':>8} {'B/id':>6}")
  for row in bench_catalogue(args):
    result["catalogue"].append(dict(zip(CATALOGUE_COLUMNS, row)))
    print("{:>10} {:>8.2f} {:>10} {:>8.1f} {:>7.2f} {:>6.2f} {:>15.1f} {:>13.1f} {:>17.1f} "
          "{:>15.1f} {:>9.2f} {:>14.2f} {:>10} {:>8.2f} {:>6.2f}".format(*row))
  if args.json_out:
    with open(args.json_out, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1, default=float)


if __name__ == "__main__":
  main()
