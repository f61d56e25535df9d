"""CaT and U-ViT backbones: shapes, init properties, conditioning, counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxgen.errors import ConfigError
from jaxgen.models.cat import CAT_SIZES, cat
from jaxgen.models.flops import backbone_costs
from jaxgen.models.uvit import uvit
from jaxgen.registry import MODELS

KEY = jax.random.PRNGKey(0)
# Two levels, one block each: the smallest CaT that has every part (CA patch embedding,
# downsampling, an attention level, the decoder with its skip, the CA head).
TINY_CAT = dict(widths=(8, 16), depths=(1, 1), block_kinds=("mb", "att"), expand_ratios=(2, 2),
                head_dim=4, num_classes=10, ca_impl="xla")
TINY_UVIT = dict(depth=2, hidden_size=32, num_heads=2, patch_size=2, num_classes=10)


def _inputs(b=3, size=8, c=4):
  x = jax.random.normal(jax.random.PRNGKey(1), (b, size, size, c))
  return x, jnp.array([1.0, 500.0, 999.0])[:b], jnp.array([0, 7, 10])[:b]


def _randomize(params, pred, seed=3, scale=0.1):
  flat = flatten_dict(params, sep="/")
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(flat)))
  return unflatten_dict({k: v + scale * jax.random.normal(next(keys), v.shape) if pred(k) else v
                         for k, v in flat.items()}, sep="/")


def _random_params(model, *args, scale=0.1):
  """Random values for every parameter (cheaper than compiling `init`)."""
  shapes = flatten_dict(jax.eval_shape(model.init, KEY, *args)["params"], sep="/")
  keys = iter(jax.random.split(jax.random.PRNGKey(5), len(shapes)))
  return unflatten_dict({k: scale * jax.random.normal(next(keys), v.shape)
                         for k, v in shapes.items()}, sep="/")


# ---------------------------------------------------------------------------------------------
# CaT


def test_cat_sizes_shapes_and_registry():
  x, t, y = _inputs(size=16, c=4)
  assert MODELS.get("cat") is cat
  for i, size in enumerate(CAT_SIZES):
    patch, learn_sigma, channels = ((1, False, 4), (2, True, 8))[i % 2]
    model = cat(size, patch_size=patch, learn_sigma=learn_sigma, num_classes=10)
    variables = jax.eval_shape(model.init, KEY, x, t, y)
    out = jax.eval_shape(model.apply, variables, x, t, y)
    assert out.shape == (3, 16, 16, channels), (size, patch)
  with pytest.raises(ConfigError, match="divisible by 8"):
    jax.eval_shape(cat("L0", patch_size=2).init, KEY, x[:, :12, :12], t, y)
  with pytest.raises(ConfigError, match="unknown CaT size"):
    cat("XL")


def test_cat_zero_init_ca_equals_static_and_conditioning():
  x, t, y = _inputs()
  ca = cat(**TINY_CAT)
  static = cat(**TINY_CAT, ca_patch_embed=False, ca_depthwise=False, ca_head=False)
  params = jax.jit(ca.init)(KEY, x, t, y)["params"]
  run_ca = jax.jit(lambda p, y: ca.apply({"params": p}, x, t, y))
  run = lambda model, p, y=y: (run_ca if model is ca else jax.jit(
      lambda p, y: model.apply({"params": p}, x, t, y)))(p, y)
  assert np.all(np.asarray(run(ca, params)) == 0)  # zero-initialised head

  # With the generators at zero, the CA model is the static one with the same weights.
  params = _randomize(params, lambda k: k.startswith("head/kernel"))
  flat = flatten_dict(params, sep="/")
  gens = [k for k in flat if "weight_generator" in k]
  assert {k.split("/")[0] for k in gens} >= {"patch_embed", "head", "down_1", "enc_0_block_0",
                                            "enc_1_block_0", "dec_0_block_0"}
  shared = unflatten_dict({k: v for k, v in flat.items() if "weight_generator" not in k}, sep="/")
  want = run(static, shared)
  assert np.abs(want).max() > 0
  np.testing.assert_allclose(run(ca, params), want, rtol=1e-5, atol=1e-6)

  # CaT has no adaLN: the label reaches the output through the generated weights alone.
  trained = _randomize(params, lambda k: "weight_generator" in k)
  out, other = run(ca, trained), run(ca, trained, jnp.array([3, 3, 3]))
  assert np.abs(out - other).max() > 1e-4


def test_cat_pallas_impl_matches_xla():
  """The same CaT through the Pallas kernel (interpret mode here) and through XLA."""
  x, t, y = _inputs()
  model = cat(**TINY_CAT)
  params = _random_params(model, x, t, y)
  pallas = cat(**{**TINY_CAT, "ca_impl": "pallas"})
  want = jax.jit(lambda p: model.apply({"params": p}, x, t, y))(params)
  got = jax.jit(lambda p: pallas.apply({"params": p}, x, t, y))(params)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_cat_counts_vs_dit():
  """CAN's claim: CaT needs ~52x fewer MACs per step than DiT-XL/2 (524.6 G at 512)."""
  l0 = backbone_costs(cat("L0", patch_size=2), (64, 64, 4))  # SD-VAE latents of a 512 image
  assert l0["gmacs"] < 524.6 / 52
  dcae = backbone_costs(cat("L0"), (16, 16, 32))  # DC-AE f32c32 latents, patch 1
  assert dcae["gmacs"] < l0["gmacs"] and dcae["params"] > 1e8


