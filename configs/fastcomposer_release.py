"""python -m jaxgen.main --config=configs/fastcomposer_release.py --config.model.init_from=FC_DIR \
    --workdir=workdirs/fastcomposer_release

Fine-tunes FastComposer's released model (FC_DIR: `python -m jaxgen.convert
--src=pytorch_model.bin --dst=FC_DIR --tokenizer=<SD-1.5 snapshot>/tokenizer`) on the digit
compositions (jaxgen.data.subjects: "a 3 on the left and a 7 on the right" with the pasted digits
as the subjects) with the official objective: the pipeline's noise schedule and prediction type,
caption dropout 0.1, localisation loss weight 1e-3; trained as the official run_training.sh
trains: the U-Net, the post-fuse MLP and the image encoder's last 2 layers, lr 1e-5
(jaxgen/tasks/fastcomposer_release.py). The 16 x 32 canvases become 64 x 128 RGB images for
SD-1.5 (text_to_image.image_size (0, 0)). Then `--mode=sample` writes the test compositions
through the FastComposerPipeline with the trained weights (delayed subject conditioning from
sample.start_merge_step).
"""

import ml_collections

from configs import common


def get_config(arg=None):
  c = common.base_config()
  c.task = "fastcomposer_release"
  # The architecture is the directory's components; init_from loads their weights.
  c.model = common.model_section({"name": "fastcomposer"})
  c.data.update(source="mnist_subjects", image_size=16, num_classes=10)
  c.data.two_subject_prob = 0.75
  c.data.max_caption_length = 16
  c.data.update(num_train=4000, num_test=1000)  # compositions per epoch / in the test split
  c.diffusion.update(schedule="pipeline", num_steps=0, prediction="pipeline", label_dropout=0.1,
                     min_snr_gamma=0.0)
  c.diffusion.loc_loss_weight = 1e-3
  c.text_to_image = ml_collections.ConfigDict(dict(
      image_size=(0, 0), sample_posterior=True, train_text_encoder=False,
      train_image_encoder=True, image_encoder_trainable_layers=2))
  c.optimizer.update(lr=1e-5, schedule="constant", warmup_frac=0.0, b2=0.999,
                     weight_decay=1e-2, grad_clip=1.0, ema_decay=0.9999)
  c.training.update(batch_size=16, steps=2000, log_every=50, sample_every=1000)
  c.checkpoint.every = 1000
  c.sample.update(method="", num_steps=25, guidance_scale=5.0, batch_size=16)
  c.sample.start_merge_step = 5  # Text only for the first steps (the official 10 of 50).
  c.sample.negative_prompt = ""
  c.sample.num_prompts = 16
  if arg == "smoke":  # Seconds-long runs (still needs model.init_from: a pipeline directory).
    common.smoke(c)
    c.sample.update(num_prompts=2, batch_size=2)
  elif arg:
    raise ValueError(f"unknown preset {arg!r}; known: smoke")
  return c
