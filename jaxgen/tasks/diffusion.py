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
        null_label=self.num_classes)
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
        prediction=self.config.diffusion.prediction)

  def write_static_visuals(self, workdir: str) -> None:
    visualize.plot_schedule(
        os.path.join(workdir, "schedule.png"), np.asarray(self.schedule.betas),
        np.asarray(self.schedule.alphas_cumprod),
        title=f"{self.config.diffusion.schedule} schedule, T={self.config.diffusion.num_steps}")
