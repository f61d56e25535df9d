"""python -m jaxgen.main --config=configs/dcae_photos.py --workdir=workdirs/dcae_photos

A small f32 DC-AE trained on random 64x64 crops of the real photos shipped in scikit-image's
wheel (no download), in under 15 minutes on a 2-core CPU. Same structure as f32c32: six stages
(the first empty: the input conv goes space-to-channels straight to stage 1), ResBlocks in
stages 1-2, EfficientViT blocks (LiteMLA + GLUMBConv) in stages 3-5, residual-autoencoding
down/up blocks, channel-averaging encoder output and channel-duplicating decoder input;
narrower (widths 8..64) and one block per stage. A 64x64x3 crop becomes a 2x2x32 latent (128
numbers, 96x fewer, f32c32's ratio).

Choices for a short run from scratch (held-out PSNR after 400 steps, batch 8, widths 16..128):
RMSNorm in every decoder stage and an MSE loss (what PSNR measures), lr 2e-3: 16.5 dB (the
f32c32 recipe, BatchNorm stages and L1 + 0.1 LPIPS, was at 16.1 dB after 1500 steps); lr 5e-4:
17.0; plus the convs beside the shortcuts zero-initialised (`autoencoder.
zero_init_shortcut_convs`: the fresh model maps images through its shortcuts alone): 21.0; plus
no RMSNorm in the decoder head (`model.decoder_out_norm=none`: per-pixel normalisation erases
the brightness that the duplicated latent channels carry): 24.3; plus an identity head
activation instead of ReLU (`model.decoder_conv_act_fn=identity`: ReLU cut the negative half of
the linear shortcut path): 26.6. Then widths 8..64 instead of 16..128: 25.7 dB at 400 steps but
2.6x the steps per second, which wins at equal time. Then, with 5000 steps: random channel
orders (`data.random_channel_order`): 29.70 dB against 28.64 without. The six train photos hold
no blue sky and the held-out rocket photo is mostly sky: without the augmentation the model
tinted it purple (sky crops 33-36 dB where bicubic reaches 43-51), and training longer made it
worse (13000 steps: 28.28 dB). The depthwise convs run as shifted sums on CPU
(`jaxgen.kernels.depthwise_conv`), 18 steps/s instead of 8, hence 10000 steps.
Phase 1 only (whole model, no GAN); AdamW, one-cycle LR. Measured (2026-11-23, 2-core CPU):
`python -m jaxgen.main --config=configs/dcae_photos.py` ran 10000 steps in 11m03s (start-up,
sample grids and checkpoints included); `--mode=eval` then gave held-out PSNR 30.12 dB, SSIM
0.769, LPIPS 0.350 against bicubic 29.17 dB / 0.737 / 0.366 through 108 numbers and 29.65 /
0.747 / 0.359 through 147: better on all three than both. Per crop, against the 147-number
bicubic: +0.47 +- 0.24 dB (paired mean +- standard error), higher on 62 of the 88 crops; PSNR of
the pooled squared error 26.83 dB against 25.95. For scale, a linear code of the same 128
numbers per crop (PCA of train crops) reaches 30.3 dB.
`--mode=eval` measures PSNR, SSIM and LPIPS on the 88 held-out crops of the two test photos
(chelsea, rocket) and, in the same json, bicubic down- and up-sampling through 6x6x3 = 108
(`bicubic_*`) and 7x7x3 = 147 (`bicubic_larger_*`) numbers, the sizes just below and above
the latent's 128. `--mode=sample` writes held-out crops beside their reconstructions.
Presets: `:smoke` (seconds, the tests run it).
"""

import ml_collections

from configs import dcae_f32c32


def model() -> dict:
  m = dcae_f32c32.f32_model((8, 16, 32, 32, 64, 64), latent_channels=32,
                            attention_head_dim=16)
  m.update(decoder_norm_types=("rms_norm",) * 6, decoder_act_fns=("silu",) * 6,
           decoder_out_norm="none", decoder_conv_act_fn="identity")
  return m


def mse_recipe(c: ml_collections.ConfigDict) -> None:
  """The loss and optimizer of this config's autoencoder run (MSE only, zero-initialised
  shortcut convs, AdamW one-cycle), applied in place; configs/can_digits.py trains its
  autoencoder with it too."""
  c.autoencoder.update(l1_weight=0.0, l2_weight=1.0, lpips_weight=0.0, use_ema=False,
                       zero_init_shortcut_convs=True, num_visual=16)
  c.optimizer.update(lr=1e-3, b1=0.9, b2=0.99, weight_decay=1e-4, schedule="one_cycle",
                     warmup_frac=0.05, grad_clip=1.0, ema_decay=0.999)


def get_config(arg=None):
  c = dcae_f32c32.autoencoder_base()
  c.model = ml_collections.ConfigDict(model())
  c.data.update(source="photos", tfds_name="", image_size=64, random_flip=True, num_classes=1,
                crops_per_photo=1000, random_channel_order=True)
  mse_recipe(c)
  c.training.update(batch_size=8, steps=10000, log_every=100, sample_every=5000)
  c.checkpoint.update(every=5000, keep=2)
  c.sample.update(batch_size=88)
  c.eval.update(num_samples=1000)
  if arg == "smoke":
    c = dcae_f32c32.smoke(c)
  elif arg:
    raise ValueError(f"unknown preset {arg!r}; presets: smoke")
  return c
