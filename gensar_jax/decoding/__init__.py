"""Decoding on device: identifier tries as arrays, constrained beam search, sampling."""
from __future__ import annotations

# The search function is gensar_jax.decoding.beam_search.beam_search; it is not re-exported
# here because the name would shadow its module.
from gensar_jax.decoding.beam_search import (BeamSearchResult, TokensToLogits,
                                             constrained_decode_fn, decode_identifiers,
                                             identifier_search)
from gensar_jax.decoding.candidate_tries import build_candidate_tries
from gensar_jax.decoding.sampling import filter_logits, temperature_sample
from gensar_jax.decoding.trie import (TrieArrays, TrieBuildError, allowed_token_mask, build_trie,
                                      contains, leaf_items, next_state, step_candidates)
