"""A word-level tokenizer for small built-in caption vocabularies (the multi-subject data).

Captions are lower-cased and split on whitespace (commas and full stops dropped); each word is
one token. Ids: 0 <pad>, 1 <unk>, 2 <bos>, 3 <eos>, then the vocabulary in order. Encoded
captions are `<bos> words <eos> <pad>...` of fixed length `max_length`. (eos is not 2, which
transformers' CLIP text config reads as "legacy: the end of text is the largest id".)

FastComposer's subject marker: in `encode_with_subjects`, a caption marks each subject by writing
`<|image|>` right after its noun ("a 3 <|image|> on the left"). The markers are removed and the
token positions of the marked nouns are returned, in caption order, next to the ids.
"""

import re
from typing import Iterable, List, Sequence, Tuple

import numpy as np

from jaxgen.errors import DataError

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
SUBJECT_MARKER = "<|image|>"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# The words of the multi-subject captions (jaxgen.data.subjects) and a few spares.
DEFAULT_WORDS = (("a", "an", "the", "and", "on", "in", "at", "of", "with", "left", "right",
                  "top", "bottom", "side", "digit", "number") + tuple(str(d) for d in range(10))
                 + DIGIT_WORDS)
_PUNCT = re.compile(r"[,.;:!?]")


class WordTokenizer:
  """Word <-> id over a fixed vocabulary; `__call__` encodes a batch to (N, max_length) int32."""

  def __init__(self, words: Sequence[str] = DEFAULT_WORDS, max_length: int = 16):
    words = [w.lower() for w in words]
    if len(set(words)) != len(words) or set(words) & set(SPECIALS):
      raise DataError("tokenizer words must be distinct and not special tokens")
    if max_length < 3:
      raise DataError(f"max_length must be >= 3 (<bos> word <eos>), got {max_length}")
    self.vocab = list(SPECIALS) + words
    self.ids = {w: i for i, w in enumerate(self.vocab)}
    self.max_length = int(max_length)
    self.pad_id, self.unk_id, self.bos_id, self.eos_id = range(4)

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  @staticmethod
  def words(text: str) -> List[str]:
    return _PUNCT.sub(" ", text.lower()).split()

  def _pack(self, ids: List[int], text: str) -> np.ndarray:
    if len(ids) + 2 > self.max_length:
      raise DataError(f"caption {text!r} has {len(ids)} words; at most {self.max_length - 2} "
                      "fit (raise the tokenizer's max_length)")
    out = np.full(self.max_length, self.pad_id, np.int32)
    out[:len(ids) + 2] = [self.bos_id, *ids, self.eos_id]
    return out

  def encode(self, text: str) -> np.ndarray:
    """(max_length,) int32 ids of `<bos> words <eos> <pad>...`; unknown words -> <unk>."""
    return self._pack([self.ids.get(w, self.unk_id) for w in self.words(text)], text)

  def encode_with_subjects(self, text: str) -> Tuple[np.ndarray, List[int]]:
    """(ids, positions): markers removed; positions of the words each marker follows."""
    ids, positions = [], []
    for w in self.words(text.replace(SUBJECT_MARKER, f" {SUBJECT_MARKER} ")):
      if w == SUBJECT_MARKER:
        if not ids:
          raise DataError(f"{text!r}: a subject marker {SUBJECT_MARKER} must follow a word")
        positions.append(len(ids))  # +1 for <bos> -1 for the preceding word.
      else:
        ids.append(self.ids.get(w, self.unk_id))
    return self._pack(ids, text), positions

  def __call__(self, texts: Iterable[str]) -> np.ndarray:
    return np.stack([self.encode(t) for t in texts])

  def decode(self, ids: Sequence[int]) -> str:
    """Words between <bos> and <eos> (specials dropped)."""
    out = []
    for i in np.asarray(ids).tolist():
      if i == self.eos_id:
        break
      if i >= len(SPECIALS) or i == self.unk_id:
        out.append(self.vocab[i])
    return " ".join(out)
