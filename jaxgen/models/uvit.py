"""U-ViT (Bao et al. 2023, arXiv 2209.12152): a ViT with long skips, DC-AE's diffusion backbone.

Follows baofff/U-ViT `libs/uvit.py`: the time and the label are tokens ([label, time, patches]
with a learned position table), depth//2 in-blocks, one mid block and depth//2 out-blocks; each
out-block first mixes in the matching in-block's output through Linear(2d -> d) on the
concatenation (the long skip). Pre-LN blocks, no qkv bias, exact GELU, a final LayerNorm and a
linear patch decoder (optionally a 3x3 conv on the image, `conv_out`, as for pixel space).
NHWC in and out: `apply({"params": p}, x, t, y, train=False)`, y == num_classes the null label
(U-ViT's 1001-entry label table).
"""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from jaxgen.errors import ConfigError
from jaxgen.nn.attention import Attention
from jaxgen.nn.embeddings import LabelEmbedder, TimestepEmbedder, sinusoidal_embedding
from jaxgen.registry import MODELS

_trunc = nn.initializers.truncated_normal(0.02)  # U-ViT's init for linears and pos_embed.


class UViTBlock(nn.Module):
  """[skip Linear(2d -> d) on concat(x, skip)], x + attn(LN(x)), x + MLP(LN(x))."""
  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = False
  skip: bool = False
  dtype: jnp.dtype = jnp.float32
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x, skip=None):
    d = self.hidden_size
    if self.skip:
      x = nn.Dense(d, kernel_init=_trunc, dtype=self.dtype, name="skip_linear")(
          jnp.concatenate([x, skip], axis=-1))
    x = x + Attention(d, self.num_heads, qkv_bias=self.qkv_bias, dtype=self.dtype,
                      name="attn")(nn.LayerNorm(epsilon=self.norm_eps, name="norm1")(x))
    h = nn.LayerNorm(epsilon=self.norm_eps, name="norm2")(x)
    h = nn.Dense(int(d * self.mlp_ratio), kernel_init=_trunc, dtype=self.dtype, name="fc1")(h)
    h = nn.Dense(d, kernel_init=_trunc, dtype=self.dtype, name="fc2")(
        nn.gelu(h, approximate=False))
    return x + h


class UViT(nn.Module):
  """U-ViT on NHWC inputs; `depth` counts the in- and out-blocks (depth + 1 blocks in all)."""
  depth: int = 12
  hidden_size: int = 512
  num_heads: int = 8
  patch_size: int = 2
  num_classes: int = 1000
  mlp_ratio: float = 4.0
  qkv_bias: bool = False
  mlp_time_embed: bool = False  # False: the time token is the raw sinusoidal features.
  skip: bool = True
  conv_out: bool = False
  learn_sigma: bool = False
  out_channels: Optional[int] = None
  dtype: jnp.dtype = jnp.float32
  # LayerNorm epsilon of every norm. U-ViT and efficientvit's UViT use torch's default 1e-5
  # (jaxgen.convert.efficientvit_diffusion sets it); 1e-6 is flax's default, kept for the
  # models trained here.
  norm_eps: float = 1e-6
  # Hidden width of the time MLP (mlp_time_embed); None: hidden_size. U-ViT's is 4 hidden_size.
  time_embed_hidden: Optional[int] = None

  @nn.compact
  def __call__(self, x, t, y, train: bool = False):
    del train
    b, h, w, cin = x.shape
    p, d = self.patch_size, self.hidden_size
    if h % p or w % p:
      raise ConfigError(f"U-ViT with patch_size {p} needs H and W divisible by {p}; got "
                        f"{h}x{w}. Change the latent size or model.patch_size.")
    if self.depth % 2:
      raise ConfigError(f"U-ViT depth must be even (depth//2 in- and out-blocks); got {self.depth}")
    out_channels = self.out_channels or cin * (2 if self.learn_sigma else 1)
    gh, gw = h // p, w // p

    patches = nn.Conv(d, (p, p), strides=p, padding="VALID", dtype=self.dtype,
                      name="patch_embed")(x).reshape(b, gh * gw, d)
    if self.mlp_time_embed:
      time_token = TimestepEmbedder(d, frequency_dim=d, hidden_dim=self.time_embed_hidden,
                                    dtype=self.dtype, name="time_embed")(t)
    else:
      time_token = sinusoidal_embedding(t, d).astype(patches.dtype)
    label_token = LabelEmbedder(self.num_classes, d, dtype=self.dtype, name="label_emb")(y)
    tokens = jnp.concatenate([label_token[:, None], time_token[:, None], patches], axis=1)
    extras = 2
    tokens = tokens + self.param("pos_embed", _trunc, (1, extras + gh * gw, d))

    block = lambda name, skip=False: UViTBlock(d, self.num_heads, self.mlp_ratio, self.qkv_bias,
                                               skip, self.dtype, self.norm_eps, name=name)
    skips = []
    for i in range(self.depth // 2):
      tokens = block(f"in_blocks_{i}")(tokens)
      skips.append(tokens)
    tokens = block("mid_block")(tokens)
    for i in range(self.depth // 2):
      tokens = block(f"out_blocks_{i}", self.skip)(tokens, skips.pop())

    tokens = nn.LayerNorm(epsilon=self.norm_eps, name="norm")(tokens)
    out = nn.Dense(p * p * out_channels, kernel_init=_trunc, dtype=self.dtype,
                   name="decoder_pred")(tokens)[:, extras:]
    out = out.reshape(b, gh, gw, p, p, out_channels).transpose(0, 1, 3, 2, 4, 5)
    out = out.reshape(b, h, w, out_channels)
    if self.conv_out:
      out = nn.Conv(out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                    name="final_layer")(out)
    return out.astype(jnp.float32)


# depth, hidden_size, num_heads (baofff/U-ViT configs; "S" has 13 blocks: 6 in, mid, 6 out).
UVIT_SIZES = {"S": (12, 512, 8), "M": (16, 768, 12), "L": (20, 1024, 16), "H": (28, 1152, 16),
              "2B": (28, 2048, 32)}


@MODELS.register("uvit")
def uvit(size: Optional[str] = None, **kwargs) -> UViT:
  """U-ViT from a size name ("S", "M", "L", "H", "2B"; "UViT-H" works too) and/or fields."""
  preset = {}
  if size is not None:
    key = size.upper().replace("UVIT-", "").replace("U-VIT-", "")
    if key not in UVIT_SIZES:
      raise ConfigError(f"unknown U-ViT size {size!r}; known: {sorted(UVIT_SIZES)}")
    preset = dict(zip(("depth", "hidden_size", "num_heads"), UVIT_SIZES[key]))
  return UViT(**{**preset, **kwargs})
