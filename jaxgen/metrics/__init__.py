"""Evaluation metrics and the feature networks jaxgen trains for offline evaluation.

  frechet_distance(mu1, sigma1, mu2, sigma2)   FID's formula, float64, eigh route (fid.py)
  inception_score(logits, splits=10)           IS (inception_score.py)
  precision_recall(real, fake, k=3)            Kynkaanniemi et al. (precision_recall.py)
  kernel_inception_distance(real, fake)        KID, unbiased MMD^2 over subsets (kid.py)
  clip_score(images, texts, embed_images, embed_texts)   100 * max(cos, 0) (clip_score.py)
  psnr, ssim (image_quality.py), LPIPS (lpips.py), the FID Inception-v3 (inception.py),
  offline feature networks (features.py, classifier.py) and `--mode=eval` (evaluate.py).
"""

from jaxgen.metrics.clip_score import clip_score, clip_scores
from jaxgen.metrics.fid import (feature_frechet_distance, feature_statistics, frechet_distance,
                                load_statistics, save_statistics)
from jaxgen.metrics.inception_score import inception_score
from jaxgen.metrics.kid import kernel_inception_distance
from jaxgen.metrics.precision_recall import precision_recall

__all__ = ["clip_score", "clip_scores", "feature_frechet_distance", "feature_statistics",
           "frechet_distance", "inception_score", "kernel_inception_distance",
           "load_statistics", "precision_recall", "save_statistics"]
