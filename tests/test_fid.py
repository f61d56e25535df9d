"""Frechet distance (jaxgen.metrics.fid): scipy's sqrtm formula, closed forms, degenerate inputs."""

import numpy as np
import pytest
from scipy import linalg

from jaxgen.metrics.fid import feature_frechet_distance, feature_statistics, frechet_distance


def scipy_frechet(mu1, s1, mu2, s2):
  """The pytorch-fid formula: Tr((S1 S2)^(1/2)) from scipy.linalg.sqrtm."""
  covmean = linalg.sqrtm(s1 @ s2)
  covmean = np.real(covmean)
  diff = mu1 - mu2
  return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def _features(rng, n, d, shift=0.0):
  mix = rng.standard_normal((d, d)) / np.sqrt(d)
  return rng.standard_normal((n, d)) @ mix + shift


@pytest.mark.parametrize("d", [1, 8, 64])
def test_matches_scipy_sqrtm(d):
  rng = np.random.default_rng(d)
  mu1, s1 = feature_statistics(_features(rng, 500, d))
  mu2, s2 = feature_statistics(_features(rng, 400, d, shift=0.3))
  ours, ref = frechet_distance(mu1, s1, mu2, s2), scipy_frechet(mu1, s1, mu2, s2)
  assert ours == pytest.approx(ref, rel=1e-6)
  assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ours, rel=1e-9)  # Symmetric.


def test_closed_forms():
  # Diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
  a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
  want = 1.0 + 4.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-12)
  # Identical Gaussians: 0 (up to round-off), also for a singular covariance.
  rng = np.random.default_rng(0)
  mu, s = feature_statistics(_features(rng, 300, 32))
  assert abs(frechet_distance(mu, s, mu, s)) < 1e-9 * np.trace(s)
  low = _features(rng, 10, 32)  # 10 samples in 32-d: rank-9 covariance.
  # The 23 zero eigenvalues come out as ~1e-16 round-off, whose square roots add ~1e-8 each.
  assert abs(feature_frechet_distance(low, low)) < 1e-6 * np.trace(np.cov(low, rowvar=False))
  # Scalars: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s1, s2.
  assert frechet_distance(1.0, 4.0, 0.0, 1.0) == pytest.approx(1.0 + 1.0)


def test_rank_deficient_matches_scipy_and_is_nonnegative():
  rng = np.random.default_rng(1)
  f1, f2 = _features(rng, 20, 48), _features(rng, 30, 48, shift=0.1)
  ours = feature_frechet_distance(f1, f2)
  ref = scipy_frechet(*feature_statistics(f1), *feature_statistics(f2))
  assert ours >= 0 and ours == pytest.approx(ref, rel=1e-5)


def test_shape_errors():
  with pytest.raises(ValueError, match="shapes differ"):
    frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
  with pytest.raises(ValueError, match="at least 2"):
    feature_statistics(np.zeros((1, 4)))


def test_exported_from_the_package():
  import jaxgen.metrics  # pylint: disable=g-import-not-at-top
  assert jaxgen.metrics.frechet_distance is frechet_distance
  rng = np.random.default_rng(5)
  mu1, s1 = feature_statistics(_features(rng, 300, 16))
  mu2, s2 = feature_statistics(_features(rng, 300, 16, shift=1.0))
  assert jaxgen.metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
      scipy_frechet(mu1, s1, mu2, s2), rel=1e-6)
