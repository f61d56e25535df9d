"""EfficientViT building blocks (mit-han-lab efficientvit `nn/ops.py`), NHWC.

Shared by DC-AE (`jaxgen/models/dcae.py`) and the CaT diffusion backbone. As in ops.py, the
blocks (ConvLayer, ResBlock, MBConv, FusedMBConv, GLUMBConv, LiteMLA) are *main branches*
without the identity shortcut; `EfficientViTBlock` adds its two shortcuts itself. Per-layer
options come as tuples (one entry per conv), a scalar meaning "the same for every conv".

Norms are named "rms_norm" (RMSNorm over channels, weight+bias, eps 1e-5), "batch_norm"
(running statistics in the `batch_stats` collection, PyTorch momentum 0.1) or None; the
efficientvit spellings "trms2d" / "rms2d" / "bn2d" are accepted too.

Substituting a conv (CaT's condition-aware depthwise conv): `ConvLayer(conv_cls=...)`,
`MBConv(depthwise_conv_cls=...)` and `FusedMBConv(spatial_conv_cls=...)` take any module class
called as `conv_cls(features=, kernel_size=, strides=, padding=, feature_group_count=,
use_bias=, dtype=, name="conv")`; extra keyword arguments given to the block's `__call__`
(e.g. the condition embedding) are passed on to that conv's `__call__`.
"""

from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
from flax.linen import dtypes as flax_dtypes
import jax
import jax.numpy as jnp

from jaxgen.kernels import depthwise_conv as dw_lib

Dtype = Any
PerConv = Union[Any, Sequence[Any]]

_NORM_ALIASES = {"rms_norm": "rms_norm", "trms2d": "rms_norm", "rms2d": "rms_norm",
                 "batch_norm": "batch_norm", "bn2d": "batch_norm"}


def per_conv(value: PerConv, n: int) -> Tuple:
  """A scalar or an n-sequence -> an n-tuple (efficientvit's `val2tuple`)."""
  if isinstance(value, (tuple, list)):
    if len(value) != n:
      raise ValueError(f"expected {n} per-conv values, got {value!r}")
    return tuple(value)
  return (value,) * n


def activation(name: Optional[str]) -> Callable[[jax.Array], jax.Array]:
  """efficientvit / diffusers activation names -> functions (None: identity)."""
  name = "identity" if name is None else name
  fns = {
      "identity": lambda x: x,
      "relu": nn.relu,
      "relu6": nn.relu6,
      "silu": nn.silu,
      "swish": nn.silu,
      "gelu": lambda x: nn.gelu(x, approximate=True),  # efficientvit uses GELU(tanh).
      "gelu_exact": lambda x: nn.gelu(x, approximate=False),
      "hswish": nn.hard_swish,
  }
  if name not in fns:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(fns)}")
  return fns[name]


