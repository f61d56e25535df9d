"""PatchGAN discriminator (pix2pix / taming-transformers `NLayerDiscriminator`), NHWC.

  conv4x4/2 (ndf) -> LeakyReLU(0.2)
  n_layers - 1 times: conv4x4/2 (ndf * min(2^n, 8), no bias) -> norm -> LeakyReLU(0.2)
  conv4x4/1 (ndf * min(2^n_layers, 8), no bias) -> norm -> LeakyReLU(0.2)
  conv4x4/1 -> 1 logit per patch

All convs pad 1 on each side as PyTorch does. Weights start at N(0, 0.02) (taming's
weights_init). `norm`: "batch_norm" (taming's default; statistics in `batch_stats`),
"group_norm" (no state) or "none". Returns (B, h, w, 1) patch logits.
"""

from typing import Optional

import flax.linen as nn

from jaxgen.errors import ConfigError
from jaxgen.registry import MODELS

_INIT = nn.initializers.normal(0.02)


class PatchGAN(nn.Module):
  """Patch logits for images (B, H, W, C) in [-1, 1]."""
  ndf: int = 64
  n_layers: int = 3
  norm: str = "batch_norm"
  dtype: Optional[object] = None

  def _norm(self, x, train: bool, name: str):
    if self.norm == "batch_norm":
      # PyTorch BatchNorm2d(momentum=0.1) == flax momentum 0.9.
      return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                          scale_init=lambda k, s, d: 1.0 + _INIT(k, s, d), dtype=self.dtype,
                          name=name)(x)
    if self.norm == "group_norm":
      return nn.GroupNorm(num_groups=min(32, x.shape[-1]), dtype=self.dtype, name=name)(x)
    if self.norm == "none":
      return x
    raise ConfigError(f"patchgan norm {self.norm!r}: use batch_norm, group_norm or none")

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = lambda f, stride, bias, name: nn.Conv(
        f, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)), use_bias=bias,
        kernel_init=_INIT, dtype=self.dtype, name=name)
    x = nn.leaky_relu(conv(self.ndf, 2, True, "conv_0")(x), 0.2)
    for n in range(1, self.n_layers + 1):
      stride = 2 if n < self.n_layers else 1
      x = conv(self.ndf * min(2 ** n, 8), stride, self.norm == "none", f"conv_{n}")(x)
      x = nn.leaky_relu(self._norm(x, train, f"norm_{n}"), 0.2)
    return conv(1, 1, True, "conv_out")(x)


@MODELS.register("patchgan")
def patchgan(ndf: int = 64, n_layers: int = 3, norm: str = "batch_norm",
             dtype: Optional[object] = None) -> PatchGAN:
  return PatchGAN(ndf=ndf, n_layers=n_layers, norm=norm, dtype=dtype)
