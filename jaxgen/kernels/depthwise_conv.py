"""Depthwise kxk convolution as kh*kw shifted multiply-adds, with a hand-written VJP.

  y[n, h, w, c] = sum_{i, j} xpad[n, h + i, w + j, c] * w[(n,) i, j, c]

(stride 1, odd kernels, PyTorch padding k//2). XLA:CPU lowers `conv_general_dilated(
feature_group_count=C)` through a generic convolution path, far slower than these fused
elementwise multiply-adds: on DC-AE's GLUMBConv shapes ~45x forward and ~3-5x backward; per
sample (CAN) 24-77x forward and 6-238x value-and-grad against the vmapped conv (BENCHMARKS.md,
`python -m benchmarks.ca_depthwise_conv --impls=xla,shifts`). GPUs and TPUs have fast library
depthwise convs, so `depthwise_conv` keeps XLA's conv there.

The kernel is either shared, (kh, kw, C), or per sample, (N, kh, kw, C) (CAN's condition-aware
depthwise conv). Gradients: dx is the same shifted sum of the cotangent with the flipped
kernel; dw the per-tap correlation of the padded input with the cotangent (summed over the
batch for a shared kernel).
"""

import functools

import jax
import jax.numpy as jnp

from jaxgen.kernels import target


def _pad(x, kh: int, kw: int):
  return jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))


def _taps(w):
  """(kh, kw, C) -> per tap (i, j) a (1, 1, 1, C) weight; (N, kh, kw, C) -> (N, 1, 1, C)."""
  if w.ndim == 3:
    return lambda i, j: w[i, j][None, None, None, :]
  return lambda i, j: w[:, i, j][:, None, None, :]


def _shifted_sum(x, w):
  kh, kw = w.shape[-3:-1]
  h, wd = x.shape[1:3]
  xp, tap = _pad(x, kh, kw), _taps(w)
  terms = (xp[:, i:i + h, j:j + wd, :] * tap(i, j) for i in range(kh) for j in range(kw))
  return functools.reduce(jnp.add, terms)


@jax.custom_vjp
def shifted_depthwise_conv(x, w):
  """x (N, H, W, C), w (kh, kw, C) or (N, kh, kw, C), odd kh, kw -> (N, H, W, C)."""
  return _shifted_sum(x, w)


def _fwd(x, w):
  return _shifted_sum(x, w), (x, w)


def _bwd(res, g):
  x, w = res
  kh, kw = w.shape[-3:-1]
  h, wd = x.shape[1:3]
  flipped = w[::-1, ::-1] if w.ndim == 3 else w[:, ::-1, ::-1]
  dx = _shifted_sum(g, flipped)
  xp = _pad(x, kh, kw)
  axes = (0, 1, 2) if w.ndim == 3 else (1, 2)
  dw = jnp.stack([jnp.stack([jnp.sum(xp[:, i:i + h, j:j + wd, :] * g, axis=axes)
                             for j in range(kw)], axis=-2) for i in range(kh)], axis=-3)
  return dx, dw.astype(w.dtype)


shifted_depthwise_conv.defvjp(_fwd, _bwd)


def xla_depthwise_conv(x, w, stride: int = 1, **conv_kwargs):
  """Shared kernel (kh, kw, C) through `lax.conv_general_dilated`, padding k//2 (conv_kwargs:
  e.g. precision, preferred_element_type)."""
  kh, kw, c = w.shape
  return jax.lax.conv_general_dilated(
      x, w[:, :, None, :], window_strides=(stride, stride),
      padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c, **conv_kwargs)


def shifts_apply(kernel_size, stride: int) -> bool:
  """The shifted sums compute stride-1 convs with odd kernels."""
  return stride == 1 and all(k % 2 for k in kernel_size)


def use_shifts(kernel_size, stride: int) -> bool:
  """Whether `depthwise_conv` takes the shifted sums: where they apply, on CPU (the default
  backend, or the target of a `target.lowering_for` export)."""
  return shifts_apply(kernel_size, stride) and target.platform() == "cpu"


def depthwise_conv(x, w, stride: int = 1):
  """Depthwise conv of x (N, H, W, C) with a shared kernel (kh, kw, C), padding k//2."""
  if use_shifts(w.shape[:2], stride):
    return shifted_depthwise_conv(x, w)
  return xla_depthwise_conv(x, w, stride)
