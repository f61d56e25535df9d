"""Depthwise convs: the condition-aware one's Pallas (interpret mode on CPU), shifted-sum and
folded forms vs XLA, and the shared-kernel shifted sum (DepthwiseConv) vs nn.Conv."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.kernels import ca_depthwise_conv
from jaxgen.kernels import depthwise_conv
from jaxgen.kernels.ca_depthwise_conv import output_size, resolve_impl
from jaxgen.nn.efficientvit import ConvLayer


def _inputs(shape, k, dtype, bias, seed=0):
  b, h, w, c = shape
  kx, kw_, kb = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(kx, shape, jnp.float32).astype(dtype)
  wt = jax.random.normal(kw_, (b, k, k, c), jnp.float32).astype(dtype)
  bb = jax.random.normal(kb, (b, c), jnp.float32).astype(dtype) if bias else None
  return x, wt, bb


def _loop_reference(x, w, b, stride):
  """Direct numpy loops over the definition (float64)."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  n, h, wd, c = x.shape
  kh, kw = w.shape[1:3]
  xp = np.pad(x, ((0, 0), (kh // 2,) * 2, (kw // 2,) * 2, (0, 0)))
  ho, wo = output_size(h, kh, stride), output_size(wd, kw, stride)
  y = np.zeros((n, ho, wo, c))
  for i in range(kh):
    for j in range(kw):
      y += xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride] * (
          w[:, i, j][:, None, None])
  if b is not None:
    y += np.asarray(b, np.float64)[:, None, None]
  return y


# (shape, kernel, stride, dtype, bias): odd sizes, channel counts off the block size, every
# kernel size with both strides, both dtypes, with and without bias.
CASES = [
    ((2, 7, 9, 5), 3, 1, jnp.float32, True),
    ((3, 9, 5, 3), 3, 2, jnp.bfloat16, False),
    ((1, 6, 11, 13), 5, 1, jnp.bfloat16, True),
    ((2, 9, 7, 5), 5, 2, jnp.float32, False),
    ((2, 5, 7, 17), 7, 1, jnp.float32, False),
    ((1, 10, 9, 4), 7, 2, jnp.float32, True),
]


def _tol(dtype):
  return dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("shape,k,stride,dtype,bias", CASES)
def test_forward_matches_xla_and_loops(shape, k, stride, dtype, bias):
  x, w, b = _inputs(shape, k, dtype, bias)
  ref = ca_depthwise_conv(x, w, b, stride=stride, impl="xla")
  n, h, wd, c = shape
  assert ref.shape == (n, output_size(h, k, stride), output_size(wd, k, stride), c)
  assert ref.dtype == dtype
  np.testing.assert_allclose(np.asarray(ref, np.float64), _loop_reference(x, w, b, stride),
                             **_tol(dtype))
  # The folded form is a benchmark reference: checked on the float32 cases only.
  impls = ("pallas", "folded") if dtype == jnp.float32 else ("pallas",)
  for impl in impls + ("shifts",):
    f = jax.jit(lambda x, w, b, impl=impl: ca_depthwise_conv(x, w, b, stride=stride, impl=impl))
    out = f(x, w, b)
    assert out.shape == ref.shape and out.dtype == dtype, impl
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               **_tol(dtype), err_msg=impl)


@pytest.mark.parametrize("shape,k,stride,dtype", [
    ((2, 7, 9, 5), 3, 1, jnp.float32),  # dx through the Pallas kernel (flipped w)
    ((1, 7, 8, 6), 5, 2, jnp.float32),  # dx through XLA (Pallas), subsampled sums (shifts)
    ((1, 6, 5, 9), 3, 1, jnp.bfloat16),
])
def test_gradients_match_xla(shape, k, stride, dtype):
  x, w, b = _inputs(shape, k, dtype, True, seed=1)

  def loss(impl):
    f = lambda x, w, b: jnp.sum(jnp.sin(ca_depthwise_conv(x, w, b, stride=stride, impl=impl)
                                        .astype(jnp.float32)))
    return jax.grad(f, argnums=(0, 1, 2))(x, w, b)

  tol = _tol(dtype) if dtype == jnp.float32 else dict(rtol=5e-2, atol=1e-1)
  want = loss("xla")
  for impl in ("pallas", "shifts"):
    for got, ref, name in zip(loss(impl), want, ("dx", "dw", "db")):
      assert got.dtype == ref.dtype == dtype, name
      np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32),
                                 **tol, err_msg=f"{impl} {name}")


@pytest.mark.parametrize("k,stride", [(3, 1), (5, 1), (3, 2)])
def test_depthwise_conv_layer_matches_nn_conv(k, stride):
  """ConvLayer's depthwise conv (shifted sums on CPU; XLA for stride 2) has nn.Conv's
  parameters, values and gradients."""
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 9, 7, 12))
  layer = ConvLayer(12, k, stride, groups=12, use_bias=True)
  params = layer.init(jax.random.PRNGKey(3), x)["params"]
  ref = nn.Conv(12, (k, k), (stride, stride), padding=((k // 2, k // 2),) * 2,
                feature_group_count=12)
  assert jax.tree.map(jnp.shape, params["conv"]) == jax.tree.map(
      jnp.shape, ref.init(jax.random.PRNGKey(3), x)["params"])
  loss = lambda y: jnp.sum(jnp.sin(y))
  got = jax.value_and_grad(lambda p: loss(layer.apply({"params": {"conv": p}}, x)))(
      params["conv"])
  want = jax.value_and_grad(lambda p: loss(ref.apply({"params": p}, x)))(params["conv"])
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)
  assert depthwise_conv.use_shifts((k, k), stride) == (stride == 1)  # auto on CPU
  assert resolve_impl("shifts", (k, k), 2) == "shifts"  # The per-sample conv: subsampled.
  with pytest.raises(ValueError, match="odd kernels"):
    resolve_impl("shifts", (k + 1, k + 1), 1)


def test_auto_is_shifts_on_cpu_and_errors():
  assert jax.default_backend() == "cpu"
  assert resolve_impl("auto") == "shifts"
  assert resolve_impl("auto", (3, 3), 2) == "shifts"
  assert resolve_impl("auto", (4, 4), 1) == "xla"
  x, w, _ = _inputs((1, 4, 4, 3), 3, jnp.float32, False)
  with pytest.raises(ValueError, match="impl"):
    ca_depthwise_conv(x, w, impl="cuda")
  with pytest.raises(ValueError, match="expected x"):
    ca_depthwise_conv(x, w[:, :, :, :2])
