"""Condition-aware layers (CAN, Cai et al. 2024, arXiv 2404.01143).

A condition-aware layer computes with the weight W + W_c, where W is the usual static weight and
W_c = WeightGenerator(cond) is generated per sample from the condition embedding (class +
timestep embedding, (B, D)). The generator is SiLU followed by one bias-free Dense whose kernel
is zero-initialised (the paper's code was never released; REFERENCE.md section 2 marks the single
zero-initialised linear layer as unverified), so every condition-aware layer equals its static
counterpart at initialisation and training starts from the static model. The SiLU mirrors the
adaLN modulation of DiT, so CAN-vs-adaLN comparisons see the same conditioning signal.

Per-sample weights are applied with `jax.vmap` over the batch (not by folding the batch into
conv groups by hand); the depthwise conv goes through `jaxgen.kernels.ca_depthwise_conv`,
whose `impl` (Pallas / XLA) is a module attribute.

Parameter names match the static layers (`kernel`, `bias`; depthwise kernels HW1C as
`nn.Conv(feature_group_count=C)`), plus the generator's `weight_generator/proj/kernel`, so a
static checkpoint loads into a condition-aware model with only the generators left at zero.

Generator size: a full W_c for a (din, dout) Dense needs a D x din*dout generator. That is
cheap for depthwise convs but not for wide Dense layers or patch embeddings (D = din = dout =
1152 is 1.5G parameters per layer), so `CADense(rank=r)` and `CAConv(rank=r)` generate only an
r x r core: W_c = U G(cond) V with U (din, r) and V (r, dout) static learned bases and G the
zero-initialised generator output, D * r**2 parameters per layer (0.3M for DiT-XL at r = 16).
Applied as x @ W + ((x @ U) @_b G_b) @ V, W_c never materialised; the extra work per token is
r * (din + r + dout) multiply-adds against din * dout for the layer itself. (A generated
(din, r) factor, W_c = A(cond) B, costs D * din * r per layer: 3.6G parameters over DiT-XL's
attention outputs and FFNs at r = 16, which AdamW and EMA then carry.)
"""

import math
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen import sharding
from jaxgen.kernels.ca_depthwise_conv import ca_depthwise_conv

Dtype = Any
PaddingLike = Union[str, Sequence[Tuple[int, int]]]


class WeightGenerator(nn.Module):
  """cond (B, D) -> W_c (B, *shape): SiLU, then a bias-free Dense (zero-initialised)."""
  shape: Sequence[int]
  kernel_init: Callable = nn.initializers.zeros
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, cond):
    w = nn.Dense(math.prod(self.shape), use_bias=False, kernel_init=self.kernel_init,
                 dtype=self.dtype, name="proj")(nn.silu(cond))
    return w.reshape((cond.shape[0],) + tuple(self.shape))


def _low_rank_core(module, h, cond):
  """(h @_b G_b) @ V for `module` (rank r, features): h = x @ U, (B, ..., r); G_b (r, r)."""
  r, dtype = module.rank, h.dtype
  g = WeightGenerator((r, r), dtype=module.dtype, name="weight_generator")(cond)
  mixed = jax.vmap(lambda hb, gb: jnp.dot(hb, gb.astype(dtype)))(h, g)
  basis_out = module.param("basis_out", nn.initializers.lecun_normal(), (r, module.features))
  return jnp.dot(mixed, basis_out.astype(dtype))


class CADense(nn.Module):
  """Dense with per-sample kernel W + W_c(cond). x (B, ..., din), cond (B, D) -> (B, ..., features).

  rank=None: full W_c, applied as `vmap` over the batch of x_b @ (W + W_c[b]).
  rank=r: W_c = U G(cond) V (module docstring), never materialised.
  """
  features: int
  use_bias: bool = True
  rank: Optional[int] = None
  dtype: Optional[Dtype] = None
  kernel_init: Callable = nn.linear.default_kernel_init
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x, cond):
    din = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (din, self.features))
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    if self.rank is None:
      wc = WeightGenerator((din, self.features), dtype=self.dtype, name="weight_generator")(cond)
      y = jax.vmap(lambda xb, wb: jnp.dot(xb, (kernel + wb).astype(dtype)))(x, wc)
    else:
      basis_in = self.param("basis_in", nn.initializers.lecun_normal(), (din, self.rank))
      y = jnp.dot(x, kernel.astype(dtype)) + _low_rank_core(
          self, jnp.dot(x, basis_in.astype(dtype)), cond)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,)).astype(dtype)
    return y


