"""Balanced spaces and dead-code restarts of the joint RQ-VAE, and what the saved model keeps."""
import dataclasses

import numpy as np
import pytest

from gensar_jax.identifiers import codebook_reset
from gensar_jax.identifiers import rqvae
from gensar_jax.identifiers import rqvae_store
from test_rqvae import SMALL, clustered_tables


def scaled_tables(n=512, seed=0):
  """The clustered tables with the semantic one shrunk 30x: the published imbalance."""
  sem, col = clustered_tables(n=n, seed=seed)
  return sem / 30.0, col


def latent_variance(trained, tables):
  r0 = rqvae.encode_and_quantize(trained, tables)[0]  # [items, 2 * latent]
  lat = trained.config.latent_dim
  return float(r0[:, :lat].var(0).sum()), float(r0[:, lat:].var(0).sum())


def test_input_statistics_standardise_every_dimension():
  rng = np.random.default_rng(0)
  table = rng.normal(3.0, 0.01, size=(200, 5)).astype(np.float32)
  table[:, 4] = 7.0  # a constant dimension stays ~0 instead of becoming noise
  stats = rqvae.input_statistics([table], standardize=True)
  (scaled,) = rqvae.scale_inputs([table], stats)
  np.testing.assert_allclose(scaled[:, :4].mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(scaled[:, :4].std(0), 1.0, atol=1e-3)
  np.testing.assert_allclose(scaled[:, 4], 0.0)
  assert rqvae.input_statistics([table], standardize=False) is None
  assert rqvae.scale_inputs([table], None)[0] is table


def test_balance_gives_both_spaces_equal_latent_weight():
  tables = scaled_tables()
  published = rqvae.train_rqvae(*tables, dataclasses.replace(SMALL, balance="none",
                                                             reset_every=0))
  balanced = rqvae.train_rqvae(*tables, SMALL)
  sem_var, col_var = latent_variance(published, tables)
  assert sem_var < 0.2 * col_var  # the published model lets behaviour dominate
  sem_var, col_var = latent_variance(balanced, tables)
  assert 0.8 < sem_var / col_var < 1.25  # unit-length latents of comparable spread
  assert balanced.input_stats is not None and published.input_stats is None


def test_reseed_moves_only_unused_codes_onto_residuals():
  rng = np.random.default_rng(0)
  r = rng.normal(size=(50, 4)).astype(np.float32)  # [items, dim]
  book = rng.normal(size=(8, 4)).astype(np.float32)  # [K, dim]
  codes = np.array([0, 1, 2] * 16 + [0, 0])  # codes 3..7 unused
  new, moved = codebook_reset._reseed_level(book, r, codes, rng)
  assert moved == 5
  np.testing.assert_array_equal(new[:3], book[:3])
  for row in new[3:]:  # each restarted code sits on some item's residual
    assert np.min(np.abs(r - row).sum(1)) < 1e-6
  assert len({tuple(row) for row in new[3:]}) == 5


def test_dead_code_restarts_raisecode_usage():
  tables = clustered_tables(n=512, clusters=4)  # few clusters: argmin leaves codes dead
  config = dataclasses.replace(SMALL, epochs=20, eval_every=20)
  without = rqvae.train_rqvae(*tables, dataclasses.replace(config, reset_every=0))
  with_reset = rqvae.train_rqvae(*tables, dataclasses.replace(config, reset_every=2))
  assert sum(r.get("codes_reset", 0) for r in with_reset.history) > 0
  assert not any("codes_reset" in r for r in without.history)
  used = lambda t: len(np.unique(rqvae.encode_and_quantize(t, tables)[1][:, 0]))
  assert used(with_reset) > used(without)


def test_saved_model_keeps_input_statistics(tmp_path):
  tables = scaled_tables(n=256)
  config = dataclasses.replace(SMALL, epochs=2, eval_every=2)
  trained = rqvae.train_rqvae(*tables, config)
  rqvae_store.save_rqvae(str(tmp_path), trained, None)
  loaded, _ = rqvae_store.load_rqvae(str(tmp_path))
  assert loaded.config.balance == "inputs_and_latents"
  for (m, s), (lm, ls) in zip(trained.input_stats, loaded.input_stats):
    np.testing.assert_array_equal(m, lm)
    np.testing.assert_array_equal(s, ls)
  codes = rqvae.encode_and_quantize(trained, tables)[1]
  np.testing.assert_array_equal(rqvae.encode_and_quantize(loaded, tables)[1], codes)


def test_model_saved_before_balance_reads_as_published(tmp_path):
  """A format-1 rqvae.json (no statistics, no balance field) fed its tables unscaled."""
  import json
  tables = scaled_tables(n=256)
  config = dataclasses.replace(SMALL, epochs=1, eval_every=1, balance="none", reset_every=0)
  trained = rqvae.train_rqvae(*tables, config)
  rqvae_store.save_rqvae(str(tmp_path), trained, None)
  meta_path = tmp_path / rqvae_store.META_FILE
  meta = json.loads(meta_path.read_text())
  meta["format_version"] = 1
  del meta["input_stats"], meta["config"]["balance"], meta["config"]["reset_every"]
  del meta["config"]["reset_until"]
  meta_path.write_text(json.dumps(meta))
  loaded, _ = rqvae_store.load_rqvae(str(tmp_path))
  assert loaded.config.balance == "none" and loaded.input_stats is None
  np.testing.assert_array_equal(rqvae.encode_and_quantize(loaded, tables)[1],
                                rqvae.encode_and_quantize(trained, tables)[1])


def test_bad_balance_is_refused():
  with pytest.raises(ValueError, match="balance"):
    dataclasses.replace(SMALL, balance="both")
  with pytest.raises(ValueError, match="reset_every"):
    dataclasses.replace(SMALL, reset_every=-1)