# ---------------------------------------------------------------------------------------------
# U-ViT


def test_uvit_shapes_presets_and_counts():
  x, t, y = _inputs()
  assert MODELS.get("uvit") is uvit
  for kwargs, channels in ((dict(), 4), (dict(learn_sigma=True, conv_out=True), 8),
                           (dict(mlp_time_embed=True, patch_size=1), 4)):
    model = uvit(**{**TINY_UVIT, **kwargs})
    variables = jax.eval_shape(model.init, KEY, x, t, y)
    assert jax.eval_shape(model.apply, variables, x, t, y).shape == (3, 8, 8, channels)
  # U-ViT paper: U-ViT-H/2 on 32x32x4 latents has 501M params and 133 GFLOPs (multiply-adds).
  costs = backbone_costs(uvit("UViT-H", patch_size=2), (32, 32, 4))
  assert abs(costs["params"] / 1e6 - 501) < 1 and abs(costs["gmacs"] - 133) < 1
  with pytest.raises(ConfigError, match="even"):
    jax.eval_shape(uvit(**{**TINY_UVIT, "depth": 3}).init, KEY, x, t, y)
  with pytest.raises(ConfigError, match="unknown U-ViT"):
    uvit("XXL")


def test_uvit_long_skips_tokens_and_jit():
  x, t, y = _inputs()
  model = uvit(**{**TINY_UVIT, "depth": 4})
  params = _random_params(model, x, t, y)
  skips = sorted(k for k in flatten_dict(params, sep="/") if "skip_linear/kernel" in k)
  assert skips == ["out_blocks_0/skip_linear/kernel", "out_blocks_1/skip_linear/kernel"]
  assert params["out_blocks_0"]["skip_linear"]["kernel"].shape == (64, 32)  # Linear(2d -> d)
  assert params["pos_embed"].shape == (1, 2 + 16, 32)  # label, time, 4x4 patches
  assert params["label_emb"]["embedding_table"]["embedding"].shape == (11, 32)  # + null label
  f = jax.jit(lambda t, y: model.apply({"params": params}, x, t, y))
  out = f(t, y)
  assert out.shape == x.shape and np.all(np.isfinite(out))
  assert np.abs(out - f(t, jnp.array([3, 3, 3]))).max() > 1e-4  # the label token matters
  assert np.abs(out - f(t + 100.0, y)).max() > 1e-4  # so does the time token
  # Without skips the out-blocks have no skip_linear.
  plain = uvit(**{**TINY_UVIT, "depth": 4, "skip": False})
  flat = flatten_dict(jax.eval_shape(plain.init, KEY, x, t, y)["params"], sep="/")
  assert not any("skip_linear" in k for k in flat)
