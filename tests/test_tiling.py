"""Tiled encode / decode: blending, agreement with untiled inference, tile-bounded memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.errors import DataError
from jaxgen.models.dcae import dcae
from jaxgen.models.tiling import (default_tiles, tile_starts, tiled_decode, tiled_encode,
                                  tiled_map)

# ResBlock-only DC-AE, f4: finite receptive field. Measured with input gradients: a latent
# pixel depends on image pixels up to 22 px beyond its 4x4 block (6 latent px); an image pixel
# on latent pixels up to 7 away (28 image px + its offset within the 4x4 block).
RESNET = dict(latent_channels=4, attention_head_dim=8, encoder_block_types="ResBlock",
              decoder_block_types="ResBlock", encoder_block_out_channels=(8, 16, 16),
              decoder_block_out_channels=(8, 16, 16), encoder_layers_per_block=(1, 1, 1),
              decoder_layers_per_block=(1, 1, 1), encoder_qkv_multiscales=((),) * 3,
              decoder_qkv_multiscales=((),) * 3, decoder_norm_types="rms_norm",
              decoder_act_fns="silu")
ENC_RADIUS, DEC_RADIUS = 6, 31  # latent px, image px


def random_variables(model, x, seed: int = 0):
  """Random variables of init's shapes, made in numpy (jit-compiling init takes long on CPU)."""
  rng = np.random.RandomState(seed)

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":
      return rng.randn(*shape).astype(np.float32) / np.sqrt(np.prod(shape[:-1]))
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return 0.1 * rng.randn(*shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(
      fill, jax.eval_shape(model.init, jax.random.PRNGKey(0), x))


def coverage(size: int, tile: int, stride: int) -> np.ndarray:
  """How many tiles cover each position along one axis."""
  count = np.zeros(size, int)
  for s in tile_starts(size, tile, stride):
    count[s:s + tile] += 1
  return count


def test_tile_starts_and_defaults():
  assert tile_starts(100, 40, 30) == (0, 30, 60)
  assert tile_starts(101, 40, 30) == (0, 30, 60, 61)  # last aligned to the end
  assert tile_starts(30, 40, 30) == (0,)
  for size, tile, stride in [(100, 40, 30), (101, 40, 30), (512, 64, 56), (64, 64, 8)]:
    starts = tile_starts(size, tile, stride)
    assert starts[0] == 0 and starts[-1] == size - tile
    assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))
    assert coverage(size, tile, stride).min() >= 1
  assert default_tiles(32) == (512, 448)  # diffusers' AutoencoderDC defaults at f32
  assert default_tiles(64) == (1024, 896)


@pytest.mark.parametrize("scale", [(1, 1), (1, 4), (4, 1)])
def test_blending_is_partition_of_unity(scale):
  """A context-free map (per-pixel / per-4x4-block) comes back exactly, ragged tiles included."""
  num, den = scale
  x = jnp.asarray(np.random.RandomState(0).randn(2, 44, 76, 3), jnp.float32)
  w = jnp.asarray(np.random.RandomState(1).randn(3, 5), jnp.float32)

  def fn(w, t):
    t = jnp.tanh(t @ w)
    if den > 1:  # 4x4 average pooling
      b, h, ww, c = t.shape
      t = t.reshape(b, h // 4, 4, ww // 4, 4, c).mean(axis=(2, 4))
    if num > 1:  # nearest x4
      t = jnp.repeat(jnp.repeat(t, 4, axis=1), 4, axis=2)
    return t

  full = fn(w, x)
  tiled = tiled_map(fn, w, x, tile=(24, 32), stride=(12, 20), scale=scale)
  np.testing.assert_allclose(np.asarray(tiled), np.asarray(full), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def resnet():
  model = dcae(**RESNET)
  x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (1, 72, 136, 3)), jnp.float32)
  return model, random_variables(model, x), x


