"""Stable Diffusion's U-Net: diffusers' `UNet2DConditionModel` in Flax, weight-compatible.

`UNet2DConditionModel(...).apply(v, sample, timesteps, encoder_hidden_states) -> NHWC` with
sample (B, H, W, in_channels) latents, timesteps (B,) or a scalar, encoder_hidden_states
(B, L, cross_attention_dim) text-encoder states; the output (B, H, W, out_channels) is float32.
`unet2d_condition(**config)` builds it from a diffusers config.json (as
`jaxgen.convert.unet2d_condition.from_diffusers` does); the fields are diffusers' config keys
and read as diffusers reads them:

  - `attention_head_dim` is a head COUNT per block (an int for every block, or a list) when
    `num_attention_heads` is None, as in every published config (SD-1.5: 8; SD-2.x:
    [5, 10, 20, 20]); the head width is then block channels // heads. `num_attention_heads`,
    when given, is the head count instead (diffusers' constructor still refuses it).
  - `layers_per_block`, `cross_attention_dim`, `only_cross_attention` and
    `transformer_layers_per_block` are an int / bool for every block or one per block;
    `transformer_layers_per_block` may give one depth per layer of each block (then the up path
    reads `reverse_transformer_layers_per_block`). Up block i mirrors down block n-1-i.
  - `upcast_attention` (SD 2.1) needs nothing here: jax's attention computes its logits and
    softmax in float32 whatever the input dtype, which is what the flag asks diffusers for.

Layout, top to bottom as diffusers' forward: center_input_sample (2x - 1) -> time embedding
(sinusoid of block_out_channels[0] features, flip_sin_to_cos, freq_shift; linear_1, SiLU,
linear_2 to time_embedding_dim or 4 * block_out_channels[0]) -> conv_in -> down_blocks (resnets
[+ SpatialTransformer attentions], then a stride-2 conv, padded as `downsample_padding` says,
except in the last block) -> mid_block (resnet, transformer, resnet; or one resnet for
UNetMidBlock2D; none for None) -> up_blocks (layers + 1 resnets, each on [h, the last skip],
[+ attentions], then nearest upsample to the next skip's size + conv, except in the last) ->
GroupNorm -> SiLU -> conv_out. Non-multiple input sizes work as in diffusers (each upsample
goes to its skip's size).

The shared layers are jaxgen's: resnets are `jaxgen.models.unet.ResBlock` (its
`time_embedding_norm` is `resnet_time_scale_shift`), attentions
`jaxgen.nn.transformer.SpatialTransformer` (GEGLU feed-forward; cross-attention maps recorded
as documented there), the time MLP `jaxgen.nn.embeddings.TimestepEmbedder`. The parameter tree
mirrors diffusers' module tree (`down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_k`,
`down_blocks_0/downsamplers_0/conv`); renamed: resnets' time_emb_proj -> emb_proj and
conv_shortcut -> skip. Not ported (ConfigError from `unet2d_condition`): class and addition
embeddings, encoder_hid_proj, Fourier time embeddings, gated / dual attention and the other
block types.
"""

from typing import Any, NamedTuple, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp

from jaxgen.errors import ConfigError
from jaxgen.models.unet import TIME_EMBEDDING_NORMS, ResBlock, upsample_nearest
from jaxgen.nn.embeddings import TimestepEmbedder
from jaxgen.nn.transformer import SpatialTransformer
from jaxgen.registry import MODELS

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)

PerBlock = Union[int, Sequence[Any]]


class LayerSettings(NamedTuple):
  """What every resnet and transformer of one U-Net shares (hashable, so blocks hold it)."""
  num_groups: int
  norm_eps: float
  time_embedding_norm: str
  dropout: float
  use_linear_projection: bool
  dtype: Any

  def resnet(self, channels: int, name: str, output_scale_factor: float = 1.0) -> ResBlock:
    return ResBlock(channels, self.num_groups, self.dropout, self.dtype,
                    time_embedding_norm=self.time_embedding_norm, norm_eps=self.norm_eps,
                    output_scale_factor=output_scale_factor, name=name)

  def transformer(self, channels: int, num_heads: int, depth: int, only_cross_attention: bool,
                  name: str) -> SpatialTransformer:
    # diffusers: Transformer2DModel(heads, channels // heads, in_channels=channels, ...).
    return SpatialTransformer(num_heads, channels // num_heads, depth, self.num_groups,
                              self.use_linear_projection, dtype=self.dtype,
                              only_cross_attention=only_cross_attention, name=name)


