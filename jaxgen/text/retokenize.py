"""Word-level caption ids -> a published model's CLIP token ids, inside the jitted step.

The embedded caption sources (jaxgen.data.subjects) tokenise with jaxgen's `WordTokenizer`
(`<bos> words <eos> <pad>...`, one id per word); a published text encoder needs its own CLIP BPE
ids. CLIP splits text at whitespace before BPE (jaxgen.text.clip_tokenizer), so the ids of a
caption are bos + the concatenated ids of its words + eos: `Retokenizer` tabulates each word's
BPE ids once on the host (the CLIP tokenizer's own `encode`) and composes them per caption on
device, equal to `clip_tokenizer(decoded caption, padding to max_length, truncation=True)`:

  input_ids       (B, L) int32: bos, the words' tokens (the first L - 2 kept, as transformers
                  truncates), eos, then pad_token_id (L = the CLIP tokenizer's model_max_length)
  attention_mask  (B, L) int32: 1 from bos to eos
  word_ends       (B, Lw) int32: the CLIP position of each word's last token (a word id's
                  position in the caption -> its token's; FastComposer flags that token), 0 for
                  bos / eos / pad and for words the truncation cut

The unknown-word id (<unk>) maps to the BPE ids of the text "<unk>", which is what the caption
decodes to.
"""

from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import ConfigError
from jaxgen.text.clip_tokenizer import CLIPTokenizer
from jaxgen.text.simple_tokenizer import WordTokenizer


class Retokenizer:
  """`Retokenizer(words, clip)(word_ids)` -> CLIP ids, mask and word ends (module docstring)."""

  def __init__(self, words: WordTokenizer, clip: CLIPTokenizer, max_length: int = 0):
    self.max_length = int(max_length or clip.model_max_length)
    if self.max_length < 2:
      raise ConfigError(f"a CLIP sequence needs room for bos and eos; max_length "
                        f"{self.max_length}")
    self.bos, self.eos, self.pad = clip.bos_token_id, clip.eos_token_id, clip.pad_token_id
    specials = (words.pad_id, words.bos_id, words.eos_id)
    pieces = [[] if i in specials else clip.encode(word, add_special_tokens=False)
              for i, word in enumerate(words.vocab)]
    width = max(1, max(len(p) for p in pieces))
    self.table = np.full((len(pieces), width), self.pad, np.int32)
    self.lengths = np.zeros(len(pieces), np.int32)
    for i, p in enumerate(pieces):
      self.table[i, :len(p)] = p
      self.lengths[i] = len(p)

  def __call__(self, word_ids: jax.Array) -> Dict[str, jax.Array]:
    word_ids = jnp.asarray(word_ids, jnp.int32)
    b, words = word_ids.shape
    length = self.max_length
    n = jnp.asarray(self.lengths)[word_ids]                      # (B, Lw) tokens per word
    start = 1 + jnp.cumsum(n, axis=1) - n                        # after bos
    total = jnp.minimum(n.sum(axis=1), length - 2)               # kept tokens
    tokens = jnp.asarray(self.table)[word_ids]                   # (B, Lw, K)
    k = jnp.arange(tokens.shape[-1])
    pos = start[..., None] + k                                   # (B, Lw, K)
    keep = (k < n[..., None]) & (pos < 1 + total[:, None, None])
    pos = jnp.where(keep, pos, length)                           # out of range: dropped
    rows = jnp.broadcast_to(jnp.arange(b)[:, None, None], pos.shape)
    ids = jnp.full((b, length), self.pad, jnp.int32).at[:, 0].set(self.bos)
    ids = ids.at[rows, pos].set(tokens, mode="drop")
    ids = ids.at[jnp.arange(b), 1 + total].set(self.eos)
    mask = (jnp.arange(length)[None] <= 1 + total[:, None]).astype(jnp.int32)
    end = start + n - 1
    word_ends = jnp.where((n > 0) & (end < 1 + total[:, None]), end, 0)
    del words
    return {"input_ids": ids, "attention_mask": mask, "word_ends": word_ends.astype(jnp.int32)}
