"""UNet2DConditionModel: parity with diffusers on random weights, config reading, errors.

Each tiny diffusers U-Net (every weight random: norms, zero-initialised convs and projections
included) is saved with save_pretrained, loaded through `jaxgen.convert.from_diffusers` and
must compute diffusers' output to 1e-4 of its scale in float32: an SD-1.5-like config (one head
count for every block, 1x1-conv projections), an SD-2-like one (linear projections, per-block
head counts, upcast_attention, a scalar timestep) and one of odd sizes (3 blocks, one layer
each, two transformer layers, cross_attention_dim 24, a non-square input that is no multiple
of the U-Net's factor, zero downsample padding, scale-shift resnets, [sin, cos] timesteps
shifted by 1, center_input_sample, only_cross_attention in the first block).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxgen.convert import from_diffusers, load_converted
from jaxgen.convert.saved import save_converted
from jaxgen.convert.unet2d_condition import convert_diffusers_state
from jaxgen.errors import ConfigError, WeightsError
from jaxgen.models.unet2d_condition import unet2d_condition

CONFIGS = {
    "sd15": dict(
        block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, cross_attention_dim=32, sample_size=16),
    "sd2": dict(
        block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 8), cross_attention_dim=16, use_linear_projection=True,
        upcast_attention=True, sample_size=16),
    "odd": dict(
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2, cross_attention_dim=24, transformer_layers_per_block=2,
        only_cross_attention=(True, False, False), downsample_padding=0,
        resnet_time_scale_shift="scale_shift", flip_sin_to_cos=False, freq_shift=1,
        center_input_sample=True, in_channels=3, out_channels=5, sample_size=12),
}
# (H, W) of the latents and the timesteps of each case.
INPUTS = {"sd15": ((16, 16), [10, 999]), "sd2": ((16, 16), 321), "odd": ((10, 14), [0, 500])}


def _diffusers_unet(config, seed=0):
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  model = UNet2DConditionModel(**config).eval()
  with torch.no_grad():  # Non-zero everywhere (norm affines, zero-initialised layers too).
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def saved_unets(tmp_path_factory):
  """{name: (diffusers model, its save_pretrained directory)}, built once per module."""
  cache = {}

  def get(name):
    if name not in cache:
      ref = _diffusers_unet(CONFIGS[name])
      path = str(tmp_path_factory.mktemp(name))
      ref.save_pretrained(path)
      cache[name] = ref, path
    return cache[name]
  return get


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_diffusers(name, saved_unets):
  ref, path = saved_unets(name)
  model, variables = from_diffusers(path)
  (h, w), timesteps = INPUTS[name]
  gen = torch.Generator().manual_seed(1)
  x = torch.randn(2, ref.config.in_channels, h, w, generator=gen)
  ctx = torch.randn(2, 7, CONFIGS[name]["cross_attention_dim"], generator=gen)
  with torch.no_grad():
    want = ref(x, torch.tensor(timesteps), ctx).sample.permute(0, 2, 3, 1).numpy()
  got = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(x.permute(0, 2, 3, 1).numpy()),
                                        jnp.asarray(timesteps), jnp.asarray(ctx.numpy())))
  assert got.shape == want.shape == (2, h, w, ref.config.out_channels)
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


def test_head_count_reading(saved_unets):
  """attention_head_dim is a head count (per block when a list; head width = channels // count,
  which need not divide); num_attention_heads, when set, is the count instead."""
  _, path = saved_unets("sd2")
  with open(f"{path}/config.json") as f:
    config = json.load(f)
  assert unet2d_condition(**config).plan().heads == (2, 8)
  renamed = dict(config, num_attention_heads=[2, 8], attention_head_dim=99)
  assert unet2d_condition(**renamed).plan().heads == (2, 8)
  assert unet2d_condition(**CONFIGS["sd15"]).plan().heads == (4, 4)
  # 3 heads of 32 // 3 = 10 channels: inner width 30, as diffusers builds it.
  ref = _diffusers_unet(dict(CONFIGS["sd15"], attention_head_dim=3))
  assert ref.state_dict()["down_blocks.0.attentions.0.proj_in.weight"].shape[0] == 30
  _, variables = convert_diffusers_state(
      dict(ref.config), {k: v.numpy() for k, v in ref.state_dict().items()})
  assert variables["params"]["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"].shape == (
      1, 1, 32, 30)


def test_converted_directory_round_trip(saved_unets, tmp_path):
  _, path = saved_unets("sd15")
  model, variables = from_diffusers(path)
  loaded, loaded_vars = load_converted(save_converted(str(tmp_path / "unet"), model, variables))
  assert loaded == model
  jax.tree.map(np.testing.assert_array_equal, loaded_vars, variables)


def test_missing_tensor_is_named(saved_unets):
  ref, _ = saved_unets("sd15")
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  del state["up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
  del state["down_blocks.0.resnets.1.time_emb_proj.weight"]
  with pytest.raises(WeightsError, match="up_blocks_1/attentions_0/transformer_blocks_0/attn2/"
                     "to_k/kernel.*down_blocks_0/resnets_1/emb_proj/kernel|down_blocks_0/"
                     "resnets_1/emb_proj/kernel.*up_blocks_1/attentions_0"):
    convert_diffusers_state(dict(ref.config), state)


@pytest.mark.parametrize("option, value", [
    ("class_embed_type", "timestep"), ("addition_embed_type", "text_time"),
    ("num_class_embeds", 10), ("encoder_hid_dim", 8), ("time_embedding_type", "fourier"),
    ("down_block_types", ("SimpleCrossAttnDownBlock2D", "DownBlock2D")),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"), ("act_fn", "gelu"),
    ("resnet_time_scale_shift", "ada_group"), ("layers_per_block", (1, 2, 3)),
    ("not_a_diffusers_key", 1)])
def test_unsupported_configs_raise_config_error(option, value):
  with pytest.raises(ConfigError, match=option if option != "down_block_types" else "down"):
    unet2d_condition(**dict(CONFIGS["sd15"], **{option: value}))


def test_input_shapes_are_checked():
  model = unet2d_condition(**CONFIGS["sd15"])
  x = jnp.zeros((1, 8, 8, 4))
  with pytest.raises(ConfigError, match="encoder_hidden_states"):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), x, 1, jnp.zeros((1, 3, 31)))
  with pytest.raises(ConfigError, match="NHWC"):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4, 8, 8)), 1,
                   jnp.zeros((1, 3, 32)))