class Downsample2D(nn.Module):
  """diffusers' Downsample2D(use_conv=True): 3x3 stride-2 conv; padding 0 pads right/bottom."""
  channels: int
  padding: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    pad = (self.padding, self.padding) if self.padding else (0, 1)
    return nn.Conv(self.channels, (3, 3), (2, 2), padding=(pad, pad), dtype=self.dtype,
                   name="conv")(x)


class Upsample2D(nn.Module):
  """diffusers' Upsample2D(use_conv=True): nearest resize (x2, or to `size`), then a 3x3 conv."""
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, size: Optional[Sequence[int]] = None):
    return nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                   name="conv")(upsample_nearest(x, size))


class DownBlock(nn.Module):
  """CrossAttnDownBlock2D (`transformer_depths` given, one per layer) or DownBlock2D (None).

  Returns (h, skips): the output after every layer, and after the downsampler.
  """
  layers: LayerSettings
  channels: int
  num_layers: int
  add_downsample: bool
  downsample_padding: int = 1
  num_heads: int = 1
  transformer_depths: Optional[Tuple[int, ...]] = None
  only_cross_attention: bool = False

  @nn.compact
  def __call__(self, x, emb, context, train: bool):
    skips = []
    for j in range(self.num_layers):
      x = self.layers.resnet(self.channels, f"resnets_{j}")(x, emb, train)
      if self.transformer_depths is not None:
        x = self.layers.transformer(self.channels, self.num_heads, self.transformer_depths[j],
                                    self.only_cross_attention, f"attentions_{j}")(x, context)
      skips.append(x)
    if self.add_downsample:
      x = Downsample2D(self.channels, self.downsample_padding, self.layers.dtype,
                       name="downsamplers_0")(x)
      skips.append(x)
    return x, skips


class UpBlock(nn.Module):
  """CrossAttnUpBlock2D (`transformer_depths` given) or UpBlock2D: each layer takes the last of
  `skips` (concatenated on channels); then the upsampler to `upsample_size`."""
  layers: LayerSettings
  channels: int
  num_layers: int
  add_upsample: bool
  num_heads: int = 1
  transformer_depths: Optional[Tuple[int, ...]] = None
  only_cross_attention: bool = False

  @nn.compact
  def __call__(self, x, skips, emb, context, train: bool, upsample_size=None):
    skips = list(skips)
    for j in range(self.num_layers):
      x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
      x = self.layers.resnet(self.channels, f"resnets_{j}")(x, emb, train)
      if self.transformer_depths is not None:
        x = self.layers.transformer(self.channels, self.num_heads, self.transformer_depths[j],
                                    self.only_cross_attention, f"attentions_{j}")(x, context)
    if self.add_upsample:
      x = Upsample2D(self.channels, self.layers.dtype, name="upsamplers_0")(x, upsample_size)
    return x


class MidBlock(nn.Module):
  """UNetMidBlock2DCrossAttn (resnet, transformer, resnet) or, with `transformer_depth` None,
  UNetMidBlock2D as UNet2DConditionModel builds it (one resnet, no attention)."""
  layers: LayerSettings
  num_heads: int = 1
  transformer_depth: Optional[int] = 1
  output_scale_factor: float = 1.0

  @nn.compact
  def __call__(self, x, emb, context, train: bool):
    c = x.shape[-1]
    x = self.layers.resnet(c, "resnets_0", self.output_scale_factor)(x, emb, train)
    if self.transformer_depth is None:
      return x
    x = self.layers.transformer(c, self.num_heads, self.transformer_depth, False,
                                "attentions_0")(x, context)
    return self.layers.resnet(c, "resnets_1", self.output_scale_factor)(x, emb, train)


