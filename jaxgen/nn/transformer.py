"""LDM's SpatialTransformer: cross-attention from image features to condition tokens.

  x -> GroupNorm -> proj_in (1x1 conv, or Linear) -> tokens (B, H*W, inner)
    -> BasicTransformerBlock x depth:  x + attn1(LN(x));  x + attn2(LN(x), context);
                                       x + ff(LN(x)), ff = GEGLU(4x) -> Linear
    -> proj_out (zero-initialised, so the block starts as the identity) -> + x

Parameter names follow diffusers' `Transformer2DModel` (continuous input) and
`BasicTransformerBlock` ("transformer_blocks.0.attn2.to_out.0" is
"transformer_blocks_0/attn2/to_out" here), so `jaxgen.convert.spatial_transformer` is a
transpose per tensor. Q/K/V have no bias; the scale is head_dim**-0.5.

Cross-attention maps: when the caller makes the `ATTENTION_MAPS` collection mutable
(`module.apply(v, ..., mutable=[ATTENTION_MAPS])`; never at init), every cross-attention records
its softmax probabilities there as (B, heads, h, w, context_len) under "cross_attention_maps"
(FastComposer's localisation loss and its inference-time maps read them). Otherwise the fused
attention runs and nothing is recorded.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.nn.attention import Attention

ATTENTION_MAPS = "attention_maps"  # The collection that records cross-attention probabilities.
MAPS_NAME = "cross_attention_maps"


def cross_attend(owner: nn.Module, attn: Attention, x, context, spatial_shape: Sequence[int]):
  """attn(x, context); records the (B, heads, *spatial_shape, L) maps in `owner` when asked."""
  if owner.is_initializing() or not owner.is_mutable_collection(ATTENTION_MAPS):
    return attn(x, context)  # init makes every collection mutable: record nothing there.
  out, weights = attn(x, context, return_weights=True)
  b, heads, _, length = weights.shape
  owner.sow(ATTENTION_MAPS, MAPS_NAME, weights.reshape((b, heads, *spatial_shape, length)))
  return out


def recorded_maps(collection) -> dict:
  """{"path/of/layer": (B, heads, h, w, L)} from an `ATTENTION_MAPS` collection (sorted paths)."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(collection)[0]:
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    name = "/".join(str(k) for k in keys if isinstance(k, str) and k != MAPS_NAME)
    flat[name] = leaf
  return dict(sorted(flat.items()))


class GEGLU(nn.Module):
  """Linear to 2 * dim_out, then value * gelu(gate) (exact GELU, as diffusers' GEGLU)."""
  dim_out: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    value, gate = jnp.split(nn.Dense(2 * self.dim_out, dtype=self.dtype, name="proj")(x), 2, -1)
    return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """diffusers' FeedForward, activation "geglu": net.0 = GEGLU(dim, mult*dim), net.2 = Linear."""
  mult: int = 4
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    h = GEGLU(self.mult * dim, self.dtype, name="net_0")(x)
    return nn.Dense(dim, dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LN self-attention, cross-attention to `context` (skipped when None), GEGLU FFN.

  `spatial_shape` (h, w) of the H*W tokens only shapes the recorded cross-attention maps.
  `only_cross_attention` (diffusers' flag): attn1 attends to `context` too, not to x.
  """
  dim: int
  num_heads: int
  head_dim: Optional[int] = None
  ff_mult: int = 4
  norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  only_cross_attention: bool = False

  @nn.compact
  def __call__(self, x, context=None, spatial_shape: Optional[Sequence[int]] = None):
    attn = lambda name: Attention(self.dim, self.num_heads, self.head_dim, qkv_bias=False,
                                  dtype=self.dtype, name=name)
    norm = lambda name: nn.LayerNorm(self.norm_eps, dtype=self.dtype, name=name)
    x = x + attn("attn1")(norm("norm1")(x), context if self.only_cross_attention else None)
    if context is not None:
      x = x + cross_attend(self, attn("attn2"), norm("norm2")(x), context,
                           spatial_shape or (x.shape[1],))
    return x + FeedForward(self.ff_mult, self.dtype, name="ff")(norm("norm3")(x))


class SpatialTransformer(nn.Module):
  """LDM / diffusers Transformer2DModel on NHWC features: `(x, context) -> x + transformer(x)`.

  inner width = num_heads * head_dim (LDM: the feature width); `context` (B, L, D) tokens of
  any width D (to_k / to_v take it); None gives self-attention-only blocks.
  """
  num_heads: int
  head_dim: int
  depth: int = 1
  num_groups: int = 32
  use_linear_projection: bool = False  # SD 2.x: Linear proj_in / proj_out instead of 1x1 convs.
  norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  only_cross_attention: bool = False  # See BasicTransformerBlock.

  @nn.compact
  def __call__(self, x, context=None):
    b, h, w, c = x.shape
    inner = self.num_heads * self.head_dim
    proj = lambda features, name, **kw: (
        nn.Dense(features, dtype=self.dtype, name=name, **kw) if self.use_linear_projection
        else nn.Conv(features, (1, 1), dtype=self.dtype, name=name, **kw))
    hs = nn.GroupNorm(self.num_groups, epsilon=1e-6, name="norm")(x)
    hs = proj(inner, "proj_in")(hs).reshape(b, h * w, inner)
    for i in range(self.depth):
      hs = BasicTransformerBlock(inner, self.num_heads, self.head_dim, norm_eps=self.norm_eps,
                                 dtype=self.dtype, only_cross_attention=self.only_cross_attention,
                                 name=f"transformer_blocks_{i}")(hs, context, (h, w))
    out = proj(c, "proj_out", kernel_init=nn.initializers.zeros)(hs.reshape(b, h, w, inner))
    return x + out.astype(x.dtype)
