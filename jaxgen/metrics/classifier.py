"""A small CNN classifier jaxgen trains on the real images of a dataset, to score samples.

Class accuracy of generated samples under this classifier measures whether a class-conditional
model draws the requested class. It is an offline measure for the embedded data, not comparable
to Inception-based scores.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import serialization

from jaxgen import data as data_lib


class DigitClassifier(nn.Module):
  """Two conv blocks and an MLP; ~99% on real MNIST test digits after a few epochs."""
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    for width in (32, 64):
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.Dropout(0.3, deterministic=not train)(nn.relu(nn.Dense(128)(x)))
    return nn.Dense(self.num_classes)(x)

  def features(self, params, x):
    """Penultimate-layer features (for feature-space distances between sample sets)."""
    _, state = self.apply({"params": params}, x, capture_intermediates=True)
    return state["intermediates"]["Dense_0"]["__call__"][0]


def random_affine(rng, images, max_degrees: float = 12.0, max_scale: float = 0.1,
                  max_shift: float = 2.5):
  """Per-image random rotation, scale and translation (bilinear, zero fill) of NHWC images.

  Generated digits are not centred, sized and slanted exactly like the training digits; a
  classifier trained on such variations scores what a person reads, not pixel alignment.
  """
  n, h, w, _ = images.shape
  k_rot, k_scale, k_shift = jax.random.split(rng, 3)
  angle = jnp.deg2rad(jax.random.uniform(k_rot, (n,), minval=-max_degrees, maxval=max_degrees))
  scale = 1.0 + jax.random.uniform(k_scale, (n,), minval=-max_scale, maxval=max_scale)
  shift = jax.random.uniform(k_shift, (n, 2), minval=-max_shift, maxval=max_shift)
  yy, xx = jnp.meshgrid(jnp.arange(h) - (h - 1) / 2, jnp.arange(w) - (w - 1) / 2, indexing="ij")

  def warp(image, angle, scale, shift):
    # Output pixel p samples the input at R(-angle) p / scale - shift (inverse map).
    cos, sin = jnp.cos(angle) / scale, jnp.sin(angle) / scale
    src_y = cos * yy - sin * xx + (h - 1) / 2 - shift[0]
    src_x = sin * yy + cos * xx + (w - 1) / 2 - shift[1]
    return jnp.stack([jax.scipy.ndimage.map_coordinates(image[..., c], [src_y, src_x], order=1)
                      for c in range(image.shape[-1])], axis=-1)

  return jax.vmap(warp)(images, angle, scale, shift)


def train_classifier(data_config: ml_collections.ConfigDict, *, epochs: int = 20,
                     batch_size: int = 128, seed: int = 0):
  """Trains on the data's train split; returns (model, params, test accuracy on real data)."""
  images, labels = data_lib.load_arrays(data_config, "train")
  test_images, test_labels = data_lib.load_arrays(data_config, "test")
  model = DigitClassifier(int(data_config.num_classes))
  rng = jax.random.PRNGKey(seed)
  params = model.init(rng, images[:1])["params"]
  steps = epochs * (len(images) // batch_size)
  tx = optax.adam(optax.cosine_decay_schedule(2e-3, steps))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y, rng):
    aug_rng, dropout_rng = jax.random.split(rng)
    # Background is -1 in [-1, 1] images: warp x + 1 so that zero fill is background.
    x = random_affine(aug_rng, x + 1.0) - 1.0

    def loss_fn(p):
      logits = model.apply({"params": p}, x, train=True, rngs={"dropout": dropout_rng})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  order = np.random.default_rng(seed)
  for epoch in range(epochs):
    perm = order.permutation(len(images))
    for i in range(len(images) // batch_size):
      idx = perm[i * batch_size:(i + 1) * batch_size]
      params, opt_state = step(params, opt_state, images[idx], labels[idx],
                               jax.random.fold_in(rng, epoch * 10000 + i))
  accuracy = float(np.mean(predict(model, params, test_images) == test_labels))
  return model, params, accuracy


def predict(model, params, images, batch_size: int = 500) -> np.ndarray:
  apply = jax.jit(lambda p, x: jnp.argmax(model.apply({"params": p}, x), -1))
  return np.concatenate([np.asarray(apply(params, images[i:i + batch_size]))
                         for i in range(0, len(images), batch_size)])


def cached_classifier(data_config: ml_collections.ConfigDict, cache_dir: str, epochs: int = 20):
  """Trains once per dataset and caches the weights under `cache_dir`."""
  name = (f"classifier_{data_config.source}_{data_config.get('tfds_name', '')}_"
          f"{data_config.image_size}_e{epochs}_affine")
  path = os.path.join(cache_dir, name + ".msgpack")
  model = DigitClassifier(int(data_config.num_classes))
  if os.path.exists(path):
    images, _ = data_lib.load_arrays(data_config, "test")
    template = model.init(jax.random.PRNGKey(0), images[:1])["params"]
    with open(path, "rb") as f:
      blob = serialization.msgpack_restore(f.read())
    params = serialization.from_state_dict(template, blob["params"])
    return model, params, float(blob["test_accuracy"])
  model, params, accuracy = train_classifier(data_config, epochs=epochs)
  os.makedirs(cache_dir, exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    f.write(serialization.msgpack_serialize(
        {"params": serialization.to_state_dict(params), "test_accuracy": accuracy}))
  os.replace(path + ".tmp", path)
  return model, params, accuracy