def pixel_unshuffle(x: jax.Array, factor: int) -> jax.Array:
  """(B, H*r, W*r, C) -> (B, H, W, C*r*r); channel c*r*r + i*r + j as torch's pixel_unshuffle."""
  b, h, w, c = x.shape
  r = factor
  x = x.reshape(b, h // r, r, w // r, r, c)
  x = x.transpose(0, 1, 3, 5, 2, 4)  # (B, H, W, C, r_i, r_j)
  return x.reshape(b, h // r, w // r, c * r * r)


def pixel_shuffle(x: jax.Array, factor: int) -> jax.Array:
  """(B, H, W, C*r*r) -> (B, H*r, W*r, C); the inverse of `pixel_unshuffle`."""
  b, h, w, c = x.shape
  r = factor
  x = x.reshape(b, h, w, c // (r * r), r, r)
  x = x.transpose(0, 1, 4, 2, 5, 3)  # (B, H, r_i, W, r_j, C)
  return x.reshape(b, h * r, w * r, c // (r * r))


class RMSNorm2d(nn.Module):
  """RMSNorm over the channel axis with weight and bias; statistics in fp32."""
  eps: float = 1e-5
  use_bias: bool = True
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    y = y * self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return y.astype(self.dtype or x.dtype)


def apply_norm(kind: Optional[str], x, train: bool, name: str, dtype: Optional[Dtype] = None):
  """Applies a named norm as a submodule `name` of the calling (compact) module."""
  if kind is None:
    return x
  if kind not in _NORM_ALIASES:
    raise ValueError(f"unknown norm {kind!r}; known: {sorted(_NORM_ALIASES)} or None")
  if _NORM_ALIASES[kind] == "rms_norm":
    return RMSNorm2d(dtype=dtype, name=name)(x)
  # PyTorch BatchNorm2d(momentum=0.1, eps=1e-5) == flax momentum 0.9.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      name=name)(x)


class DepthwiseConv(nn.Module):
  """`nn.Conv(feature_group_count=features)` for odd kernels with padding k//2, with nn.Conv's
  parameters (`kernel` (k, k, 1, C), `bias`) and dtype rules, computed by
  `jaxgen.kernels.depthwise_conv` (shifted multiply-adds on CPU, where XLA's grouped conv is
  slow). Takes ConvLayer's conv_cls arguments."""
  features: int
  kernel_size: Tuple[int, int]
  strides: Tuple[int, int] = (1, 1)
  padding: Any = None  # Must be k//2 on each side (checked).
  feature_group_count: Optional[int] = None
  use_bias: bool = True
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x):
    c, (kh, kw) = x.shape[-1], self.kernel_size
    expected = ((kh // 2, kh // 2), (kw // 2, kw // 2))
    if (self.features != c or self.feature_group_count not in (None, c) or kh % 2 == 0
        or self.strides[0] != self.strides[1]
        or tuple(map(tuple, self.padding or expected)) != expected):
      raise ValueError(f"DepthwiseConv: {c} -> {self.features} channels, groups "
                       f"{self.feature_group_count}, kernel {self.kernel_size}, padding "
                       f"{self.padding}: needs features = groups = input channels, odd "
                       "kernels and padding k//2")
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, 1, c))
    bias = self.param("bias", nn.initializers.zeros_init(), (c,)) if self.use_bias else None
    x, kernel, bias = flax_dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = dw_lib.depthwise_conv(x, kernel[:, :, 0, :], stride=self.strides[0])
    return y if bias is None else y + bias


class ConvLayer(nn.Module):
  """conv (PyTorch padding k//2 * dilation) -> optional norm -> optional activation.

  Children: `conv` (kernel HWIO, bias) and `norm`. A depthwise conv (groups = features = input
  channels) is a `DepthwiseConv`, with the same parameters.
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  dilation: int = 1
  groups: int = 1
  use_bias: bool = False
  norm: Optional[str] = None
  act: Optional[str] = None
  dtype: Optional[Dtype] = None
  conv_cls: Optional[Callable[..., nn.Module]] = None

  @nn.compact
  def __call__(self, x, train: bool = False, **conv_kwargs):
    pad = self.kernel_size // 2 * self.dilation
    # Explicit padding: flax's "SAME" pads stride-2 convs asymmetrically, PyTorch does (p, p).
    kwargs = dict(features=self.features, kernel_size=(self.kernel_size, self.kernel_size),
                  strides=(self.strides, self.strides), padding=((pad, pad), (pad, pad)),
                  feature_group_count=self.groups, use_bias=self.use_bias, dtype=self.dtype,
                  name="conv")
    if self.conv_cls is not None:
      conv = self.conv_cls(**kwargs)
    elif self.groups == self.features == x.shape[-1] > 1 and self.dilation == 1 and \
        self.kernel_size % 2:
      conv = DepthwiseConv(**kwargs)
    else:
      conv = nn.Conv(kernel_dilation=(self.dilation, self.dilation), **kwargs)
    x = conv(x, **conv_kwargs)
    x = apply_norm(self.norm, x, train, "norm", self.dtype)
    return activation(self.act)(x)


class ResBlock(nn.Module):
  """kxk conv -> kxk conv (main branch only; DC-AE wraps it with an identity shortcut).

  DC-AE: use_bias (True, False), norm (None, norm), act (act, None).
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  mid_channels: Optional[int] = None
  expand_ratio: float = 1.0
  use_bias: PerConv = False
  norm: PerConv = ("batch_norm", "batch_norm")
  act: PerConv = ("relu6", None)
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    use_bias, norm, act = (per_conv(v, 2) for v in (self.use_bias, self.norm, self.act))
    mid = self.mid_channels or round(x.shape[-1] * self.expand_ratio)
    x = ConvLayer(mid, self.kernel_size, self.strides, use_bias=use_bias[0], norm=norm[0],
                  act=act[0], dtype=self.dtype, name="conv1")(x, train)
    return ConvLayer(self.features, self.kernel_size, 1, use_bias=use_bias[1], norm=norm[1],
                     act=act[1], dtype=self.dtype, name="conv2")(x, train)


class MBConv(nn.Module):
  """Inverted bottleneck: 1x1 expand -> depthwise kxk (stride) -> 1x1 project.

  Children `inverted_conv`, `depth_conv`, `point_conv`. `depthwise_conv_cls` replaces the
  depthwise conv module; keyword arguments of `__call__` are passed to it.
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  mid_channels: Optional[int] = None
  expand_ratio: float = 6.0
  use_bias: PerConv = False
  norm: PerConv = ("batch_norm", "batch_norm", "batch_norm")
  act: PerConv = ("relu6", "relu6", None)
  dtype: Optional[Dtype] = None
  depthwise_conv_cls: Optional[Callable[..., nn.Module]] = None

  @nn.compact
  def __call__(self, x, train: bool = False, **depthwise_kwargs):
    use_bias, norm, act = (per_conv(v, 3) for v in (self.use_bias, self.norm, self.act))
    mid = self.mid_channels or round(x.shape[-1] * self.expand_ratio)
    x = ConvLayer(mid, 1, use_bias=use_bias[0], norm=norm[0], act=act[0], dtype=self.dtype,
                  name="inverted_conv")(x, train)
    x = ConvLayer(mid, self.kernel_size, self.strides, groups=mid, use_bias=use_bias[1],
                  norm=norm[1], act=act[1], dtype=self.dtype, conv_cls=self.depthwise_conv_cls,
                  name="depth_conv")(x, train, **depthwise_kwargs)
    return ConvLayer(self.features, 1, use_bias=use_bias[2], norm=norm[2], act=act[2],
                     dtype=self.dtype, name="point_conv")(x, train)


class FusedMBConv(nn.Module):
  """kxk expand (stride, optionally grouped) -> 1x1 project.

  Children `spatial_conv`, `point_conv`. `spatial_conv_cls` replaces the kxk conv module;
  keyword arguments of `__call__` are passed to it.
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  mid_channels: Optional[int] = None
  expand_ratio: float = 6.0
  groups: int = 1
  use_bias: PerConv = False
  norm: PerConv = ("batch_norm", "batch_norm")
  act: PerConv = ("relu6", None)
  dtype: Optional[Dtype] = None
  spatial_conv_cls: Optional[Callable[..., nn.Module]] = None

  @nn.compact
  def __call__(self, x, train: bool = False, **spatial_kwargs):
    use_bias, norm, act = (per_conv(v, 2) for v in (self.use_bias, self.norm, self.act))
    mid = self.mid_channels or round(x.shape[-1] * self.expand_ratio)
    x = ConvLayer(mid, self.kernel_size, self.strides, groups=self.groups, use_bias=use_bias[0],
                  norm=norm[0], act=act[0], dtype=self.dtype, conv_cls=self.spatial_conv_cls,
                  name="spatial_conv")(x, train, **spatial_kwargs)
    return ConvLayer(self.features, 1, use_bias=use_bias[1], norm=norm[1], act=act[1],
                     dtype=self.dtype, name="point_conv")(x, train)


class GLUMBConv(nn.Module):
  """1x1 expand to 2*mid -> depthwise kxk -> split (x, gate) -> x * act(gate) -> 1x1 project.

  acts: (after the expansion, on the gate, after the projection). DC-AE / Sana use
  use_bias (True, True, False), norm (None, None, "rms_norm"), act ("silu", "silu", None).
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  mid_channels: Optional[int] = None
  expand_ratio: float = 4.0
  use_bias: PerConv = (True, True, False)
  norm: PerConv = (None, None, "rms_norm")
  act: PerConv = ("silu", "silu", None)
  dtype: Optional[Dtype] = None
  depthwise_conv_cls: Optional[Callable[..., nn.Module]] = None

  @nn.compact
  def __call__(self, x, train: bool = False, **depthwise_kwargs):
    use_bias, norm, act = (per_conv(v, 3) for v in (self.use_bias, self.norm, self.act))
    mid = self.mid_channels or round(x.shape[-1] * self.expand_ratio)
    x = ConvLayer(2 * mid, 1, use_bias=use_bias[0], norm=norm[0], act=act[0], dtype=self.dtype,
                  name="inverted_conv")(x, train)
    x = ConvLayer(2 * mid, self.kernel_size, self.strides, groups=2 * mid, use_bias=use_bias[1],
                  norm=norm[1], act=None, dtype=self.dtype, conv_cls=self.depthwise_conv_cls,
                  name="depth_conv")(x, train, **depthwise_kwargs)
    x, gate = jnp.split(x, 2, axis=-1)
    x = x * activation(act[1])(gate)
    return ConvLayer(self.features, 1, use_bias=use_bias[2], norm=norm[2], act=act[2],
                     dtype=self.dtype, name="point_conv")(x, train)


class _ScaleAggregation(nn.Module):
  """One extra LiteMLA scale: depthwise sxs conv, then 1x1 conv grouped per head's q/k/v."""
  kernel_size: int
  groups: int
  use_bias: bool = False
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, qkv):
    c, p = qkv.shape[-1], self.kernel_size // 2
    qkv = DepthwiseConv(c, (self.kernel_size,) * 2, padding=((p, p), (p, p)),
                        feature_group_count=c, use_bias=self.use_bias, dtype=self.dtype,
                        name="proj_in")(qkv)
    return nn.Conv(c, (1, 1), feature_group_count=self.groups, use_bias=self.use_bias,
                   dtype=self.dtype, name="proj_out")(qkv)


def relu_linear_attention(qkv: jax.Array, head_dim: int, eps: float = 1e-15) -> jax.Array:
  """LiteMLA's ReLU linear attention in fp32: (B, H, W, G*3*d) -> (B, H, W, G*d).

  Channels group as PyTorch's reshape (B, G, 3*d, H*W): group g holds q, k, v of d channels.
  out_n = sum_m v_m (k_m . q_n) / (sum_m k_m . q_n + eps), i.e. efficientvit's "pad v with a
  row of ones". For H*W <= head_dim the same quantity is formed quadratically (as upstream).
  """
  b, h, w, c = qkv.shape
  n = h * w
  qkv = qkv.astype(jnp.float32).reshape(b, n, c // (3 * head_dim), 3 * head_dim)
  q, k, v = jnp.split(qkv, 3, axis=-1)
  q, k = nn.relu(q), nn.relu(k)
  hi = jax.lax.Precision.HIGHEST  # Sums over H*W positions: no reduced-precision passes.
  if n > head_dim:
    vk = jnp.einsum("bmgd,bmge->bgde", v, k, precision=hi)  # (B, G, d_v, d_k)
    num = jnp.einsum("bgde,bnge->bngd", vk, q, precision=hi)
    den = jnp.einsum("bge,bnge->bng", jnp.sum(k, axis=1), q, precision=hi)[..., None]
  else:
    att = jnp.einsum("bmge,bnge->bgmn", k, q, precision=hi)  # (B, G, keys, queries)
    num = jnp.einsum("bmgd,bgmn->bngd", v, att, precision=hi)
    den = jnp.sum(att, axis=2).transpose(0, 2, 1)[..., None]
  out = num / (den + eps)
  return out.reshape(b, h, w, -1)


class LiteMLA(nn.Module):
  """Lightweight multi-scale linear attention (main branch, no shortcut).

  1x1 conv C -> 3*heads*dim gives qkv; each scale s adds a depthwise sxs + grouped 1x1 copy;
  ReLU linear attention per head (fp32 even under bf16: fp16/bf16 overflow here); 1x1 proj.
  Children: `qkv`, `aggreg_{i}` (`proj_in`, `proj_out`), `proj` (`conv`, `norm`).
  """
  features: int
  heads: Optional[int] = None
  heads_ratio: float = 1.0
  dim: int = 8
  use_bias: PerConv = False
  norm: PerConv = (None, "batch_norm")
  act: PerConv = (None, None)
  scales: Sequence[int] = (5,)
  eps: float = 1e-15
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    use_bias, norm, act = (per_conv(v, 2) for v in (self.use_bias, self.norm, self.act))
    heads = self.heads or int(x.shape[-1] // self.dim * self.heads_ratio)
    total = heads * self.dim
    qkv = ConvLayer(3 * total, 1, use_bias=use_bias[0], norm=norm[0], act=act[0],
                    dtype=self.dtype, name="qkv")(x, train)
    multi = [qkv] + [
        _ScaleAggregation(s, 3 * heads, use_bias[0], self.dtype, name=f"aggreg_{i}")(qkv)
        for i, s in enumerate(self.scales)]
    out = relu_linear_attention(jnp.concatenate(multi, axis=-1), self.dim, self.eps)
    out = out.astype(self.dtype or x.dtype)
    return ConvLayer(self.features, 1, use_bias=use_bias[1], norm=norm[1], act=act[1],
                     dtype=self.dtype, name="proj")(out, train)


class EfficientViTBlock(nn.Module):
  """x + LiteMLA(x), then x + local(x), local = GLUMBConv or MBConv (children
  `context_module`, `local_module`).

  `local_norm` defaults to `norm`; diffusers' AutoencoderDC always uses "rms_norm" there.
  """
  heads_ratio: float = 1.0
  dim: int = 32
  expand_ratio: float = 4.0
  scales: Sequence[int] = (5,)
  norm: Optional[str] = "batch_norm"
  act: Optional[str] = "hswish"
  local_module: str = "MBConv"
  local_norm: Optional[str] = "same"
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    x = x + LiteMLA(c, heads_ratio=self.heads_ratio, dim=self.dim, norm=(None, self.norm),
                    scales=tuple(self.scales), dtype=self.dtype, name="context_module")(x, train)
    local_norm = self.norm if self.local_norm == "same" else self.local_norm
    if self.local_module == "GLUMBConv":
      local = GLUMBConv(c, expand_ratio=self.expand_ratio, use_bias=(True, True, False),
                        norm=(None, None, local_norm), act=(self.act, self.act, None),
                        dtype=self.dtype, name="local_module")
    elif self.local_module == "MBConv":
      local = MBConv(c, expand_ratio=self.expand_ratio, use_bias=(True, True, False),
                     norm=(None, None, local_norm), act=(self.act, self.act, None),
                     dtype=self.dtype, name="local_module")
    else:
      raise ValueError(f"unknown local_module {self.local_module!r}; use GLUMBConv or MBConv")
    return x + local(x, train)
