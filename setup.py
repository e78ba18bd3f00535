"""gensar-jax: unified generative search and recommendation (GenSAR) in JAX/Flax, T5X-style.

Every dependency is pinned on purpose; the comment says why we need it. Ranges admit
Python 3.11 with JAX 0.10.x (CPU development machines) and Python 3.12 with JAX 0.11
(GPU/TPU machines). `make` installs with constraints.txt, the exact versions the test suite
last passed with, so a clean clone gets the environment that was tested.
"""
import setuptools

INSTALL_REQUIRES = [
    # Numerics and compilation: jit, named shardings, multi-process on TPU pods.
    "jax>=0.10.0,<0.12",
    "jaxlib>=0.10.0,<0.12",
    # Neural network layers with logical axis annotations (nn.with_logical_partitioning).
    "flax>=0.12.0,<0.13",
    # Optimisers and schedules (AdamW, Adafactor, cosine with warm-up, clipping).
    "optax>=0.2.5,<0.3",
    # Checkpoints: async, sharded, CheckpointManager with keep-best.
    "orbax-checkpoint>=0.11.20,<0.13",
    # The filesystem layer of run directories (gensar_jax/io_utils.py): local paths and gs://
    # through etils.epath (orbax's own layer); gcsfs is its bucket client with EPATH_USE_TF=0.
    "etils[epath]>=1.7",
    "fsspec>=2024.6",
    "gcsfs>=2024.6",
    # Tasks, mixtures, vocabularies and feature converters, the way T5X users know them.
    "seqio==0.0.20",
    # SeqIO needs the full TensorFlow (tf.data) and tensorflow-text; TFDS writes the prepared
    # dataset that SeqIO reads straight from a bucket.
    "tensorflow>=2.21.0,<2.22",
    "tensorflow-text>=2.21.0,<2.22",
    "tensorflow-datasets>=4.9.8,<4.10",
    # TFDS imports it lazily when building a dataset but does not declare it.
    "importlib_resources>=6.0",
    # Configuration with the T5X flag convention (--gin_file, --gin.NAME=value).
    "gin-config==0.5.0",
    "absl-py>=2.1",
    "numpy>=1.26,<3",
    # Generic user logs in parquet or CSV.
    "pandas>=2.2,<3",
    "pyarrow>=17",
    # BM25 hard negatives for search evaluation and the BM25 baseline.
    "bm25s==0.3.16",
    # Sentence-encoder weights and tokenizers without PyTorch.
    "safetensors>=0.4.5,<0.9",
    "tokenizers>=0.20,<0.24",
    # The search/recommend HTTP server: an ASGI app (FastAPI, pydantic request validation)
    # on uvicorn; httpx is the client of the load test and the server tests.
    "fastapi>=0.115,<1",
    "uvicorn>=0.30,<1",
    "httpx>=0.27,<1",
    # Progress bars and plots of results.
    "tqdm>=4.66",
    "matplotlib>=3.8",
]

EXTRAS_REQUIRE = {
    # gcp-storage-emulator: a GCS JSON API on loopback, for the gs:// run-directory tests.
    "test": ["pytest>=8.0", "pytest-timeout>=2.3", "gcp-storage-emulator>=2026.7", "ruff>=0.6",
             "pytest-xdist>=3.5"],
}

setuptools.setup(
    name="gensar-jax",
    version="0.1.0",
    description="Unified generative search and recommendation (GenSAR) in JAX/Flax, T5X-style.",
    python_requires=">=3.11,<3.13",
    # The repository's tasks/ folder is installed as the package gensar_tasks: a bare `tasks`
    # in site-packages would claim a name other projects use too.
    packages=setuptools.find_packages(include=["gensar_jax", "gensar_jax.*"]) + ["gensar_tasks"],
    package_dir={"gensar_tasks": "tasks"},
    package_data={"gensar_jax": ["py.typed"]},
    # `gensar <stage> --gin_file=... --gin.NAME=value`, the same as python -m gensar_jax.<stage>.
    entry_points={"console_scripts": ["gensar = gensar_jax.commands:main"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
