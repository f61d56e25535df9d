"""diffusers' `DiTPipeline` (facebook/DiT-XL-2-256 / -512) in JAX: the same images from the same
initial latents.

A pipeline directory holds `transformer/` (DiTTransformer2DModel, hub name Transformer2DModel),
`vae/` (AutoencoderKL) and `scheduler/` (scheduler_config.json); `model_index.json` may carry
`id2label`. The loop follows diffusers' `DiTPipeline.__call__`:

* guidance only when guidance_scale > 1: the batch is doubled with the null class (id
  `num_embeds_ada_norm`, 1000 for the published models), and eps = uncond + s (cond - uncond)
  on the first C (latent) channels; the variance half rides along;
* with a learned sigma (out_channels == 2C) only the first C channels go to the scheduler;
* the scheduler steps the input *after* `scale_model_input` (identity for DDIM / DPM-Solver,
  not for Euler-type schedulers), and the initial latents are not multiplied by
  `init_noise_sigma` — both as diffusers does;
* decode: vae.decode(latents / scaling_factor), then (x / 2 + 0.5) clipped to [0, 1].

Both halves of diffusers' doubled batch carry the same latents and the same guided eps, so the
loop keeps the conditional half only.
"""

import os
from typing import Mapping, Optional

import jax
import jax.numpy as jnp

from jaxgen.convert import dit as dit_convert
from jaxgen.convert.common import read_json
from jaxgen.convert import vae_kl as vae_convert
from jaxgen.diffusion import schedulers as schedulers_lib
from jaxgen.errors import WeightsError
from jaxgen.pipelines.base import (ClassConditionalPipeline, image_keys, resolve_dtype,
                                   step_keys)


def read_model_index(path: str) -> dict:
  """model_index.json of a diffusers pipeline directory, with a clear error when unreadable."""
  index_path = os.path.join(path, "model_index.json")
  if not os.path.isfile(index_path):
    raise WeightsError(f"{index_path} not found: pass a diffusers pipeline directory "
                       "(model_index.json + one subfolder per component, as save_pretrained "
                       "writes it).")
  return read_json(index_path, "a diffusers pipeline index (model_index.json)")


def component_dir(path: str, index: Mapping, name: str) -> str:
  """The subfolder of component `name`, checked to exist."""
  if not index.get(name) or index[name][0] is None:
    raise WeightsError(f"{path}/model_index.json names no {name!r} component; a "
                       f"{index.get('_class_name')} needs one.")
  sub = os.path.join(path, name)
  if not os.path.isdir(sub):
    raise WeightsError(f"{sub} not found: model_index.json names a {name!r} component but its "
                       "folder is missing (incomplete download?).")
  return sub


class DiTPipeline(ClassConditionalPipeline):
  """`pipe(class_labels, num_inference_steps=50, guidance_scale=4.0, ...)` as diffusers."""

  def __init__(self, transformer, transformer_config: Mapping, vae, vae_config: Mapping,
               scheduler: schedulers_lib.Scheduler, variables, *, id2label=None, dtype=None,
               mesh=None):
    dtype = resolve_dtype(dtype)
    self.transformer = transformer.clone(dtype=dtype)
    self.vae = vae.clone(dtype=dtype)
    self.scheduler = scheduler
    self.latent_channels = int(transformer_config.get("in_channels") or 4)
    self.out_channels = int(transformer_config.get("out_channels") or self.latent_channels)
    self.scaling_factor = float(vae_config.get("scaling_factor") or 0.18215)
    size = int(transformer_config.get("sample_size") or 32)
    super().__init__(
        variables, num_classes=int(transformer_config.get("num_embeds_ada_norm") or 1000),
        latent_shape=(size, size, self.latent_channels), default_steps=50,
        default_guidance=4.0, id2label=id2label, dtype=dtype, mesh=mesh)

  @classmethod
  def from_directory(cls, path: str, dtype=None, mesh=None) -> "DiTPipeline":
    index = read_model_index(path)
    transformer_dir = component_dir(path, index, "transformer")
    transformer, t_vars = dit_convert.from_diffusers(transformer_dir)
    vae, v_vars = vae_convert.from_diffusers(component_dir(path, index, "vae"))
    scheduler = schedulers_lib.load_scheduler(component_dir(path, index, "scheduler"))
    transformer_config = read_json(os.path.join(transformer_dir, "config.json"))
    vae_config = read_json(os.path.join(path, "vae", "config.json"))
    return cls(transformer, transformer_config, vae, vae_config, scheduler,
               {"transformer": t_vars, "vae": v_vars}, id2label=index.get("id2label"),
               dtype=dtype, mesh=mesh)

  def denoiser(self, x, t, labels):
    """The transformer's raw output (B, h, w, out_channels) at diffusers timesteps t (B,)."""
    return self._transformer(self.variables, jnp.asarray(x), jnp.asarray(t),
                             jnp.asarray(labels, jnp.int32))

  def _transformer(self, variables, x, t, labels):
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    out = self.transformer.apply(variables["transformer"], x.astype(self.dtype), t, labels)
    return out.astype(jnp.float32)

  def guided_denoiser(self, variables, x, t, labels, guidance_scale: float):
    """The transformer's output with DiTPipeline's guidance (scale > 1 only): the batch doubled
    with the null class, eps = uncond + s (cond - uncond) on the latent channels, the rest of
    the channels from the conditional half."""
    if guidance_scale <= 1:
      return self._transformer(variables, x, t, labels)
    b, c = x.shape[0], self.latent_channels
    null = jnp.full_like(labels, self.num_classes)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    out = self._transformer(variables, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                            jnp.concatenate([labels, null]))
    eps_c, eps_u = out[:b, ..., :c], out[b:, ..., :c]
    return jnp.concatenate([eps_u + guidance_scale * (eps_c - eps_u), out[:b, ..., c:]], axis=-1)

  def get_scheduler(self, name: Optional[str] = None) -> schedulers_lib.Scheduler:
    """The directory's scheduler, or algorithm `name` built from its config."""
    return self.scheduler if name is None else schedulers_lib.from_config(self.scheduler.config,
                                                                          name)

  def sample_latents(self, variables, latents, labels, guidance_scale, num_inference_steps,
                     scheduler, eta=0.0):
    sched = self.get_scheduler(scheduler)
    plan = sched.plan(num_inference_steps, eta=eta)
    keys = image_keys(latents)
    c = self.latent_channels

    def model_output(x, t):
      noise_pred = self.guided_denoiser(variables, x, t, labels, guidance_scale)
      return noise_pred[..., :c] if self.out_channels // 2 == c else noise_pred

    def step(carry, i):
      x, state = carry
      x = sched.scale_model_input(plan, i, x)
      # Stochastic schedulers (DDPM, ancestral, DDIM with eta) draw each image's noise from
      # its own key: the same distribution as diffusers, not its torch generator stream.
      x, state = sched.step(plan, i, model_output(x, plan.timesteps[i]), x, state,
                            step_keys(keys, i))
      return (x, state), None

    x = latents.astype(jnp.float32)
    n = plan.timesteps.shape[0]
    (x, _), _ = jax.lax.scan(step, (x, sched.init_state(plan, x)), jnp.arange(n))
    return x

  def decode(self, variables, latents):
    z = (latents / self.scaling_factor).astype(self.dtype)
    images = self.vae.apply(variables["vae"], z, method="decode").astype(jnp.float32)
    return jnp.clip(images / 2 + 0.5, 0.0, 1.0)

