"""python -m jaxgen.main --config=configs/dcae_photos.py --workdir=workdirs/dcae_photos

A small f32 DC-AE trained on random 64x64 crops of the real photos shipped in scikit-image's
wheel (no download), in about 15 minutes on a 2-core CPU. Same structure as f32c32: six
stages (the first empty: the input conv space-to-channels straight to stage 1), ResBlocks in
stages 1-2, EfficientViT blocks (LiteMLA + GLUMBConv) in stages 3-5, residual-autoencoding
down/up blocks, channel-averaging encoder output and channel-duplicating decoder input, a
BatchNorm/ReLU decoder in the ResBlock stages; narrower and one block per stage. A 64x64x3
crop becomes a 2x2x32 latent (128 numbers, 96x fewer, f32c32's ratio).

Loss: L1 + 0.1 LPIPS (AlexNet), phase 1 only (whole model, no GAN); AdamW, one-cycle LR.
`--mode=eval` measures PSNR, SSIM and LPIPS on the 88 held-out crops of the two test photos
(chelsea, rocket) and, in the same json, bicubic down- and up-sampling through 6x6x3 = 108
(`bicubic_*`) and 7x7x3 = 147 (`bicubic_larger_*`) numbers, the sizes just below and above
the latent's 128. `--mode=sample` writes held-out crops beside their reconstructions.
Presets: `:smoke` (seconds, the tests run it).
"""

import ml_collections

from configs import dcae_f32c32


def model() -> dict:
  return dcae_f32c32.f32_model((32, 64, 128, 128, 256, 256), latent_channels=32,
                               attention_head_dim=16)


def get_config(arg=None):
  c = dcae_f32c32.autoencoder_base()
  c.model = ml_collections.ConfigDict(model())
  c.data.update(source="photos", tfds_name="", image_size=64, random_flip=True, num_classes=1,
                crops_per_photo=1000)
  c.autoencoder.update(lpips_weight=0.1, use_ema=False, num_visual=16)
  c.optimizer.update(lr=2e-3, b1=0.9, b2=0.99, weight_decay=1e-4, schedule="one_cycle",
                     warmup_frac=0.05, grad_clip=1.0, ema_decay=0.999)
  c.training.update(batch_size=16, steps=3000, log_every=100, sample_every=1000)
  c.checkpoint.update(every=1000, keep=2)
  c.sample.update(batch_size=88)
  c.eval.update(num_samples=1000)
  if arg == "smoke":
    c = dcae_f32c32.smoke(c)
  elif arg:
    raise ValueError(f"unknown preset {arg!r}; presets: smoke")
  return c
