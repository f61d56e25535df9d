"""Text processing: tokenizers for text-conditioned models (CLIP's BPE)."""

from jaxgen.text.clip_tokenizer import CLIPTokenizer

__all__ = ["CLIPTokenizer"]
