"""The reserved token ids (T5's convention), in a module with no dependencies.

The vocabulary (gensar_jax/vocabulary.py) trains SentencePiece models with these ids, and
decoding uses them; the serving path imports decoding without SeqIO or TensorFlow, so they
live here rather than next to the SentencePiece code.
"""
PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
