"""DC-AE: the deep compression autoencoder (arXiv 2410.10733), weight-compatible with diffusers.

Deterministic autoencoder; `apply(v, x, method="encode")` maps NHWC images in [-1, 1] to the
unscaled latent (B, H/f, W/f, latent_channels), `method="decode"` maps it back, `__call__`
reconstructs. Diffusion models use `latent * scaling_factor`.

The constructor takes diffusers' `AutoencoderDC` config keys, so a hub `config.json` builds
the module directly; `dcae_config(name)` gives the published variants. Layout:

  encoder: conv_in (3x3 conv, or a stride-2 / space-to-channel down block when stage 0 has
    depth 0) -> stages of ResBlock / EfficientViT blocks, each but the last ending in a
    residual-autoencoding down block -> conv_out + channel-averaging shortcut.
  decoder: conv_in + channel-duplicating shortcut -> stages (deepest first), each but the
    deepest starting with a residual-autoencoding up block -> RMSNorm -> act -> conv_out.

Submodule names follow diffusers' indices: `encoder/down_blocks_{i}_{j}` is diffusers'
`encoder.down_blocks.{i}.{j}` (the down block is the last j of a stage), `decoder/up_blocks_{i}_{j}`
is `decoder.up_blocks.{i}.{j}` (the up block is j = 0).
"""

import re
from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp

from jaxgen.errors import ConfigError
from jaxgen.nn.efficientvit import (EfficientViTBlock, RMSNorm2d, ResBlock, activation,
                                    pixel_shuffle, pixel_unshuffle)
from jaxgen.registry import MODELS

PerStage = Union[str, Sequence[str]]

# -- Published variants --------------------------------------------------------------------

_SCALING = {
    "f32c32-in-1.0": 0.3189, "f32c32-mix-1.0": 0.4552,
    "f64c128-in-1.0": 0.2889, "f64c128-mix-1.0": 0.4538,
    "f128c512-in-1.0": 0.4883, "f128c512-mix-1.0": 0.3620,
    "f32c32-sana-1.0": 0.41407,
}
VARIANTS = tuple(_SCALING)


def _in_mix_config(stages: int, latent_channels: int) -> dict:
  """f32c32 / f64c128 / f128c512 (in-1.0 and mix-1.0 share the architecture)."""
  widths = (128, 256, 512, 512, 1024, 1024, 2048, 2048)[:stages]
  blocks = ("ResBlock",) * 3 + ("EfficientViTBlock",) * (stages - 3)
  return dict(
      latent_channels=latent_channels,
      encoder_block_types=blocks, decoder_block_types=blocks,
      encoder_block_out_channels=widths, decoder_block_out_channels=widths,
      encoder_layers_per_block=(0, 4, 8) + (2,) * (stages - 3),
      decoder_layers_per_block=(0, 5, 10) + (2,) * (stages - 3),
      encoder_qkv_multiscales=((),) * stages, decoder_qkv_multiscales=((),) * stages,
      downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle",
      decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * (stages - 3),
      decoder_act_fns=("relu",) * 3 + ("silu",) * (stages - 3))


def _sana_config() -> dict:
  widths = (128, 256, 512, 512, 1024, 1024)
  blocks = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
  scales = ((),) * 3 + ((5,),) * 3
  return dict(
      latent_channels=32,
      encoder_block_types=blocks, decoder_block_types=blocks,
      encoder_block_out_channels=widths, decoder_block_out_channels=widths,
      encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3,) * 6,
      encoder_qkv_multiscales=scales, decoder_qkv_multiscales=scales,
      downsample_block_type="conv", upsample_block_type="interpolate",
      decoder_norm_types=("rms_norm",) * 6, decoder_act_fns=("silu",) * 6)


def canonical_variant(name: str) -> str:
  """'mit-han-lab/dc-ae-f32c32-in-1.0-diffusers' / 'dc-ae-f32c32-in-1.0' -> 'f32c32-in-1.0'."""
  short = name.split("/")[-1]
  short = re.sub(r"^dc-ae-", "", short)
  short = re.sub(r"-diffusers$", "", short)
  if short not in _SCALING:
    raise ConfigError(f"unknown DC-AE variant {name!r}; known: {list(VARIANTS)}")
  return short


