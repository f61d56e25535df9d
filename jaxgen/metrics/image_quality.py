"""Full-reference image quality: PSNR, SSIM, and the bicubic down/up-sampling baseline.

Images are NHWC floats in [-1, 1] (jaxgen's convention); both metrics clip to that range and
measure on [0, 1] (data range 1), per image, so a dataset score is the mean over images.

  PSNR = 10 log10(1 / MSE), MSE over all pixels and channels of one image.
  SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, population
    (co)variances, per channel over the valid (unpadded) window positions, averaged over
    positions and channels; equal to skimage's structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=-1).
"""

import math
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np


def _unit(x):
  return (jnp.clip(jnp.asarray(x, jnp.float32), -1.0, 1.0) + 1.0) * 0.5


@jax.jit
def psnr(x, y):
  """(B,) PSNR in dB of images in [-1, 1] (data range 1 after mapping to [0, 1])."""
  mse = jnp.mean(jnp.square(_unit(x) - _unit(y)), axis=(1, 2, 3))
  return 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-12))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  """Normalised 1-D Gaussian taps."""
  r = np.arange(size, dtype=np.float64) - (size - 1) / 2
  w = np.exp(-0.5 * (r / sigma) ** 2)
  return (w / w.sum()).astype(np.float32)


def _filter(x, taps):
  """Separable 'valid' filtering of (B, H, W, C) with 1-D `taps` along H then W."""
  c = x.shape[-1]
  k = taps.shape[0]
  hi = jax.lax.Precision.HIGHEST
  kh = jnp.tile(taps.reshape(k, 1, 1, 1), (1, 1, 1, c))
  kw = jnp.tile(taps.reshape(1, k, 1, 1), (1, 1, 1, c))
  dn = ("NHWC", "HWIO", "NHWC")
  x = jax.lax.conv_general_dilated(x, kh, (1, 1), "VALID", dimension_numbers=dn,
                                   feature_group_count=c, precision=hi)
  return jax.lax.conv_general_dilated(x, kw, (1, 1), "VALID", dimension_numbers=dn,
                                      feature_group_count=c, precision=hi)


@jax.jit
def ssim(x, y):
  """(B,) SSIM of images in [-1, 1]; H and W must be at least 11."""
  x, y = _unit(x), _unit(y)
  taps = jnp.asarray(gaussian_window())
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  mx, my = _filter(x, taps), _filter(y, taps)
  sxx = _filter(x * x, taps) - mx * mx
  syy = _filter(y * y, taps) - my * my
  sxy = _filter(x * y, taps) - mx * my
  s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
  return jnp.mean(s, axis=(1, 2, 3))


def bicubic_sizes(latent_floats: int, channels: int = 3) -> Tuple[int, ...]:
  """Sides of the square images that hold as many numbers as a latent of `latent_floats`:
  (s,) when s*s*C == latent_floats, else (floor, ceil) of sqrt(latent_floats / C), the
  largest image with fewer numbers and the smallest with more."""
  lo = max(1, math.isqrt(latent_floats // channels))
  while (lo + 1) ** 2 * channels <= latent_floats:
    lo += 1
  return (lo,) if lo * lo * channels == latent_floats else (lo, lo + 1)


def bicubic_roundtrip(x, size: int) -> np.ndarray:
  """Bicubic (Keys a=-0.5, antialiased) downsample of NHWC `x` to size x size and back."""
  b, h, w, c = x.shape
  small = jax.image.resize(jnp.asarray(x, jnp.float32), (b, size, size, c), "bicubic",
                           antialias=True)
  return np.asarray(jax.image.resize(small, (b, h, w, c), "bicubic", antialias=True))


def summarize(values) -> Tuple[float, float]:
  """(mean, standard error) of per-image scores."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
