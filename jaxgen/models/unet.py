"""Class-conditional U-Net for pixel-space diffusion (DDPM / improved-DDPM layout).

Time (sinusoidal) and class embeddings are summed and injected into every residual block;
down and up paths with skip connections; self-attention at the low-resolution levels.

Cross-attention (LDM): with `context_dim` set, the attention levels and the middle block use
`jaxgen.nn.transformer.SpatialTransformer` (self-attention, cross-attention to context tokens,
GEGLU FFN) instead of plain self-attention. The context is passed as a keyword argument,
`apply(v, x, t, y, context=tokens)` with tokens (B, L, context_dim), e.g. text-encoder states;
`label_conditioning` says what the class label y does:
  "add"    its embedding is added to the time embedding (default; the class-label path)
  "token"  its embedding (width context_dim) is one context token, prepended to `context`
           when one is given (LDM's class-conditional ImageNet model; y == num_classes is null)
  "none"   y is ignored (text-only models such as FastComposer's U-Net)
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import ConfigError
from jaxgen.nn.attention import Attention
from jaxgen.nn.embeddings import LabelEmbedder, TimestepEmbedder
from jaxgen.nn.transformer import SpatialTransformer
from jaxgen.registry import MODELS


def pixel_unshuffle(x, r: int):
  """(B, H, W, C) -> (B, H/r, W/r, C*r*r)."""
  if r == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h // r, r, w // r, r, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // r, w // r, r * r * c)


def pixel_shuffle(x, r: int):
  """Inverse of `pixel_unshuffle`."""
  if r == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, r, r, c // (r * r)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * r, w * r, c // (r * r))


def upsample_nearest(x, size: Optional[Sequence[int]] = None):
  """Nearest-neighbour resize of NHWC `x` to `size` (H, W), default twice its size.

  Picks source index floor(i * in / out) in float32, as torch's `F.interpolate(mode="nearest")`
  does, so odd sizes (diffusers' `upsample_size` for inputs not divisible by the U-Net's
  factor) match it; twice the size is a plain repeat.
  """
  size = tuple(size) if size is not None else (2 * x.shape[1], 2 * x.shape[2])
  for axis, out in ((1, size[0]), (2, size[1])):
    n = x.shape[axis]
    if out == 2 * n:
      x = jnp.repeat(x, 2, axis=axis)
    elif out != n:
      scale = np.float32(n) / np.float32(out)
      index = np.minimum(np.floor(np.arange(out, dtype=np.float32) * scale), n - 1)
      x = jnp.take(x, index.astype(np.int32), axis=axis)
  return x


TIME_EMBEDDING_NORMS = ("scale_shift", "default")


class ResBlock(nn.Module):
  """GroupNorm-SiLU-conv twice, the condition injected in between, plus a shortcut.

  diffusers' `ResnetBlock2D` with a time embedding: `time_embedding_norm` "scale_shift" (the
  default here) modulates the normalised features, "default" adds the projected embedding
  before norm2 (Stable Diffusion's `resnet_time_scale_shift="default"`); the output is
  (x + h) / output_scale_factor. Names: emb_proj = diffusers' time_emb_proj, skip =
  conv_shortcut.
  """
  channels: int
  num_groups: int = 32
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  time_embedding_norm: str = "scale_shift"
  norm_eps: float = 1e-6  # flax's GroupNorm default; diffusers U-Nets pass norm_eps (1e-5).
  output_scale_factor: float = 1.0

  @nn.compact
  def __call__(self, x, emb, train: bool):
    if self.time_embedding_norm not in TIME_EMBEDDING_NORMS:
      raise ConfigError(f"ResBlock time_embedding_norm {self.time_embedding_norm!r} unknown; "
                        f"use one of {TIME_EMBEDDING_NORMS}")
    norm = lambda name: nn.GroupNorm(self.num_groups, epsilon=self.norm_eps, name=name)
    conv = lambda name: nn.Conv(self.channels, (3, 3), dtype=self.dtype, name=name)
    h = conv("conv1")(nn.silu(norm("norm1")(x)))
    shift_scale = self.time_embedding_norm == "scale_shift"
    emb = nn.Dense((2 if shift_scale else 1) * self.channels, dtype=self.dtype,
                   name="emb_proj")(nn.silu(emb))[:, None, None]
    if shift_scale:
      # Scale-shift conditioning (adaGN, Dhariwal & Nichol): the condition modulates the
      # normalised features, which conditions more strongly than adding a bias.
      scale, shift = jnp.split(emb, 2, axis=-1)
      h = norm("norm2")(h) * (1 + scale) + shift
    else:
      h = norm("norm2")(h + emb)
    h = nn.silu(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    # Zero-init the last conv so every block starts as the identity (stable early training).
    h = nn.Conv(self.channels, (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros,
                name="conv2")(h)
    if x.shape[-1] != self.channels:
      x = nn.Conv(self.channels, (1, 1), dtype=self.dtype, name="skip")(x)
    out = x + h
    return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class AttentionBlock(nn.Module):
  """Pre-norm multi-head self-attention over the H*W positions, residual."""
  num_heads: int
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    tokens = nn.GroupNorm(self.num_groups, name="norm")(x).reshape(b, h * w, c)
    out = Attention(c, self.num_heads, dtype=self.dtype, name="attn")(tokens)
    return x + out.reshape(b, h, w, c)


LABEL_MODES = ("add", "token", "none")


@MODELS.register("unet")
class UNet(nn.Module):
  """eps/v-predicting U-Net: `apply(variables, x_nhwc, t, y, train=False) -> NHWC`.

  `channel_mult[i]` scales `base_channels` at level i (resolution / 2**i); levels listed in
  `attention_levels` get self-attention after each residual block (a SpatialTransformer with
  cross-attention to `context` when `context_dim` is set). Labels equal to `num_classes` are the
  null label (classifier-free guidance).
  """
  num_classes: int
  out_channels: int = 0  # 0: same as the input channels.
  patch_size: int = 1    # >1: space-to-depth on input, depth-to-space on output (cheap U-Nets).
  base_channels: int = 64
  channel_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 2
  attention_levels: Sequence[int] = (2,)
  num_heads: int = 4
  num_groups: int = 32
  dropout: float = 0.0
  # Cross-attention (see the module docstring); None keeps the self-attention U-Net.
  context_dim: Optional[int] = None
  transformer_depth: int = 1
  use_linear_projection: bool = False
  label_conditioning: str = "add"
  dtype: jnp.dtype = jnp.float32

  def _context(self, y, context):
    """The cross-attention tokens (B, L, context_dim), or None for self-attention only."""
    if self.label_conditioning not in LABEL_MODES:
      raise ConfigError(f"unet label_conditioning {self.label_conditioning!r} unknown; use one "
                        f"of {LABEL_MODES}")
    if self.context_dim is None:
      if context is not None or self.label_conditioning == "token":
        raise ConfigError("this U-Net has no cross-attention: set model.context_dim to use "
                          "context tokens or label_conditioning='token'")
      return None
    if self.label_conditioning == "token":
      token = LabelEmbedder(self.num_classes, self.context_dim, self.dtype,
                            name="class_token_embed")(y)[:, None]
      context = token if context is None else jnp.concatenate(
          [token, context.astype(token.dtype)], axis=1)
    if context is None:
      raise ConfigError("this U-Net cross-attends (context_dim is set): pass "
                        "context=(B, L, context_dim) tokens or use label_conditioning='token'")
    if context.ndim != 3 or context.shape[-1] != self.context_dim:
      raise ConfigError(f"context must be (B, L, {self.context_dim}); got {context.shape}")
    return context

  @nn.compact
  def __call__(self, x, t, y, train: bool = False, context=None):
    levels = len(self.channel_mult)
    factor = 2 ** (levels - 1) * self.patch_size
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ConfigError(
          f"unet with {levels} levels needs H and W divisible by {factor}; got image "
          f"{x.shape[1]}x{x.shape[2]}. Change data.image_size or model.channel_mult.")
    emb_dim = 4 * self.base_channels
    emb = TimestepEmbedder(emb_dim, name="time_embed")(t)
    if self.label_conditioning == "add":
      emb = emb + LabelEmbedder(self.num_classes, emb_dim, name="class_embed")(y)
    context = self._context(y, context)
    block = lambda ch, name: ResBlock(ch, self.num_groups, self.dropout, self.dtype, name=name)

    def attn(name):
      if self.context_dim is None:
        return AttentionBlock(self.num_heads, self.num_groups, self.dtype, name=name)
      def spatial_transformer(h):
        return SpatialTransformer(
            self.num_heads, h.shape[-1] // self.num_heads, self.transformer_depth,
            self.num_groups, self.use_linear_projection, dtype=self.dtype, name=name)(h, context)
      return spatial_transformer

    h = nn.Conv(self.base_channels, (3, 3), dtype=self.dtype, name="conv_in")(
        pixel_unshuffle(x, self.patch_size))
    skips = [h]
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = block(self.base_channels * mult, f"down_{level}_block_{i}")(h, emb, train)
        if level in self.attention_levels:
          h = attn(f"down_{level}_attn_{i}")(h)
        skips.append(h)
      if level < levels - 1:
        h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), dtype=self.dtype,
                    name=f"down_{level}_downsample")(h)
        skips.append(h)

    h = block(h.shape[-1], "mid_block_0")(h, emb, train)
    h = attn("mid_attn")(h)
    h = block(h.shape[-1], "mid_block_1")(h, emb, train)

    for level in reversed(range(levels)):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = block(self.base_channels * self.channel_mult[level], f"up_{level}_block_{i}")(
            h, emb, train)
        if level in self.attention_levels:
          h = attn(f"up_{level}_attn_{i}")(h)
      if level > 0:
        h = nn.Conv(h.shape[-1], (3, 3), dtype=self.dtype, name=f"up_{level}_upsample")(
            upsample_nearest(h))

    h = nn.silu(nn.GroupNorm(self.num_groups, name="norm_out")(h))
    out = nn.Conv((self.out_channels or x.shape[-1]) * self.patch_size**2, (3, 3),
                  dtype=self.dtype, kernel_init=nn.initializers.zeros, name="conv_out")(h)
    return pixel_shuffle(out, self.patch_size).astype(jnp.float32)
