"""What a person looks at: image grids and plots written under the workdir."""

import json
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image


def to_uint8(images) -> np.ndarray:
  """[-1, 1] float NHWC -> uint8 NHWC."""
  images = np.asarray(images, np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, rows: int, pad: int = 2) -> np.ndarray:
  """uint8 (N, H, W, C) -> one (rows*H', cols*W', C) image, filled row by row."""
  n, h, w, c = images.shape
  cols = -(-n // rows)
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, k = divmod(i, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + k * (w + pad):pad + k * (w + pad) + w] = images[i]
  return grid


def save_png(path: str, image: np.ndarray, min_size: int = 256) -> None:
  """Writes a uint8 HWC image, upscaled by an integer factor (nearest) so small grids are legible."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  scale = max(1, min_size // max(image.shape[:2]))
  if scale > 1:
    image = image.repeat(scale, 0).repeat(scale, 1)
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)


def save_class_grid(path: str, images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
  """A row per class (classes in order, samples of one class left to right)."""
  per_class = [images[labels == k] for k in range(num_classes)]
  cols = max(len(p) for p in per_class)
  h, w, c = images.shape[1:]
  rows = []
  for p in per_class:
    blank = np.full((cols - len(p), h, w, c), 255, np.uint8)
    rows.append(np.concatenate([p, blank]) if len(p) < cols else p)
  save_png(path, image_grid(np.concatenate(rows), rows=num_classes), min_size=512)


def save_labelled_grid(path: str, rows: Sequence[np.ndarray], names: Sequence[str]) -> None:
  """A row of uint8 images per name, the name written to the left of its row."""
  from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
  cols = max(len(r) for r in rows)
  h, w, c = rows[0].shape[1:]
  blank = lambda k: np.full((k, h, w, c), 255, np.uint8)
  grid = image_grid(np.concatenate([np.concatenate([r, blank(cols - len(r))]) for r in rows]),
                    rows=len(rows))
  scale = max(1, 128 // h)
  grid = grid.repeat(scale, 0).repeat(scale, 1)
  margin = 8 + 7 * max(len(n) for n in names)
  canvas = Image.new("RGB", (grid.shape[1] + margin, grid.shape[0]), "white")
  canvas.paste(Image.fromarray(grid[..., 0] if c == 1 else grid).convert("RGB"), (margin, 0))
  draw = ImageDraw.Draw(canvas)
  row_h = grid.shape[0] / len(rows)
  for i, name in enumerate(names):
    draw.text((4, int((i + 0.5) * row_h) - 6), name, fill="black")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  canvas.save(path)


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_schedule(path: str, betas: np.ndarray, alphas_cumprod: np.ndarray,
                  title: str = "") -> None:
  plt = _pyplot()
  fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
  ax[0].plot(betas)
  ax[0].set(title="beta_t", xlabel="t", yscale="log")
  ax[1].plot(alphas_cumprod, label="alpha_bar_t")
  ax[1].plot(np.sqrt(alphas_cumprod), label="sqrt(alpha_bar_t)")
  ax[1].plot(np.sqrt(1 - alphas_cumprod), label="sqrt(1 - alpha_bar_t)")
  ax[1].set(title="signal and noise", xlabel="t")
  ax[1].legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def read_metrics(path: str) -> Sequence[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_loss(path: str, metrics_path: str, key: str = "loss",
              smooth: Optional[int] = None) -> None:
  rows = [r for r in read_metrics(metrics_path) if key in r]
  if not rows:
    return
  steps = np.array([r["step"] for r in rows])
  values = np.array([r[key] for r in rows])
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot(steps, values, alpha=0.4, label=key)
  k = smooth or max(1, len(values) // 20)
  if k > 1 and len(values) > k:
    ax.plot(steps[k - 1:], np.convolve(values, np.ones(k) / k, "valid"), label=f"mean of {k}")
  ax.set(xlabel="step", ylabel=key, yscale="log")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
