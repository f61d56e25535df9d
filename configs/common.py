"""Defaults shared by the config files (not a runnable config itself).

Each runnable config starts from `base_config()` and changes what differs.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "diffusion"
  c.model = ml_collections.ConfigDict({"name": "unet"})
  c.data = ml_collections.ConfigDict(dict(
      source="mnist5k", tfds_name="", tfds_data_dir="", image_size=28, random_flip=False,
      num_classes=10))
  c.diffusion = ml_collections.ConfigDict(dict(
      schedule="cosine", num_steps=1000, prediction="eps", label_dropout=0.1,
      min_snr_gamma=0.0))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", lr=2e-3, b1=0.9, b2=0.99, weight_decay=0.01, schedule="one_cycle",
      warmup_frac=0.15, grad_clip=1.0, ema_decay=0.999))
  c.training = ml_collections.ConfigDict(dict(
      batch_size=128, steps=1000, log_every=50, sample_every=0))
  c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, async_save=True))
  c.sample = ml_collections.ConfigDict(dict(
      method="ddim", num_steps=50, eta=0.0, guidance_scale=2.0, num_per_class=10,
      batch_size=256))
  # Class accuracy of samples under a classifier trained on the real data (cached in workdir/eval).
  c.eval = ml_collections.ConfigDict(dict(num_samples=1000, classifier_epochs=8))
  # Axis sizes (one may be -1: the rest); num_devices 0 = all devices, N = the first N.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, num_devices=0))
  return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config to a seconds-long CPU run of the same pipeline."""
  c.training.update(batch_size=16, steps=4, log_every=2, sample_every=0)
  c.checkpoint.update(every=2, async_save=False)
  c.sample.update(num_steps=4, num_per_class=2, batch_size=32)
  c.eval.update(num_samples=20, classifier_epochs=1)
  return c
