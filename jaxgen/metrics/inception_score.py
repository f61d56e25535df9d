"""Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), mean and std over splits.

As the original TF code and torch-fidelity compute it: the class posteriors (softmax of the FID
Inception's 1008 logits for the standard IS) are cut into `splits` consecutive chunks; each
chunk's score uses that chunk's marginal p(y); the result is the mean and the (population)
standard deviation of the chunk scores. Computed in float64.

Known values: uniform posteriors give 1; confident posteriors spread evenly over n classes
(in every split) give n.
"""

from typing import Tuple

import numpy as np
from scipy import special


def inception_score(logits=None, *, probs=None, splits: int = 10) -> Tuple[float, float]:
  """(mean, std) of the IS over `splits` chunks, from logits (N, K) or probabilities (N, K)."""
  if (logits is None) == (probs is None):
    raise ValueError("pass exactly one of logits or probs")
  if probs is None:
    log_p = special.log_softmax(np.asarray(logits, np.float64), axis=-1)
  else:
    p = np.asarray(probs, np.float64)
    log_p = np.log(np.clip(p / p.sum(axis=-1, keepdims=True), 1e-300, None))
  n = len(log_p)
  if not 1 <= splits <= n:
    raise ValueError(f"splits must be in [1, {n}] for {n} samples, got {splits}")
  scores = []
  for chunk in np.array_split(log_p, splits):
    # log p(y) of the chunk, from a log-sum-exp (no underflow for confident posteriors).
    log_py = special.logsumexp(chunk, axis=0) - np.log(len(chunk))
    kl = np.sum(np.exp(chunk) * (chunk - log_py), axis=-1)
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores)), float(np.std(scores))
