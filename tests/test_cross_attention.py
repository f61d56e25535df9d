"""Cross-attention conditioning: SpatialTransformer parity with diffusers, U-Net / DiT options.

The SpatialTransformer loaded from a random diffusers `Transformer2DModel` (continuous input,
GEGLU, cross-attention; every weight random, proj_out included) computes the same function
to 1e-4 of the output scale in float32, with 1x1-conv and with linear projections.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxgen.convert.spatial_transformer import convert_diffusers_state
from jaxgen.errors import ConfigError, WeightsError
from jaxgen.models.dit import DiT, can_dit
from jaxgen.models.unet import UNet
from jaxgen.nn.transformer import ATTENTION_MAPS, SpatialTransformer, recorded_maps

CONTEXT_DIM = 12


def _diffusers_transformer(linear: bool, seed: int = 0):
  from diffusers import Transformer2DModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  model = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16,
                             num_layers=2, norm_num_groups=4, cross_attention_dim=CONTEXT_DIM,
                             use_linear_projection=linear).eval()
  with torch.no_grad():  # Non-zero everywhere (LayerNorm / GroupNorm affine too).
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.mark.parametrize("linear", [False, True])
def test_spatial_transformer_matches_diffusers(linear):
  ref = _diffusers_transformer(linear)
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  module, variables = convert_diffusers_state(dict(ref.config), state)
  assert module.use_linear_projection == linear and module.depth == 2
  gen = torch.Generator().manual_seed(1)
  x = torch.randn(2, 16, 4, 6, generator=gen)
  ctx = torch.randn(2, 5, CONTEXT_DIM, generator=gen)
  with torch.no_grad():
    want = ref(x, encoder_hidden_states=ctx).sample.permute(0, 2, 3, 1).numpy()
  x_nhwc = jnp.asarray(x.permute(0, 2, 3, 1).numpy())
  got = np.asarray(jax.jit(module.apply)(variables, x_nhwc, jnp.asarray(ctx.numpy())))
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-4

  # Recording the maps takes the explicit-softmax path: same output, probabilities over tokens.
  out, state = jax.jit(lambda v, x, c: module.apply(v, x, c, mutable=[ATTENTION_MAPS]))(
      variables, x_nhwc, jnp.asarray(ctx.numpy()))
  np.testing.assert_allclose(np.asarray(out), got, rtol=0, atol=1e-5 * np.abs(want).max())
  maps = recorded_maps(state[ATTENTION_MAPS])
  assert sorted(maps) == ["transformer_blocks_0", "transformer_blocks_1"]
  for m in maps.values():
    assert m.shape == (2, 2, 4, 6, 5)
    np.testing.assert_allclose(np.asarray(m.sum(-1)), 1.0, atol=1e-5)


def test_conversion_names_missing_tensors():
  ref = _diffusers_transformer(False)
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  del state["transformer_blocks.1.attn2.to_k.weight"]
  with pytest.raises(WeightsError, match="transformer_blocks_1/attn2/to_k/kernel"):
    convert_diffusers_state(dict(ref.config), state)
  with pytest.raises(WeightsError, match="activation_fn"):
    convert_diffusers_state(dict(ref.config, activation_fn="gelu"), state)


def test_spatial_transformer_starts_as_identity():
  module = SpatialTransformer(num_heads=2, head_dim=4, num_groups=4)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 4, 4, 8)), jnp.float32)
  ctx = jnp.asarray(rng.standard_normal((2, 3, 6)), jnp.float32)
  variables = jax.jit(module.init)(jax.random.PRNGKey(2), x, ctx)
  assert ATTENTION_MAPS not in variables  # init records nothing.
  np.testing.assert_array_equal(np.asarray(jax.jit(module.apply)(variables, x, ctx)),
                                np.asarray(x))


def _randomize(params, seed=0):
  """Random values of the shapes of `params` (arrays or ShapeDtypeStructs); numpy is fast."""
  rng = np.random.default_rng(seed)
  def draw(p):
    scale = 1.0 / np.sqrt(np.prod(p.shape[:-1])) if len(p.shape) >= 2 else 0.1
    return jnp.asarray(scale * rng.standard_normal(p.shape), jnp.float32)
  return jax.tree_util.tree_map(draw, params)


def _shapes(model, *args, **kwargs):
  """The params' shapes without running the initialisers."""
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, **kwargs))["params"]


UNET = dict(num_classes=10, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
            attention_levels=(1,), num_heads=2, num_groups=4)