class CAConv(nn.Module):
  """Conv with per-sample kernel W + W_c(cond) (the patch embedding). x NHWC, kernel HWIO.

  rank=r: W_c = U G(cond) V with U a (kh, kw, cin, r) conv kernel and V (r, features).
  """
  features: int
  kernel_size: Sequence[int]
  strides: Union[int, Sequence[int]] = 1
  padding: PaddingLike = "VALID"
  use_bias: bool = True
  rank: Optional[int] = None
  dtype: Optional[Dtype] = None
  kernel_init: Callable = nn.linear.default_kernel_init
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x, cond):
    kh, kw = self.kernel_size
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
    shape = (kh, kw, x.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, shape)
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    padding = self.padding if isinstance(self.padding, str) else tuple(map(tuple, self.padding))

    def conv(xs, k):
      return jax.lax.conv_general_dilated(xs, k.astype(dtype), strides, padding,
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))

    if self.rank is None:
      wc = WeightGenerator(shape, dtype=self.dtype, name="weight_generator")(cond)
      per_sample = lambda xs, ks: jax.vmap(lambda xb, kb: conv(xb[None], kb)[0])(xs, ks)
      # XLA's partitioner all-gathers a vmapped per-sample conv: run it per batch shard.
      y = sharding.on_batch_shards(per_sample, x, kernel + wc)
    else:
      basis_in = self.param("basis_in", nn.initializers.lecun_normal(in_axis=(0, 1, 2)),
                            (kh, kw, x.shape[-1], self.rank))
      y = conv(x, kernel) + _low_rank_core(self, conv(x, basis_in), cond)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,)).astype(dtype)
    return y


class CADepthwiseConv(nn.Module):
  """Depthwise kxk conv with per-sample kernel W + W_c(cond), through `ca_depthwise_conv`.

  Constructor arguments match `nn.Conv` as `jaxgen.nn.efficientvit.ConvLayer(conv_cls=...)`
  passes them (padding must be the symmetric k//2), so it substitutes MBConv's depthwise conv:
  `MBConv(depthwise_conv_cls=functools.partial(CADepthwiseConv, impl="auto"))`, then
  `block(x, train, cond=cond)`. Kernel param HW1C as in `nn.Conv(feature_group_count=C)`.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Union[int, Sequence[int]] = 1
  padding: Optional[PaddingLike] = None  # None: symmetric k//2.
  feature_group_count: Optional[int] = None  # Must equal features (depthwise).
  use_bias: bool = True
  dtype: Optional[Dtype] = None
  impl: str = "auto"
  kernel_init: Callable = nn.linear.default_kernel_init
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x, cond):
    c = x.shape[-1]
    kh, kw = self.kernel_size
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
    if self.features != c or self.feature_group_count not in (None, c):
      raise ValueError(f"CADepthwiseConv is depthwise: features ({self.features}) and "
                       f"feature_group_count ({self.feature_group_count}) must equal the input "
                       f"channels ({c})")
    if strides[0] != strides[1]:
      raise ValueError(f"CADepthwiseConv needs equal strides, got {strides}")
    sym = ((kh // 2, kh // 2), (kw // 2, kw // 2))
    if self.padding is not None and tuple(map(tuple, self.padding)) != sym:
      raise ValueError(f"CADepthwiseConv pads symmetrically by k//2 {sym}; got {self.padding}")
    kernel = self.param("kernel", self.kernel_init, (kh, kw, 1, c))
    wc = WeightGenerator((kh, kw, c), dtype=self.dtype, name="weight_generator")(cond)
    dtype = self.dtype or x.dtype
    w = (kernel[:, :, 0, :][None] + wc).astype(dtype)
    b = None
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (c,))
      b = jnp.broadcast_to(bias.astype(dtype), (x.shape[0], c))
    return ca_depthwise_conv(x.astype(dtype), w, b, stride=strides[0], impl=self.impl)
