"""What a benchmark ran on, and how fast that machine can multiply matrices.

Throughput alone says little across machines, so every benchmark figure is set beside two
peaks: the data-sheet dense bf16 peak of a known accelerator (for MFU), and the measured
fp32 matmul peak of whatever device JAX sees (the only honest ceiling on a CPU, where no
data sheet applies and XLA's kernels, not the silicon, set the limit).

  .venv/bin/python -m launch.bench.bench_machine [--json_out PATH]   # the description, the peak
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from typing import Dict, Optional

import jax

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Peak dense (no sparsity) bf16 FLOP/s per chip, from the vendors' data sheets:
#   H100 SXM5 989.4 TFLOP/s, H200 SXM 989 TFLOP/s (NVIDIA H100 / H200 Tensor Core GPU
#   data sheets; the PCIe/NVL parts are lower, 756 / 835), A100 SXM 312 TFLOP/s (NVIDIA
#   A100 data sheet), TPU v4 275, v5e 197, v5p 459 TFLOP/s (cloud.google.com/tpu/docs/v4,
#   /v5e, /v5p). Matched as substrings of jax's device_kind, first match wins, so the
#   more specific names come first.
PEAK_FLOPS_BY_DEVICE_KIND = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("v5 lite", 197e12),   # TPU v5e reports device_kind "TPU v5 lite"
    ("v5e", 197e12),
    ("v5p", 459e12),
    ("v5", 459e12),        # TPU v5p reports "TPU v5"
    ("v4", 275e12),
)


def peak_flops_per_chip(device: jax.Device) -> Optional[float]:
  """The table's bf16 peak for this device, or None (CPUs, unknown kinds)."""
  if device.platform == "cpu":
    return None
  kind = device.device_kind
  for name, flops in PEAK_FLOPS_BY_DEVICE_KIND:
    if name.lower() in kind.lower():
      return flops
  return None


def measure_matmul_peak(n: Optional[int] = None, dtype: str = "float32",
                        chain: Optional[int] = None, repeats: int = 10) -> Dict[str, float]:
  """Best FLOP/s of a jitted chain of `chain` [n, n] @ [n, n] products, best of `repeats`.

  A chain inside one jit keeps dispatch out of the timing; each product is 2 n^3 FLOPs.
  The result is what XLA reaches on this device at default precision, the ceiling that a
  compute-bound model step could reach, not a data-sheet number. Defaults: 4 products of
  2048 on a CPU (about 0.5 s each here), 16 of 8192 on an accelerator (a 2048 product takes
  tens of microseconds there, too short to time).
  """
  on_cpu = jax.devices()[0].platform == "cpu"
  n = n or (2048 if on_cpu else 8192)
  chain = chain or (4 if on_cpu else 16)
  key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(key_a, (n, n), dtype) / n ** 0.5
  b = jax.random.normal(key_b, (n, n), dtype) / n ** 0.5

  @jax.jit
  def run(a, b):
    return jax.lax.fori_loop(0, chain, lambda _, x: x @ b, a)

  jax.block_until_ready(run(a, b))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run(a, b))
    best = min(best, time.perf_counter() - start)
  return {"n": n, "dtype": dtype, "chain": chain, "repeats": repeats, "best_s": best,
          "flops_per_s": 2.0 * n ** 3 * chain / best}


# The vector units that set a CPU's matmul peak, as /proc/cpuinfo names them.
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _cpuinfo() -> Dict[str, object]:
  fields, logical = {}, 0
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
          logical += 1
        elif key in ("model name", "cpu family", "model", "flags"):
          fields.setdefault(key, value.strip())
  except OSError:
    pass
  usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
  flags = set(fields.get("flags", "").split())
  return {"cpu_model": fields.get("model name") or platform.processor() or platform.machine(),
          "cpu_family_model": f"{fields.get('cpu family')}/{fields.get('model')}",
          "cpu_vector_flags": [f for f in VECTOR_FLAGS if f in flags],
          "cpu_logical_cores": logical or os.cpu_count(), "cpu_usable_cores": usable,
          "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def _ram_gib() -> Optional[float]:
  try:
    with open("/proc/meminfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("MemTotal:"):
          return round(int(line.split()[1]) / 2**20, 1)
  except OSError:
    pass
  return None


def _git_commit() -> Optional[str]:
  def git(*args):
    return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True,
                          check=True).stdout.strip()
  try:
    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
  except (OSError, subprocess.CalledProcessError):
    return None
  return commit + ("+dirty" if dirty else "")


def describe_machine() -> Dict[str, object]:
  """CPU, RAM, accelerator, library versions and commit, as one JSON-able dict."""
  import flax
  import jaxlib
  devices = jax.devices()
  peak = peak_flops_per_chip(devices[0])
  return {
      **_cpuinfo(),
      "ram_gib": _ram_gib(),
      "platform": devices[0].platform,
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "peak_bf16_flops_per_chip": peak,
      "python": platform.python_version(),
      "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
      "os": platform.platform(),
      "git_commit": _git_commit(),
  }


def describe_with_peaks() -> Dict[str, object]:
  """describe_machine plus the measured fp32 matmul peak (and bf16 on an accelerator,
  where the model trains in bf16; on a CPU bf16 is emulated and never the fast path)."""
  description = describe_machine()
  description["matmul_peak_fp32"] = measure_matmul_peak()
  if description["platform"] != "cpu":
    description["matmul_peak_bf16"] = measure_matmul_peak(dtype="bfloat16")
  return description


if __name__ == "__main__":
  result = describe_with_peaks()
  if len(sys.argv) == 3 and sys.argv[1] == "--json_out":
    with open(sys.argv[2], "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  json.dump(result, sys.stdout, indent=1)
  print()
