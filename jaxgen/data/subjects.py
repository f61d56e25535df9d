"""Multi-subject compositions built from the embedded MNIST-5k digits (FastComposer's data).

Source "mnist_subjects" (`config.data.source`): a canvas of two S x S halves (S =
`data.image_size`, canvas (S, 2S, 1), background -1) holds one or two real digits, each pasted
whole into the left or right half. Every example carries:

  image              (S, 2S, 1) float32 in [-1, 1]: the composition
  label              int32: the first-mentioned subject's digit (for class-based tools)
  input_ids          (L,) int32: the caption, e.g. "a 3 on the left and a 7 on the right",
                     tokenized by `jaxgen.text.simple_tokenizer.WordTokenizer` (L =
                     data.max_caption_length, default 16); written with FastComposer's
                     subject markers ("a 3 <|image|> on the left ..."), which the tokenizer removes
  subject_positions  (2,) int32: token position of each subject's noun (the digit), 0 if absent
  subject_valid      (2,) float32: 1 for a present subject
  subject_images     (2, S, S, 1) float32: the reference image of each subject: the very digit
                     image pasted on the canvas (FastComposer's segmented subject), -1 if absent
  subject_masks      (2, S, 2S) float32: each subject's segmentation on the canvas (digit
                     pixels above -0.5)
  subject_digits, subject_sides, subject_rows  (2,) int32: digit class, side (0 left,
                     1 right) and row in the mnist5k split of each subject; -1 if absent

Subjects are listed in caption order. Digits come from the matching mnist5k split (train
compositions use train digits only). Deterministic: a "train" stream (augment) draws a fresh
composition per example from the pipeline's per-position rng (fixed by config.seed); without
augmentation (and for "test") record i is always the same composition, drawn from
`default_rng([data.subjects_seed, split, i])`. Optional `config.data` fields:
two_subject_prob (0.75), num_train (4000 compositions per epoch), num_test (1000),
max_caption_length (16), subjects_seed (0).
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple

import ml_collections
import numpy as np

from jaxgen.data.base import DatasetInfo
from jaxgen.data.embedded import mnist5k_arrays
from jaxgen.errors import ConfigError
from jaxgen.text.simple_tokenizer import SUBJECT_MARKER, WordTokenizer

MAX_SUBJECTS = 2
SIDES = ("left", "right")
MASK_THRESHOLD = -0.5  # Digit pixels (in [-1, 1]) above this belong to the subject.
_SPLIT_CODE = {"train": 0, "test": 1}


def caption_for(subjects: Sequence[Tuple[int, int]], marker: bool = True) -> str:
  """[(digit, side), ...] -> "a 3 <|image|> on the left and a 7 <|image|> on the right"."""
  tag = f" {SUBJECT_MARKER}" if marker else ""
  return " and ".join(f"a {digit}{tag} on the {SIDES[side]}" for digit, side in subjects)


class MnistSubjects:
  """The "mnist_subjects" source; records are composition indices."""

  name = "mnist_subjects"

  def __init__(self, data_config: ml_collections.ConfigDict):
    self.size = int(data_config.image_size)
    self.two_subject_prob = float(data_config.get("two_subject_prob", 0.75))
    if not 0.0 <= self.two_subject_prob <= 1.0:
      raise ConfigError(f"data.two_subject_prob must be in [0, 1], got {self.two_subject_prob}")
    self.num_examples = {"train": int(data_config.get("num_train", 4000)),
                         "test": int(data_config.get("num_test", 1000))}
    self.seed = int(data_config.get("subjects_seed", 0))
    self.tokenizer = WordTokenizer(max_length=int(data_config.get("max_caption_length", 16)))
    self.info = DatasetInfo((self.size, 2 * self.size, 1), 10, self.num_examples["train"])

  def digits(self, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """The mnist5k split at S x S: (float32 (N, S, S, 1), int32 (N,))."""
    return mnist5k_arrays(split, self.size)

  def records(self, split: str, augment: bool) -> Sequence[Any]:
    del augment
    if split not in self.num_examples:
      raise ConfigError(f"data source {self.name!r} has splits 'train' and 'test', got {split!r}")
    return range(self.num_examples[split])

  def layout(self, split: str, record: int,
             rng: Optional[np.random.Generator] = None) -> List[Tuple[int, int]]:
    """[(mnist5k row, side), ...] of one composition, in caption order."""
    if rng is None:
      rng = np.random.default_rng([self.seed, _SPLIT_CODE[split], int(record)])
    count = 2 if rng.random() < self.two_subject_prob else 1
    sides = rng.permutation(2)[:count]  # Random caption order: right may come first.
    rows = rng.integers(0, len(self.digits(split)[1]), size=count)
    return [(int(r), int(s)) for r, s in zip(rows, sides)]

  def compose(self, split: str, layout: Sequence[Tuple[int, int]]) -> Dict[str, np.ndarray]:
    """The example (see the module docstring) of a layout [(row, side), ...]."""
    images, labels = self.digits(split)
    s = self.size
    canvas = np.full((s, 2 * s, 1), -1.0, np.float32)
    refs = np.full((MAX_SUBJECTS, s, s, 1), -1.0, np.float32)
    masks = np.zeros((MAX_SUBJECTS, s, 2 * s), np.float32)
    digits = np.full(MAX_SUBJECTS, -1, np.int32)
    sides = np.full(MAX_SUBJECTS, -1, np.int32)
    rows = np.full(MAX_SUBJECTS, -1, np.int32)
    for i, (row, side) in enumerate(layout):
      canvas[:, side * s:(side + 1) * s] = images[row]
      refs[i] = images[row]
      masks[i, :, side * s:(side + 1) * s] = images[row][..., 0] > MASK_THRESHOLD
      digits[i], sides[i], rows[i] = labels[row], side, row
    caption = caption_for([(int(digits[i]), int(sides[i])) for i in range(len(layout))])
    ids, positions = self.tokenizer.encode_with_subjects(caption)
    pos = np.zeros(MAX_SUBJECTS, np.int32)
    pos[:len(positions)] = positions
    valid = (digits >= 0).astype(np.float32)
    return {"image": canvas, "label": np.int32(digits[0]), "input_ids": ids,
            "subject_positions": pos, "subject_valid": valid, "subject_images": refs,
            "subject_masks": masks, "subject_digits": digits, "subject_sides": sides,
            "subject_rows": rows}

  def example(self, split: str, record: int, rng: Optional[np.random.Generator]) -> dict:
    return self.compose(split, self.layout(split, record, rng))

  def caption(self, example: Dict[str, np.ndarray]) -> str:
    """The caption (markers removed) of an example."""
    return self.tokenizer.decode(example["input_ids"])


def load_examples(data_config: ml_collections.ConfigDict, split: str = "test",
                  num: Optional[int] = None) -> Dict[str, np.ndarray]:
  """The first `num` fixed compositions of a split, stacked: {key: (num, ...)}."""
  source = MnistSubjects(data_config)
  num = len(source.records(split, False)) if num is None else int(num)
  examples = [source.example(split, i, None) for i in range(num)]
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
