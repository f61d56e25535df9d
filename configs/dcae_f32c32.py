"""python -m jaxgen.main --config=configs/dcae_f32c32.py:phase1 --workdir=workdirs/dcae_f32c32_phase1

DC-AE f32c32 (the published architecture, 323M parameters) trained on ImageNet (tfds
imagenet2012, prepared beforehand) in the three phases of decoupled high-resolution
adaptation (DC-AE paper section 3.3). Each phase is a preset; a later phase starts from the
previous phase's workdir:

  :phase1  256 px, the whole model, L1 + LPIPS, no GAN; BatchNorm statistics updated.
  :phase2  512 px, only the middle layers: the encoder's last stages (3-5, the EfficientViT
           stages) with its output conv, and the decoder's first stages (its input conv and
           stages 5-4-3, up-sampling blocks included); no GAN. Everything else (encoder stages
           1-2 and the pixel-unshuffle input, decoder stages 2-1, norm_out, conv_out) is frozen,
           BatchNorm statistics included.
             --config.autoencoder.init_from=workdirs/dcae_f32c32_phase1
  :phase3  256 px, only the decoder head: decoder stage 1 (the highest-resolution stage,
           its up-sampling block included), norm_out and conv_out; L1 + LPIPS + PatchGAN
           hinge loss; BatchNorm statistics frozen (the head's own BatchNorms keep the phase-2
           statistics).
             --config.autoencoder.init_from=workdirs/dcae_f32c32_phase2
  :smoke   (combinable: `:phase3,smoke`) a tiny same-structure model on 32 px crops of the
           photos embedded in scikit-image (64 px for phase 2), seconds on a CPU.

The paper does not publish training code or schedules; the learning rates and betas follow
the secondary source quoted in REFERENCE.md (6.4e-5 wd 0.1 / 1.6e-5 wd 1e-3 / 5.4e-5 betas
(0.5, 0.9)); step counts and the GAN weight are this config's choices. To fine-tune the
released weights instead, convert them (python -m jaxgen.convert) and pass the converted
directory as autoencoder.init_from. `--mode=eval` reports PSNR, SSIM and LPIPS on held-out
images next to a bicubic down/up-sampling baseline of the latent's size; `--mode=sample`
writes reconstructions beside their inputs.
"""

import ml_collections

from configs import common

NUM_STAGES = 6
MIDDLE_STAGES = (3, 4, 5)  # Phase 2: the stages next to the latent.
HEAD_STAGE = 1  # Phase 3: the decoder's highest-resolution (non-empty) stage.


def _stages(stages) -> str:
  return "[" + "".join(str(s) for s in stages) + "]"


def phase_trainable(phase: int, middle=MIDDLE_STAGES, head=HEAD_STAGE):
  """Regexes over autoencoder parameter paths that a phase trains (see the docstring)."""
  if phase == 1:
    return (".*",)
  if phase == 2:
    return (rf"^encoder/down_blocks_{_stages(middle)}_\d+/", r"^encoder/conv_out/",
            r"^decoder/conv_in/", rf"^decoder/up_blocks_{_stages(middle)}_\d+/")
  if phase == 3:
    return (rf"^decoder/up_blocks_{head}_\d+/", r"^decoder/norm_out/", r"^decoder/conv_out/")
  raise ValueError(f"phase must be 1, 2 or 3, got {phase}")


def autoencoder_section() -> ml_collections.ConfigDict:
  """The `autoencoder` config section (read by jaxgen/tasks/autoencoder.py)."""
  return ml_collections.ConfigDict(dict(
      l1_weight=1.0,
      l2_weight=0.0,            # Mean squared error (what PSNR measures).
      lpips_weight=1.0,
      lpips_net="alexnet",      # LPIPS backbone of the loss and of evaluation: alexnet | vgg16.
      gan_weight=0.0,           # > 0 adds the PatchGAN hinge loss and its discriminator.
      gan_start=0,              # Step at which the GAN terms and the discriminator switch on.
      disc=ml_collections.ConfigDict(dict(
          ndf=64, n_layers=3, norm="batch_norm", lr=5.4e-5, b1=0.5, b2=0.9,
          weight_decay=0.0)),
      trainable=(".*",),        # Regexes over AE parameter paths; the rest is frozen.
      update_batch_stats=True,  # False: BatchNorm in inference mode (statistics frozen).
      init_from="",             # Workdir / converted / diffusers dir to start a fresh run from.
      zero_init_residual=True,  # Fresh init: every residual branch's last norm scale = 0.
      zero_init_shortcut_convs=False,  # Fresh init: convs beside a shortcut start at 0.
      use_ema=True,             # Evaluate / sample / export the EMA weights.
      num_visual=16,            # Held-out images shown in sample grids.
  ))