def test_tiled_encode_matches_untiled_where_one_tile_covers(resnet):
  model, variables, x = resnet
  tile, stride = 64, 36  # latent tile 16, overlap 7 >= receptive radius 6
  full = np.asarray(model.apply(variables, x, method="encode"))
  tiled = np.asarray(tiled_encode(model, variables, x, tile=tile, stride=stride))
  assert tiled.shape == full.shape == (1, 18, 34, 4)
  err = np.abs(tiled - full) / np.abs(full).max()
  single = np.outer(coverage(18, 16, 9) == 1, coverage(34, 16, 9) == 1)
  assert single[:, 16:18].any()  # interior columns between two overlaps are checked too
  print(f"encode: single-tile max err {err[0][single].max():.1e}, overall {err.max():.1e}")
  assert err[0][single].max() < 1e-5
  assert err.max() < 0.2  # inside overlaps the blend mixes in edge-affected values


def test_tiled_decode_matches_untiled_where_one_tile_covers(resnet):
  model, variables, _ = resnet
  z = jnp.asarray(np.random.RandomState(1).randn(1, 18, 42, 4), jnp.float32)
  tile, stride = 80, 44  # image overlap 36 px >= receptive radius 31
  full = np.asarray(model.apply(variables, z, method="decode"))
  tiled = np.asarray(tiled_decode(model, variables, z, tile=tile, stride=stride))
  assert tiled.shape == full.shape == (1, 72, 168, 3)
  err = np.abs(tiled - full) / np.abs(full).max()
  single = np.outer(coverage(72, 80, 44) == 1, coverage(168, 80, 44) == 1)
  assert single.all(axis=0)[80:88].all()  # an interior band between two overlaps
  print(f"decode: single-tile max err {err[0][single].max():.1e}, overall {err.max():.1e}")
  assert err[0][single].max() < 1e-5
  assert err.max() < 0.2


def test_small_image_is_one_tile(resnet):
  model, variables, x = resnet
  small = x[:, :32, :48]
  np.testing.assert_allclose(np.asarray(tiled_encode(model, variables, small)),
                             np.asarray(model.apply(variables, small, method="encode")),
                             rtol=1e-5, atol=1e-5)


def _conv_input_shapes(jaxpr):
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      shapes.append(eqn.invars[0].aval.shape)
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", None)
      if inner is not None:
        shapes.extend(_conv_input_shapes(getattr(inner, "jaxpr", inner)))
  return shapes


def test_memory_bounded_by_tile(resnet):
  """Every conv of the tiled computation sees one tile, never the whole image."""
  model, variables, _ = resnet
  big = jax.ShapeDtypeStruct((1, 512, 768, 3), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda v, x: tiled_encode(model, v, x, tile=64, stride=48))(
      variables, big)
  shapes = _conv_input_shapes(jaxpr.jaxpr)
  assert shapes and max(max(s[1], s[2]) for s in shapes) <= 64
  z = jax.ShapeDtypeStruct((1, 128, 192, 4), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda v, z: tiled_decode(model, v, z, tile=64, stride=48))(
      variables, z)
  shapes = _conv_input_shapes(jaxpr.jaxpr)
  assert shapes and max(max(s[1], s[2]) for s in shapes) <= 64


def test_global_attention_model_is_close_not_exact():
  """With EfficientViT stages (global linear attention) no position is exact; measured."""
  config = dict(RESNET, encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"))
  model = dcae(**config)
  x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (1, 72, 136, 3)), jnp.float32)
  variables = random_variables(model, x)
  full = np.asarray(model.apply(variables, x, method="encode"))
  tiled = np.asarray(tiled_encode(model, variables, x, tile=64, stride=36))
  err = np.abs(tiled - full) / np.abs(full).max()
  print(f"global attention encode: median err {np.median(err):.1e}, max {err.max():.1e}")
  assert 1e-5 < err.max() < 0.5


def test_sizes_must_fit_the_ratio(resnet):
  model, variables, x = resnet
  with pytest.raises(DataError):
    tiled_encode(model, variables, x[:, :70], tile=64, stride=36)
  with pytest.raises(DataError):
    tiled_decode(model, variables, jnp.zeros((1, 18, 34, 4)), tile=64, stride=30)
