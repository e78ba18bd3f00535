"""gensar-jax: unified generative search and recommendation in JAX/Flax, T5X-style."""

__version__ = "0.1.0"
