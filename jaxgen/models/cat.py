"""CaT: the condition-aware EfficientViT diffusion backbone of CAN (Cai et al. 2024, arXiv 2404.01143).

CAN's code was never released, so the macro architecture is jaxgen's, built from the
EfficientViT blocks in `jaxgen.nn.efficientvit` and the condition-aware layers in
`jaxgen.nn.condition_aware`:

  latent (H, W, C) -> patch embedding (condition-aware p x p conv, stride p)
  encoder levels l = 0..L-1 (level l > 0 starts with a stride-2 block, no shortcut):
      "fmb": x + FusedMBConv(x)                       (kxk expand, 1x1 project)
      "mb":  x + MBConv(x)                            (1x1, CA depthwise kxk, 1x1)
      "att": x + LiteMLA(x), then x + MBConv(x)       (EfficientViT block, CA depthwise)
  decoder levels l = L-2..0 (U-Net-like, as in U-ViT's long skips): nearest x2 upsample,
      1x1 conv to the level width, concat with the encoder output of level l, 1x1 conv
      (2w -> w), then the level's blocks again
  head: RMSNorm, GELU, condition-aware 1x1 conv (zero-initialised: output 0 at init), then
      depth-to-space by p.

The condition c = TimestepEmbedder(t) + LabelEmbedder(y) (null label = num_classes) enters only
through the condition-aware layers, as in CaT (no adaLN): the patch embedding, every depthwise
conv (the `ca_depthwise_conv` kernel; `ca_impl` picks Pallas or XLA) and the output head; each
is a config flag. `adaln=True` adds the baseline CAN is compared with (for ablations), adaLN-Zero
as DiT's: every residual branch (LiteMLA, the local module of a block with a shortcut) sees
x normalised (RMS, no affine) then modulated, RMS(x) * (1 + scale(c)) + shift(c), and its
output is multiplied by gate(c), x + gate(c) * branch(...), with shift/scale/gate from one
zero-initialised linear of silu(c) per block; the head's norm is modulated the same way.
Norms are RMSNorm (EfficientViT's BatchNorm would mix samples of different timesteps),
activations GELU(tanh), as EfficientViT-L.

Sizes (the paper's CaT widths/depths are not public). EfficientViT's classification stages run
at 1/2 .. 1/32 of the image; a latent is already at 1/8 (SD-VAE) to 1/32 (DC-AE f32) of it, so
CaT keeps the *last three* EfficientViT stages as its three levels (widths, depths, block kinds,
expand ratios and attention head dim taken from the named EfficientViT model):
  EfficientViT-L0: widths 32,64,128,256,512 depths 1,1,1,4,4 stages res,fmb,fmb,mb,att,
      expand 1,4,4,4,6, head dim 32     -> CaT-L0: (128,256,512) (1,4,4) (fmb,mb,att) (4,4,6)
  EfficientViT-L1: depths 1,1,1,6,6     -> CaT-L1: (128,256,512) (1,6,6)
  EfficientViT-B0: widths 8,16,32,64,128 depths 1,2,2,2,2, MBConv stages then EfficientViT
      blocks in the last two, expand 4, head dim 16  -> CaT-B0: (32,64,128) (2,2,2) (mb,att,att)
  CaT-S0 (jaxgen's, half of B0 for smoke tests and ablations): (16,32,64) (1,1,1) (mb,att,att)
"""

import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.errors import ConfigError
from jaxgen.nn.condition_aware import CAConv, CADepthwiseConv
from jaxgen.nn.efficientvit import ConvLayer, FusedMBConv, LiteMLA, MBConv, RMSNorm2d, pixel_shuffle
from jaxgen.nn.embeddings import LabelEmbedder, TimestepEmbedder
from jaxgen.registry import MODELS

BLOCK_KINDS = ("fmb", "mb", "att")
NORM, ACT = "rms_norm", "gelu"


