"""PyTorch twin of jaxgen's class-conditional U-Net (jaxgen/models/unet.py), for benchmarks.

Same layers, widths, names and numerics as the flax model, so `load_jax_params` copies a jaxgen
checkpoint in by name and both networks compute the same function (tests/test_unet_torch_parity.py).
Details that must match flax rather than PyTorch habits:
  * GroupNorm epsilon 1e-6 (flax's default; PyTorch's is 1e-5).
  * flax 'SAME' padding of the stride-2 downsample conv pads (0, 1) per axis, not (1, 1).
  * (Un)shuffle channel order is (row offset, column offset, channel), not PyTorch's
    F.pixel_(un)shuffle order (channel, row offset, column offset).
  * Sinusoidal timestep features are [cos, sin] with frequencies exp(-ln(1e4) * i / half).
Tensors are NCHW; `forward(x, t, y)` returns float32 NCHW.
"""

import math
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jaxgen.convert.common import flatten
from jaxgen.errors import WeightsError

GROUP_NORM_EPS = 1e-6  # flax.linen.GroupNorm's default epsilon.


def pixel_unshuffle(x: torch.Tensor, r: int) -> torch.Tensor:
  """(B, C, H, W) -> (B, r*r*C, H/r, W/r), channel index (dy * r + dx) * C + c like jaxgen."""
  if r == 1:
    return x
  b, c, h, w = x.shape
  x = x.reshape(b, c, h // r, r, w // r, r).permute(0, 3, 5, 1, 2, 4)
  return x.reshape(b, r * r * c, h // r, w // r)


def pixel_shuffle(x: torch.Tensor, r: int) -> torch.Tensor:
  """Inverse of `pixel_unshuffle`."""
  if r == 1:
    return x
  b, c, h, w = x.shape
  x = x.reshape(b, r, r, c // (r * r), h, w).permute(0, 3, 4, 1, 5, 2)
  return x.reshape(b, c // (r * r), h * r, w * r)


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
  """jaxgen.nn.embeddings.sinusoidal_embedding with its defaults: [cos, sin], float32."""
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) *
                    torch.arange(half, dtype=torch.float32, device=t.device) / half)
  args = t.float()[:, None] * freqs[None]
  emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
  return F.pad(emb, (0, 1)) if dim % 2 else emb


def group_norm(groups: int, channels: int) -> nn.GroupNorm:
  return nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS)


class TimestepEmbedder(nn.Module):
  def __init__(self, dim: int, frequency_dim: int = 256):
    super().__init__()
    self.frequency_dim = frequency_dim
    self.linear_1 = nn.Linear(frequency_dim, dim)
    self.linear_2 = nn.Linear(dim, dim)

  def forward(self, t):
    h = sinusoidal_embedding(t, self.frequency_dim)
    return self.linear_2(F.silu(self.linear_1(h)))


class LabelEmbedder(nn.Module):
  def __init__(self, num_classes: int, dim: int):
    super().__init__()
    self.embedding_table = nn.Embedding(num_classes + 1, dim)  # Row num_classes: null label.

  def forward(self, y):
    return self.embedding_table(y)


class ResBlock(nn.Module):
  """GroupNorm-SiLU-conv, GroupNorm scaled/shifted by the condition-SiLU-dropout-conv, shortcut."""

  def __init__(self, in_channels: int, channels: int, emb_dim: int, num_groups: int,
               dropout: float):
    super().__init__()
    self.norm1 = group_norm(num_groups, in_channels)
    self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1)
    self.emb_proj = nn.Linear(emb_dim, 2 * channels)  # [scale, shift] (adaGN).
    self.norm2 = group_norm(num_groups, channels)
    self.dropout = nn.Dropout(dropout)
    self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
    self.skip = nn.Conv2d(in_channels, channels, 1) if in_channels != channels else None

  def forward(self, x, emb):
    h = self.conv1(F.silu(self.norm1(x)))
    scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
    h = self.norm2(h) * (1 + scale) + shift
    h = self.conv2(self.dropout(F.silu(h)))
    return (x if self.skip is None else self.skip(x)) + h


class Attention(nn.Module):
  """jaxgen.nn.attention.Attention (self-attention form): to_q/to_k/to_v/to_out Linear."""

  def __init__(self, dim: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.to_q = nn.Linear(dim, dim)
    self.to_k = nn.Linear(dim, dim)
    self.to_v = nn.Linear(dim, dim)
    self.to_out = nn.Linear(dim, dim)

  def forward(self, x):  # (B, N, C)
    b, n, c = x.shape
    split = lambda u: u.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(x)),
                                         split(self.to_v(x)))
    return self.to_out(out.transpose(1, 2).reshape(b, n, c))


class AttentionBlock(nn.Module):
  def __init__(self, channels: int, num_heads: int, num_groups: int):
    super().__init__()
    self.norm = group_norm(num_groups, channels)
    self.attn = Attention(channels, num_heads)

  def forward(self, x):
    b, c, h, w = x.shape
    tokens = self.norm(x).reshape(b, c, h * w).transpose(1, 2)
    return x + self.attn(tokens).transpose(1, 2).reshape(b, c, h, w)


