"""KL autoencoder of latent diffusion / Stable Diffusion (SD-VAE, KL-f8), diffusers-compatible.

A VAE whose posterior is a diagonal Gaussian; `apply(v, x, method="encode")` maps NHWC images in
[-1, 1] to the posterior mean (B, H/f, W/f, latent_channels), f = 2^(len(block_out_channels)-1);
`encode(x, rng=key)` draws a posterior sample instead; `method="encode_moments"` gives
(mean, logvar); `method="decode"` maps latents back; `__call__` reconstructs from the mean.
Diffusion models use `latent * scaling_factor` (0.18215 for SD-1.x / LDM KL-f8).

The constructor takes diffusers' `AutoencoderKL` config keys; layout (diffusers `Encoder` /
`Decoder`, activations `act_fn` inside the resnets, SiLU before conv_out):

  encoder: conv_in -> down_blocks_{i}: layers_per_block ResnetBlocks (+ a stride-2 conv,
    padded right/bottom, except in the last block) -> mid_block (resnet, attention, resnet)
    -> GroupNorm -> SiLU -> conv_out (2 * latent channels) -> quant_conv (1x1) = [mean, logvar]
  decoder: post_quant_conv (1x1) -> conv_in -> mid_block -> up_blocks_{i} (widest first):
    layers_per_block + 1 ResnetBlocks (+ nearest 2x upsample and conv, except in the last)
    -> GroupNorm -> SiLU -> conv_out

All GroupNorms use eps 1e-6. The mid-block attention is jaxgen's U-Net `AttentionBlock` with
one head (diffusers uses heads = channels / attention_head_dim = 1). The resnet is defined here:
the U-Net's `ResBlock` takes a time embedding and zero-initialises conv2, and diffusers'
`ResnetBlock2D` without time embedding has neither.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.errors import ConfigError
from jaxgen.models.unet import AttentionBlock
from jaxgen.registry import MODELS

ACTIVATIONS = {"silu": nn.silu, "swish": nn.silu, "relu": nn.relu, "mish": jax.nn.mish,
               "gelu": lambda x: nn.gelu(x, approximate=False)}
EPS = 1e-6  # diffusers' resnet_eps for the VAE (also flax's GroupNorm default).


class ResnetBlock(nn.Module):
  """diffusers ResnetBlock2D without time embedding: GN-act-conv twice + (1x1) shortcut."""
  features: int
  num_groups: int = 32
  act_fn: str = "silu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    act = ACTIVATIONS[self.act_fn]
    norm = lambda name: nn.GroupNorm(self.num_groups, epsilon=EPS, dtype=self.dtype, name=name)
    conv = lambda name: nn.Conv(self.features, (3, 3), dtype=self.dtype, name=name)
    h = conv("conv1")(act(norm("norm1")(x)))
    h = conv("conv2")(act(norm("norm2")(h)))
    if x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
    return x + h


class MidBlock(nn.Module):
  """resnets_0 -> attentions_0 (one-head self-attention over H*W) -> resnets_1."""
  num_groups: int = 32
  act_fn: str = "silu"
  add_attention: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = ResnetBlock(c, self.num_groups, self.act_fn, self.dtype, name="resnets_0")(x)
    if self.add_attention:
      x = AttentionBlock(1, self.num_groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock(c, self.num_groups, self.act_fn, self.dtype, name="resnets_1")(x)


class Encoder(nn.Module):
  """Images (B, H, W, C) -> (B, H/f, W/f, 2 * latent_channels) = [mean, logvar] pre-quant."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  num_groups: int
  act_fn: str
  mid_block_add_attention: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.block_out_channels[0], (3, 3), dtype=self.dtype, name="conv_in")(x)
    last = len(self.block_out_channels) - 1
    for i, ch in enumerate(self.block_out_channels):
      for j in range(self.layers_per_block):
        x = ResnetBlock(ch, self.num_groups, self.act_fn, self.dtype,
                        name=f"down_blocks_{i}_resnets_{j}")(x)
      if i != last:
        # diffusers' Downsample2D(padding=0): pad one pixel right and bottom, 3x3 stride 2.
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        x = nn.Conv(ch, (3, 3), (2, 2), padding="VALID", dtype=self.dtype,
                    name=f"down_blocks_{i}_downsample")(x)
    x = MidBlock(self.num_groups, self.act_fn, self.mid_block_add_attention, self.dtype,
                 name="mid_block")(x)
    x = nn.silu(nn.GroupNorm(self.num_groups, epsilon=EPS, dtype=self.dtype,
                             name="conv_norm_out")(x))
    return nn.Conv(2 * self.latent_channels, (3, 3), dtype=self.dtype, name="conv_out")(x)


