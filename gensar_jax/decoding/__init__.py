"""Decoding on device: identifier tries as arrays, constrained beam search, sampling."""
from __future__ import annotations

from gensar_jax.decoding.beam_search import (BeamSearchResult, TokensToLogits, beam_search,
                                             decode_identifiers, identifier_search)
from gensar_jax.decoding.candidate_tries import build_candidate_tries
from gensar_jax.decoding.sampling import filter_logits, temperature_sample
from gensar_jax.decoding.trie import (TrieArrays, TrieBuildError, allowed_token_mask, build_trie,
                                      contains, leaf_items, next_state, step_candidates)
