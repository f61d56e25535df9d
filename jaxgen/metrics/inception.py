"""The FID Inception-v3 (TF graph 2015-12-05, as pytorch-fid ports it) in Flax, NHWC.

FID, IS, KID and Inception precision/recall are defined on this network: 2048-d features of
its final average pool ("pool3") and its 1008-way logits. It differs from torchvision's
Inception-v3 in the blocks pytorch-fid patches (FIDInceptionA/C/E_1): their pooling branch
averages without counting the zero padding (TF's avg_pool), and the last block (E_2) max-pools
there instead. Convolutions have no bias and are followed by BatchNorm (eps 1e-3) and ReLU.

Input pipeline of pytorch-fid, reproduced by `prepare`: images in [0, 1] (uint8 / 255), RGB
(grey is repeated to 3 channels), resized to 299x299 by bilinear interpolation without
antialiasing and with half-pixel centres (torch F.interpolate(mode="bilinear",
align_corners=False)), then scaled to [-1, 1]. Convolutions run at full float32 precision
(no TF32/bf16 passes on GPU/TPU), as the standard tools do.

Weights: no installed package ships them; the user downloads pytorch-fid's file (FID_WEIGHTS_URL)
and points `config.eval.inception_weights` at it (the .pth, read with
torch.load(weights_only=True), or the same state dict saved as .safetensors:
`python -m jaxgen.metrics.inception --src=X.pth --dst=X.safetensors` writes one, after which
torch is not needed).

Parameter names follow the PyTorch module paths: "Mixed_6b/branch7x7_2/conv/kernel",
".../bn/{scale,bias}" and batch_stats ".../bn/{mean,var}", "fc/{kernel,bias}".
"""

import functools
import os
import sys
from typing import Dict, List, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert.common import describe_exception, read_safetensors
from jaxgen.errors import ConfigError, WeightsError, cli

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
CONFIG_KEY = "eval.inception_weights"
INPUT_SIZE = 299
NUM_FEATURES = 2048
NUM_LOGITS = 1008
_HIGHEST = jax.lax.Precision.HIGHEST


def _pair(v) -> Tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class ConvBN(nn.Module):
  """Conv (no bias) -> BatchNorm (inference statistics, eps 1e-3) -> ReLU (torch BasicConv2d)."""
  features: int
  kernel: Sequence[int] = (1, 1)
  stride: int = 1
  padding: Sequence[int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel), strides=_pair(self.stride),
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=_HIGHEST, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_same(x):
  """3x3 stride-1 average over the valid (unpadded) pixels only, as TF's avg_pool."""
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_valid(x):
  return nn.max_pool(x, (3, 3), (2, 2))


