"""The DC-AE paper's class-conditional ImageNet models (efficientvit `DCAE_Diffusion_HF`) in JAX.

`DCAEDiffusionPipeline.from_directory(DIR)` reads a checkpoint directory (config.json +
model.safetensors, `jaxgen.convert.efficientvit_diffusion`) and samples as efficientvit's
`diffusion_model.generate(labels, null_labels, cfg_scale, generator)` followed by
`autoencoder.decode(latents / scaling_factor)` (efficientvit `diffusion_model_zoo.py`,
`diffusioncore/models/{uvit,dit}.py`, `applications/dc_ae/demo_dc_ae_diffusion_model.py`):

* null label: num_classes (1000); guidance whenever cfg_scale != 1, default 6.0 (the demo's;
  the README's FID runs use 1.0 and 1.3 - 1.5);
* UViT: DPM-Solver (`jaxgen.diffusion.dpm_solver`) "fast", order 3, time-uniform steps from
  t = 1 to 1/N, data prediction, 30 steps, on the scaled-linear schedule (betas
  linspace(0.00085^0.5, 0.012^0.5, 1000)^2); the network sees t * 1000 (t continuous) and
  predicts noise; eps = cond + (s - 1)(cond - uncond);
* USiT (the UViT network trained as a SiT velocity model on the linear path x_t = t x1 +
  (1 - t) x0, noise at t = 0): torchdiffeq's adaptive dopri5 from t = 0 to 1, atol 1e-6,
  rtol 1e-3 (`jaxgen.diffusion.dopri5`, per-sample step sizes); the network sees t in [0, 1];
  v = uncond + s (cond - uncond); num_inference_steps (250) is only the solver's output grid
  there, so it changes nothing;
* DiT: guided-diffusion's ancestral sampler on 250 respaced steps of the linear schedule
  (1e-4 .. 0.02, 1000 steps), learned-range variance, no x0 clipping, the network fed the
  original integer timesteps; eps = uncond + s (cond - uncond) on the latent channels, the
  variance half from the conditional pass (`jaxgen.diffusion.samplers`, spacing
  "guided_diffusion");
* decode: autoencoder.decode(latents / scaling_factor), then x / 2 + 0.5 clipped to [0, 1];
  `to_uint8` as efficientvit's clamp(127.5 x + 128), i.e. floor(255 y + 0.5) of these images.

`guided_denoiser` is the one guided evaluation each sampler calls (and export serialises).

The DiT sampler draws fresh noise every step. This pipeline's loop gets only the initial
latents, so image i's step noise comes from a key folded from the bits of its own initial
latent: deterministic, independent of the batch it runs in (not torch's generator stream).
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert import efficientvit_diffusion as convert
from jaxgen.diffusion import dopri5, dpm_solver, samplers
from jaxgen.diffusion.schedules import Schedule, linear_betas, scaled_linear_betas
from jaxgen.errors import ConfigError
from jaxgen.pipelines.base import (ClassConditionalPipeline, image_keys, resolve_dtype,
                                   step_keys)

DEFAULT_GUIDANCE = 6.0  # demo_dc_ae_diffusion_model.py / the README example
NUM_TRAIN_STEPS = 1000
# scheduler= names per efficientvit eval_scheduler; the first is the checkpoint's own.
SCHEDULERS = {"DPM_Solver": ("dpm_solver",), "ODE_dopri5": ("dopri5",),
              "GaussianDiffusion": ("ddpm", "ddim")}
ODE_RTOL, ODE_ATOL = 1e-3, 1e-6  # efficientvit UViT's sample_ode(atol=1e-6, rtol=0.001)


def uvit_betas() -> np.ndarray:
  """efficientvit UViT's schedule: linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2."""
  return scaled_linear_betas(NUM_TRAIN_STEPS, 0.00085, 0.012)


def dit_schedule() -> Schedule:
  """guided-diffusion's "linear" schedule of DiT: 1e-4 .. 0.02 over 1000 steps."""
  return Schedule.from_betas(linear_betas(NUM_TRAIN_STEPS, 1e-4, 0.02))