def test_unet_cross_attention_context_and_label_modes():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 1)), jnp.float32)
  t, y = jnp.array([3, 700]), jnp.array([1, 2])
  ctx = jnp.asarray(rng.standard_normal((2, 5, CONTEXT_DIM)), jnp.float32)

  text = UNet(context_dim=CONTEXT_DIM, label_conditioning="none", **UNET)
  params = _randomize(_shapes(text, x, t, y, context=ctx))
  assert "class_embed" not in params and "transformer_blocks_0" in params["mid_attn"]
  f = jax.jit(lambda p, y, c: text.apply({"params": p}, x, t, y, context=c))
  out = f(params, y, ctx)
  assert out.shape == x.shape
  np.testing.assert_array_equal(np.asarray(f(params, y + 5, ctx)), np.asarray(out))  # y unused
  assert np.abs(np.asarray(f(params, y, ctx + 1.0) - out)).max() > 1e-4  # context is used
  with pytest.raises(ConfigError, match="pass context"):
    jax.eval_shape(lambda: text.apply({"params": params}, x, t, y))
  with pytest.raises(ConfigError, match=r"\(B, L, 12\)"):
    jax.eval_shape(lambda: text.apply({"params": params}, x, t, y, context=ctx[..., :4]))

  # LDM ImageNet style: the class embedding is the single context token.
  token = UNet(context_dim=CONTEXT_DIM, label_conditioning="token", **UNET)
  tparams = _randomize(_shapes(token, x, t, y))
  assert tparams["class_token_embed"]["embedding_table"]["embedding"].shape == (11, CONTEXT_DIM)
  g = jax.jit(lambda p, y: token.apply({"params": p}, x, t, y))
  assert np.abs(np.asarray(g(tparams, y) - g(tparams, jnp.array([10, 10])))).max() > 1e-4
  _, state = jax.jit(lambda p: token.apply({"params": p}, x, t, y, mutable=[ATTENTION_MAPS]))(
      tparams)
  maps = recorded_maps(state[ATTENTION_MAPS])
  assert set(maps) == {"down_1_attn_0/transformer_blocks_0", "mid_attn/transformer_blocks_0",
                       "up_1_attn_0/transformer_blocks_0", "up_1_attn_1/transformer_blocks_0"}
  assert all(m.shape == (2, 2, 4, 4, 1) for m in maps.values())

  with pytest.raises(ConfigError, match="no cross-attention"):
    _shapes(UNet(**UNET), x, t, y, context=ctx)


def test_unet_default_is_unchanged():
  """Without context_dim the parameter tree is the self-attention U-Net's (no new names)."""
  x = jnp.zeros((1, 8, 8, 1))
  params = _shapes(UNet(**UNET), x, jnp.zeros((1,)), jnp.zeros((1,), int))
  assert set(params["mid_attn"]) == {"norm", "attn"}
  assert "class_embed" in params


DIT = dict(depth=2, hidden_size=32, num_heads=2, patch_size=2, num_classes=10, learn_sigma=False)


def test_dit_cross_attention_starts_as_dit_and_uses_context():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
  t, y = jnp.array([3, 700]), jnp.array([1, 10])
  ctx = jnp.asarray(rng.standard_normal((2, 5, CONTEXT_DIM)), jnp.float32)
  cross = DiT(context_dim=CONTEXT_DIM, **DIT)
  # Zero-initialised cross-attention output: a new cross-attention DiT computes the plain DiT
  # (with the plain DiT's other weights, here random).
  params = jax.jit(lambda: cross.init(jax.random.PRNGKey(0), x, t, y, context=ctx)["params"])()
  assert set(params["blocks_0"]) >= {"cross_attn", "norm_cross"}
  is_cross = lambda k: k in ("cross_attn", "norm_cross")
  plain_params = {k: ({n: v for n, v in p.items() if not is_cross(n)}
                      if k.startswith("blocks_") else p) for k, p in params.items()}
  randomized = _randomize(plain_params)
  with_cross = {k: (dict(p, **{n: v for n, v in params[k].items() if is_cross(n)})
                    if k.startswith("blocks_") else p) for k, p in randomized.items()}
  apply = jax.jit(lambda p, c: cross.apply({"params": p}, x, t, y, context=c))
  plain = jax.jit(lambda p: DiT(**DIT).apply({"params": p}, x, t, y))(randomized)
  np.testing.assert_allclose(np.asarray(apply(with_cross, ctx)), np.asarray(plain), atol=1e-6)
  # Once the cross-attention has weights, the context changes the output; maps are recorded.
  full = _randomize(params, seed=3)
  a = apply(full, ctx)
  assert np.abs(np.asarray(apply(full, -ctx) - a)).max() > 1e-4
  _, state = jax.jit(lambda p: cross.apply({"params": p}, x, t, y, context=ctx,
                                           mutable=[ATTENTION_MAPS]))(full)
  maps = recorded_maps(state[ATTENTION_MAPS])
  assert sorted(maps) == ["blocks_0", "blocks_1"]
  assert maps["blocks_0"].shape == (2, 2, 4, 4, 5)


def test_dit_label_token_and_can_dit_cross_attention():
  x = jnp.zeros((2, 8, 8, 4))
  t, y = jnp.array([3, 700]), jnp.array([1, 10])
  token = DiT(context_dim=CONTEXT_DIM, label_conditioning="token", **DIT)
  params = _shapes(token, x, t, y)
  assert params["y_embedder"]["embedding_table"]["embedding"].shape == (11, CONTEXT_DIM)
  assert jax.eval_shape(lambda p: token.apply({"params": p}, x, t, y), params).shape == x.shape
  ctx = jnp.ones((2, 3, CONTEXT_DIM))
  model = can_dit(context_dim=CONTEXT_DIM, **DIT)
  params = _shapes(model, x, t, y, context=ctx)
  assert "cross_attn" in params["blocks_1"] and "y_embedder" in params
  assert jax.eval_shape(lambda p: model.apply({"params": p}, x, t, y, context=ctx),
                        params).shape == x.shape
  with pytest.raises(ConfigError, match="no cross-attention"):
    _shapes(DiT(**DIT), x, t, y, context=ctx)


def test_class_token_config_builds():
  from jaxgen.config import build_model, load_config  # pylint: disable=g-import-not-at-top
  config = load_config("configs/unet_mnist_xattn.py:smoke")
  model = build_model(config.model)
  shapes = _shapes(model, jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
  assert "class_token_embed" in shapes and "class_embed" not in shapes
  assert "transformer_blocks_0" in shapes["mid_attn"]