def dcae_config(name: str) -> dict:
  """Architecture kwargs (diffusers AutoencoderDC keys) + scaling_factor of a named variant."""
  short = canonical_variant(name)
  if short.startswith("f32c32-sana"):
    config = _sana_config()
  else:
    stages, latent = {"f32c32": (6, 32), "f64c128": (7, 128), "f128c512": (8, 512)}[
        short.split("-")[0]]
    config = _in_mix_config(stages, latent)
  return dict(in_channels=3, attention_head_dim=32, encoder_out_shortcut=True,
              decoder_in_shortcut=True, decoder_conv_act_fn="relu",
              scaling_factor=_SCALING[short], **config)


# -- Residual-autoencoding blocks ----------------------------------------------------------


class DownBlock(nn.Module):
  """x2 down: conv (3x3 stride 2, or 3x3 to C/4 then pixel-unshuffle) + optional shortcut
  (pixel-unshuffle, then the mean of consecutive groups of 4*C_in/C_out channels)."""
  features: int
  pixel_unshuffle: bool = True
  shortcut: bool = True
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x):
    if self.pixel_unshuffle:
      if self.features % 4:
        raise ConfigError(f"pixel-unshuffle down block needs channels % 4 == 0, got "
                          f"{self.features}")
      h = nn.Conv(self.features // 4, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                  name="conv")(x)
      h = pixel_unshuffle(h, 2)
    else:
      h = nn.Conv(self.features, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                  dtype=self.dtype, name="conv")(x)
    if not self.shortcut:
      return h
    y = pixel_unshuffle(x, 2)
    return h + channel_average(y, self.features)


class UpBlock(nn.Module):
  """x2 up: conv to 4*C then pixel-shuffle (or nearest x2 then conv) + optional shortcut
  (repeat_interleave each channel 4*C_out/C_in times, then pixel-shuffle)."""
  features: int
  interpolate: bool = False
  shortcut: bool = True
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x):
    conv = lambda f: nn.Conv(f, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="conv")
    if self.interpolate:
      h = conv(self.features)(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
    else:
      h = pixel_shuffle(conv(4 * self.features)(x), 2)
    if not self.shortcut:
      return h
    return h + pixel_shuffle(channel_repeat(x, 4 * self.features), 2)


def channel_average(x, features: int):
  """Mean over consecutive channel groups down to `features` channels (torch unflatten+mean)."""
  c = x.shape[-1]
  if c % features:
    raise ConfigError(f"channel-averaging shortcut: {c} channels do not split into {features}")
  return x.reshape(x.shape[:-1] + (features, c // features)).mean(axis=-1)


def channel_repeat(x, features: int):
  """Each channel repeated features/C times in place (torch repeat_interleave on dim 1)."""
  c = x.shape[-1]
  if features % c:
    raise ConfigError(f"channel-duplicating shortcut: {features} channels are no multiple of {c}")
  return jnp.repeat(x, features // c, axis=-1)


def _block(block_type: str, width: int, norm: str, act: str, head_dim: int,
           scales: Sequence[int], dtype, name: str):
  """A stage block as `fn(x, train) -> x`, shortcut included."""
  if block_type == "ResBlock":
    res = ResBlock(width, use_bias=(True, False), norm=(None, norm), act=(act, None),
                   dtype=dtype, name=name)
    return lambda x, train: x + res(x, train)
  if block_type == "EfficientViTBlock":
    # As diffusers: the attention takes the stage's norm, the GLUMBConv always RMSNorm.
    return EfficientViTBlock(dim=head_dim, scales=tuple(scales), norm=norm, act="silu",
                             local_module="GLUMBConv", local_norm="rms_norm", dtype=dtype,
                             name=name)
  raise ConfigError(f"unknown DC-AE block type {block_type!r}; use ResBlock or EfficientViTBlock")


def _per_stage(value, n: int, what: str) -> Tuple:
  if isinstance(value, str):
    return (value,) * n
  if len(value) != n:
    raise ConfigError(f"DC-AE {what} has {len(value)} entries for {n} stages: {value!r}")
  return tuple(value)


class Encoder(nn.Module):
  """Images (B, H, W, in_channels) -> unscaled latent (B, H/f, W/f, latent_channels)."""
  latent_channels: int
  attention_head_dim: int
  block_types: Tuple[str, ...]
  widths: Tuple[int, ...]
  depths: Tuple[int, ...]
  qkv_multiscales: Tuple[Tuple[int, ...], ...]
  downsample_block_type: str = "pixel_unshuffle"
  out_shortcut: bool = True
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    n = len(self.widths)
    unshuffle = self.downsample_block_type == "pixel_unshuffle"
    if self.depths[0] > 0:
      x = nn.Conv(self.widths[0], (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                  name="conv_in")(x)
    else:  # Stage 0 empty: the input conv downsamples straight to stage 1's width.
      x = DownBlock(self.widths[1], unshuffle, shortcut=False, dtype=self.dtype,
                    name="conv_in")(x)
    for i, (width, depth) in enumerate(zip(self.widths, self.depths)):
      for j in range(depth):
        x = _block(self.block_types[i], width, "rms_norm", "silu", self.attention_head_dim,
                   self.qkv_multiscales[i], self.dtype, f"down_blocks_{i}_{j}")(x, train)
      if i < n - 1 and depth > 0:
        x = DownBlock(self.widths[i + 1], unshuffle, dtype=self.dtype,
                      name=f"down_blocks_{i}_{depth}")(x)
    h = nn.Conv(self.latent_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                name="conv_out")(x)
    return h + channel_average(x, self.latent_channels) if self.out_shortcut else h


class Decoder(nn.Module):
  """Unscaled latent (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels)."""
  out_channels: int
  attention_head_dim: int
  block_types: Tuple[str, ...]
  widths: Tuple[int, ...]
  depths: Tuple[int, ...]
  qkv_multiscales: Tuple[Tuple[int, ...], ...]
  norm_types: Tuple[str, ...]
  act_fns: Tuple[str, ...]
  upsample_block_type: str = "pixel_shuffle"
  in_shortcut: bool = True
  conv_act_fn: str = "relu"
  out_norm: str = "rms_norm"
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, z, train: bool = False):
    n = len(self.widths)
    interpolate = self.upsample_block_type == "interpolate"
    x = nn.Conv(self.widths[-1], (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                name="conv_in")(z)
    if self.in_shortcut:
      x = x + channel_repeat(z, self.widths[-1])
    for i in reversed(range(n)):
      width, depth = self.widths[i], self.depths[i]
      if i < n - 1 and depth > 0:
        x = UpBlock(width, interpolate, dtype=self.dtype, name=f"up_blocks_{i}_0")(x)
      offset = 1 if i < n - 1 and depth > 0 else 0
      for j in range(depth):
        x = _block(self.block_types[i], width, self.norm_types[i], self.act_fns[i],
                   self.attention_head_dim, self.qkv_multiscales[i], self.dtype,
                   f"up_blocks_{i}_{j + offset}")(x, train)
    if self.out_norm == "rms_norm":
      x = RMSNorm2d(dtype=self.dtype, name="norm_out")(x)
    x = activation(self.conv_act_fn)(x)
    if self.depths[0] > 0:
      return nn.Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                     name="conv_out")(x)
    return UpBlock(self.out_channels, interpolate, shortcut=False, dtype=self.dtype,
                   name="conv_out")(x)


class DCAE(nn.Module):
  """DC-AE with diffusers `AutoencoderDC` config fields (see `dcae_config`)."""
  in_channels: int = 3
  latent_channels: int = 32
  attention_head_dim: int = 32
  encoder_block_types: PerStage = "ResBlock"
  decoder_block_types: PerStage = "ResBlock"
  encoder_block_out_channels: Sequence[int] = (128, 256, 512, 512, 1024, 1024)
  decoder_block_out_channels: Sequence[int] = (128, 256, 512, 512, 1024, 1024)
  encoder_layers_per_block: Sequence[int] = (2, 2, 2, 3, 3, 3)
  decoder_layers_per_block: Sequence[int] = (3, 3, 3, 3, 3, 3)
  encoder_qkv_multiscales: Sequence[Sequence[int]] = ((), (), (), (5,), (5,), (5,))
  decoder_qkv_multiscales: Sequence[Sequence[int]] = ((), (), (), (5,), (5,), (5,))
  upsample_block_type: str = "pixel_shuffle"
  downsample_block_type: str = "pixel_unshuffle"
  decoder_norm_types: PerStage = "rms_norm"
  decoder_act_fns: PerStage = "silu"
  encoder_out_shortcut: bool = True
  decoder_in_shortcut: bool = True
  # The head's activation before its output conv: "relu" (every published variant); "identity"
  # keeps the fresh shortcut path linear end to end (relu drops its negative half).
  decoder_conv_act_fn: str = "relu"
  # The head's norm before conv_act_fn: "rms_norm" (every published variant) or "none". Per
  # pixel RMS normalisation removes the feature vector's magnitude, which a small model trained
  # briefly from the shortcut init still needs for brightness (configs/dcae_photos.py).
  decoder_out_norm: str = "rms_norm"
  scaling_factor: float = 1.0
  dtype: Optional[Any] = None  # Computation dtype (e.g. bfloat16); params stay float32.

  @property
  def spatial_compression_ratio(self) -> int:
    return 2 ** (len(self.encoder_block_out_channels) - 1)

  def setup(self):
    ne, nd = len(self.encoder_block_out_channels), len(self.decoder_block_out_channels)
    if self.downsample_block_type not in ("pixel_unshuffle", "conv"):
      raise ConfigError(f"downsample_block_type {self.downsample_block_type!r}: use "
                        "'pixel_unshuffle' or 'conv'")
    if self.upsample_block_type not in ("pixel_shuffle", "interpolate"):
      raise ConfigError(f"upsample_block_type {self.upsample_block_type!r}: use "
                        "'pixel_shuffle' or 'interpolate'")
    if self.decoder_out_norm not in ("rms_norm", "none"):
      raise ConfigError(f"decoder_out_norm {self.decoder_out_norm!r}: use 'rms_norm' or 'none'")
    self.encoder = Encoder(
        latent_channels=self.latent_channels,
        attention_head_dim=self.attention_head_dim,
        block_types=_per_stage(self.encoder_block_types, ne, "encoder_block_types"),
        widths=tuple(self.encoder_block_out_channels),
        depths=_per_stage(tuple(self.encoder_layers_per_block), ne, "encoder_layers_per_block"),
        qkv_multiscales=tuple(tuple(s) for s in _per_stage(
            tuple(self.encoder_qkv_multiscales), ne, "encoder_qkv_multiscales")),
        downsample_block_type=self.downsample_block_type,
        out_shortcut=self.encoder_out_shortcut, dtype=self.dtype)
    self.decoder = Decoder(
        out_channels=self.in_channels,
        attention_head_dim=self.attention_head_dim,
        block_types=_per_stage(self.decoder_block_types, nd, "decoder_block_types"),
        widths=tuple(self.decoder_block_out_channels),
        depths=_per_stage(tuple(self.decoder_layers_per_block), nd, "decoder_layers_per_block"),
        qkv_multiscales=tuple(tuple(s) for s in _per_stage(
            tuple(self.decoder_qkv_multiscales), nd, "decoder_qkv_multiscales")),
        norm_types=_per_stage(self.decoder_norm_types, nd, "decoder_norm_types"),
        act_fns=_per_stage(self.decoder_act_fns, nd, "decoder_act_fns"),
        upsample_block_type=self.upsample_block_type, in_shortcut=self.decoder_in_shortcut,
        conv_act_fn=self.decoder_conv_act_fn, out_norm=self.decoder_out_norm, dtype=self.dtype)

  def encode(self, x, train: bool = False):
    f = self.spatial_compression_ratio
    if x.shape[1] % f or x.shape[2] % f:
      raise ConfigError(f"DC-AE f{f} needs H and W divisible by {f}; got {x.shape[1]}x"
                        f"{x.shape[2]}. Pad or crop the image (or use jaxgen.models.tiling).")
    return self.encoder(x, train)

  def decode(self, z, train: bool = False):
    return self.decoder(z, train)

  def __call__(self, x, train: bool = False):
    return self.decode(self.encode(x, train), train)


def _hashable(value):
  # ConfigDict / JSON give lists; module fields should be hashable tuples.
  if isinstance(value, (list, tuple)):
    return tuple(_hashable(v) for v in value)
  return value


@MODELS.register("dcae")
def dcae(variant: Optional[str] = None, **overrides) -> DCAE:
  """DCAE from a named variant (e.g. "f32c32-in-1.0") and/or explicit config fields."""
  kwargs = dcae_config(variant) if variant else {}
  kwargs.update(overrides)
  try:
    return DCAE(**{k: _hashable(v) for k, v in kwargs.items()})
  except TypeError as e:
    raise ConfigError(f"dcae: {e}") from None
