"""Timestep and label embeddings shared by the diffusion backbones."""

import math
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp


def sinusoidal_embedding(t, dim: int, *, max_period: float = 10000.0,
                         flip_sin_to_cos: bool = True, freq_shift: float = 0.0):
  """Transformer-style sinusoidal features of (B,) timesteps -> (B, dim), float32.

  Defaults reproduce DiT's `timestep_embedding` ([cos, sin], frequencies over `half`);
  `flip_sin_to_cos=False, freq_shift=1` reproduces diffusers' `get_timestep_embedding` defaults.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedder(nn.Module):
  """Sinusoidal features -> Linear -> SiLU -> Linear (DiT, U-Net, CaT).

  `freq_shift=1` gives diffusers' DiT embedding (CombinedTimestepLabelEmbeddings uses
  downscale_freq_shift=1); facebookresearch/DiT uses 0. With `flip_sin_to_cos` and
  `freq_shift` from a UNet2DConditionModel config and frequency_dim = block_out_channels[0]
  it is diffusers' `Timesteps` + `TimestepEmbedding` (linear_1, SiLU, linear_2).
  """
  dim: int
  frequency_dim: int = 256
  dtype: jnp.dtype = jnp.float32
  freq_shift: float = 0.0
  flip_sin_to_cos: bool = True  # [cos, sin]; False gives [sin, cos].
  hidden_dim: Optional[int] = None  # Width of linear_1; None: dim (U-ViT's time MLP uses 4 dim).

  @nn.compact
  def __call__(self, t):
    h = sinusoidal_embedding(t, self.frequency_dim, flip_sin_to_cos=self.flip_sin_to_cos,
                             freq_shift=self.freq_shift)
    h = nn.Dense(self.hidden_dim or self.dim, dtype=self.dtype, name="linear_1")(h)
    return nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(nn.silu(h))


class LabelEmbedder(nn.Module):
  """Class-label table with one extra row, the null label used for classifier-free guidance.

  Labels equal to `num_classes` mean "unconditional"; label dropout is applied by the
  diffusion objective (it swaps labels for `num_classes`), so sampling and training agree.
  """
  num_classes: int
  dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, y):
    table = nn.Embed(self.num_classes + 1, self.dim, dtype=self.dtype,
                     embedding_init=nn.initializers.normal(0.02), name="embedding_table")
    return table(y)
