"""Joint RQ-VAE: shapes, training, straight-through gradients, k-means init, keep-best, inputs."""
import dataclasses
import functools

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gensar_jax.identifiers import rqvae
from gensar_jax.identifiers import rqvae_config
from gensar_jax.identifiers.rqvae_config import COLLABORATIVE, SEMANTIC

# Small enough to compile and train in seconds; every module sharing it reuses the programs.
SMALL = rqvae_config.RQVAEConfig(hidden_dims=(32, 16), latent_dim=8, codebook_size=16,
                                 batch_size=128, eval_chunk=256, epochs=30, eval_every=10,
                                 progress=False)


def clustered_tables(n=512, clusters=16, seed=0):
  """Semantic [n, 24] and collaborative [n, 12] tables that share a cluster structure."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(clusters, 24)).astype(np.float32)
  labels = rng.integers(0, clusters, n)
  sem = centres[labels] + 0.2 * rng.normal(size=(n, 24)).astype(np.float32)
  col = centres[labels] @ (rng.normal(size=(24, 12)).astype(np.float32) / 5)
  col = col + 0.05 * rng.normal(size=(n, 12)).astype(np.float32)
  # L2-normalised, as the paper's sentence embeddings.
  return (sem / np.linalg.norm(sem, axis=1, keepdims=True),
          col / np.linalg.norm(col, axis=1, keepdims=True))


@pytest.fixture(scope="module")
def tables():
  return clustered_tables()


@pytest.fixture(scope="module")
def trained(tables):
  return rqvae.train_rqvae(*tables, SMALL)


@pytest.fixture(scope="module")
def forward(trained, tables):
  """One jitted forward pass on 7 items (eager flax would compile every op on its own)."""
  apply = jax.jit(functools.partial(trained.model.apply, use_sinkhorn=False))
  return jax.device_get(apply(trained.params, tuple(t[:7] for t in tables)))


def test_forward_shapes(forward):
  recon, q = forward
  assert [r.shape for r in recon] == [(7, 24), (7, 12)]
  assert q["shared_codes"].shape == (7, 2)  # [batch, L_m]
  assert q["specific_codes"].shape == (2, 7, 2)  # [spaces, batch, L_n]
  assert q["decoder_inputs"].shape == (2, 7, 8)  # [spaces, batch, latent]
  assert q["level_losses"].shape == (6,)  # 2 shared + 2 x 2 specific


def test_decoder_input_is_shared_half_plus_specific_codes(trained, forward):
  """v_s is decoded from (first half of the shared quantisation + semantic codes), v_c mirrored."""
  p = jax.device_get(trained.params["params"])
  _, q = forward
  shared_q = sum(p["shared_codebook"][lvl][q["shared_codes"][:, lvl]]
                 for lvl in range(2))  # [7, 16]
  for i in range(2):
    specific_q = sum(p["specific_codebook"][i, lvl][q["specific_codes"][i, :, lvl]]
                     for lvl in range(2))  # [7, 8]
    expected = shared_q[:, i * 8:(i + 1) * 8] + specific_q
    np.testing.assert_allclose(q["decoder_inputs"][i], expected, atol=1e-5)


def test_loss_decreases_on_clustered_data(trained):
  losses = [h["loss"] for h in trained.history]
  recon = [h["recon_loss"] for h in trained.history]
  assert len(losses) == SMALL.epochs
  assert np.mean(losses[-3:]) < 0.7 * losses[0]
  assert np.mean(recon[-3:]) < 0.6 * recon[0]


def test_straight_through_gradient_reaches_both_encoders(trained, tables):
  """The reconstruction loss alone (no commitment term) must train the encoders."""
  model = trained.model
  batch = tuple(jnp.asarray(t[:64]) for t in tables)
  recon_loss = lambda p: rqvae.rqvae_loss(model, p, batch, use_sinkhorn=False)[1][0]
  grads = jax.jit(jax.grad(recon_loss))(trained.params)["params"]
  for name in ("encoders_0", "encoders_1"):  # semantic, collaborative
    norm = sum(float(jnp.sum(g ** 2)) for g in jax.tree_util.tree_leaves(grads[name]))
    assert norm > 1e-12, name


def test_kmeans_init_uses_every_code(tables):
  """Random codebooks would leave most codes dead; k-means-initialised ones use them all."""
  init = rqvae.init_rqvae(*tables, SMALL)
  _, shared, specific = rqvae.encode_and_quantize(init, tables)
  assert len(np.unique(shared[:, 0])) == SMALL.codebook_size
  assert len(np.unique(specific[SEMANTIC][:, 0])) >= SMALL.codebook_size - 2
  # And the argmin IDs of an untrained model are already far from collapsed.
  assert rqvae.collision_rate(np.concatenate([shared, specific[SEMANTIC]], 1)) < 0.5


def test_keeps_params_with_lowest_collision_rate(trained, tables):
  evaluated = [(h["epoch"], h["collision_rate"]) for h in trained.history if "collision_rate" in h]
  assert [e for e, _ in evaluated] == [9, 19, 29]
  best = min(r for _, r in evaluated)
  assert trained.best_collision_rate == best
  assert trained.best_epoch == max(e for e, r in evaluated if r == best)
  # The kept params really give that collision rate.
  rates = rqvae._collision_rates(trained, tables, trained.params)
  assert np.mean(list(rates.values())) == pytest.approx(best)


def test_layouts_of_the_modes():
  dual = SMALL.layout()
  assert dual.level_names(SEMANTIC) == ("m0", "m1", "s0", "s1")
  assert dual.level_names(COLLABORATIVE) == ("m0", "m1", "c0", "c1")
  sid = dataclasses.replace(SMALL, mode="sid_only").layout()
  assert sid.spaces == (SEMANTIC,) and sid.level_names("semantic") == ("s0", "s1", "s2", "s3")
  no_shared = dataclasses.replace(SMALL, mode="dual_no_shared").layout()
  assert no_shared.shared_levels == 0 and no_shared.specific_levels == 4
  three = dataclasses.replace(SMALL, shared_levels=1, specific_levels=2).layout()
  assert three.level_names(COLLABORATIVE) == ("m0", "c0", "c1")


def test_config_is_gin_configurable():
  with gin.unlock_config():
    gin.parse_config(["RQVAEConfig.codebook_size = 512", "RQVAEConfig.specific_levels = 1",
                      "RQVAEConfig.hidden_dims = [64, 32]"])
  try:
    config = rqvae_config.RQVAEConfig()
    assert config.codebook_size == 512 and config.specific_levels == 1
    assert config.hidden_dims == (64, 32) and hash(config)  # hashable: programs cache on it
  finally:
    gin.clear_config()
  assert rqvae_config.RQVAEConfig().codebook_size == 256


def test_training_module_reexports_the_config_names():
  """ablations.py, identify.py and older callers import these from `rqvae`: same objects."""
  from gensar_jax.identifiers.rqvae import MODES, RQVAEConfig  # as ablations.py does
  assert MODES is rqvae_config.MODES and RQVAEConfig is rqvae_config.RQVAEConfig
  for name in ("SEMANTIC", "COLLABORATIVE", "QuantizerLayout", "validate_embeddings"):
    assert getattr(rqvae, name) is getattr(rqvae_config, name), name


def test_config_rejects_bad_values():
  with pytest.raises(ValueError, match="mode"):
    rqvae_config.RQVAEConfig(mode="triple")
  with pytest.raises(ValueError, match="shared_dim"):
    rqvae_config.RQVAEConfig(shared_dim=48)


@pytest.mark.parametrize("bad,table,row,kind", [(np.nan, 0, 7, "NaN"), (np.inf, 1, 3, "inf")])
def test_non_finite_embeddings_are_rejected_with_table_and_row(tables, bad, table, row, kind):
  sem, col = (t.copy() for t in tables)
  [sem, col][table][row, 2] = bad
  [sem, col][table][row + 5, 0] = bad
  name = ["semantic", "collaborative"][table]
  with pytest.raises(ValueError, match=rf"{name} embedding table .*{kind}.* row {row}\b"):
    rqvae.train_rqvae(sem, col, SMALL)


def test_mismatched_item_counts_name_both_counts(tables):
  with pytest.raises(ValueError, match=r"512.*500"):
    rqvae.train_rqvae(tables[0], tables[1][:500], SMALL)


def test_missing_table_depends_on_mode(tables):
  with pytest.raises(ValueError, match="collaborative"):
    rqvae_config.validate_embeddings(tables[0], None, SMALL)
  sid_only = dataclasses.replace(SMALL, mode="sid_only")
  (sem,) = rqvae_config.validate_embeddings(tables[0], None, sid_only)
  assert sem.shape == (512, 24)