def _per_block(value, n: int, name: str) -> tuple:
  """diffusers' broadcast of one value to every block; a list must have one per block."""
  if isinstance(value, (tuple, list)):
    if len(value) != n:
      raise ConfigError(f"UNet2DConditionModel {name} {tuple(value)} has {len(value)} entries "
                        f"for {n} blocks; give one per down block (or a single value)")
    return tuple(value)
  return (value,) * n


def _layer_depths(depth, num_layers: int, where: str) -> Tuple[int, ...]:
  """Transformer depth per layer of one block (an int repeats, as the diffusers blocks do)."""
  if isinstance(depth, (tuple, list)):
    if len(depth) != num_layers:
      raise ConfigError(f"UNet2DConditionModel transformer depths {tuple(depth)} for {where} "
                        f"have {len(depth)} entries for its {num_layers} layers")
    return tuple(int(d) for d in depth)
  return (int(depth),) * num_layers


class Plan(NamedTuple):
  """A config resolved per block as diffusers' constructor does (up lists in up-block order)."""
  heads: Tuple[int, ...]
  layers_per_block: Tuple[int, ...]
  cross_attention_dim: Tuple[int, ...]
  only_cross_attention: Tuple[bool, ...]
  down_depths: Tuple[Tuple[int, ...], ...]
  up_depths: Tuple[Tuple[int, ...], ...]
  mid_depth: int


