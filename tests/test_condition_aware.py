"""Condition-aware layers: equal to the static layer at init, W + W_c per sample after."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.nn.condition_aware import CAConv, CADense, CADepthwiseConv
from jaxgen.nn.efficientvit import MBConv

B, D = 3, 16
KEY = jax.random.PRNGKey(0)


def _cond(seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), (B, D))


def _randomize_generator(params, seed=2):
  """Gives every weight generator a non-zero kernel (init leaves them at zero)."""
  flat = flax_flatten(params)
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(flat)))
  return flax_unflatten({k: (0.05 * jax.random.normal(next(keys), v.shape)
                             if "weight_generator" in k else v) for k, v in flat.items()})


def flax_flatten(tree):
  from flax.traverse_util import flatten_dict  # pylint: disable=g-import-not-at-top
  return flatten_dict(tree, sep="/")


def flax_unflatten(flat):
  from flax.traverse_util import unflatten_dict  # pylint: disable=g-import-not-at-top
  return unflatten_dict(flat, sep="/")


def _wc(params, cond, shape):
  """W_c exactly as the generator defines it: silu(cond) @ proj."""
  return (nn.silu(cond) @ params["weight_generator"]["proj"]["kernel"]).reshape((B,) + shape)


def test_dense_static_at_init_then_per_sample():
  x = jax.random.normal(KEY, (B, 5, 8))
  layer = CADense(6)
  params = layer.init(KEY, x, _cond())["params"]
  assert np.all(params["weight_generator"]["proj"]["kernel"] == 0)
  static = nn.Dense(6).apply({"params": {"kernel": params["kernel"], "bias": params["bias"]}}, x)
  np.testing.assert_allclose(layer.apply({"params": params}, x, _cond()), static,
                             rtol=1e-6, atol=1e-6)
  params = _randomize_generator(params)
  out = layer.apply({"params": params}, x, _cond())
  w = params["kernel"][None] + _wc(params, _cond(), (8, 6))
  want = jnp.einsum("bnd,bde->bne", x, w, precision="highest") + params["bias"]
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  assert not np.allclose(out, static, atol=1e-3)  # the condition now changes the output


def test_low_rank_dense():
  x = jax.random.normal(KEY, (B, 4, 8))
  layer = CADense(6, rank=2)
  params = layer.init(KEY, x, _cond())["params"]
  assert params["weight_generator"]["proj"]["kernel"].shape == (D, 2 * 2)  # only the r x r core
  static = x @ params["kernel"] + params["bias"]
  np.testing.assert_allclose(layer.apply({"params": params}, x, _cond()), static,
                             rtol=1e-5, atol=1e-5)
  params = _randomize_generator(params)
  w = params["kernel"][None] + params["basis_in"] @ _wc(params, _cond(), (2, 2)) @ params[
      "basis_out"]
  want = jnp.einsum("bnd,bde->bne", x, w, precision="highest") + params["bias"]
  np.testing.assert_allclose(layer.apply({"params": params}, x, _cond()), want,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [None, 3])
def test_patch_embedding_conv(rank):
  x = jax.random.normal(KEY, (B, 8, 6, 4))
  layer = CAConv(5, (2, 2), strides=2, rank=rank)
  params = layer.init(KEY, x, _cond())["params"]
  static = nn.Conv(5, (2, 2), strides=2, padding="VALID")
  sp = {"kernel": params["kernel"], "bias": params["bias"]}
  np.testing.assert_allclose(layer.apply({"params": params}, x, _cond()),
                             static.apply({"params": sp}, x), rtol=1e-5, atol=1e-5)
  params = _randomize_generator(params)
  out = layer.apply({"params": params}, x, _cond())
  if rank is None:
    wc = _wc(params, _cond(), (2, 2, 4, 5))
  else:  # U G V with U a (2, 2, 4, r) kernel: W_c[b] = U @ G_b @ V on the flattened kernel.
    g = _wc(params, _cond(), (rank, rank))
    wc = jnp.einsum("hwir,brs,so->bhwio", params["basis_in"], g, params["basis_out"],
                    precision="highest")
  for b in range(B):
    kb = {"kernel": params["kernel"] + wc[b], "bias": params["bias"]}
    np.testing.assert_allclose(out[b], static.apply({"params": kb}, x[b:b + 1])[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl,stride", [("xla", 1), ("xla", 2), ("pallas", 1)])
def test_depthwise_conv(impl, stride):
  c, k = 6, 3
  x = jax.random.normal(KEY, (B, 7, 6, c))
  layer = CADepthwiseConv(c, (k, k), strides=stride, impl=impl)
  params = layer.init(KEY, x, _cond())["params"]
  assert params["kernel"].shape == (k, k, 1, c)  # nn.Conv's depthwise layout
  static = nn.Conv(c, (k, k), strides=stride, padding=((1, 1), (1, 1)), feature_group_count=c)
  sp = {"kernel": params["kernel"], "bias": params["bias"]}
  np.testing.assert_allclose(layer.apply({"params": params}, x, _cond()),
                             static.apply({"params": sp}, x), rtol=1e-5, atol=1e-5)
  params = _randomize_generator(params)
  out = layer.apply({"params": params}, x, _cond())
  wc = _wc(params, _cond(), (k, k, c))
  for b in range(B):
    kb = {"kernel": params["kernel"] + wc[b][:, :, None], "bias": params["bias"]}
    np.testing.assert_allclose(out[b], static.apply({"params": kb}, x[b:b + 1])[0],
                               rtol=1e-5, atol=1e-5)


def test_generator_gets_gradient_at_init():
  x = jax.random.normal(KEY, (B, 6, 6, 4))
  layer = CADepthwiseConv(4, (3, 3), impl="xla")
  params = layer.init(KEY, x, _cond())["params"]
  grads = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x, _cond()) ** 2))(params)
  assert float(jnp.abs(grads["weight_generator"]["proj"]["kernel"]).max()) > 0


def test_substitutes_mbconv_depthwise_conv():
  """efficientvit's MBConv with the CA depthwise conv equals the plain MBConv at init."""
  x = jax.random.normal(KEY, (B, 6, 6, 8))
  kw = dict(expand_ratio=2, use_bias=(True, True, False), norm=(None, None, None),
            act=("silu", "silu", None))
  ca = MBConv(8, depthwise_conv_cls=functools.partial(CADepthwiseConv, impl="xla"), **kw)
  params = ca.init(KEY, x, cond=_cond())["params"]
  dw = params["depth_conv"]["conv"]
  plain = {**params, "depth_conv": {"conv": {"kernel": dw["kernel"], "bias": dw["bias"]}}}
  np.testing.assert_allclose(ca.apply({"params": params}, x, cond=_cond()),
                             MBConv(8, **kw).apply({"params": plain}, x), rtol=1e-5, atol=1e-5)


def test_depthwise_rejects_wrong_padding():
  x = jnp.zeros((B, 5, 5, 4))
  with pytest.raises(ValueError, match="symmetric"):
    CADepthwiseConv(4, (3, 3), padding=((0, 2), (0, 2))).init(KEY, x, _cond())