def autoencoder_base() -> ml_collections.ConfigDict:
  """common.base_config() turned into an autoencoder config (model set by the caller)."""
  c = common.base_config()
  c.task = "autoencoder"
  c.autoencoder = autoencoder_section()
  c.optimizer.update(dict(lr=6.4e-5, b1=0.9, b2=0.999, weight_decay=0.1, schedule="cosine",
                          warmup_frac=0.01, grad_clip=1.0, ema_decay=0.9999))
  c.sample.update(batch_size=32)
  c.eval.update(num_samples=1000)
  return c


def f32_model(widths, latent_channels: int, attention_head_dim: int) -> dict:
  """The f32c32 structure at other widths: six stages (the first empty: the input conv goes
  space-to-channels straight to stage 1), ResBlocks in stages 0-2 with a BatchNorm/ReLU decoder,
  EfficientViT blocks in stages 3-5, one block per stage."""
  return dict(
      name="dcae", variant=None, in_channels=3, latent_channels=latent_channels,
      attention_head_dim=attention_head_dim,
      encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
      decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
      encoder_block_out_channels=tuple(widths), decoder_block_out_channels=tuple(widths),
      encoder_layers_per_block=(0, 1, 1, 1, 1, 1), decoder_layers_per_block=(0, 1, 1, 1, 1, 1),
      encoder_qkv_multiscales=((),) * 6, decoder_qkv_multiscales=((),) * 6,
      downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle",
      decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * 3,
      decoder_act_fns=("relu",) * 3 + ("silu",) * 3, decoder_out_norm="rms_norm")


def smoke_model() -> dict:
  """f32-structure DC-AE small enough to compile and run in seconds on a CPU."""
  return f32_model((8, 8, 16, 16, 16, 16), latent_channels=8, attention_head_dim=8)


def smoke(c: ml_collections.ConfigDict, image_size: int = 32) -> ml_collections.ConfigDict:
  """Tiny model on the embedded photos; seconds per phase on a CPU."""
  c = common.smoke(c)
  c.model = ml_collections.ConfigDict(smoke_model())
  c.data.update(source="photos", tfds_name="", image_size=image_size, random_flip=True,
                num_classes=1)
  c.optimizer.update(lr=1e-3, warmup_frac=0.0, schedule="constant", ema_decay=0.9)
  c.autoencoder.update(num_visual=4)
  c.autoencoder.disc.update(ndf=8, n_layers=2)
  c.sample.update(batch_size=16)
  c.eval.update(num_samples=16)
  return c


def get_config(arg=None):
  presets = [p for p in (arg or "phase1").split(",") if p]
  unknown = [p for p in presets if p not in ("phase1", "phase2", "phase3", "smoke")]
  if unknown:
    raise ValueError(f"unknown preset(s) {unknown}; presets: phase1, phase2, phase3, smoke "
                     "(e.g. phase3,smoke)")
  phases = [int(p[-1]) for p in presets if p.startswith("phase")] or [1]
  if len(phases) > 1:
    raise ValueError(f"choose one phase, got {presets}")
  phase = phases[0]
  c = autoencoder_base()
  c.model = ml_collections.ConfigDict(dict(name="dcae", variant="f32c32-in-1.0"))
  c.data.update(source="tfds", tfds_name="imagenet2012", image_size=256, random_flip=True,
                num_classes=1000)
  c.autoencoder.trainable = phase_trainable(phase)
  c.training.update(log_every=100, sample_every=5000)
  c.checkpoint.update(every=5000, keep=3)
  if phase == 1:
    c.training.update(batch_size=256, steps=200_000)
  elif phase == 2:
    c.data.image_size = 512
    c.training.update(batch_size=64, steps=50_000)
    c.optimizer.update(lr=1.6e-5, weight_decay=1e-3)
    c.autoencoder.update_batch_stats = False
  else:
    c.training.update(batch_size=256, steps=50_000)
    c.optimizer.update(lr=5.4e-5, b1=0.5, b2=0.9, weight_decay=0.0)
    c.autoencoder.update(gan_weight=0.1, gan_start=0, update_batch_stats=False)
  if "smoke" in presets:
    c = smoke(c, image_size=64 if phase == 2 else 32)
  return c
