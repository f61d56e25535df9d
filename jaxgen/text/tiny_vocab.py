"""A cut-down CLIP BPE vocabulary in the hub's tokenizer layout, for tests and benchmarks.

Published tokenizers cannot be downloaded here; this writes one that transformers'
`CLIPTokenizer` and jaxgen's read alike: the 512 byte symbols (with and without "</w>"), the
merges that spell each of `words` whole, and the two special tokens, with
`tokenizer_config.json` / `special_tokens_map.json` as a hub directory has them.
"""

import json
import os
from typing import Sequence

from jaxgen.text.clip_tokenizer import bytes_to_unicode

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def write_clip_tokenizer(directory: str, words: Sequence[str], pad_token: str = EOS,
                         model_max_length: int = 77) -> int:
  """Writes vocab.json, merges.txt and the token configs to `directory`; returns the
  vocabulary size."""
  byte_map = bytes_to_unicode()
  vocab = list(byte_map.values()) + [c + "</w>" for c in byte_map.values()]
  merges = []
  for word in words:
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:  # Merge left to right until the word is one symbol.
      pair = (symbols[0], symbols[1])
      if pair not in merges:
        merges.append(pair)
        vocab.append(pair[0] + pair[1])
      symbols = [pair[0] + pair[1]] + symbols[2:]
  vocab += [BOS, EOS]
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(dict(specials, model_max_length=model_max_length,
                   tokenizer_class="CLIPTokenizer", do_lower_case=True), f)
  with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
    json.dump(specials, f)
  return len(vocab)
