"""Loaders: one module per raw format, each returning a validated `SearchRecLog`."""
from gensar_jax.data.loaders.amazon import load_amazon_2014  # noqa: F401
from gensar_jax.data.loaders.generic import load_generic  # noqa: F401
from gensar_jax.data.loaders.movielens import load_movielens_100k  # noqa: F401
