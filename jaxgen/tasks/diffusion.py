"""Class-conditional diffusion on images: the objective, the sampler and the visuals.

Works with every backbone that has the `apply(variables, x, t, y, train)` signature (U-Net, DiT,
CAN-DiT, CaT, U-ViT). Label `num_classes` is the null label used for classifier-free guidance.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxgen import visualize
from jaxgen.config import build_model
from jaxgen.diffusion.losses import diffusion_loss
from jaxgen.diffusion.samplers import sample
from jaxgen.diffusion.schedules import make_schedule
from jaxgen.registry import TASKS


@TASKS.register("diffusion")
class DiffusionTask:
  """Noise-prediction training and guided sampling of `config.model` on `config.data`."""

  clip_x0 = True  # Pixels live in [-1, 1]; latent diffusion (a subclass) must not clip.

  def __init__(self, config: ml_collections.ConfigDict, image_shape, num_classes: int):
    self.config = config
    self.image_shape = tuple(image_shape)
    self.num_classes = num_classes
    self.model = build_model(config.model)
    d = config.diffusion
    self.schedule = make_schedule(d.schedule, d.num_steps)

  def _model_fn(self, params, model_state, train, rng=None):
    variables = {"params": params, **model_state}
    rngs = {"dropout": rng} if rng is not None else {}
    return lambda x, t, y: self.model.apply(variables, x, t, y, train=train, rngs=rngs)

  def init(self, rng, batch):
    """Variables for a batch of this task's input shape -> (params, model_state)."""
    x = jnp.zeros((1,) + self.image_shape, jnp.float32)
    variables = self.model.init({"params": rng, "dropout": rng}, x, jnp.zeros((1,)),
                                jnp.zeros((1,), jnp.int32))
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables

  def loss(self, params, model_state, batch, rng):
    model_rng, loss_rng = jax.random.split(rng)
    d = self.config.diffusion
    loss, aux = diffusion_loss(
        self._model_fn(params, model_state, True, model_rng), batch["image"], batch["label"],
        loss_rng, self.schedule, prediction=d.prediction, label_dropout=d.label_dropout,
        null_label=self.num_classes, min_snr_gamma=d.get("min_snr_gamma", 0.0))
    del aux
    return loss, ({}, model_state)

  def generate(self, params, model_state, rng, labels):
    """Images in [-1, 1] for int `labels` (B,), with the config's sampler and guidance."""
    s = self.config.sample
    return sample(
        self._model_fn(params, model_state, False), rng, (labels.shape[0],) + self.image_shape,
        labels, self.schedule, method=s.method, num_steps=s.num_steps, eta=s.eta,
        guidance_scale=s.guidance_scale,
        uncond=jnp.full_like(labels, self.num_classes),
        prediction=self.config.diffusion.prediction, clip_x0=self.clip_x0)

  def write_static_visuals(self, workdir: str) -> None:
    visualize.plot_schedule(
        os.path.join(workdir, "schedule.png"), np.asarray(self.schedule.betas),
        np.asarray(self.schedule.alphas_cumprod),
        title=f"{self.config.diffusion.schedule} schedule, T={self.config.diffusion.num_steps}")

  def write_samples(self, setup, out: str) -> None:
    """samples.npz (uint8 images, int labels), grid.png (a row per class), class_K.png."""
    from jaxgen.train import loop  # pylint: disable=g-import-not-at-top
    labels = loop.class_labels(self.num_classes, self.config.sample.num_per_class)
    images = visualize.to_uint8(loop.generate(setup, labels, seed=self.config.seed))
    if jax.process_index() != 0:
      return
    os.makedirs(out, exist_ok=True)
    np.savez(os.path.join(out, "samples.npz"), images=images, labels=labels)
    visualize.save_class_grid(os.path.join(out, "grid.png"), images, labels, self.num_classes)
    for k in range(self.num_classes):
      of_k = images[labels == k]
      visualize.save_png(os.path.join(out, f"class_{k}.png"),
                         visualize.image_grid(of_k, rows=max(1, int(np.sqrt(len(of_k))))))
    print(f"wrote {len(images)} samples to {out}/samples.npz and {out}/grid.png", flush=True)

  def evaluate(self, setup, out: str) -> dict:
    """config.eval.metrics of eval.num_samples samples drawn with the config's sampler on the
    mesh (default: class accuracy, FD and precision/recall under a classifier jaxgen trains
    on the real data; FID and IS with eval.inception_weights); see jaxgen/metrics/evaluate.py."""
    from jaxgen.metrics import evaluate  # pylint: disable=g-import-not-at-top
    return evaluate.evaluate_generator(setup, out)