class UNet2DConditionModel(nn.Module):
  """diffusers' UNet2DConditionModel (see the module docstring); fields are its config keys."""
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  down_block_types: Sequence[str] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                     "CrossAttnDownBlock2D", "DownBlock2D")
  mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
  up_block_types: Sequence[str] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                   "CrossAttnUpBlock2D")
  only_cross_attention: Union[bool, Sequence[bool]] = False
  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
  layers_per_block: PerBlock = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  dropout: float = 0.0
  act_fn: str = "silu"
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: PerBlock = 1280
  transformer_layers_per_block: PerBlock = 1
  reverse_transformer_layers_per_block: Optional[Sequence[Any]] = None
  attention_head_dim: PerBlock = 8
  num_attention_heads: Optional[PerBlock] = None
  use_linear_projection: bool = False
  upcast_attention: bool = False  # Always in effect (module docstring).
  resnet_time_scale_shift: str = "default"
  time_embedding_dim: Optional[int] = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  sample_size: Any = None  # Unused here; pipelines read it for their default image size.
  dtype: Any = jnp.float32

  def plan(self) -> Plan:
    """The per-block settings, checked; ConfigError names what is inconsistent."""
    n = len(self.down_block_types)
    if len(self.up_block_types) != n or len(self.block_out_channels) != n:
      raise ConfigError(f"UNet2DConditionModel needs as many up_block_types and "
                        f"block_out_channels as down_block_types ({n}); got "
                        f"{len(self.up_block_types)} and {len(self.block_out_channels)}")
    for kind, types, known in (("down", self.down_block_types, DOWN_BLOCK_TYPES),
                               ("up", self.up_block_types, UP_BLOCK_TYPES)):
      bad = [t for t in types if t not in known]
      if bad:
        raise ConfigError(f"UNet2DConditionModel {kind} block types {bad} are not supported; "
                          f"use {known}")
    if self.mid_block_type not in MID_BLOCK_TYPES:
      raise ConfigError(f"UNet2DConditionModel mid_block_type {self.mid_block_type!r} is not "
                        f"supported; use one of {MID_BLOCK_TYPES}")
    if self.act_fn not in ("silu", "swish"):
      raise ConfigError(f"UNet2DConditionModel act_fn {self.act_fn!r} is not supported; the "
                        "port has SiLU (act_fn 'silu' / 'swish') only")
    if self.resnet_time_scale_shift not in TIME_EMBEDDING_NORMS:
      raise ConfigError(f"UNet2DConditionModel resnet_time_scale_shift "
                        f"{self.resnet_time_scale_shift!r}; use one of {TIME_EMBEDDING_NORMS}")
    if self.norm_num_groups is None:
      raise ConfigError("UNet2DConditionModel norm_num_groups None is not supported (its "
                        "resnets need GroupNorm groups)")
    heads = _per_block(self.num_attention_heads or self.attention_head_dim, n,
                       "num_attention_heads" if self.num_attention_heads else
                       "attention_head_dim")
    layers = tuple(int(v) for v in _per_block(self.layers_per_block, n, "layers_per_block"))
    depths = _per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")
    if self.reverse_transformer_layers_per_block is None:
      if any(isinstance(d, (tuple, list)) for d in depths):
        raise ConfigError("UNet2DConditionModel: per-layer transformer_layers_per_block needs "
                          "reverse_transformer_layers_per_block (as diffusers requires)")
      reverse_depths = tuple(reversed(depths))
    else:
      reverse_depths = _per_block(self.reverse_transformer_layers_per_block, n,
                                  "reverse_transformer_layers_per_block")
    attends = [t.startswith("CrossAttn") for t in self.down_block_types]
    up_attends = [t.startswith("CrossAttn") for t in self.up_block_types]
    # Up block i mirrors down block n-1-i; the mid block uses the last block's settings.
    used = ({i for i in range(n) if attends[i]} | {n - 1 - i for i in range(n) if up_attends[i]}
            | ({n - 1} if self.mid_block_type == "UNetMidBlock2DCrossAttn" else set()))
    if any(not isinstance(heads[i], int) or heads[i] < 1 for i in used):
      raise ConfigError(f"UNet2DConditionModel head counts {heads} must be positive integers "
                        "for the cross-attention blocks")
    mid = depths[-1]
    return Plan(
        heads=tuple(heads),
        layers_per_block=layers,
        cross_attention_dim=tuple(
            int(d) for d in _per_block(self.cross_attention_dim, n, "cross_attention_dim")),
        only_cross_attention=tuple(
            bool(o) for o in _per_block(self.only_cross_attention, n, "only_cross_attention")),
        down_depths=tuple(_layer_depths(d, m, f"down block {i}") if a else None
                          for i, (d, m, a) in enumerate(zip(depths, layers, attends))),
        up_depths=tuple(_layer_depths(d, m + 1, f"up block {i}") if a else None
                        for i, (d, m, a) in enumerate(zip(reverse_depths, layers[::-1],
                                                          up_attends))),
        mid_depth=int(mid[0] if isinstance(mid, (tuple, list)) else mid))

  def _check_inputs(self, sample, encoder_hidden_states, plan: Plan):
    if sample.ndim != 4 or sample.shape[-1] != self.in_channels:
      raise ConfigError(f"UNet2DConditionModel sample must be NHWC (B, H, W, "
                        f"{self.in_channels}); got {sample.shape}")
    dims = {d for d, t in zip(plan.cross_attention_dim, self.down_block_types)
            if t.startswith("CrossAttn")}
    dims |= {d for d, t in zip(plan.cross_attention_dim[::-1], self.up_block_types)
             if t.startswith("CrossAttn")}
    if self.mid_block_type == "UNetMidBlock2DCrossAttn":
      dims.add(plan.cross_attention_dim[-1])
    if (encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != sample.shape[0]
        or (dims and {encoder_hidden_states.shape[-1]} != dims)):
      raise ConfigError(f"UNet2DConditionModel encoder_hidden_states must be (B={sample.shape[0]}"
                        f", L, {'/'.join(map(str, sorted(dims))) or 'D'}); got "
                        f"{encoder_hidden_states.shape}")

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states, train: bool = False):
    plan = self.plan()
    self._check_inputs(sample, encoder_hidden_states, plan)
    n = len(self.block_out_channels)
    layers = LayerSettings(self.norm_num_groups, self.norm_eps, self.resnet_time_scale_shift,
                           self.dropout, self.use_linear_projection, self.dtype)
    context = encoder_hidden_states.astype(self.dtype)
    x = sample.astype(self.dtype)
    if self.center_input_sample:
      x = 2 * x - 1.0

    batch = sample.shape[0]
    timesteps = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), (batch,))
    channels0 = self.block_out_channels[0]
    emb = TimestepEmbedder(self.time_embedding_dim or 4 * channels0, frequency_dim=channels0,
                           dtype=self.dtype, freq_shift=self.freq_shift,
                           flip_sin_to_cos=self.flip_sin_to_cos, name="time_embedding")(timesteps)

    pad = (self.conv_in_kernel - 1) // 2
    x = nn.Conv(channels0, (self.conv_in_kernel,) * 2, padding=((pad, pad), (pad, pad)),
                dtype=self.dtype, name="conv_in")(x)
    skips = [x]
    for i, block_type in enumerate(self.down_block_types):
      attends = block_type == "CrossAttnDownBlock2D"
      x, block_skips = DownBlock(
          layers, self.block_out_channels[i], plan.layers_per_block[i], i < n - 1,
          self.downsample_padding, plan.heads[i] if attends else 1, plan.down_depths[i],
          plan.only_cross_attention[i], name=f"down_blocks_{i}")(x, emb, context, train)
      skips.extend(block_skips)

    if self.mid_block_type is not None:
      depth = plan.mid_depth if self.mid_block_type == "UNetMidBlock2DCrossAttn" else None
      x = MidBlock(layers, plan.heads[-1] if depth else 1, depth, self.mid_block_scale_factor,
                   name="mid_block")(x, emb, context, train)

    heads_up = plan.heads[::-1]
    only_cross_up = plan.only_cross_attention[::-1]
    for i, block_type in enumerate(self.up_block_types):
      num_layers = plan.layers_per_block[::-1][i] + 1
      block_skips, skips = skips[-num_layers:], skips[:-num_layers]
      add_upsample = i < n - 1
      # diffusers upsamples to the next skip's size (exactly 2x when sizes divide evenly).
      size = skips[-1].shape[1:3] if add_upsample and skips else None
      attends = block_type == "CrossAttnUpBlock2D"
      x = UpBlock(layers, self.block_out_channels[::-1][i], num_layers, add_upsample,
                  heads_up[i] if attends else 1, plan.up_depths[i], only_cross_up[i],
                  name=f"up_blocks_{i}")(x, block_skips, emb, context, train, size)

    x = nn.silu(nn.GroupNorm(self.norm_num_groups, epsilon=self.norm_eps,
                             name="conv_norm_out")(x))
    pad = (self.conv_out_kernel - 1) // 2
    x = nn.Conv(self.out_channels, (self.conv_out_kernel,) * 2, padding=((pad, pad), (pad, pad)),
                dtype=self.dtype, name="conv_out")(x)
    return x.astype(jnp.float32)