class CaTBlock(nn.Module):
  """One block of a level; `strides=2` makes it the level's downsampling block (no shortcut)."""
  kind: str
  features: int
  expand_ratio: float
  head_dim: int = 32
  scales: Sequence[int] = (5,)
  strides: int = 1
  ca_depthwise: bool = True
  ca_impl: str = "auto"
  adaln: bool = False  # adaLN-Zero on the residual branches (the downsampling block has none).
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, x, c):
    shortcut = self.strides == 1 and x.shape[-1] == self.features
    branches = 2 if self.kind == "att" else 1
    mods = (adaln_modulation(c, self.features, 3 * branches, self.dtype or x.dtype)
            if self.adaln and shortcut else None)

    def branch_input(x, i):
      return x if mods is None else modulate(x, mods[3 * i], mods[3 * i + 1])

    def add_branch(x, out, i):
      return x + (out if mods is None else mods[3 * i + 2] * out)

    if self.kind == "att" and shortcut:
      x = add_branch(x, LiteMLA(self.features, dim=self.head_dim, norm=(None, NORM),
                                scales=self.scales, dtype=self.dtype,
                                name="context_module")(branch_input(x, 0)), 0)
    h = branch_input(x, branches - 1)
    if self.kind == "fmb":
      out = FusedMBConv(self.features, strides=self.strides, expand_ratio=self.expand_ratio,
                        use_bias=(True, False), norm=(None, NORM), act=(ACT, None),
                        dtype=self.dtype, name="local_module")(h)
    else:  # "mb", and the local module of "att"
      dw_cls = (functools.partial(CADepthwiseConv, impl=self.ca_impl) if self.ca_depthwise
                else None)
      mb = MBConv(self.features, strides=self.strides, expand_ratio=self.expand_ratio,
                  use_bias=(True, True, False), norm=(None, None, NORM), act=(ACT, ACT, None),
                  dtype=self.dtype, depthwise_conv_cls=dw_cls, name="local_module")
      out = mb(h, cond=c) if self.ca_depthwise else mb(h)
    return add_branch(x, out, branches - 1) if shortcut else out


def adaln_modulation(c, features: int, chunks: int, dtype):
  """`chunks` (B, 1, 1, features) maps from one zero-initialised linear of silu(c)."""
  m = nn.Dense(chunks * features, kernel_init=nn.initializers.zeros,
               bias_init=nn.initializers.zeros, name="adaLN_modulation")(nn.silu(c))
  return jnp.split(m[:, None, None, :].astype(dtype), chunks, axis=-1)


