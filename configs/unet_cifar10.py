"""python -m jaxgen.main --config=configs/unet_cifar10.py --workdir=workdirs/unet_cifar10

Class-conditional U-Net diffusion on CIFAR-10 (32x32x3) from tfds (`tfds build cifar10` first).
Cosine schedule, eps-prediction, label dropout 0.1, AdamW + one-cycle, EMA 0.9999, random flips,
DDIM sampling with classifier-free guidance. Presets: `:smoke` (seconds, embedded digits padded
to 32x32x1 so it needs no download; the tests run it).
"""

from configs import common


def get_config(arg=None):
  c = common.base_config()
  c.data.update(dict(source="tfds", tfds_name="cifar10", image_size=32, random_flip=True,
                     num_classes=10))
  c.model.update(dict(
      name="unet", num_classes=10, base_channels=128, channel_mult=(1, 2, 2, 2),
      num_res_blocks=2, attention_levels=(2,), num_heads=4, num_groups=32, dropout=0.1))
  c.optimizer.update(dict(lr=2e-4, ema_decay=0.9999, warmup_frac=0.05))
  c.training.update(batch_size=128, steps=200_000, log_every=100, sample_every=10_000)
  c.checkpoint.every = 5000
  c.sample.update(method="ddim", num_steps=100, guidance_scale=2.0, num_per_class=10)
  if arg == "smoke":
    c = common.smoke(c)
    c.data.update(source="mnist5k", image_size=32, random_flip=False)
    c.model.update(base_channels=8, num_groups=4, dropout=0.0)
  elif arg:
    raise ValueError(f"unknown preset {arg!r}; presets: smoke")
  return c
