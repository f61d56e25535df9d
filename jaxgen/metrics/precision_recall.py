"""Improved precision and recall (Kynkaanniemi et al. 2019) of generated features against real.

Each set approximates its manifold by the union of balls around its points, a ball's radius
being the distance to the point's k-th nearest neighbour in its own set (k = 3, the paper's):

  precision = fraction of generated points inside some real ball   (are samples realistic?)
  recall    = fraction of real points inside some generated ball    (is the data covered?)

Distances are computed on the default device (GPU/TPU when the model runs there) in blocks of
rows, in float32 at full matmul precision from |a|^2 + |b|^2 - 2 a.b clipped at 0.
"""

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


@jax.jit
def _sq_dist(a, b):
  aa = jnp.sum(a * a, axis=1)[:, None]
  bb = jnp.sum(b * b, axis=1)[None, :]
  return jnp.maximum(aa + bb - 2.0 * jnp.matmul(a, b.T, precision=_HIGHEST), 0.0)


@functools.partial(jax.jit, static_argnums=2)
def _kth_sq_dist(rows, points, k):
  # The (k+1)-th smallest: each row's own point (distance 0) is among `points`.
  return -jax.lax.top_k(-_sq_dist(rows, points), k + 1)[0][:, k]


@jax.jit
def _covered(queries, centres, radii_sq):
  return jnp.any(_sq_dist(queries, centres) <= radii_sq[None, :], axis=1)


def _blocks(x, block):
  return [x[i:i + block] for i in range(0, len(x), block)]


def knn_radii(features, k: int = 3, block: int = 1024) -> np.ndarray:
  """Squared distance of each point to its k-th nearest neighbour in the same set (N,)."""
  f = jnp.asarray(features, jnp.float32)
  if len(f) <= k:
    raise ValueError(f"k-NN radii with k={k} need more than {k} points, got {len(f)}")
  return np.concatenate([np.asarray(_kth_sq_dist(b, f, k)) for b in _blocks(f, block)])


def coverage_fraction(queries, centres, radii_sq, block: int = 1024) -> float:
  """Fraction of `queries` within some ball (centre, sqrt(radius_sq))."""
  c, r = jnp.asarray(centres, jnp.float32), jnp.asarray(radii_sq, jnp.float32)
  q = jnp.asarray(queries, jnp.float32)
  inside = np.concatenate([np.asarray(_covered(b, c, r)) for b in _blocks(q, block)])
  return float(inside.mean())


def precision_recall(real, fake, k: int = 3, block: int = 1024) -> Tuple[float, float]:
  """(precision, recall) of `fake` (M, D) features against `real` (N, D)."""
  real = np.asarray(real, np.float32).reshape(len(real), -1)
  fake = np.asarray(fake, np.float32).reshape(len(fake), -1)
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"feature sizes differ: real {real.shape}, fake {fake.shape}")
  precision = coverage_fraction(fake, real, knn_radii(real, k, block), block)
  recall = coverage_fraction(real, fake, knn_radii(fake, k, block), block)
  return precision, recall
