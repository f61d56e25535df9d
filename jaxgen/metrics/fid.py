"""Frechet distance between Gaussians fitted to two feature sets (the formula behind FID).

  FD = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))

computed in float64 without scipy's general sqrtm: with A = S1^(1/2) from a symmetric
eigendecomposition, A S2 A is symmetric positive semi-definite and similar to S1 S2, so
Tr((S1 S2)^(1/2)) = sum sqrt(eigvalsh(A S2 A)). Both eigendecompositions are of symmetric
matrices (stable, real); eigenvalues that round-off makes slightly negative are clipped to 0.

FID proper is this distance on the 2048-d pool features of the TF Inception network (no
Inception weights ship with any installed package); jaxgen's offline evaluations use the
penultimate features of its own digit classifier (`jaxgen.metrics.classifier`), a distance
comparable only between runs scored by the same classifier.
"""

from typing import Tuple

import numpy as np


def feature_statistics(features) -> Tuple[np.ndarray, np.ndarray]:
  """(mean, covariance) in float64 of features (N, D); the covariance has N - 1 in the denominator."""
  f = np.asarray(features, np.float64).reshape(len(features), -1)
  if len(f) < 2:
    raise ValueError(f"feature statistics need at least 2 samples, got {len(f)}")
  return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues -> 0)."""
  vals, vecs = np.linalg.eigh((s + s.T) / 2)
  return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
    raise ValueError(f"shapes differ: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
  a = _sqrt_psd(s1)
  m = a @ s2 @ a
  tr_sqrt = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None))))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def feature_frechet_distance(features1, features2) -> float:
  """Frechet distance between the Gaussians fitted to two feature sets (N1, D) and (N2, D)."""
  return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))
