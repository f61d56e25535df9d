"""CLIP score (Hessel et al. 2021; torchmetrics' CLIPScore): 100 * max(cos(E_image, E_text), 0),
averaged over image-caption pairs.

The embeddings come from callables, so any encoder works (jaxgen's Flax CLIP in
jaxgen/models/clip.py, or another): `embed_images(images) -> (B, D)` and
`embed_texts(texts) -> (B, D)`. torchmetrics clamps the mean instead of each pair; the two agree
whenever no pair has a negative cosine (as for CLIP models on real captions).
"""

from typing import Callable, Sequence, Tuple

import numpy as np


def clip_scores(image_embeds, text_embeds) -> np.ndarray:
  """Per-pair 100 * max(cos, 0) of matching rows of (N, D) image and text embeddings."""
  a = np.asarray(image_embeds, np.float64)
  b = np.asarray(text_embeds, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"embedding shapes differ: images {a.shape}, texts {b.shape}")
  cos = np.sum(a * b, axis=-1) / np.maximum(
      np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
  return 100.0 * np.maximum(cos, 0.0)


def clip_score(images, texts: Sequence[str], embed_images: Callable, embed_texts: Callable,
               batch_size: int = 64) -> Tuple[float, float]:
  """(mean, standard error) of the CLIP score of images[i] with texts[i], in batches."""
  if len(images) != len(texts):
    raise ValueError(f"{len(images)} images but {len(texts)} captions")
  scores = []
  for i in range(0, len(texts), batch_size):
    scores.append(clip_scores(np.asarray(embed_images(images[i:i + batch_size])),
                              np.asarray(embed_texts(list(texts[i:i + batch_size])))))
  s = np.concatenate(scores)
  return float(s.mean()), float(s.std(ddof=1) / np.sqrt(len(s))) if len(s) > 1 else 0.0
