"""Latent diffusion: class-conditional diffusion on the latents of a frozen autoencoder (DC-AE).

  images x in [-1, 1] -> z = stop_gradient(encode(x)) * scaling_factor -> DiffusionTask's
  objective on z;   sampling: z ~ backbone (guided, no x0 clipping) -> decode(z / factor).

This class only maps between images and latents; the objective, classifier-free guidance, the
samplers, the sample grids and the class-accuracy evaluation are `DiffusionTask`'s, with the
backbone (`config.model`, patch size 1 on DC-AE latents) built for the latent shape.

`config.autoencoder`:
  dir             the frozen autoencoder on disk, in any form `jaxgen.convert.load_autoencoder`
                  reads: a converted directory (`python -m jaxgen.convert --src --dst`), a
                  diffusers AutoencoderDC directory, an original efficientvit checkpoint, or an
                  autoencoder training workdir
  random_init     instead of dir: a randomly initialised `model` (seeded by `seed`); for smoke
                  tests and benchmarks only (its latents carry no image structure)
  model           {name: "dcae", variant: ..., fields...}: the architecture for random_init
  seed            the random_init seed (fixed apart from config.seed, so a latent cache and
                  the training run agree)
  scaling_factor  latents are multiplied by it; 0 takes the autoencoder's own (DC-AE: its
                  variant's factor, e.g. 0.3189 for f32c32-in-1.0)

`config.data.latent_cache` (optional): train from latents written once by
`python -m jaxgen.data.latent_cache` (see jaxgen/data/latent_cache.py); the cache must have been
written with this config's data and autoencoder.

Where the frozen weights live: `model_state["autoencoder"]`, so the jitted train and sample
steps take them as arguments (XLA would embed closed-over arrays as constants in the program)
and they are checkpointed with the run (sampling and evaluation need no autoencoder.dir).
No gradient reaches them (stop_gradient; they are not in `params`) and they are never
updated. `init` returns zeros of their shapes and `warm_start` puts in the real values, so the
jitted initialisation does not embed them either.
"""

import json
import os
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxgen.config import build_model
from jaxgen.errors import ConfigError, DataError
from jaxgen.registry import TASKS
from jaxgen.tasks.diffusion import DiffusionTask

AE = "autoencoder"  # The model_state key of the frozen autoencoder's variables.


def load_frozen_autoencoder(ae_config: ml_collections.ConfigDict) -> Tuple[Any, Any]:
  """(module, variables) from `config.autoencoder`; variables None: random init (seeded)."""
  if ae_config.get("dir"):
    from jaxgen.convert import load_autoencoder  # pylint: disable=g-import-not-at-top
    module, variables = load_autoencoder(str(ae_config.dir))
    return module, jax.device_get(dict(variables))
  if not ae_config.get("random_init"):
    raise ConfigError(
        "latent diffusion needs a trained autoencoder: set --config.autoencoder.dir=DIR, e.g. "
        "a DC-AE converted once with\n  python -m jaxgen.convert "
        "--src=<snapshot of mit-han-lab/dc-ae-f32c32-in-1.0-diffusers> --dst=DIR\n"
        "(autoencoder.random_init=True trains on a random autoencoder: smoke tests only)")
  return build_model(ae_config.model), None


