"""Defaults shared by the latent-diffusion configs (not a runnable config itself).

ImageNet class-conditional diffusion on DC-AE latents (task "latent_diffusion"): the images of
tfds imagenet2012 are encoded by a frozen DC-AE (`autoencoder.dir`: a converted checkpoint,
see jaxgen/tasks/latent_diffusion.py) and scaled by its variant's factor; the backbone runs at
patch size 1 on the latents. Training follows DiT: AdamW lr 1e-4, no weight decay, batch 256,
EMA 0.9999, 1000-step linear schedule, eps prediction, label dropout 0.1 for guidance.

`latent_smoke` turns such a config into a seconds-long CPU run of the same pipeline: MNIST-5k
padded to 32x32 (embedded data, no download), a tiny random-init DC-AE (f4, 8x8x8 latents,
the f32c32 structure: pixel-unshuffle input stage, ResBlock stages, an EfficientViT stage,
BatchNorm/ReLU decoder stages) and a tiny backbone of the same family.
"""

import ml_collections

from configs import common

# DC-AE f32c32 in miniature: 3 stages (f4) instead of 6 (f32), 1 channel, 8 latent channels.
TINY_DCAE = dict(
    name="dcae", in_channels=1, latent_channels=8, attention_head_dim=8,
    encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
    decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
    encoder_block_out_channels=(8, 16, 32), decoder_block_out_channels=(8, 16, 32),
    encoder_layers_per_block=(0, 1, 1), decoder_layers_per_block=(0, 1, 1),
    encoder_qkv_multiscales=((), (), ()), decoder_qkv_multiscales=((), (), ()),
    downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle",
    decoder_norm_types=("batch_norm", "batch_norm", "rms_norm"),
    decoder_act_fns=("relu", "relu", "silu"),
    scaling_factor=0.4)  # ~1 / std of its (random-init) latents on MNIST, as DC-AE's factors.


def imagenet_config(image_size: int, model: dict,
                    variant: str = "f32c32-in-1.0") -> ml_collections.ConfigDict:
  """ImageNet `image_size` through DC-AE `variant` latents with backbone `model`."""
  c = common.base_config()
  c.task = "latent_diffusion"
  c.data.update(dict(source="tfds", tfds_name="imagenet2012", image_size=image_size,
                     random_flip=True, num_classes=1000))
  c.data.latent_cache = ""  # A directory from `python -m jaxgen.data.latent_cache`.
  c.autoencoder = ml_collections.ConfigDict(dict(
      dir="", random_init=False, seed=0, scaling_factor=0.0,
      model=ml_collections.ConfigDict(dict(name="dcae", variant=variant))))
  c.model = common.model_section(dict(model, num_classes=1000))
  c.diffusion.update(dict(schedule="linear", num_steps=1000, prediction="eps",
                          label_dropout=0.1, min_snr_gamma=0.0))
  c.optimizer.update(dict(lr=1e-4, b1=0.9, b2=0.999, weight_decay=0.0, schedule="constant",
                          warmup_frac=0.0, grad_clip=1.0, ema_decay=0.9999))
  c.training.update(dict(batch_size=256, steps=400_000, log_every=100, sample_every=0))
  c.checkpoint.update(dict(every=10_000, keep=3))
  # DiT's guidance 1.5; DPM-Solver++(2M) in 30 steps (U-ViT / DC-AE sample with DPM-Solver).
  c.sample.update(dict(method="dpmpp_2m", num_steps=30, guidance_scale=1.5, num_per_class=1,
                       batch_size=64))
  return c


def latent_smoke(c: ml_collections.ConfigDict, model: dict) -> ml_collections.ConfigDict:
  """The same pipeline on MNIST-5k at 32x32 with a tiny random DC-AE and backbone `model`."""
  c = common.smoke(c)
  c.data.update(dict(source="mnist5k", tfds_name="", image_size=32, random_flip=False,
                     num_classes=10))
  c.autoencoder.update(dict(dir="", random_init=True, scaling_factor=0.0))
  c.autoencoder.model = ml_collections.ConfigDict(TINY_DCAE)
  c.model = common.model_section(dict(model, num_classes=10))
  c.optimizer.update(dict(lr=1e-3, warmup_frac=0.0))
  c.sample.update(dict(method="dpmpp_2m", num_steps=4, guidance_scale=1.5, num_per_class=2,
                       batch_size=32))
  return c


# CaT-S0 cut to two levels (fewer ops to compile; CaT-S0 itself needs 4x4-divisible latents).
SMOKE_CAT = dict(name="cat", size="S0", widths=(16, 32), depths=(1, 1), block_kinds=("mb", "att"),
                 expand_ratios=(4, 4), patch_size=1, learn_sigma=False)


def config_getter(image_size: int, model: dict, smoke_model: dict = SMOKE_CAT):
  """`get_config(arg)` of an ImageNet latent config: the full run, or `:smoke`."""
  def get_config(arg=None):
    c = imagenet_config(image_size, model)
    if arg == "smoke":
      c = latent_smoke(c, smoke_model)
    elif arg:
      raise ValueError(f"unknown preset {arg!r}; presets: smoke")
    return c
  return get_config
