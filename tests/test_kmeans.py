"""k-means: it must find planted clusters, and stay finite when there are fewer points than k."""
import jax
import numpy as np

from gensar_jax.identifiers import kmeans as kmeans_lib


def test_kmeans_finds_planted_clusters():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(6, 8)).astype(np.float32) * 5.0  # far apart
  labels = np.repeat(np.arange(6), 100)
  x = centres[labels] + 0.05 * rng.normal(size=(600, 8)).astype(np.float32)
  centroids, assign = jax.device_get(kmeans_lib.kmeans(x, jax.random.PRNGKey(1), k=6))
  # Every planted cluster maps onto exactly one found cluster, and vice versa.
  contingency = np.zeros((6, 6), int)
  np.add.at(contingency, (labels, assign), 1)
  assert ((contingency > 0).sum(axis=1) == 1).all()
  assert ((contingency > 0).sum(axis=0) == 1).all()
  # Each found centroid sits on its planted centre.
  matched = centres[contingency.argmax(axis=0)]  # [k, d] planted centre of found cluster j
  assert np.abs(centroids - matched).max() < 0.05


def test_kmeans_with_fewer_points_than_codes_is_finite():
  x = np.array([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]], np.float32)
  centroids, assign = jax.device_get(kmeans_lib.kmeans(x, jax.random.PRNGKey(0), k=8))
  assert centroids.shape == (8, 2) and np.isfinite(centroids).all()
  # Both distinct points are centres, so each point is at distance 0 from its centroid.
  np.testing.assert_allclose(centroids[assign], x, atol=1e-6)