# Config keys read only to check that a feature this port lacks is off (value: the off value).
_OFF = {
    "class_embed_type": None, "addition_embed_type": None, "num_class_embeds": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "time_embedding_type": "positional",
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "dual_cross_attention": False, "attention_type": "default",
    "class_embeddings_concat": False,
}
# Keys that only configure the parts above or block types this port rejects (SimpleCrossAttn,
# ResnetDownsample): nothing to build from them.
_IGNORED = {"resnet_skip_time_act", "resnet_out_scale_factor", "cross_attention_norm",
            "mid_block_only_cross_attention", "addition_embed_type_num_heads",
            "addition_time_embed_dim", "projection_class_embeddings_input_dim"}


def _hashable(value):
  if isinstance(value, (list, tuple)):
    return tuple(_hashable(v) for v in value)
  return value


@MODELS.register("unet2d_condition")
def unet2d_condition(**config) -> UNet2DConditionModel:
  """UNet2DConditionModel from diffusers config keys ("_"-prefixed keys are ignored); a feature
  this port does not have raises ConfigError naming it."""
  unsupported = {k: config[k] for k, off in _OFF.items()
                 if config.get(k, off) != off and not (off is False and config[k] is None)}
  if unsupported:
    raise ConfigError(f"UNet2DConditionModel options {unsupported} are not supported by "
                      f"jaxgen's port (it has no class / addition embeddings, encoder_hid_proj, "
                      f"Fourier time embedding or gated / dual attention); supported are "
                      f"{_OFF}")
  kwargs = {k: _hashable(v) for k, v in config.items()
            if not k.startswith("_") and k not in _OFF and k not in _IGNORED}
  try:
    model = UNet2DConditionModel(**kwargs)
  except TypeError as e:
    raise ConfigError(f"unet2d_condition: {e}") from None
  model.plan()  # Raises on an inconsistent config now, not at the first call.
  return model
