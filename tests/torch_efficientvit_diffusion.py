"""PyTorch twins of efficientvit's DC-AE diffusion backbones, for parity tests (no timm).

Same module structure and state-dict names as efficientvit `diffusioncore/models/uvit.py`
(UViT: patch_embed.proj, label_emb.embedding_table, pos_embed, [time_embed.0/.2], in_blocks /
mid_block / out_blocks with norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2, skip_linear,
norm, decoder_pred) and `dit.py` (DiT: x_embedder.proj, t_embedder.mlp.0/.2,
y_embedder.embedding_table, pos_embed, blocks.i.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2,
adaLN_modulation.1}, final_layer.{linear, adaLN_modulation.1}), and their forward maths
(NCHW in and out). `save_checkpoint` writes a DCAE_Diffusion_HF directory: config.json +
model.safetensors with `autoencoder.*` and `diffusion_model.*`.
"""

import json
import math
import os

import numpy as np
import torch
from torch import nn


def timestep_embedding(t, dim, max_period=10000):
  """[cos, sin] of t * exp(-log(max_period) k / half), zero-padded to odd dim."""
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
  args = t[:, None].float() * freqs[None]
  emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
  if dim % 2:
    emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
  return emb


class Attention(nn.Module):
  """Fused qkv Linear, rows [q; k; v] with heads contiguous, then proj."""

  def __init__(self, dim, num_heads, qkv_bias):
    super().__init__()
    self.num_heads = num_heads
    self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
    out = torch.nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):

  def __init__(self, dim, hidden, act):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = act
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):

  def __init__(self, patch, cin, dim):
    super().__init__()
    self.proj = nn.Conv2d(cin, dim, patch, stride=patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class LabelEmbedder(nn.Module):

  def __init__(self, num_classes, dim):
    super().__init__()
    self.embedding_table = nn.Embedding(num_classes + 1, dim)  # + the null label

  def forward(self, y):
    return self.embedding_table(y)


def unpatchify(x, p, c):
  """(B, h*w, p*p*c) -> (B, c, h*p, w*p), square grid, patch entries ordered (p1, p2, c)."""
  b, n, _ = x.shape
  h = w = int(round(n ** 0.5))
  x = x.reshape(b, h, w, p, p, c)
  return torch.einsum("bhwpqc->bchpwq", x).reshape(b, c, h * p, w * p)


class UViTBlock(nn.Module):

  def __init__(self, dim, heads, mlp_ratio, qkv_bias, skip=False):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim)  # torch's default eps 1e-5, as efficientvit's UViT
    self.attn = Attention(dim, heads, qkv_bias)
    self.norm2 = nn.LayerNorm(dim)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), nn.GELU())
    self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

  def forward(self, x, skip=None):
    if self.skip_linear is not None:
      x = self.skip_linear(torch.cat([x, skip], dim=-1))
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
  """efficientvit UViT(cfg) with cfg fields as keyword arguments."""

  def __init__(self, input_size, patch_size=1, in_channels=4, hidden_size=32, depth=2,
               num_heads=4, mlp_ratio=4.0, mlp_time_embed=False, qkv_bias=False,
               num_classes=10):
    super().__init__()
    d = hidden_size
    self.patch_size, self.in_channels, self.hidden_size = patch_size, in_channels, d
    self.patch_embed = PatchEmbed(patch_size, in_channels, d)
    self.time_embed = (nn.Sequential(nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d))
                       if mlp_time_embed else nn.Identity())
    self.label_emb = LabelEmbedder(num_classes, d)
    self.extras = 2
    num_patches = (input_size // patch_size) ** 2
    self.pos_embed = nn.Parameter(torch.randn(1, self.extras + num_patches, d) * 0.1)
    block = lambda skip=False: UViTBlock(d, num_heads, mlp_ratio, qkv_bias, skip)
    self.in_blocks = nn.ModuleList([block() for _ in range(depth // 2)])
    self.mid_block = block()
    self.out_blocks = nn.ModuleList([block(True) for _ in range(depth // 2)])
    self.norm = nn.LayerNorm(d)
    self.decoder_pred = nn.Linear(d, patch_size ** 2 * in_channels)
    self.final_layer = nn.Identity()

  def forward_without_cfg(self, x, timesteps, y):
    x = self.patch_embed(x)
    n = x.shape[1]
    time_token = self.time_embed(timestep_embedding(timesteps, self.hidden_size))[:, None]
    x = torch.cat([time_token, x], dim=1)
    x = torch.cat([self.label_emb(y)[:, None], x], dim=1)
    x = x + self.pos_embed
    skips = []
    for blk in self.in_blocks:
      x = blk(x)
      skips.append(x)
    x = self.mid_block(x)
    for blk in self.out_blocks:
      x = blk(x, skips.pop())
    x = self.decoder_pred(self.norm(x))
    assert x.shape[1] == self.extras + n
    return self.final_layer(unpatchify(x[:, self.extras:], self.patch_size, self.in_channels))


def sincos_pos_embed(dim, grid):
  """DiT's fixed table: first half encodes the column (meshgrid w first), [sin, cos] each."""
  def one_d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
  return np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)


def modulate(x, shift, scale):
  return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):

  def __init__(self, dim, freq=256):
    super().__init__()
    self.freq = freq
    self.mlp = nn.Sequential(nn.Linear(freq, dim), nn.SiLU(), nn.Linear(dim, dim))

  def forward(self, t):
    return self.mlp(timestep_embedding(t, self.freq))


class DiTBlock(nn.Module):

  def __init__(self, dim, heads, mlp_ratio):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    self.attn = Attention(dim, heads, qkv_bias=True)
    self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), nn.GELU(approximate="tanh"))
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

  def forward(self, x, c):
    sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
    x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh1, sc1))
    return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):

  def __init__(self, dim, patch, cout):
    super().__init__()
    self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    self.linear = nn.Linear(dim, patch * patch * cout)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

  def forward(self, x, c):
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
    return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
  """efficientvit DiT(cfg), learn_sigma: outputs [eps, variance] (2 in_channels)."""

  def __init__(self, input_size, patch_size=1, in_channels=4, hidden_size=32, depth=2,
               num_heads=4, mlp_ratio=4.0, num_classes=10):
    super().__init__()
    self.patch_size, self.out_channels = patch_size, 2 * in_channels
    self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
    self.t_embedder = TimestepEmbedder(hidden_size)
    self.y_embedder = LabelEmbedder(num_classes, hidden_size)
    grid = input_size // patch_size
    table = torch.from_numpy(sincos_pos_embed(hidden_size, grid)).float()[None]
    self.pos_embed = nn.Parameter(table, requires_grad=False)
    self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio)
                                 for _ in range(depth)])
    self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

  def forward_without_cfg(self, x, t, y):
    x = self.x_embedder(x) + self.pos_embed
    c = self.t_embedder(t) + self.y_embedder(y)
    for block in self.blocks:
      x = block(x, c)
    return unpatchify(self.final_layer(x, c), self.patch_size, self.out_channels)


def save_checkpoint(path, config: dict, backbone: nn.Module, autoencoder_state: dict):
  """A DCAE_Diffusion_HF directory: config.json + model.safetensors (autoencoder.* in
  efficientvit's layout, numpy arrays; diffusion_model.* from the torch backbone)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  state = {f"autoencoder.{k}": np.ascontiguousarray(v, np.float32)
           for k, v in autoencoder_state.items()}
  for k, v in backbone.state_dict().items():
    state[f"diffusion_model.{k}"] = np.ascontiguousarray(v.detach().numpy())
  save_file(state, os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  return path
