"""python -m jaxgen.main --config=configs/fastcomposer_mnist.py --workdir=workdirs/fastcomposer_mnist

FastComposer on multi-subject MNIST-5k compositions (jaxgen.data.subjects): 16 x 32 canvases with
one or two real digits, captions such as "a 3 on the left and a 7 on the right", the pasted
digit as each subject's reference image. Tiny random-init CLIP text encoder (frozen) and image
encoder (trained), the post-fuse MLP, a pixel-space cross-attention U-Net; localisation loss
weight `diffusion.loc_loss_weight`, delayed subject conditioning `sample.subject_start`.
Then `--mode=sample` (samples/grid.png, attention.png) and `--mode=eval` (prompt consistency,
identity; jaxgen/tasks/fastcomposer.py).
Presets: `:smoke` (seconds, the tests run it), `:no_loc` (localisation loss off).
"""

import ml_collections

from configs import common
from jaxgen.text.simple_tokenizer import WordTokenizer

CAPTION_LENGTH = 16


def get_config(arg=None):
  c = common.base_config()
  c.task = "fastcomposer"
  c.data.update(source="mnist_subjects", image_size=16, num_classes=10)
  c.data.two_subject_prob = 0.75
  c.data.max_caption_length = CAPTION_LENGTH
  width = 64
  c.model = ml_collections.ConfigDict(dict(
      name="fastcomposer", projection_dim=width, train_text_encoder=False,
      train_image_encoder=True,
      text_config=dict(vocab_size=WordTokenizer().vocab_size, hidden_size=width,
                       intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=CAPTION_LENGTH, hidden_act="quick_gelu",
                       eos_token_id=WordTokenizer().eos_id),
      vision_config=dict(image_size=16, patch_size=4, num_channels=1, hidden_size=width,
                         intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4),
      # patch_size 2: the U-Net runs at 8 x 16 and 4 x 8 (cross-attention maps 4 x 8).
      unet=dict(patch_size=2, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                attention_levels=(1,), num_heads=4, num_groups=8, dropout=0.0)))
  # label_dropout is the caption dropout (classifier-free guidance against the empty caption).
  c.diffusion.update(min_snr_gamma=5.0, label_dropout=0.1)
  c.diffusion.loc_loss_weight = 0.01
  c.training.update(batch_size=64, steps=2000, log_every=50, sample_every=1000)
  c.checkpoint.every = 1000
  c.sample.update(method="ddim", num_steps=30, guidance_scale=3.0, batch_size=256)
  c.sample.subject_start = 0.2  # Delayed subject conditioning: text only for the first 20%.
  c.sample.num_prompts = 16
  c.eval.update(num_samples=300, classifier_epochs=8)
  if arg == "smoke":
    c = common.smoke(c)
    c.data.update(num_train=64, num_test=16)
    c.model.update(projection_dim=16)
    c.model.text_config.update(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2)
    c.model.vision_config.update(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)
    # Cross-attention in the middle block only, one checkpoint: the test's time is compilation.
    c.model.unet.update(base_channels=8, num_heads=2, num_groups=4, attention_levels=())
    c.checkpoint.every = 4
    c.sample.update(num_prompts=4)
    c.eval.update(num_samples=4)
  elif arg == "no_loc":
    c.diffusion.loc_loss_weight = 0.0
  elif arg:
    raise ValueError(f"unknown preset {arg!r}; presets: smoke, no_loc")
  return c
