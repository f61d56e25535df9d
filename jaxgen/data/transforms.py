"""Image operations shared by the data sources (numpy HWC in, numpy HWC out)."""

from typing import List, Tuple

import numpy as np
from PIL import Image


def to_float(image_uint8: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return image_uint8.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


def pad_to(image: np.ndarray, size: int, value: float = -1.0) -> np.ndarray:
  """Pads H and W (batch `...HWC` allowed) equally on each side up to `size`."""
  h, w = image.shape[-3], image.shape[-2]
  top, left = (size - h) // 2, (size - w) // 2
  pads = [(0, 0)] * (image.ndim - 3) + [(top, size - h - top), (left, size - w - left), (0, 0)]
  return np.pad(image, pads, constant_values=value)


def _pil(image_uint8: np.ndarray) -> Image.Image:
  return Image.fromarray(image_uint8[..., 0] if image_uint8.shape[-1] == 1 else image_uint8)


def _array(pil_image: Image.Image, channels: int) -> np.ndarray:
  arr = np.asarray(pil_image)
  return arr[..., None] if channels == 1 else arr


def resize(image_uint8: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bicubic (antialiased) resize of a uint8 HWC image."""
  if image_uint8.shape[:2] == (height, width):
    return image_uint8
  out = _pil(image_uint8).resize((width, height), resample=Image.BICUBIC)
  return _array(out, image_uint8.shape[-1])


def resize_center_crop(image_uint8: np.ndarray, size: int) -> np.ndarray:
  """Shorter side -> `size`, then a central size x size crop (the ADM/DiT ImageNet recipe).

  Large images are first halved with a box filter while the shorter side stays >= 2 * size,
  then resized with bicubic filtering, as ADM's `center_crop_arr` does.
  """
  h, w = image_uint8.shape[:2]
  if (h, w) == (size, size):
    return image_uint8
  pil = _pil(image_uint8)
  while min(pil.size) >= 2 * size:
    pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
  scale = size / min(pil.size)
  pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
  arr = _array(pil, image_uint8.shape[-1])
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  return arr[top:top + size, left:left + size]


def random_crop_origin(shape: Tuple[int, int], size: int,
                       rng: np.random.Generator) -> Tuple[int, int]:
  """Uniform top-left corner of a size x size crop inside an (H, W) image."""
  return int(rng.integers(0, shape[0] - size + 1)), int(rng.integers(0, shape[1] - size + 1))


def grid_crop_origins(shape: Tuple[int, int], size: int) -> List[Tuple[int, int]]:
  """Top-left corners of the non-overlapping size x size crops of a centred grid."""
  ny, nx = shape[0] // size, shape[1] // size
  oy, ox = (shape[0] - ny * size) // 2, (shape[1] - nx * size) // 2
  return [(oy + i * size, ox + j * size) for i in range(ny) for j in range(nx)]


def maybe_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Horizontal flip with probability 1/2."""
  return image[:, ::-1] if rng.random() < 0.5 else image


def permute_channels(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """The channels (last axis) in a uniformly random order: RGB -> any of its 6 orders."""
  return image[..., rng.permutation(image.shape[-1])]
