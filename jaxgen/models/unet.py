"""Class-conditional U-Net for pixel-space diffusion (DDPM / improved-DDPM layout).

Time (sinusoidal) and class embeddings are summed and injected into every residual block;
down and up paths with skip connections; self-attention at the low-resolution levels.
"""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxgen.errors import ConfigError
from jaxgen.nn.attention import Attention
from jaxgen.nn.embeddings import LabelEmbedder, TimestepEmbedder
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


class ResBlock(nn.Module):
  """GroupNorm-SiLU-conv twice, the condition scaling and shifting in between, plus a shortcut."""
  channels: int
  num_groups: int = 32
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train: bool):
    conv = lambda name: nn.Conv(self.channels, (3, 3), dtype=self.dtype, name=name)
    h = conv("conv1")(nn.silu(nn.GroupNorm(self.num_groups, name="norm1")(x)))
    # Scale-shift conditioning (adaGN, Dhariwal & Nichol): the condition modulates the
    # normalised features, which conditions more strongly than adding a bias.
    scale, shift = jnp.split(
        nn.Dense(2 * self.channels, dtype=self.dtype, name="emb_proj")(nn.silu(emb))[:, None, None],
        2, axis=-1)
    h = nn.GroupNorm(self.num_groups, name="norm2")(h) * (1 + scale) + shift
    h = nn.silu(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    # Zero-init the last conv so every block starts as the identity (stable early training).
    h = nn.Conv(self.channels, (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros,
                name="conv2")(h)
    if x.shape[-1] != self.channels:
      x = nn.Conv(self.channels, (1, 1), dtype=self.dtype, name="skip")(x)
    return x + h


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


@MODELS.register("unet")
class UNet(nn.Module):
  """eps/v-predicting U-Net: `apply(variables, x_nhwc, t, y, train=False) -> NHWC`.

  `channel_mult[i]` scales `base_channels` at level i (resolution / 2**i); levels listed in
  `attention_levels` get self-attention after each residual block. Labels equal to
  `num_classes` are the null label (classifier-free guidance).
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
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, t, y, train: bool = False):
    levels = len(self.channel_mult)
    factor = 2 ** (levels - 1) * self.patch_size
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ConfigError(
          f"unet with {levels} levels needs H and W divisible by {factor}; got image "
          f"{x.shape[1]}x{x.shape[2]}. Change data.image_size or model.channel_mult.")
    emb_dim = 4 * self.base_channels
    emb = TimestepEmbedder(emb_dim, name="time_embed")(t)
    emb = emb + LabelEmbedder(self.num_classes, emb_dim, name="class_embed")(y)
    block = lambda ch, name: ResBlock(ch, self.num_groups, self.dropout, self.dtype, name=name)
    attn = lambda name: AttentionBlock(self.num_heads, self.num_groups, self.dtype, name=name)

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
        b, hh, ww, c = h.shape
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # Nearest-neighbour x2.
        h = nn.Conv(c, (3, 3), dtype=self.dtype, name=f"up_{level}_upsample")(h)

    h = nn.silu(nn.GroupNorm(self.num_groups, name="norm_out")(h))
    out = nn.Conv((self.out_channels or x.shape[-1]) * self.patch_size**2, (3, 3),
                  dtype=self.dtype, kernel_init=nn.initializers.zeros, name="conv_out")(h)
    return pixel_shuffle(out, self.patch_size).astype(jnp.float32)
