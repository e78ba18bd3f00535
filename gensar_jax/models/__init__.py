"""The T5.1.1 encoder-decoder network and the EncoderDecoderModel wrapper."""
from gensar_jax.models.encoder_decoder import EncoderDecoderModel, build_model
from gensar_jax.models.t5 import Transformer
from gensar_jax.models.t5_config import T5Config, vocab_size_for

__all__ = ["EncoderDecoderModel", "T5Config", "Transformer", "build_model", "vocab_size_for"]