def modulate(x, shift, scale, eps: float = 1e-6):
  """adaLN: RMS-normalised x (no affine parameters; statistics in fp32), scaled and shifted."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (y * (1 + scale) + shift).astype(x.dtype)


class CaT(nn.Module):
  """U-shaped EfficientViT diffusion backbone: `apply(variables, x, t, y, train=False) -> NHWC`."""
  widths: Sequence[int] = (128, 256, 512)
  depths: Sequence[int] = (1, 4, 4)
  block_kinds: Sequence[str] = ("fmb", "mb", "att")
  expand_ratios: Sequence[float] = (4, 4, 6)
  head_dim: int = 32
  scales: Sequence[int] = (5,)
  patch_size: int = 1
  num_classes: int = 1000
  cond_dim: Optional[int] = None  # Condition embedding width; None: the widest level's.
  learn_sigma: bool = False
  out_channels: Optional[int] = None
  ca_patch_embed: bool = True
  ca_depthwise: bool = True
  ca_head: bool = True
  ca_impl: str = "auto"
  adaln: bool = False
  dtype: Optional[jnp.dtype] = None

  def _check(self, h, w):
    n = len(self.widths)
    if not (len(self.depths) == len(self.block_kinds) == len(self.expand_ratios) == n):
      raise ConfigError("CaT widths, depths, block_kinds and expand_ratios need one entry per "
                        f"level; got {self.widths}, {self.depths}, {self.block_kinds}, "
                        f"{self.expand_ratios}")
    bad = [k for k in self.block_kinds if k not in BLOCK_KINDS]
    if bad:
      raise ConfigError(f"unknown CaT block kinds {bad}; use {BLOCK_KINDS}")
    factor = self.patch_size * 2 ** (n - 1)
    if h % factor or w % factor:
      raise ConfigError(f"CaT with {n} levels and patch_size {self.patch_size} needs H and W "
                        f"divisible by {factor}; got {h}x{w}. Change the latent size, "
                        "model.patch_size or the number of levels.")

  @nn.compact
  def __call__(self, x, t, y, train: bool = False):
    del train
    b, h, w, cin = x.shape
    self._check(h, w)
    p = self.patch_size
    out_channels = self.out_channels or cin * (2 if self.learn_sigma else 1)
    cond_dim = self.cond_dim or max(self.widths)
    c = TimestepEmbedder(cond_dim, dtype=self.dtype or jnp.float32, name="t_embedder")(t)
    c = c + LabelEmbedder(self.num_classes, cond_dim, dtype=self.dtype or jnp.float32,
                          name="y_embedder")(y)

    if self.ca_patch_embed:
      x = CAConv(self.widths[0], (p, p), strides=p, dtype=self.dtype, name="patch_embed")(x, c)
    else:
      x = nn.Conv(self.widths[0], (p, p), strides=p, padding="VALID", dtype=self.dtype,
                  name="patch_embed")(x)

    def blocks(x, level, prefix, first_stride=1):
      for i in range(self.depths[level]):
        x = CaTBlock(self.block_kinds[level], self.widths[level], self.expand_ratios[level],
                     self.head_dim, tuple(self.scales), first_stride if i == 0 else 1,
                     ca_depthwise=self.ca_depthwise, ca_impl=self.ca_impl, adaln=self.adaln,
                     dtype=self.dtype, name=f"{prefix}_{level}_block_{i}")(x, c)
      return x

    skips = []
    for level in range(len(self.widths)):
      if level > 0:
        # The level's kind at stride 2 (MBConv for "att" levels, as EfficientViT) downsamples.
        kind = "fmb" if self.block_kinds[level] == "fmb" else "mb"
        x = CaTBlock(kind, self.widths[level], self.expand_ratios[level], strides=2,
                     ca_depthwise=self.ca_depthwise, ca_impl=self.ca_impl, dtype=self.dtype,
                     name=f"down_{level}")(x, c)
      x = blocks(x, level, "enc")
      skips.append(x)

    skips.pop()  # The deepest level feeds the decoder directly.
    for level in reversed(range(len(self.widths) - 1)):
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      x = ConvLayer(self.widths[level], 1, use_bias=True, dtype=self.dtype,
                    name=f"up_{level}_proj")(x)
      x = ConvLayer(self.widths[level], 1, use_bias=True, dtype=self.dtype,
                    name=f"up_{level}_skip")(jnp.concatenate([x, skips.pop()], axis=-1))
      x = blocks(x, level, "dec")

    x = RMSNorm2d(dtype=self.dtype, name="norm_out")(x)
    if self.adaln:  # As DiT's final layer: the head's norm modulated by c.
      shift, scale = adaln_modulation(c, x.shape[-1], 2, x.dtype)
      x = x * (1 + scale) + shift
    x = nn.gelu(x, approximate=True)
    head = p * p * out_channels
    if self.ca_head:
      x = CAConv(head, (1, 1), kernel_init=nn.initializers.zeros, dtype=self.dtype,
                 name="head")(x, c)
    else:
      x = nn.Conv(head, (1, 1), kernel_init=nn.initializers.zeros, dtype=self.dtype,
                  name="head")(x)
    return pixel_shuffle(x, p).astype(jnp.float32) if p > 1 else x.astype(jnp.float32)


CAT_SIZES = {
    "S0": dict(widths=(16, 32, 64), depths=(1, 1, 1), block_kinds=("mb", "att", "att"),
               expand_ratios=(4, 4, 4), head_dim=16),
    "B0": dict(widths=(32, 64, 128), depths=(2, 2, 2), block_kinds=("mb", "att", "att"),
               expand_ratios=(4, 4, 4), head_dim=16),
    "L0": dict(widths=(128, 256, 512), depths=(1, 4, 4), block_kinds=("fmb", "mb", "att"),
               expand_ratios=(4, 4, 6), head_dim=32),
    "L1": dict(widths=(128, 256, 512), depths=(1, 6, 6), block_kinds=("fmb", "mb", "att"),
               expand_ratios=(4, 4, 6), head_dim=32),
}


@MODELS.register("cat")
def cat(size: Optional[str] = None, **kwargs) -> CaT:
  """CaT from a size ("S0", "B0", "L0", "L1"; "CaT-L0" works too) and/or explicit fields."""
  preset = {}
  if size is not None:
    key = size.upper().replace("CAT-", "").replace("CAT_", "")
    if key not in CAT_SIZES:
      raise ConfigError(f"unknown CaT size {size!r}; known: {sorted(CAT_SIZES)}")
    preset = CAT_SIZES[key]
  return CaT(**{**preset, **kwargs})
