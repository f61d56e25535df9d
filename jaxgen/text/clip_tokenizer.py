"""CLIP's byte-level BPE tokenizer in pure Python, reading a hub directory's vocab files.

`CLIPTokenizer.from_pretrained(path)` reads `vocab.json` + `merges.txt` (or `tokenizer.json`)
from `path` or `path/tokenizer` (Stable Diffusion's layout), plus the special tokens and
`model_max_length` from `tokenizer_config.json` when present. It reproduces transformers'
`CLIPTokenizer` (transformers 5 has only the `tokenizers`-backed one):

  text -> split out the special tokens -> NFC, runs of whitespace -> " ", lowercase
       -> pieces by CLIP's pattern ('s 't 're 've 'm 'll 'd | letters+ | one digit |
          other non-space runs) -> GPT-2 byte-to-unicode map -> BPE with "</w>" on each
          piece's last symbol -> ids; bos + ids[:max_length - 2] + eos, padded with pad.

The pattern needs Unicode classes (\\p{L}, \\p{N}) from the `regex` package, which
transformers already depends on. Without it, `re` approximates them: letters are
`[^\\W\\d_]` (adds the few Nl/No number characters to "letters"), digits are `\\d` (Nd only);
ASCII text tokenizes identically either way. Symbols missing from the vocabulary become the
unknown token (`<|endoftext|>`), as in transformers; the released CLIP vocabulary holds all
256 byte symbols, so this only happens with cut-down vocabularies.
"""

import functools
import os
import re
import unicodedata
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from jaxgen.convert.common import read_json
from jaxgen.errors import DataError

try:
  import regex  # pylint: disable=g-import-not-at-top
except ImportError:
  regex = None


def piece_pattern(unicode_classes: bool = regex is not None):
  """CLIP's pre-tokenization pattern; `unicode_classes=False` gives the `re` approximation."""
  if unicode_classes:
    letters, digit, other, lib = r"\p{L}+", r"\p{N}", r"[^\s\p{L}\p{N}]+", regex
  else:  # ASCII-exact approximation of the Unicode classes (see module doc).
    letters, digit, other, lib = r"[^\W\d_]+", r"\d", r"(?:[^\s\w]|_)+", re
  return lib.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                     + "|".join((letters, digit, other)))


_PIECES = piece_pattern()
_WHITESPACE = re.compile(r"\s+")
_EOW = "</w>"  # Marks a word's last symbol.


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> Dict[int, str]:
  """GPT-2's reversible byte -> printable unicode character map (no spaces/control chars)."""
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) +
          list(range(ord("®"), ord("ÿ") + 1)))
  chars, extra = [], 0
  for b in range(256):
    if b in keep:
      chars.append(b)
    else:
      chars.append(256 + extra)
      extra += 1
  return {b: chr(c) for b, c in zip(range(256), chars)}


def _token_content(value, default: str) -> str:
  # tokenizer_config.json stores tokens as strings or as {"content": ...} (AddedToken).
  if isinstance(value, Mapping):
    value = value.get("content")
  return value if isinstance(value, str) else default