class TorchUNet(nn.Module):
  """jaxgen's `UNet` in PyTorch; submodules carry the flax module names (down_0_block_0, ...).

  Takes the jaxgen config's model kwargs plus `in_channels` (flax infers it from the input).
  """

  def __init__(self, num_classes: int, in_channels: int = 3, out_channels: int = 0,
               patch_size: int = 1, base_channels: int = 64,
               channel_mult: Sequence[int] = (1, 2, 2),
               num_res_blocks: int = 2, attention_levels: Sequence[int] = (2,), num_heads: int = 4,
               num_groups: int = 32, dropout: float = 0.0):
    super().__init__()
    self.patch_size = patch_size
    self.levels = len(channel_mult)
    self.channel_mult = tuple(channel_mult)
    self.num_res_blocks = num_res_blocks
    self.attention_levels = tuple(attention_levels)
    emb_dim = 4 * base_channels
    self.time_embed = TimestepEmbedder(emb_dim)
    self.class_embed = LabelEmbedder(num_classes, emb_dim)
    block = lambda cin, cout: ResBlock(cin, cout, emb_dim, num_groups, dropout)
    attn = lambda ch: AttentionBlock(ch, num_heads, num_groups)

    # Same construction order as the flax model; channel counts tracked by hand.
    self.conv_in = nn.Conv2d(in_channels * patch_size**2, base_channels, 3, padding=1)
    ch, skips = base_channels, [base_channels]
    for level, mult in enumerate(channel_mult):
      for i in range(num_res_blocks):
        self.add_module(f"down_{level}_block_{i}", block(ch, base_channels * mult))
        ch = base_channels * mult
        if level in self.attention_levels:
          self.add_module(f"down_{level}_attn_{i}", attn(ch))
        skips.append(ch)
      if level < self.levels - 1:
        # Padding is applied in forward: flax 'SAME' at stride 2 pads (0, 1).
        self.add_module(f"down_{level}_downsample", nn.Conv2d(ch, ch, 3, stride=2))
        skips.append(ch)
    self.mid_block_0 = block(ch, ch)
    self.mid_attn = attn(ch)
    self.mid_block_1 = block(ch, ch)
    for level in reversed(range(self.levels)):
      for i in range(num_res_blocks + 1):
        self.add_module(f"up_{level}_block_{i}", block(ch + skips.pop(),
                                                       base_channels * channel_mult[level]))
        ch = base_channels * channel_mult[level]
        if level in self.attention_levels:
          self.add_module(f"up_{level}_attn_{i}", attn(ch))
      if level > 0:
        self.add_module(f"up_{level}_upsample", nn.Conv2d(ch, ch, 3, padding=1))
    self.norm_out = group_norm(num_groups, ch)
    self.conv_out = nn.Conv2d(ch, (out_channels or in_channels) * patch_size**2, 3, padding=1)

  def forward(self, x, t, y):
    layer = lambda name: getattr(self, name)
    emb = self.time_embed(t) + self.class_embed(y)
    h = self.conv_in(pixel_unshuffle(x, self.patch_size))
    skips = [h]
    for level in range(self.levels):
      for i in range(self.num_res_blocks):
        h = layer(f"down_{level}_block_{i}")(h, emb)
        if level in self.attention_levels:
          h = layer(f"down_{level}_attn_{i}")(h)
        skips.append(h)
      if level < self.levels - 1:
        h = layer(f"down_{level}_downsample")(F.pad(h, (0, 1, 0, 1)))
        skips.append(h)
    h = self.mid_block_1(self.mid_attn(self.mid_block_0(h, emb)), emb)
    for level in reversed(range(self.levels)):
      for i in range(self.num_res_blocks + 1):
        h = layer(f"up_{level}_block_{i}")(torch.cat([h, skips.pop()], dim=1), emb)
        if level in self.attention_levels:
          h = layer(f"up_{level}_attn_{i}")(h)
      if level > 0:
        h = layer(f"up_{level}_upsample")(F.interpolate(h, scale_factor=2, mode="nearest"))
    out = self.conv_out(F.silu(self.norm_out(h)))
    return pixel_shuffle(out, self.patch_size).float()


# flax leaf name -> PyTorch parameter name.
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and value.ndim == 4:
    return np.transpose(value, (3, 2, 0, 1))  # HWIO -> OIHW.
  if leaf == "kernel" and value.ndim == 2:
    return value.T  # (in, out) -> (out, in).
  return value


def load_jax_params(torch_model: nn.Module, flax_params: Mapping) -> nn.Module:
  """Copies jaxgen UNet params (or {"params": ...} variables) into `torch_model`, in place.

  Every tensor must be matched one to one; otherwise WeightsError names the missing, unused
  and mis-shaped ones. Values keep the torch parameters' device and dtype.
  """
  if "params" in flax_params and len(flax_params) == 1:
    flax_params = flax_params["params"]
  targets = dict(torch_model.named_parameters())
  missing, unused, mismatched = set(targets), [], []
  converted = {}
  for key, value in flatten(flax_params).items():
    *path, leaf = key.split("/")
    name = ".".join(path + [_LEAF_NAMES.get(leaf, leaf)])
    value = _to_torch_layout(leaf, np.asarray(value, np.float32))
    if name not in targets:
      unused.append(key)
    elif tuple(value.shape) != tuple(targets[name].shape):
      mismatched.append(f"{key}: jax {value.shape} -> torch {tuple(targets[name].shape)}")
    else:
      converted[name] = value
      missing.discard(name)
  if missing or unused or mismatched:
    raise WeightsError(
        "jaxgen params do not match the PyTorch U-Net; build both from the same model kwargs "
        f"(and in_channels). torch params without a jax tensor: {sorted(missing)[:20]}; "
        f"jax tensors with no torch param: {unused[:20]}; shape mismatches: {mismatched[:20]}")
  with torch.no_grad():
    for name, value in converted.items():
      targets[name].copy_(torch.from_numpy(np.array(value)))  # A writable copy.
  return torch_model
