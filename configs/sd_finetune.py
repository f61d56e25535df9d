"""python -m jaxgen.main --config=configs/sd_finetune.py --config.model.init_from=SD_DIR \
    --workdir=workdirs/sd_finetune

Fine-tunes a published Stable Diffusion pipeline's U-Net (SD_DIR: a diffusers
StableDiffusionPipeline directory, e.g. a snapshot of stable-diffusion-v1-5) with its frozen CLIP
text encoder and VAE on the digit canvases with their captions ("a 3 on the left and a 7 on the
right"; jaxgen.data.subjects), under the pipeline's own noise schedule and prediction type
(jaxgen/tasks/text_to_image.py). The 16 x 32 canvases are turned to RGB and resized to 64 x 128
for SD 1.x / 2.x (text_to_image.image_size (0, 0): the smallest multiple of 64 per side).
Then `--mode=sample` writes images for the test captions through the StableDiffusionPipeline
with the trained U-Net (samples/grid.png, samples.npz, prompts.txt).

The recipe is diffusers' train_text_to_image.py's: AdamW lr 1e-5 constant, weight decay 1e-2,
gradient clipping 1.0, EMA 0.9999; caption dropout 0.1 keeps the empty prompt (classifier-free
guidance's negative) trained.
"""

import ml_collections

from configs import common


def get_config(arg=None):
  c = common.base_config()
  c.task = "text_to_image"
  # The architecture is the pipeline's unet/config.json; init_from loads its weights.
  c.model = common.model_section({"name": "unet2d_condition"})
  c.data.update(source="mnist_subjects", image_size=16, num_classes=10)
  c.data.two_subject_prob = 0.75
  c.data.max_caption_length = 16
  c.data.update(num_train=4000, num_test=1000)  # compositions per epoch / in the test split
  # The noise schedule and the prediction type are the pipeline's (scheduler_config.json);
  # label_dropout is the caption dropout.
  c.diffusion.update(schedule="pipeline", num_steps=0, prediction="pipeline", label_dropout=0.1,
                     min_snr_gamma=0.0)
  c.text_to_image = ml_collections.ConfigDict(dict(image_size=(0, 0), sample_posterior=True))
  c.optimizer.update(lr=1e-5, schedule="constant", warmup_frac=0.0, b2=0.999,
                     weight_decay=1e-2, grad_clip=1.0, ema_decay=0.9999)
  c.training.update(batch_size=32, steps=2000, log_every=50, sample_every=1000)
  c.checkpoint.every = 1000
  # method "": the pipeline's scheduler (or a name: ddim, pndm, dpmpp_2m, euler, ...).
  c.sample.update(method="", num_steps=25, guidance_scale=5.0, batch_size=16)
  c.sample.negative_prompt = ""
  c.sample.num_prompts = 16
  if arg == "smoke":  # Seconds-long runs (still needs model.init_from: a pipeline directory).
    common.smoke(c)
    c.sample.update(num_prompts=2, batch_size=2)
  elif arg:
    raise ValueError(f"unknown preset {arg!r}; known: smoke")
  return c
