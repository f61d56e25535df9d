"""Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2 with the cubic kernel
k(x, y) = (x.y / d + 1)^3, averaged over random subsets (as clean-fid and torch-fidelity).

Per subset of m real (x) and m generated (y) features:

  MMD^2 = sum_{i!=j} k(x_i, x_j) / (m (m-1)) + sum_{i!=j} k(y_i, y_j) / (m (m-1))
          - 2 sum_{i,j} k(x_i, y_j) / m^2

The result is (mean, std) over `num_subsets` subsets of size min(subset_size, N, M), drawn
without replacement (seeded). Kernel matrices run on the default device in float32 at full
matmul precision; their sums are accumulated by XLA's tree reductions.
"""

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


@jax.jit
def _mmd2(x, y):
  m, d = x.shape
  kernel = lambda a, b: (jnp.matmul(a, b.T, precision=_HIGHEST) / d + 1.0) ** 3
  kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
  off = lambda k: jnp.sum(k) - jnp.sum(jnp.diagonal(k))
  return (off(kxx) + off(kyy)) / (m * (m - 1)) - 2.0 * jnp.sum(kxy) / (m * m)


def kernel_inception_distance(real, fake, num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> Tuple[float, float]:
  """(mean, std) of the unbiased MMD^2 over random subsets of real (N, D) and fake (M, D)."""
  real = np.asarray(real, np.float32).reshape(len(real), -1)
  fake = np.asarray(fake, np.float32).reshape(len(fake), -1)
  m = min(subset_size, len(real), len(fake))
  if m < 2:
    raise ValueError(f"KID needs at least 2 samples per set, got {len(real)} and {len(fake)}")
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(num_subsets):
    x = real[rng.choice(len(real), m, replace=False)]
    y = fake[rng.choice(len(fake), m, replace=False)]
    values.append(float(_mmd2(x, y)))
  return float(np.mean(values)), float(np.std(values))
