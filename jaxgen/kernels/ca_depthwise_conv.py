"""Condition-aware depthwise convolution: one kxk depthwise kernel per sample.

`ca_depthwise_conv(x, w, b)` computes, for every sample n and channel c,

  y[n, h, w, c] = b[n, c] + sum_{i, j} xpad[n, h*s + i, w*s + j, c] * w[n, i, j, c]

with PyTorch-style symmetric padding (kh//2, kw//2), i.e. "SAME" for odd kernels at stride 1.
This is CAN's condition-aware depthwise conv (the kernel is W + W_c(condition), different per
sample), the only CAN layer whose per-sample weights are not a plain batched matmul.

Implementations (`impl`):
  "pallas": a Pallas kernel. Grid (batch, channel blocks, output-row blocks); each program loads
      the kh*kw shifted windows of its padded tile and accumulates them in fp32. Strides > 1
      are handled by a polyphase split in the wrapper, so every in-kernel load is a unit-stride
      window. Lowers with Triton on GPU (all loaded tiles have power-of-2 sizes: channels and
      width are padded) and Mosaic on TPU; on CPU it runs the same kernel with interpret=True.
  "xla": `vmap` over the batch of `lax.conv_general_dilated(feature_group_count=C)`.
  "shifts": kh*kw shifted multiply-adds with the per-sample taps (`jaxgen.kernels.
      depthwise_conv`; odd kernels): XLA:CPU's fast path. A stride s > 1 takes every s-th row
      and column of the stride-1 sums (the same numbers: with padding k//2, output (h, w) of
      stride s is output (s*h, s*w) of stride 1); XLA:CPU's vmapped strided conv instead
      needs GiBs of scratch for its gradient at CaT's downsampling shapes (batch 32, 512
      channels, 8x8: 4.6 GiB, 18 GFLOP more per train step than the rest of a small CaT).
  "folded": the batch folded into the channels, one grouped conv (CAN's reference form; kept for
      the benchmark only).
  "auto": "pallas" on GPU / TPU; elsewhere "shifts" for odd kernels on CPU, else "xla" (the
      platform is the default backend, or the target inside `jaxgen.kernels.target.
      lowering_for`, which jax.export artifacts are traced in: "xla" for a CUDA artifact).

Gradients of the Pallas path come from a `jax.custom_vjp`: dx is the same Pallas kernel with
the spatially flipped kernel (stride 1, odd kernels; XLA otherwise), dw is a per-sample
correlation and db a spatial sum, both in XLA.

Under a mesh: a Pallas call is opaque to XLA's SPMD partitioner (a custom call on GPU / TPU,
a loop of dynamic slices in interpret mode), which would all-gather a batch-sharded x, w and b
onto every device and compute the whole global batch everywhere. Traced under a mesh context
(`sharding.mesh_context`, or `jax.set_mesh`; jaxgen's train step and `BatchRunner` set it)
whose batch axes (data, fsdp) split the batch, the Pallas path runs in `jax.shard_map` over
those axes instead (`sharding.on_batch_shards`): each device convolves its own samples (the
conv is independent per sample, so nothing is communicated). Channels stay whole on
each device. The "xla" and "shifts" paths are ordinary XLA ops that the partitioner splits
by itself.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxgen import sharding
from jaxgen.kernels import depthwise_conv as dw_lib
from jaxgen.kernels import target

IMPLS = ("auto", "pallas", "xla", "shifts", "folded")

# Backend specifics, kept in this one table. block_c: channels per program (a power of 2;
# 128 = one TPU lane row); tile: output elements per program (rows are chosen to fit);
# num_warps / num_stages: Triton launch parameters.
_BLOCKS = {
    "gpu": dict(block_c=64, tile=8192, num_warps=4, num_stages=1),
    "tpu": dict(block_c=128, tile=64 * 1024),
    "cpu": dict(block_c=8, tile=1024),  # interpret mode: small blocks exercise the tiling.
}


def _next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _platform() -> str:
  """The Pallas platform: "gpu" / "tpu" as `target.platform()` (the default backend or an
  export's target), else "cpu" (interpret mode)."""
  platform = target.platform()
  return platform if platform in ("gpu", "tpu") else "cpu"


def output_size(size: int, k: int, stride: int) -> int:
  """Output length of a conv with symmetric padding k//2 (PyTorch `padding=k//2`)."""
  return (size + 2 * (k // 2) - k) // stride + 1


# ------------------------------------------------------------------------------------------------
# XLA references.


def _conv_one(x, w, stride):
  """One sample: x (H, W, C), w (kh, kw, C) -> (Ho, Wo, C), depthwise, fp32 accumulation."""
  return dw_lib.xla_depthwise_conv(x[None], w, stride, precision=jax.lax.Precision.HIGHEST,
                                   preferred_element_type=jnp.float32)[0]


def _add_bias(y, b):
  if b is not None:
    y = y + b.astype(jnp.float32)[:, None, None, :]
  return y


def ca_depthwise_conv_xla(x, w, b=None, *, stride: int = 1):
  """`vmap` over the batch of a depthwise `lax.conv_general_dilated`."""
  y = jax.vmap(functools.partial(_conv_one, stride=stride))(x, w.astype(x.dtype))
  return _add_bias(y, b).astype(x.dtype)


def ca_depthwise_conv_folded(x, w, b=None, *, stride: int = 1):
  """Batch folded into channels: one conv with B*C groups (the grouped-conv form of CAN)."""
  n, h, wd, c = x.shape
  kh, kw = w.shape[1:3]
  xf = x.transpose(1, 2, 0, 3).reshape(1, h, wd, n * c)         # channel index n*C + c
  wf = w.astype(x.dtype).transpose(1, 2, 0, 3).reshape(kh, kw, 1, n * c)
  y = jax.lax.conv_general_dilated(
      xf, wf, window_strides=(stride, stride),
      padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=n * c,
      precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  ho, wo = y.shape[1:3]
  y = y.reshape(ho, wo, n, c).transpose(2, 0, 1, 3)
  return _add_bias(y, b).astype(x.dtype)


# ------------------------------------------------------------------------------------------------
# Pallas kernel.


def _kernel(x_ref, w_ref, b_ref, o_ref, *, kh, kw, stride, rows):
  """One program: `rows` output rows x all (padded) columns x one channel block.

  x_ref: (stride**2, Hq, Wq, bc) polyphase input of this sample / channel block;
  w_ref: (kh, kw, bc); b_ref: (bc,); o_ref: (rows, Wo_pad, bc).
  """
  _, wo_pad, _ = o_ref.shape
  r0 = pl.program_id(2) * rows
  acc = jnp.zeros(o_ref.shape, jnp.float32) + b_ref[...].astype(jnp.float32)
  for i in range(kh):
    for j in range(kw):
      phase = (i % stride) * stride + (j % stride)
      window = x_ref[phase, pl.ds(r0 + i // stride, rows), pl.ds(j // stride, wo_pad), :]
      acc += window.astype(jnp.float32) * w_ref[i, j, :].astype(jnp.float32)
  o_ref[...] = acc.astype(o_ref.dtype)


def _pallas_forward(x, w, b, stride: int, platform: str):
  """Pads, splits phases, runs the kernel and crops. x (B,H,W,C), w (B,kh,kw,C), b (B,C)."""
  n, h, wd, c = x.shape
  kh, kw = w.shape[1:3]
  s = stride
  ho, wo = output_size(h, kh, s), output_size(wd, kw, s)
  cfg = _BLOCKS[platform]
  bc = min(cfg["block_c"], _next_pow2(c))
  c_pad = _round_up(c, bc)
  wo_pad = _next_pow2(wo)
  rows = max(1, min(_next_pow2(ho), cfg["tile"] // (wo_pad * bc)))
  rows = 1 << (rows.bit_length() - 1)  # a power of 2 no larger than the budget.
  ho_pad = _round_up(ho, rows)
  # Polyphase layout: padded row r = s*q + a lives at phase a, index q. Tap i of output row o
  # reads q = o + i//s, so the phases need Ho_pad + (kh-1)//s rows (likewise columns).
  hq, wq = ho_pad + (kh - 1) // s, wo_pad + (kw - 1) // s
  ph, pw = kh // 2, kw // 2

  def pad_to(a, axis, before, total):
    after = max(0, total - a.shape[axis] - before)
    widths = [(0, 0)] * a.ndim
    widths[axis] = (before, after)
    return jax.lax.slice_in_dim(jnp.pad(a, widths), 0, total, axis=axis)

  xp = pad_to(pad_to(x, 1, ph, s * hq), 2, pw, s * wq)
  xp = pad_to(xp, 3, 0, c_pad)
  xp = xp.reshape(n, hq, s, wq, s, c_pad).transpose(0, 2, 4, 1, 3, 5)
  xp = xp.reshape(n, s * s, hq, wq, c_pad)
  wp = pad_to(w, 3, 0, c_pad)
  bp = pad_to(b, 1, 0, c_pad)

  grid = (n, c_pad // bc, ho_pad // rows)
  if platform == "gpu":
    from jax.experimental.pallas import triton as pl_triton  # pylint: disable=g-import-not-at-top
    params = dict(compiler_params=pl_triton.CompilerParams(
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
  elif platform == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    params = dict(compiler_params=pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel")))
  else:
    params = dict(interpret=True)
  sq = pl.squeezed
  out = pl.pallas_call(
      functools.partial(_kernel, kh=kh, kw=kw, stride=s, rows=rows),
      out_shape=jax.ShapeDtypeStruct((n, ho_pad, wo_pad, c_pad), x.dtype),
      grid=grid,
      in_specs=[
          pl.BlockSpec((sq, s * s, hq, wq, bc), lambda bi, ci, ri: (bi, 0, 0, 0, ci)),
          pl.BlockSpec((sq, kh, kw, bc), lambda bi, ci, ri: (bi, 0, 0, ci)),
          pl.BlockSpec((sq, bc), lambda bi, ci, ri: (bi, ci)),
      ],
      out_specs=pl.BlockSpec((sq, rows, wo_pad, bc), lambda bi, ci, ri: (bi, ri, 0, ci)),
      name="ca_depthwise_conv",
      **params,
  )(xp, wp, bp)
  return out[:, :ho, :wo, :c]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _pallas_conv(x, w, b, stride, platform):
  return _pallas_forward(x, w, b, stride, platform)


def _pallas_conv_fwd(x, w, b, stride, platform):
  return _pallas_forward(x, w, b, stride, platform), (x, w, b)


def _pallas_conv_bwd(stride, platform, res, g):
  x, w, b = res
  kh, kw = w.shape[1:3]
  if stride == 1 and kh % 2 and kw % 2:
    # Symmetric padding k//2 == k-1-k//2 for odd k: dx is the same conv with the flipped kernel.
    dx = _pallas_forward(g, w[:, ::-1, ::-1, :], jnp.zeros_like(b), 1, platform)
  else:
    dx = jax.vjp(lambda x_: ca_depthwise_conv_xla(x_, w, stride=stride), x)[1](g)[0]
  # dw[n, i, j, c] = sum_{h, w} g[n, h, w, c] * xpad[n, h*s + i, w*s + j, c].
  dw = jax.vjp(lambda w_: ca_depthwise_conv_xla(x, w_, stride=stride), w)[1](g)[0]
  db = jnp.sum(g.astype(jnp.float32), axis=(1, 2))
  return dx.astype(x.dtype), dw.astype(w.dtype), db.astype(b.dtype)


_pallas_conv.defvjp(_pallas_conv_fwd, _pallas_conv_bwd)


def ca_depthwise_conv_pallas(x, w, b=None, *, stride: int = 1, platform: Optional[str] = None):
  """The Pallas path; `platform` ("gpu", "tpu", "cpu" = interpret mode) defaults to the backend.
  Under a mesh that splits the batch it runs on each device's samples
  (`sharding.on_batch_shards`)."""
  platform = platform or _platform()
  bias = jnp.zeros((x.shape[0], x.shape[-1]), x.dtype) if b is None else b
  return sharding.on_batch_shards(
      lambda x_, w_, b_: _pallas_conv(x_, w_, b_, stride, platform), x, w, bias)


# ------------------------------------------------------------------------------------------------
# Public entry point.


def resolve_impl(impl: str, kernel_size=(3, 3), stride: int = 1) -> str:
  """"auto" -> "pallas" where the kernel compiles for the platform (`target.platform()`: GPU,
  TPU; not in a GPU export, where its Triton custom call is not stable: `target`), else
  "shifts" on CPU (odd kernels, any stride: strided by subsampling), else "xla"."""
  del stride  # "shifts" computes every stride (see the module docstring).
  if impl not in IMPLS:
    raise ValueError(f"unknown ca_depthwise_conv impl {impl!r}; choose from {IMPLS}")
  if impl == "auto":
    if target.pallas_available():
      return "pallas"
    return "shifts" if dw_lib.use_shifts(kernel_size, 1) else "xla"
  if impl == "shifts" and not dw_lib.shifts_apply(kernel_size, 1):
    raise ValueError(f"impl 'shifts' needs odd kernels, got kernel {tuple(kernel_size)}; use "
                     "impl='xla'")
  return impl


def ca_depthwise_conv(x, w, b=None, *, stride: int = 1, impl: str = "auto"):
  """Per-sample depthwise conv. x (B, H, W, C), w (B, kh, kw, C), b (B, C) or None -> (B, Ho, Wo, C).

  Padding is symmetric kh//2, kw//2 (PyTorch style; "SAME" for odd kernels at stride 1), so
  Ho = (H + 2*(kh//2) - kh) // stride + 1. The output has x's dtype; accumulation is fp32.
  """
  if x.ndim != 4 or w.ndim != 4 or w.shape[0] != x.shape[0] or w.shape[3] != x.shape[3]:
    raise ValueError(f"expected x (B, H, W, C) and w (B, kh, kw, C); got {x.shape}, {w.shape}")
  if b is not None and b.shape != (x.shape[0], x.shape[3]):
    raise ValueError(f"expected b of shape {(x.shape[0], x.shape[3])}; got {b.shape}")
  if stride < 1:
    raise ValueError(f"stride must be >= 1, got {stride}")
  impl = resolve_impl(impl, w.shape[1:3], stride)
  if impl == "shifts":
    y = dw_lib.shifted_depthwise_conv(x.astype(jnp.float32), w.astype(jnp.float32))
    return _add_bias(y[:, ::stride, ::stride], b).astype(x.dtype)
  if impl == "xla":
    return ca_depthwise_conv_xla(x, w, b, stride=stride)
  if impl == "folded":
    return ca_depthwise_conv_folded(x, w, b, stride=stride)
  return ca_depthwise_conv_pallas(x, w, b, stride=stride)


def bytes_moved(x_shape, k: int, stride: int = 1, itemsize: int = 4, bias: bool = True) -> int:
  """Minimum HBM traffic of one call (read x, w, b once; write y once), for roofline numbers."""
  n, h, wd, c = x_shape
  ho, wo = output_size(h, k, stride), output_size(wd, k, stride)
  elems = n * h * wd * c + n * k * k * c + (n * c if bias else 0) + n * ho * wo * c
  return elems * itemsize


def flops(x_shape, k: int, stride: int = 1) -> int:
  """Multiply-adds counted as 2 FLOPs."""
  n, h, wd, c = x_shape
  return 2 * n * output_size(h, k, stride) * output_size(wd, k, stride) * c * k * k

