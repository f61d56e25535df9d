"""Multi-head attention shared by every model: self-attention and cross-attention.

Parameter names (to_q, to_k, to_v, to_out) follow diffusers' `Attention`, so weight conversion
is a transpose per Dense.
"""

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


class Attention(nn.Module):
  """Scaled dot-product attention over tokens (B, N, C); `context` makes it cross-attention."""
  dim: int
  num_heads: int
  head_dim: Optional[int] = None
  qkv_bias: bool = True
  out_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  # Replaces the output Dense (e.g. CAN's condition-aware `CADense`); keyword arguments of
  # `__call__` beyond the ones below are passed to it (e.g. `cond=`).
  out_cls: Optional[Callable[..., nn.Module]] = None

  @nn.compact
  def __call__(self, x, context=None, mask=None, return_weights: bool = False, **out_kwargs):
    """mask: optional boolean (B, 1, N, M) or broadcastable, True = attend (causal, padding)."""
    head_dim = self.head_dim or self.dim // self.num_heads
    inner = head_dim * self.num_heads
    context = x if context is None else context
    dense = lambda n, f, b: nn.Dense(f, use_bias=b, dtype=self.dtype, name=n)
    split = lambda t: t.reshape(t.shape[:-1] + (self.num_heads, head_dim))
    q = split(dense("to_q", inner, self.qkv_bias)(x))
    k = split(dense("to_k", inner, self.qkv_bias)(context))
    v = split(dense("to_v", inner, self.qkv_bias)(context))
    if return_weights:
      # Explicit softmax so callers (FastComposer's localisation loss) can read the maps.
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * head_dim**-0.5
      if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
      weights = jax.nn.softmax(logits, axis=-1)
      out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
    else:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask)
      weights = None
    out_layer = (self.out_cls or nn.Dense)(self.dim, use_bias=self.out_bias, dtype=self.dtype,
                                           name="to_out")
    out = out_layer(out.reshape(out.shape[:-2] + (inner,)), **out_kwargs)
    return (out, weights) if return_weights else out