class InceptionA(nn.Module):
  """Mixed_5b/5c/5d (FIDInceptionA): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = ConvBN(64, name="branch1x1")(x)
    b5 = ConvBN(48, name="branch5x5_1")(x)
    b5 = ConvBN(64, (5, 5), padding=2, name="branch5x5_2")(b5)
    b3 = ConvBN(64, name="branch3x3dbl_1")(x)
    b3 = ConvBN(96, (3, 3), padding=1, name="branch3x3dbl_2")(b3)
    b3 = ConvBN(96, (3, 3), padding=1, name="branch3x3dbl_3")(b3)
    bp = ConvBN(self.pool_features, name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

  @nn.compact
  def __call__(self, x):
    b3 = ConvBN(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = ConvBN(64, name="branch3x3dbl_1")(x)
    bd = ConvBN(96, (3, 3), padding=1, name="branch3x3dbl_2")(bd)
    bd = ConvBN(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_valid(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b-6e (FIDInceptionC): factorised 7x7 branches and an avgpool-1x1 branch."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = ConvBN(192, name="branch1x1")(x)
    b7 = ConvBN(c7, name="branch7x7_1")(x)
    b7 = ConvBN(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = ConvBN(c7, name="branch7x7dbl_1")(x)
    bd = ConvBN(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = ConvBN(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = ConvBN(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = ConvBN(192, name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (grid reduction 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

  @nn.compact
  def __call__(self, x):
    b3 = ConvBN(192, name="branch3x3_1")(x)
    b3 = ConvBN(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = ConvBN(192, name="branch7x7x3_1")(x)
    b7 = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = ConvBN(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_valid(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (FIDInceptionE_1, avg pool branch) and Mixed_7c (FIDInceptionE_2, max pool)."""
  pool: str = "avg"

  @nn.compact
  def __call__(self, x):
    b1 = ConvBN(320, name="branch1x1")(x)
    b3 = ConvBN(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
    bd = ConvBN(448, name="branch3x3dbl_1")(x)
    bd = ConvBN(384, (3, 3), padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
    if self.pool == "avg":
      pooled = _avg_pool_same(x)
    else:  # The TF graph max-pools here (pytorch-fid keeps this quirk for comparable FIDs).
      pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
    bp = ConvBN(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """FID Inception-v3: (B, H, W, 3) in [-1, 1] (H = W = 299 for FID) ->
  {"pool": (B, 2048) pool3 features, "logits": (B, 1008)}."""

  @nn.compact
  def __call__(self, x):
    x = ConvBN(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = ConvBN(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = ConvBN(64, (3, 3), padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_valid(x)
    x = ConvBN(80, name="Conv2d_3b_1x1")(x)
    x = ConvBN(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_valid(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(NUM_LOGITS, precision=_HIGHEST, name="fc")(pool)
    return {"pool": pool, "logits": logits}


# -- input pipeline --------------------------------------------------------------------------


def resize_bilinear(images, size: int):
  """(B, H, W, C) -> (B, size, size, C) as torch F.interpolate(bilinear, align_corners=False,
  antialias=False): half-pixel centres, two taps per axis (also when shrinking), edges clamped."""
  b, _, _, c = images.shape
  return jax.image.resize(images, (b, size, size, c), "linear", antialias=False)


def prepare(images, data_range: Tuple[float, float] = (0.0, 1.0), size: int = INPUT_SIZE):
  """Images -> the network's input, as pytorch-fid does it.

  Args:
    images: (B, H, W, C), C = 1 or 3; uint8 (0..255) or floats with values in `data_range`
      (jaxgen's images: data_range=(-1, 1)).
    data_range: the (low, high) of float images; ignored for uint8.
    size: output side (299 for FID).
  Returns:
    float32 (B, size, size, 3) in [-1, 1].
  """
  x = jnp.asarray(images)
  if x.dtype == jnp.uint8:
    x = x.astype(jnp.float32) / 255.0
  else:
    lo, hi = data_range
    x = (x.astype(jnp.float32) - lo) / (hi - lo)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  elif x.shape[-1] != 3:
    raise ValueError(f"Inception takes 1- or 3-channel images, got shape {x.shape}")
  if x.shape[1:3] != (size, size):
    x = resize_bilinear(x, size)
  return 2.0 * x - 1.0


# -- weights ---------------------------------------------------------------------------------


def missing_weights_message(path: str) -> str:
  what = (f"Inception weights {path!r} not found." if path else
          f"{CONFIG_KEY} is not set.")
  return (f"{what} FID/IS/KID need the FID Inception-v3 "
          f"weights of pytorch-fid: download {FID_WEIGHTS_URL} and set "
          f"--config.{CONFIG_KEY}=/path/to/pt_inception-2015-12-05-6726825d.pth (or a "
          ".safetensors of the same state dict).")


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """pytorch-fid's state dict {"Mixed_5b.branch1x1.conv.weight": ...} as numpy arrays."""
  if not path or not os.path.isfile(path):
    raise WeightsError(missing_weights_message(path))
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise WeightsError(f"reading {path} needs torch (pip install torch); or convert it once "
                       "where torch is installed: python -m jaxgen.metrics.inception "
                       f"--src={path} --dst=inception.safetensors") from None
  try:
    # weights_only: tensors and containers only; a pickle that would run code is refused.
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise WeightsError(f"{path}: not a readable PyTorch state dict ({describe_exception(e, 200)}"
                       f"); expected pytorch-fid's {FID_WEIGHTS_URL}") from None
  if not isinstance(state, dict):
    raise WeightsError(f"{path}: holds a {type(state).__name__}, not a state dict")
  return {k: v.detach().cpu().numpy() for k, v in state.items()}


def abstract_variables():
  x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0), x)


def convert_state_dict(state: Dict[str, np.ndarray]) -> Dict:
  """pytorch-fid state dict -> {"params", "batch_stats"} of `InceptionV3`; names every
  missing, unexpected or mis-shaped tensor (WeightsError)."""
  from jaxgen.convert.common import (check_complete, conv_kernel,  # pylint: disable=g-import-not-at-top
                                     dense_kernel, unflatten)
  params, stats, unused = {}, {}, []
  renames = {"bn.weight": ("scale", params), "bn.bias": ("bias", params),
             "bn.running_mean": ("mean", stats), "bn.running_var": ("var", stats)}
  for key, value in state.items():
    value = np.asarray(value, np.float32) if np.asarray(value).dtype.kind == "f" else value
    module, _, leaf = key.rpartition(".")
    owner, _, kind = module.rpartition(".")
    if leaf == "num_batches_tracked":
      continue
    if kind == "conv" and leaf == "weight":
      params[f"{module.replace('.', '/')}/kernel"] = conv_kernel(value)
    elif f"{kind}.{leaf}" in renames:
      name, dest = renames[f"{kind}.{leaf}"]
      dest[f"{owner.replace('.', '/')}/bn/{name}"] = value
    elif module == "fc":
      params[f"fc/{'kernel' if leaf == 'weight' else 'bias'}"] = (
          dense_kernel(value) if leaf == "weight" else value)
    else:
      unused.append(key)  # E.g. AuxLogits.* of a torchvision (not FID) Inception.
  variables = {"params": unflatten(params), "batch_stats": unflatten(stats)}
  check_complete(variables, abstract_variables(), unused)
  return variables


@functools.lru_cache(maxsize=2)
def _load_cached(path: str, mtime: float):
  del mtime  # Part of the cache key only: a replaced file is read again.
  return convert_state_dict(read_state_dict(path))


def load_inception(path: str) -> Tuple[InceptionV3, Dict]:
  """(module, variables) from pytorch-fid's `pt_inception-2015-12-05-*.pth` or .safetensors.

  A missing file raises WeightsError naming the download URL and `config.eval.inception_weights`.
  """
  path = os.path.expanduser(str(path or ""))
  if not path or not os.path.isfile(path):
    raise WeightsError(missing_weights_message(path))
  return InceptionV3(), _load_cached(os.path.abspath(path), os.path.getmtime(path))


def outputs(variables, images, data_range=(-1.0, 1.0)) -> Dict[str, jax.Array]:
  """{"pool": (B, 2048), "logits": (B, 1008)} of images of any size with values in `data_range`
  (or uint8). The variables are an argument, not a closure, so a jit takes them as a (sharded
  or replicated) input instead of baking 24M constants into the program."""
  return InceptionV3().apply(variables, prepare(images, data_range))


def save_safetensors(state: Dict[str, np.ndarray], path: str) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)


@cli
def main(argv: List[str]) -> int:
  """python -m jaxgen.metrics.inception --src=pt_inception-....pth --dst=inception.safetensors"""
  args = dict(a.partition("=")[::2] for a in argv)
  if set(args) != {"--src", "--dst"} or not all(args.values()):
    raise ConfigError("usage: python -m jaxgen.metrics.inception --src=PTH --dst=SAFETENSORS")
  state = read_state_dict(args["--src"])
  convert_state_dict(state)  # Checks that it is the FID Inception before writing anything.
  save_safetensors(state, args["--dst"])
  print(f"wrote {args['--dst']} ({len(state)} tensors)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
