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

Reference statistics are computed once and kept as .npz with pytorch-fid's key names ("mu",
"sigma"; `python -m pytorch_fid --save-stats` files load as they are), optionally with the
features themselves ("features": precision/recall and KID need them) and a JSON "meta" string
saying what they were computed from.
"""

import json
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np

from jaxgen.errors import DataError


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


def save_statistics(path: str, features=None, *, mu=None, sigma=None,
                    meta: Optional[Dict[str, Any]] = None, keep_features: bool = True) -> None:
  """Writes {mu, sigma[, features][, meta]} to `path` (.npz); mu/sigma from `features` unless
  given. Written to a temporary name first, so a reader never sees a partial file."""
  if features is not None:
    features = np.asarray(features).reshape(len(features), -1)
    if mu is None or sigma is None:
      mu, sigma = feature_statistics(features)  # From the features as given (float64 math).
    features = features.astype(np.float32)
  if mu is None or sigma is None:
    raise ValueError("save_statistics needs features or both mu and sigma")
  arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
  if features is not None and keep_features:
    arrays["features"] = features
  if meta is not None:
    arrays["meta"] = np.asarray(json.dumps(meta, sort_keys=True))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def load_statistics(path: str) -> Dict[str, Any]:
  """{"mu", "sigma", "features" (or None), "meta" (dict or None)} from a .npz of
  `save_statistics` or pytorch-fid's --save-stats."""
  if not os.path.isfile(path):
    raise DataError(f"reference statistics {path} not found")
  try:
    with np.load(path, allow_pickle=False) as f:
      if "mu" not in f or "sigma" not in f:
        raise DataError(f"{path} has no 'mu' and 'sigma' arrays (keys: {sorted(f.keys())})")
      return {"mu": np.asarray(f["mu"], np.float64), "sigma": np.asarray(f["sigma"], np.float64),
              "features": np.asarray(f["features"]) if "features" in f else None,
              "meta": json.loads(str(f["meta"])) if "meta" in f else None}
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: unreadable reference statistics ({e})") from None
