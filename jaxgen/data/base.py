"""What every data source provides to the pipeline: its shape facts, records and decoding."""

import dataclasses
from typing import Any, Optional, Protocol, Sequence, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  image_shape: Tuple[int, int, int]  # (H, W, C) of every batch image.
  num_classes: int
  num_train: int  # Examples in one epoch of the "train" split.


class Source(Protocol):
  """A dataset: random-access records per split and a record -> example function."""

  name: str
  info: DatasetInfo

  def records(self, split: str, augment: bool) -> Sequence[Any]:
    """Random-access records of `split` (`augment`: the records the training stream uses)."""

  def example(self, split: str, record: Any, rng: Optional[np.random.Generator]) -> dict:
    """{"image": float32 HWC in [-1, 1], "label": int32}; `rng` is None when not augmenting.

    The source applies only its own random choices (crops); the pipeline adds flips.
    """