class CLIPTokenizer:
  """Text -> CLIP token ids: `tokenizer(["a photo of a cat"])["input_ids"]` (B, 77) int32."""

  def __init__(self, vocab: Mapping[str, int], merges: Sequence[Tuple[str, str]],
               bos_token: str = "<|startoftext|>", eos_token: str = "<|endoftext|>",
               pad_token: str = "<|endoftext|>", unk_token: str = "<|endoftext|>",
               model_max_length: int = 77):
    self.encoder = dict(vocab)
    self.decoder = {i: t for t, i in self.encoder.items()}
    self.ranks = {tuple(m): i for i, m in enumerate(merges)}
    for name, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token),
                        ("unk", unk_token)):
      if token not in self.encoder:
        raise DataError(f"CLIP tokenizer: {name} token {token!r} is not in the vocabulary")
    self.bos_token, self.eos_token = bos_token, eos_token
    self.pad_token, self.unk_token = pad_token, unk_token
    self.bos_token_id, self.eos_token_id = self.encoder[bos_token], self.encoder[eos_token]
    self.pad_token_id, self.unk_token_id = self.encoder[pad_token], self.encoder[unk_token]
    self.model_max_length = int(model_max_length)
    self._specials = sorted({bos_token, eos_token, pad_token, unk_token}, key=len, reverse=True)
    self._special_split = re.compile("(" + "|".join(re.escape(s) for s in self._specials) + ")")
    self._pieces = _PIECES
    self._byte_map = bytes_to_unicode()
    self._byte_unmap = {c: b for b, c in self._byte_map.items()}
    self._cache: Dict[str, List[str]] = {}

  @classmethod
  def from_pretrained(cls, path: str, **overrides) -> "CLIPTokenizer":
    """Reads `path` (or `path/tokenizer`): vocab.json + merges.txt, else tokenizer.json."""
    if not os.path.isfile(os.path.join(path, "vocab.json")) and not os.path.isfile(
        os.path.join(path, "tokenizer.json")) and os.path.isdir(os.path.join(path, "tokenizer")):
      path = os.path.join(path, "tokenizer")
    vocab_path, merges_path = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    json_path = os.path.join(path, "tokenizer.json")
    if os.path.isfile(vocab_path) and os.path.isfile(merges_path):
      vocab = read_json(vocab_path, "a CLIP BPE vocabulary {token: id}", DataError)
      with open(merges_path, encoding="utf-8") as f:
        lines = f.read().split("\n")
      merges = [tuple(l.split()) for l in lines if l.strip() and not l.startswith("#version")]
    elif os.path.isfile(json_path):
      model = read_json(json_path, "a tokenizers tokenizer.json", DataError).get("model", {})
      if model.get("type") != "BPE":
        raise DataError(f"{json_path}: tokenizer model {model.get('type')!r} is not BPE")
      vocab = model["vocab"]
      merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    else:
      raise DataError(f"{path}: no CLIP tokenizer files (vocab.json + merges.txt, or "
                      f"tokenizer.json); directory holds {sorted(os.listdir(path))}")
    bad = [m for m in merges if len(m) != 2]
    if bad:
      raise DataError(f"{path}: malformed merges (want two symbols per line): {bad[:3]}")
    kwargs = {}
    config_path = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(config_path):
      config = read_json(config_path, "a tokenizer_config.json", DataError)
      for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if key in config:
          kwargs[key] = _token_content(config[key], "<|endoftext|>")
      # Hub configs without a limit store a huge sentinel; CLIP's context is 77.
      max_len = config.get("model_max_length")
      if isinstance(max_len, int) and max_len < 100_000:
        kwargs["model_max_length"] = max_len
    kwargs.update(overrides)
    return cls(vocab, merges, **kwargs)

  @property
  def vocab_size(self) -> int:
    return len(self.encoder)

  # -- text -> tokens ------------------------------------------------------------------------

  def _bpe(self, piece: str) -> List[str]:
    if piece in self._cache:
      return self._cache[piece]
    word = list(piece[:-1]) + [piece[-1] + _EOW]
    while len(word) > 1:
      # The lowest-ranked adjacent pair merges everywhere it occurs (left to right).
      pair = min(zip(word, word[1:]), key=lambda p: self.ranks.get(p, float("inf")))
      if pair not in self.ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    self._cache[piece] = word
    return word

  def tokenize(self, text: str) -> List[str]:
    """BPE tokens of `text` (no bos/eos)."""
    tokens = []
    for chunk in self._special_split.split(text):
      if chunk in self._specials:
        tokens.append(chunk)
        continue
      chunk = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", chunk)).lower()
      for piece in self._pieces.findall(chunk):
        if piece in self._specials:  # Lowercasing can reveal one (the pattern lists them).
          tokens.append(piece)
        else:
          tokens.extend(self._bpe("".join(self._byte_map[b] for b in piece.encode("utf-8"))))
    return tokens

  def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
    """Ids of `text`, neither truncated nor padded."""
    ids = [self.encoder.get(t, self.unk_token_id) for t in self.tokenize(text)]
    return [self.bos_token_id] + ids + [self.eos_token_id] if add_special_tokens else ids

  def __call__(self, texts: Union[str, Sequence[str]], max_length: Optional[int] = None,
               padding: bool = True, truncation: bool = True) -> Dict[str, np.ndarray]:
    """{"input_ids", "attention_mask"}: (B, max_length) int32 (default model_max_length, 77).

    Truncation keeps bos + the first max_length - 2 tokens + eos, as transformers does;
    `padding=False` pads only to the longest text of the batch.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    max_length = int(max_length or self.model_max_length)
    rows = []
    for text in texts:
      ids = self.encode(text, add_special_tokens=False)
      if truncation:
        ids = ids[:max_length - 2]
      rows.append([self.bos_token_id] + ids + [self.eos_token_id])
    width = max_length if padding else max(len(r) for r in rows)
    if max(len(r) for r in rows) > width:
      raise DataError(f"a text has {max(len(r) for r in rows)} tokens > max_length {width}; "
                      "pass truncation=True")
    input_ids = np.full((len(rows), width), self.pad_token_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
      input_ids[i, :len(r)] = r
      mask[i, :len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}

  # -- ids -> text ---------------------------------------------------------------------------

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    tokens = [self.decoder.get(int(i), self.unk_token) for i in ids]
    if skip_special_tokens:
      tokens = [t for t in tokens if t not in self._specials]
    words = "".join(tokens).split(_EOW)
    as_bytes = lambda w: bytes(self._byte_unmap[c] for c in w if c in self._byte_unmap)
    return " ".join(as_bytes(w).decode("utf-8", errors="replace") for w in words).strip()
