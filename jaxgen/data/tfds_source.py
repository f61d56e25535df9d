"""The "tfds" source: a prepared TensorFlow Datasets dataset read by random access.

`tfds.data_source` needs the dataset prepared in the array_record format (the default tfrecord
format has no random access), so the command this module suggests passes
`--file_format=array_record`. Images whose size differs from image_size get the ADM/DiT
ImageNet treatment: shorter side resized to image_size, then a central crop.
"""

import functools
import os
from typing import Any, Optional, Sequence

import numpy as np

from jaxgen.data import transforms
from jaxgen.data.base import DatasetInfo
from jaxgen.errors import ConfigError, DataError

# Datasets whose source files cannot be downloaded by tfds: the user puts them in manual_dir.
MANUAL_DOWNLOADS = {
    "imagenet2012": "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org)",
}


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def prepare_command(name: str, data_dir_root: str) -> str:
  """The shell command(s) that prepare `name` for `tfds.data_source`."""
  base = name.split("/")[0].split(":")[0]
  cmd = f"tfds build {name} --data_dir={data_dir_root} --file_format=array_record"
  if base in MANUAL_DOWNLOADS:
    manual = os.path.join(data_dir_root, "downloads", "manual")
    return (f"download {MANUAL_DOWNLOADS[base]} into {manual} (the manual download dir; "
            f"or pass --manual_dir=DIR), then run:\n  {cmd}")
  return cmd


class Tfds:
  """Records are a split's `tfds.data_source`; examples are resized/cropped images + labels."""

  name = "tfds"

  def __init__(self, data_config):
    self.dataset = str(data_config.get("tfds_name") or "")
    if not self.dataset:
      raise ConfigError("data.source='tfds' needs data.tfds_name (e.g. 'cifar10')")
    self.data_dir = data_config.get("tfds_data_dir") or None
    self.image_size = int(data_config.image_size)
    tfds = _tfds()
    try:
      self.builder = tfds.builder(self.dataset, data_dir=self.data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise DataError(f"tfds has no dataset named {self.dataset!r} (data.tfds_name): "
                      f"{str(e).splitlines()[0]}") from None
    features = self.builder.info.features
    if "image" not in features:
      raise DataError(f"tfds dataset {self.dataset!r} has no 'image' feature "
                      f"(features: {sorted(features.keys())})")
    channels = features["image"].shape[-1]
    num_classes = features["label"].num_classes if "label" in features else 1
    self.info = DatasetInfo((self.image_size, self.image_size, int(channels)), int(num_classes),
                            len(self.records("train", True)))

  @property
  def data_dir_root(self) -> str:
    return str(self.builder.data_dir_root)

  def resolve_split(self, split: str) -> str:
    """"test" falls back to "validation" for datasets without a test split (imagenet2012)."""
    known = list(self.builder.info.splits.keys())
    if split == "test" and known and "test" not in known and "validation" in known:
      return "validation"
    return split

  @functools.lru_cache(maxsize=None)
  def _open(self, split: str):
    try:
      return self.builder.as_data_source(split=split)
    except (ValueError, KeyError) as e:
      if self.builder.is_prepared():  # Prepared, so the split name is wrong.
        raise DataError(f"tfds dataset {self.dataset!r} has no split {split!r} (splits: "
                        f"{sorted(self.builder.info.splits.keys())}): {e}") from None
      raise self._unprepared_error(e) from None
    except Exception as e:  # pylint: disable=broad-except
      # Unprepared data (or tfrecord-only data) surfaces as NotImplementedError, AssertionError
      # or a file error depending on the dataset: all mean "prepare it (again)".
      raise self._unprepared_error(e) from None

  def _unprepared_error(self, cause: Exception) -> DataError:
    cmd = prepare_command(self.dataset, self.data_dir_root)
    if self.builder.is_prepared():
      what = (f"is prepared in {self.builder.data_dir} but not readable by random access "
              f"({type(cause).__name__}: {str(cause).splitlines()[0]}); rebuild it in the "
              "array_record format")
    else:
      what = f"is not prepared in data_dir {self.data_dir_root}"
    return DataError(f"tfds dataset {self.dataset!r} {what}. Prepare it once with:\n  {cmd}\n"
                     "(set data.tfds_data_dir to use another directory)")

  def records(self, split: str, augment: bool) -> Sequence[Any]:
    del augment
    return self._open(self.resolve_split(split))

  def example(self, split: str, record: dict, rng: Optional[np.random.Generator]) -> dict:
    del split, rng
    image = np.asarray(record["image"])
    if image.ndim == 2:
      image = image[..., None]
    image = transforms.resize_center_crop(image, self.image_size)
    label = record["label"] if "label" in record else 0
    return {"image": transforms.to_float(image), "label": np.int32(label)}