class DCAEDiffusionPipeline(ClassConditionalPipeline):
  """`pipe(class_labels, num_inference_steps=None, guidance_scale=6.0, ...)` -> images."""

  def __init__(self, converted: convert.DCAEDiffusion, *, dtype=None, mesh=None):
    dtype = resolve_dtype(dtype)
    self.converted = converted
    self.kind = converted.kind
    self.sampler = converted.sampler
    supported = ("DPM_Solver", "ODE_dopri5") if self.kind == "uvit" else ("GaussianDiffusion",)
    if self.sampler not in supported:
      raise ConfigError(f"{converted.name}: {self.kind} eval_scheduler {self.sampler!r} is not "
                        f"supported; supported: {list(supported)} (the published models').")
    self.backbone = converted.backbone.clone(dtype=dtype)
    self.autoencoder = converted.autoencoder.clone(dtype=dtype)
    self.scaling_factor = converted.scaling_factor
    self.latent_channels = converted.latent_shape[-1]
    super().__init__(
        {"backbone": converted.backbone_variables,
         "autoencoder": converted.autoencoder_variables},
        num_classes=converted.num_classes, latent_shape=converted.latent_shape,
        default_steps=converted.num_inference_steps, default_guidance=DEFAULT_GUIDANCE,
        id2label=None, dtype=dtype, mesh=mesh)

  @classmethod
  def accepts_config(cls, config) -> bool:
    """Whether a config.json dict is a DCAE_Diffusion_HF one (see
    `convert.is_dcae_diffusion_config`)."""
    return convert.is_dcae_diffusion_config(config)

  @classmethod
  def from_directory(cls, path: str, dtype=None, mesh=None) -> "DCAEDiffusionPipeline":
    return cls(convert.from_directory(path), dtype=dtype, mesh=mesh)

  # -- the pure functions ------------------------------------------------------------------------

  def _backbone(self, variables, x, t, labels):
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    out = self.backbone.apply(variables["backbone"], x.astype(self.dtype), t,
                              jnp.asarray(labels, jnp.int32))
    return out.astype(jnp.float32)

  def denoiser(self, x, t, labels):
    """The backbone's raw output, NHWC: UViT noise at t = 1000 x continuous time (1 .. 1000),
    USiT velocity at t in [0, 1] (0 noise, 1 data), DiT [noise, variance] (2C channels) at the
    integer timesteps 0 .. 999."""
    return self._backbone(self.variables, jnp.asarray(x, jnp.float32), t, labels)

  def guided_denoiser(self, variables, x, t, labels, guidance_scale: float):
    """One guided evaluation in the checkpoint's units (see `denoiser`), guidance whenever
    the scale is not 1, the null class num_classes, each as efficientvit writes it: UViT
    (UViT.generate's model_fn) cond + (s - 1)(cond - uncond); USiT and DiT (forward_with_cfg)
    uncond + s (cond - uncond) on the latent channels, DiT's variance half from the
    conditional pass."""
    x = jnp.asarray(x, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    if guidance_scale == 1.0:
      return self._backbone(variables, x, t, labels)
    b, c = x.shape[0], self.latent_channels
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    out = self._backbone(variables, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                         jnp.concatenate([labels, jnp.full_like(labels, self.num_classes)]))
    cond, uncond = out[:b, ..., :c], out[b:, ..., :c]
    if self.sampler == "DPM_Solver":
      guided = cond + (guidance_scale - 1.0) * (cond - uncond)
    else:
      guided = uncond + guidance_scale * (cond - uncond)
    return jnp.concatenate([guided, out[:b, ..., c:]], axis=-1)

  def to_uint8(self, images: np.ndarray) -> np.ndarray:
    """efficientvit's clamp(127.5 x + 128, 0, 255).to(uint8) of x = 2 y - 1, i.e.
    floor(255 y + 0.5) (its Evaluator and torchvision's save_image of the demo agree)."""
    y = np.asarray(images, np.float32)
    return np.clip(np.floor(255.0 * y + 0.5), 0, 255).astype(np.uint8)

  def step_noise(self, latents: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """The DiT sampler's fresh noise: i -> (B, h, w, c) for grid point i, per image from
    `image_keys(latents)` (latents: the initial noise)."""
    keys = image_keys(latents)
    draw = lambda i: jax.vmap(lambda k: jax.random.normal(k, self.latent_shape, jnp.float32))(
        step_keys(keys, i))
    return draw

  def sample_latents(self, variables, latents, labels, guidance_scale, num_inference_steps,
                     scheduler, eta=0.0):
    if eta:
      raise ConfigError(f"eta={eta}: efficientvit's samplers for this checkpoint take no eta.")
    known = SCHEDULERS[self.sampler]
    name = known[0] if scheduler is None else scheduler
    if name not in known:
      raise ConfigError(f"scheduler {scheduler!r} for this checkpoint ({self.sampler}); known: "
                        f"{list(known)} (default {known[0]}).")
    latents = jnp.asarray(latents, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    scale = float(guidance_scale)
    model = lambda x, t: self.guided_denoiser(variables, x, t, labels, scale)
    if self.sampler == "DPM_Solver":
      table = dpm_solver.plan(uvit_betas(), int(num_inference_steps), order=3, method="fast",
                              skip_type="time_uniform", t_start=1.0,
                              t_end=1.0 / NUM_TRAIN_STEPS, predict_x0=True)
      # UViT.generate's model_fn: the network sees t = t_continuous * N.
      return dpm_solver.sample(lambda x, t: model(x, t * NUM_TRAIN_STEPS), latents, table,
                               predict_x0=True)
    if self.sampler == "ODE_dopri5":
      return dopri5.solve(lambda t, x: model(x, t), latents, 0.0, 1.0, rtol=ODE_RTOL,
                          atol=ODE_ATOL)
    if name == "ddpm" and not self.converted.fields["learn_sigma"]:
      raise ConfigError("guided-diffusion's DDPM sampler of efficientvit's DiT needs a "
                        "learn_sigma model (2C output channels); use scheduler='ddim'.")
    # Guidance is inside `model` already (samplers.sample's own is left off).
    return samplers.sample(
        lambda x, t, _: model(x, t), None, latents.shape, None, dit_schedule(), method=name,
        num_steps=int(num_inference_steps), prediction="eps", clip_x0=False,
        learned_variance=name == "ddpm", spacing="guided_diffusion", x_init=latents,
        step_noise=self.step_noise(latents) if name == "ddpm" else None)

  def decode(self, variables, latents):
    z = (jnp.asarray(latents, jnp.float32) / self.scaling_factor).astype(self.dtype)
    images = self.autoencoder.apply(variables["autoencoder"], z, method="decode")
    return jnp.clip(images.astype(jnp.float32) * 0.5 + 0.5, 0.0, 1.0)