@TASKS.register("latent_diffusion")
class LatentDiffusionTask(DiffusionTask):
  """DiffusionTask on `scaling_factor * encode(x)` of a frozen autoencoder."""

  clip_x0 = False  # Latents are not confined to [-1, 1].

  def __init__(self, config: ml_collections.ConfigDict, image_shape, num_classes: int):
    self.config = config
    self.pixel_shape = tuple(image_shape)
    a = config.autoencoder
    self.autoencoder, self._loaded = load_frozen_autoencoder(a)
    channels = getattr(self.autoencoder, "in_channels", self.pixel_shape[-1])
    if channels != self.pixel_shape[-1]:
      raise ConfigError(f"the autoencoder takes {channels}-channel images but the data has "
                        f"{self.pixel_shape[-1]} channels ({config.data.source})")
    self.scaling_factor = float(a.scaling_factor or getattr(self.autoencoder, "scaling_factor",
                                                            0.0) or 0.0)
    if self.scaling_factor <= 0:
      raise ConfigError("set autoencoder.scaling_factor (the autoencoder has none of its own)")
    pixels = jax.ShapeDtypeStruct((1,) + self.pixel_shape, jnp.float32)
    self._abstract_ae = (jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                                      self._loaded) if self._loaded is not None else
                         jax.eval_shape(self._init_autoencoder, pixels))
    latent = jax.eval_shape(self.encode, self._abstract_ae, pixels)
    super().__init__(config, latent.shape[1:], num_classes)
    if config.data.get("latent_cache"):
      self._check_cache(str(config.data.latent_cache))

  # -- the frozen autoencoder ----------------------------------------------------------------

  def _init_autoencoder(self, pixels):
    rng = jax.random.PRNGKey(self._seed)
    # Unpartitionable threefry: XLA compiles the init of these many small tensors ~4x faster on
    # CPU (other, still seed-determined numbers); the weights are replicated anyway.
    with jax.threefry_partitionable(False):
      return dict(self.autoencoder.init(rng, jnp.zeros(pixels.shape, jnp.float32)))

  @property
  def _seed(self) -> int:
    return int(self.config.autoencoder.get("seed", 0))

  def autoencoder_variables(self) -> Dict:
    """The frozen variables ({"params", ["batch_stats"]}): loaded, or the seeded random init."""
    if self._loaded is not None:
      return self._loaded
    pixels = jax.ShapeDtypeStruct((1,) + self.pixel_shape, jnp.float32)
    return jax.jit(lambda: self._init_autoencoder(pixels))()

  def autoencoder_spec(self) -> Dict:
    """What identifies the latents (recorded in, and checked against, a latent cache)."""
    a = self.config.autoencoder
    if a.get("dir"):
      spec = {"dir": os.path.abspath(str(a.dir))}
    else:
      spec = {"random_init": True, "seed": self._seed, "model": a.model.to_dict()}
    return json.loads(json.dumps(spec))  # As stored in JSON (tuples -> lists).

  def encode(self, ae_variables, images):
    """Unscaled latents of images in [-1, 1] (inference mode)."""
    return self.autoencoder.apply(ae_variables, images, train=False, method="encode")

  def decode(self, ae_variables, latents):
    """Images in [-1, 1] from unscaled latents."""
    images = self.autoencoder.apply(ae_variables, latents, train=False, method="decode")
    return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)

  def _check_cache(self, directory: str) -> None:
    from jaxgen.data import latent_cache  # pylint: disable=g-import-not-at-top
    meta = latent_cache.read_meta(directory)
    if meta["autoencoder"] != self.autoencoder_spec():
      raise DataError(f"latent cache {directory} was written with autoencoder "
                      f"{meta['autoencoder']}, but this config has {self.autoencoder_spec()}; "
                      f"rewrite it with:\n  {latent_cache.write_command(directory)}")
    if tuple(meta["latent_shape"]) != self.image_shape:
      raise DataError(f"latent cache {directory} holds {tuple(meta['latent_shape'])} latents; "
                      f"this autoencoder makes {self.image_shape}")

  # -- the task interface --------------------------------------------------------------------

  @staticmethod
  def _split(model_state) -> Tuple[Dict, Dict]:
    state = dict(model_state)
    return state.pop(AE), state

  def init(self, rng, batch):
    with jax.threefry_partitionable(False):  # As _init_autoencoder: a much faster compile.
      params, state = super().init(rng, batch)
    state[AE] = jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype), self._abstract_ae)
    return params, state

  def warm_start(self, state):
    """A fresh run: the frozen autoencoder's values replace init's zeros, same shardings."""
    ae = self.autoencoder_variables()
    placed = jax.tree.map(lambda v, old: jax.device_put(jnp.asarray(v, old.dtype), old.sharding),
                          ae, state.model_state[AE])
    return state.replace(model_state={**state.model_state, AE: placed})

  def latents(self, ae_variables, batch):
    """Scaled latents of a batch: cached ({"latent"}) or encoded on the fly ({"image"})."""
    z = batch["latent"] if "latent" in batch else self.encode(ae_variables, batch["image"])
    return jax.lax.stop_gradient(z.astype(jnp.float32)) * self.scaling_factor

  def loss(self, params, model_state, batch, rng):
    ae, state = self._split(model_state)
    z = self.latents(ae, batch)
    loss, (metrics, state) = super().loss(params, state, {"image": z, "label": batch["label"]},
                                          rng)
    return loss, (metrics, {**state, AE: ae})

  def generate(self, params, model_state, rng, labels):
    """Images in [-1, 1]: latents sampled with the config's sampler, then decoded."""
    ae, state = self._split(model_state)
    z = super().generate(params, state, rng, labels)
    return self.decode(ae, z / self.scaling_factor)

  def evaluate(self, setup, out: str) -> dict:
    """DiffusionTask's metrics of the decoded samples, and `autoencoder_psnr`: the frozen
    autoencoder's reconstruction PSNR (dB) on the first eval.num_samples held-out images, what
    its latents let a sample be at best (with `autoencoder_psnr_stderr`)."""
    result = super().evaluate(setup, out)
    psnr = self.autoencoder_psnr(setup)
    result.update(autoencoder_psnr=float(np.mean(psnr)),
                  autoencoder_psnr_stderr=float(np.std(psnr) / np.sqrt(max(len(psnr), 1))),
                  autoencoder_psnr_images=int(len(psnr)))
    return result

  def autoencoder_psnr(self, setup) -> np.ndarray:
    """Per-image PSNR of decode(encode(x)) over the first eval.num_samples test-split images."""
    from jaxgen import data as data_lib  # pylint: disable=g-import-not-at-top
    from jaxgen import sharding  # pylint: disable=g-import-not-at-top
    from jaxgen.metrics import image_quality  # pylint: disable=g-import-not-at-top
    images_only = ml_collections.ConfigDict(dict(self.config.data.to_dict(), latent_cache=""))
    runner = sharding.BatchRunner(setup.mesh, int(self.config.sample.batch_size))
    ae = setup.state.model_state[AE]
    fn = jax.jit(lambda v, x: image_quality.psnr(x, self.decode(v, self.encode(v, x))),
                 in_shardings=(None, runner.split), out_shardings=runner.split)
    it = data_lib.make_iterator(images_only, split="test", global_batch_size=runner.batch,
                                seed=0, shuffle=False, num_epochs=1, process_index=0,
                                process_count=1, drop_remainder=False, augment=False)
    limit, done, values = min(int(self.config.eval.num_samples), it.num_examples), 0, []
    for batch in it:
      x, n = runner.put(batch["image"][:limit - done].astype(np.float32))
      values.append(runner.get(fn(ae, x), n))
      done += n
      if done >= limit:
        break
    it.close()
    return np.concatenate(values)

  def write_static_visuals(self, workdir: str) -> None:
    super().write_static_visuals(workdir)
    with open(os.path.join(workdir, "latent_shape.txt"), "w") as f:
      f.write(f"images {self.pixel_shape} -> latents {self.image_shape}, scaling factor "
              f"{self.scaling_factor}\n")