class Decoder(nn.Module):
  """Latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels)."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  out_channels: int
  num_groups: int
  act_fn: str
  mid_block_add_attention: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z):
    widths = tuple(reversed(self.block_out_channels))
    x = nn.Conv(widths[0], (3, 3), dtype=self.dtype, name="conv_in")(z)
    x = MidBlock(self.num_groups, self.act_fn, self.mid_block_add_attention, self.dtype,
                 name="mid_block")(x)
    for i, ch in enumerate(widths):
      for j in range(self.layers_per_block + 1):
        x = ResnetBlock(ch, self.num_groups, self.act_fn, self.dtype,
                        name=f"up_blocks_{i}_resnets_{j}")(x)
      if i != len(widths) - 1:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # Nearest-neighbour 2x.
        x = nn.Conv(ch, (3, 3), dtype=self.dtype, name=f"up_blocks_{i}_upsample")(x)
    x = nn.silu(nn.GroupNorm(self.num_groups, epsilon=EPS, dtype=self.dtype,
                             name="conv_norm_out")(x))
    return nn.Conv(self.out_channels, (3, 3), dtype=self.dtype, name="conv_out")(x)


class AutoencoderKL(nn.Module):
  """SD-VAE: `encode` (posterior mean or a sample), `decode`, `__call__` = decode(mean)."""
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: Sequence[str] = ("DownEncoderBlock2D",)
  up_block_types: Sequence[str] = ("UpDecoderBlock2D",)
  block_out_channels: Sequence[int] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: Any = 32  # Unused (diffusers' tiling size); kept so hub configs round-trip.
  scaling_factor: float = 0.18215
  shift_factor: Optional[float] = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  dtype: Any = jnp.float32

  def setup(self):
    n = len(self.block_out_channels)
    if (tuple(self.down_block_types) != ("DownEncoderBlock2D",) * n or
        tuple(self.up_block_types) != ("UpDecoderBlock2D",) * n):
      raise ConfigError(f"AutoencoderKL: {n} DownEncoderBlock2D / UpDecoderBlock2D blocks "
                        f"are supported, got {self.down_block_types} / {self.up_block_types}")
    if self.act_fn not in ACTIVATIONS:
      raise ConfigError(f"AutoencoderKL act_fn {self.act_fn!r}; known: {sorted(ACTIVATIONS)}")
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ConfigError(f"AutoencoderKL: block_out_channels {bad} are not divisible by "
                        f"norm_num_groups {self.norm_num_groups}")
    args = (tuple(self.block_out_channels), self.layers_per_block)
    rest = (self.norm_num_groups, self.act_fn, self.mid_block_add_attention, self.dtype)
    self.encoder = Encoder(*args, self.latent_channels, *rest)
    self.decoder = Decoder(*args, self.out_channels, *rest)
    if self.use_quant_conv:
      self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1), dtype=self.dtype)
    if self.use_post_quant_conv:
      self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), dtype=self.dtype)

  @property
  def spatial_compression_ratio(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def encode_moments(self, x, train: bool = False):
    """(mean, logvar) of the posterior, logvar clipped to [-30, 20] as diffusers does."""
    del train  # No dropout or batch statistics.
    moments = self.encoder(x)
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def encode(self, x, train: bool = False, rng: Optional[jax.Array] = None):
    """Unscaled latents: the posterior mean, or mean + std * N(0, 1) when `rng` is given."""
    mean, logvar = self.encode_moments(x, train)
    if rng is None:
      return mean
    noise = jax.random.normal(rng, mean.shape, jnp.float32).astype(mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * noise

  def decode(self, z, train: bool = False):
    del train
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x, train: bool = False):
    return self.decode(self.encode(x, train), train)


def kl_divergence(mean, logvar):
  """KL(N(mean, exp(logvar)) || N(0, 1)) summed over H, W, C: (B,), diffusers' `posterior.kl()`."""
  return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))


def _hashable(value):
  if isinstance(value, (list, tuple)):
    return tuple(_hashable(v) for v in value)
  return value


@MODELS.register("vae_kl")
def vae_kl(**config) -> AutoencoderKL:
  """AutoencoderKL from diffusers config keys; keys starting with "_" (e.g. _class_name) and
  diffusers-only switches (force_upcast, latents_mean/std) are ignored."""
  ignored = {"force_upcast", "latents_mean", "latents_std"}
  kwargs = {k: _hashable(v) for k, v in config.items()
            if not k.startswith("_") and k not in ignored}
  try:
    return AutoencoderKL(**kwargs)
  except TypeError as e:
    raise ConfigError(f"vae_kl: {e}") from None
