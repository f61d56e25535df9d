"""Fine-tuning a published Stable Diffusion pipeline on an image-caption source.

  python -m jaxgen.main --config=configs/sd_finetune.py --config.model.init_from=SD_DIR \
      --workdir=DIR [--mode=train|sample|eval]

`model.init_from` is a diffusers `StableDiffusionPipeline` directory (jaxgen.pipelines.
stable_diffusion). The trained model is its U-Net (`unet/config.json`; `jaxgen.train.init_from`
loads `unet/`'s weights into it); the rest stays frozen and is what diffusers'
train_text_to_image.py computes around it:

  caption ids (the source's WordTokenizer) -> the pipeline's CLIP ids (`jaxgen.text.retokenize`:
  equal to its tokenizer on the decoded caption, padded to model_max_length, truncated)
  -> text encoder (its last hidden state, the attention mask only when its config sets
  `use_attention_mask`: `StableDiffusionPipeline.text_states`) -> encoder_hidden_states;
  images in [-1, 1] -> RGB (a grey source repeated to the VAE's channels) -> resized
  (bilinear) to `text_to_image.image_size` -> VAE posterior sample (or the mean with
  text_to_image.sample_posterior False) * scaling_factor -> latents;
  loss: the MSE of `jaxgen.diffusion.losses.diffusion_loss` under the pipeline's noise schedule:
  DDPMScheduler built from `scheduler/scheduler_config.json` (betas, alphas_cumprod and
  prediction_type as diffusers' training scripts read them: epsilon -> eps, v_prediction -> v),
  t ~ U{0..num_train_timesteps-1}; caption dropout with p = diffusion.label_dropout (the caption
  becomes the empty prompt, the negative prompt of classifier-free guidance).

Config (configs/sd_finetune.py): `diffusion.schedule` and `diffusion.prediction` must be
"pipeline" and `diffusion.num_steps` 0 (the directory decides them); `text_to_image.image_size`
(h, w), (0, 0): the data's size times the smallest integer making both sides multiples of
`size_multiple` = vae factor * lcm(8, 2 ** (U-Net levels - 1)) (64 for SD 1.x / 2.x: latents
divisible by the U-Net's downsampling and 8-pixel-aligned images, which the pipeline requires).

Where the weights live: the U-Net's in `params` (and EMA); the text encoder's and VAE's in
`model_state["frozen"]`, so the jitted steps take them as arguments and they are checkpointed
with the run; no gradient reaches them and they are never updated. `init` gives zeros of every
shape (the U-Net's too: its architecture is the directory's, so init_from fills all of it),
`warm_start` puts in the directory's frozen values.

Sampling (`--mode=sample`, `training.sample_every`): a `StableDiffusionPipeline` made of the
directory's components with the trained U-Net (EMA) and the checkpoint's frozen weights, called
like any pipeline on the captions of the first `sample.num_prompts` test examples, at the
training size, with `sample.num_steps`, `sample.guidance_scale`, `sample.negative_prompt` and
`sample.method` ("" the directory's scheduler, else a scheduler name or alias of
jaxgen.diffusion.schedulers). `finetuned_pipeline(setup)` returns that pipeline for other
prompts. The pipeline directory must stay where init_from points (its configs and tokenizer are
read from it; a resumed run reads it too).
"""

import dataclasses
import math
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxgen import data as data_lib
from jaxgen import visualize
from jaxgen.convert import clip as clip_convert
from jaxgen.convert import unet2d_condition as unet_convert
from jaxgen.convert import vae_kl as vae_convert
from jaxgen.convert.common import read_json
from jaxgen.diffusion import schedulers as schedulers_lib
from jaxgen.diffusion.losses import diffusion_loss, example_keys
from jaxgen.diffusion.schedules import Schedule
from jaxgen.errors import ConfigError
from jaxgen.registry import TASKS
from jaxgen.text.clip_tokenizer import CLIPTokenizer
from jaxgen.text.retokenize import Retokenizer
from jaxgen.text.simple_tokenizer import WordTokenizer

FROZEN = "frozen"  # The model_state key of the frozen components' variables.
FROM_PIPELINE = "pipeline"  # diffusion.schedule / diffusion.prediction: the directory's.
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}  # diffusers -> jaxgen.diffusion.losses


# ----------------------------------------------------------------------------- the directory

@dataclasses.dataclass
class StableDiffusionParts:
  """A StableDiffusionPipeline directory's components (U-Net architecture only; the frozen
  text encoder's and VAE's variables)."""
  directory: str
  unet: Any
  unet_config: Dict[str, Any]
  text_encoder: Any
  text_encoder_config: Dict[str, Any]
  tokenizer: CLIPTokenizer
  vae: Any
  vae_config: Dict[str, Any]
  scheduler: schedulers_lib.Scheduler
  frozen: Dict[str, Any]  # {"text_encoder": variables, "vae": variables}

  def pipeline(self, unet_variables, frozen, *, mesh=None, dtype=None):
    """A StableDiffusionPipeline of these components with the given U-Net and frozen
    variables."""
    from jaxgen.pipelines.stable_diffusion import (  # pylint: disable=g-import-not-at-top
        StableDiffusionPipeline)
    variables = {"unet": unet_variables, "text_encoder": frozen["text_encoder"],
                 "vae": frozen["vae"]}
    return StableDiffusionPipeline(
        self.unet, self.unet_config, self.text_encoder, self.text_encoder_config,
        self.tokenizer, self.vae, self.vae_config,
        schedulers_lib.from_config(self.scheduler.config), variables, dtype=dtype, mesh=mesh)


def read_stable_diffusion(path: str) -> StableDiffusionParts:
  """The components of StableDiffusionPipeline directory `path` (the U-Net unloaded)."""
  from jaxgen.pipelines.dit import (  # pylint: disable=g-import-not-at-top
      component_dir, read_model_index)
  index = read_model_index(path)
  if index.get("_class_name") != "StableDiffusionPipeline":
    raise ConfigError(f"model.init_from={path} is a {index.get('_class_name')!r} directory; "
                      "task text_to_image fine-tunes a StableDiffusionPipeline directory (for "
                      "FastComposer's release use configs/fastcomposer_release.py)")
  unet_dir = component_dir(path, index, "unet")
  text_dir = component_dir(path, index, "text_encoder")
  vae_dir = component_dir(path, index, "vae")
  unet_config = read_json(os.path.join(unet_dir, "config.json"))
  text_encoder, text_vars = clip_convert.from_transformers(text_dir)
  if text_encoder.text_model is None:
    raise ConfigError(f"{text_dir} holds a CLIP vision model; Stable Diffusion's text_encoder "
                      "is a CLIPTextModel")
  vae, vae_vars = vae_convert.from_diffusers(vae_dir)
  return StableDiffusionParts(
      directory=path, unet=unet_convert.module_from_config(unet_config),
      unet_config=unet_config, text_encoder=text_encoder,
      text_encoder_config=read_json(os.path.join(text_dir, "config.json")),
      tokenizer=CLIPTokenizer.from_pretrained(component_dir(path, index, "tokenizer")),
      vae=vae, vae_config=read_json(os.path.join(vae_dir, "config.json")),
      scheduler=schedulers_lib.load_scheduler(component_dir(path, index, "scheduler")),
      frozen={"text_encoder": jax.device_get(dict(text_vars)),
              "vae": jax.device_get(dict(vae_vars))})


def training_schedule(scheduler: schedulers_lib.Scheduler) -> Tuple[Schedule, str]:
  """(noise schedule, jaxgen prediction) of a pipeline's scheduler config, as diffusers'
  training scripts read it: `DDPMScheduler.from_config(config)`'s betas and alphas_cumprod
  and its prediction_type."""
  ddpm = schedulers_lib.from_config(scheduler.config, "DDPMScheduler")
  kind = ddpm.config["prediction_type"]
  if kind not in PREDICTIONS:
    raise ConfigError(f"the pipeline's scheduler predicts {kind!r}; fine-tuning supports "
                      f"{sorted(PREDICTIONS)}")
  schedule = Schedule(betas=jnp.asarray(ddpm.betas, jnp.float32),
                      alphas_cumprod=jnp.asarray(ddpm.alphas_cumprod, jnp.float32))
  return schedule, PREDICTIONS[kind]


def check_pipeline_diffusion(d: ml_collections.ConfigDict, path: str) -> None:
  """The noise schedule and prediction come from the pipeline: the config must not set them."""
  if (d.get("schedule") != FROM_PIPELINE or d.get("prediction") != FROM_PIPELINE
      or int(d.get("num_steps", 0)) != 0):
    raise ConfigError(
        f"fine-tuning {path} trains with the pipeline's own noise schedule and prediction type "
        f"(its scheduler_config.json); set diffusion.schedule='{FROM_PIPELINE}', "
        f"diffusion.prediction='{FROM_PIPELINE}' and diffusion.num_steps=0 (got "
        f"{d.get('schedule')!r}, {d.get('prediction')!r}, {d.get('num_steps')!r})")


# ----------------------------------------------------------------------------- images

def size_multiple(vae_factor: int, unet_levels: int) -> int:
  """Image sides must be multiples of this: 8-aligned latents the U-Net can halve
  unet_levels - 1 times, in pixels."""
  return int(vae_factor) * math.lcm(8, 2 ** (int(unet_levels) - 1))


def pipeline_image_size(data_size: Sequence[int], requested: Sequence[int],
                        multiple: int) -> Tuple[int, int]:
  """(h, w) the data is resized to: `requested`, or for (0, 0) the data's size times the
  smallest integer that makes both sides multiples of `multiple`."""
  requested = tuple(int(v) for v in (requested or (0, 0)))
  if requested != (0, 0):
    if len(requested) != 2 or any(v <= 0 or v % multiple for v in requested):
      raise ConfigError(f"text_to_image.image_size {requested} must be two positive multiples "
                        f"of {multiple} (the VAE factor times the U-Net's latent alignment), "
                        "or (0, 0) for the data's size scaled up to the nearest such size")
    return requested
  h, w = (int(v) for v in data_size)
  k = math.lcm(multiple // math.gcd(h, multiple), multiple // math.gcd(w, multiple))
  return h * k, w * k


def to_pipeline_pixels(images: jax.Array, size: Sequence[int], channels: int) -> jax.Array:
  """Data images (B, h, w, c) in [-1, 1] -> (B, H, W, channels): grey repeated to the
  channels, bilinear resize (values stay in [-1, 1])."""
  x = images.astype(jnp.float32)
  if x.shape[-1] != channels:
    x = jnp.repeat(x, channels, axis=-1)  # Checked at construction: a grey source.
  if tuple(x.shape[1:3]) != tuple(size):
    x = jax.image.resize(x, (x.shape[0], *size, channels), "linear")
  return x


def encode_latents(vae, vae_variables, pixels: jax.Array, scaling_factor: float,
                   rng: Optional[jax.Array]) -> jax.Array:
  """VAE latents times the scaling factor, without gradient: with `rng` a posterior sample per
  example (drawn from the example's own key, as the diffusion noise; diffusers' training
  scripts sample too), else the posterior mean."""
  mean, logvar = vae.apply(vae_variables, pixels, method="encode_moments")
  z = mean.astype(jnp.float32)
  if rng is not None:
    noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], jnp.float32))(
        example_keys(rng, mean.shape[0]))
    z = z + jnp.exp(0.5 * logvar.astype(jnp.float32)) * noise
  return jax.lax.stop_gradient(z) * scaling_factor


def caption_source(data_config: ml_collections.ConfigDict, image_channels: int):
  """The data source, checked to carry word-tokenised captions and fitting channels."""
  source = data_lib.get_source(data_config)
  tokenizer = getattr(source, "tokenizer", None)  # A caption source declares its tokenizer.
  if not isinstance(tokenizer, WordTokenizer):
    raise ConfigError(f"data.source {data_config.source!r} has no captions; text-to-image "
                      "fine-tuning needs an image-caption source such as 'mnist_subjects' "
                      "(the digit canvases with their captions)")
  channels = source.info.image_shape[-1]
  if channels not in (1, image_channels):
    raise ConfigError(f"the data has {channels}-channel images; the VAE takes "
                      f"{image_channels} (grey images are repeated, other counts do not fit)")
  return source


def write_prompt_images(out: str, images: np.ndarray, captions: Sequence[str],
                        grid: Optional[np.ndarray] = None) -> None:
  """samples.npz (uint8 images, captions), grid.png (`grid`, default the images in about
  sqrt(N) rows) and prompts.txt (one caption a line)."""
  os.makedirs(out, exist_ok=True)
  np.savez(os.path.join(out, "samples.npz"), images=images, captions=np.asarray(captions))
  if grid is None:
    grid = visualize.image_grid(images, rows=max(1, int(np.sqrt(len(images)))))
  visualize.save_png(os.path.join(out, "grid.png"), grid)
  with open(os.path.join(out, "prompts.txt"), "w") as f:
    f.write("".join(f"{i:05d} {c}\n" for i, c in enumerate(captions)))


# ----------------------------------------------------------------------------- the task

@TASKS.register("text_to_image")
class TextToImageTask:
  """Stable Diffusion's U-Net fine-tuned with its frozen text encoder and VAE (module doc)."""

  def __init__(self, config: ml_collections.ConfigDict, image_shape, num_classes: int):
    del num_classes
    self.config = config
    path = str(config.model.get("init_from", "") or "")
    if not path:
      raise ConfigError("task text_to_image fine-tunes a published pipeline: set "
                        "--config.model.init_from=DIR, a diffusers StableDiffusionPipeline "
                        "directory (model_index.json, unet/, text_encoder/, tokenizer/, vae/, "
                        "scheduler/)")
    check_pipeline_diffusion(config.diffusion, path)
    self.parts = read_stable_diffusion(path)
    self.model = self.parts.unet
    self.schedule, self.prediction = training_schedule(self.parts.scheduler)
    # The pipeline's own conditioning code, for training and sampling alike.
    self.pipeline = self.parts.pipeline({}, self.parts.frozen)
    self.image_shape = tuple(image_shape)
    self.source = caption_source(config.data, self.parts.vae.in_channels)
    multiple = size_multiple(self.pipeline.vae_scale_factor,
                             len(self.parts.unet.block_out_channels))
    self.pixel_size = pipeline_image_size(self.image_shape[:2],
                                          config.text_to_image.get("image_size"), multiple)
    self.latent_shape = self.pipeline.latent_size(*self.pixel_size)
    self.retokenize = Retokenizer(self.source.tokenizer, self.parts.tokenizer,
                                  self.pipeline.max_length)

  # -- the frozen components -------------------------------------------------------------------

  def text_states(self, frozen, word_ids):
    """(B, L, D) encoder_hidden_states of word-tokenised captions (B, Lw)."""
    clip = self.retokenize(word_ids)
    return self.pipeline.text_states(frozen, clip["input_ids"], clip["attention_mask"])

  def latents(self, frozen, images, rng):
    """Scaled VAE latents of data images (`encode_latents`)."""
    x = to_pipeline_pixels(images, self.pixel_size, self.parts.vae.in_channels)
    return encode_latents(self.pipeline.vae, frozen["vae"], x, self.pipeline.scaling_factor,
                          rng if self.config.text_to_image.get("sample_posterior", True)
                          else None)

  # -- the task interface ----------------------------------------------------------------------

  def init(self, rng, batch):
    """Zeros of the U-Net's and the frozen parts' shapes: the U-Net is built from the
    directory's config, so `model.init_from` fills every parameter (a random init would be
    computed only to be overwritten), and `warm_start` the frozen parts."""
    del batch
    x = jax.ShapeDtypeStruct((1,) + tuple(self.latent_shape), jnp.float32)
    width = self.parts.text_encoder.text_model.hidden_size
    context = jax.ShapeDtypeStruct((1, self.pipeline.max_length, width), jnp.float32)
    abstract = jax.eval_shape(
        lambda r, x, c: self.model.init({"params": r, "dropout": r}, x, jnp.zeros((1,)), c),
        rng, x, context)
    zeros = lambda tree: jax.tree.map(lambda v: jnp.zeros(np.shape(v), v.dtype), tree)
    return zeros(abstract["params"]), {FROZEN: zeros(self.parts.frozen)}

  def warm_start(self, state):
    """A fresh run: the directory's frozen values replace init's zeros, same shardings."""
    placed = jax.tree.map(
        lambda v, old: jax.device_put(np.asarray(v, old.dtype), old.sharding),
        self.parts.frozen, state.model_state[FROZEN])
    return state.replace(model_state={**state.model_state, FROZEN: placed})

  def loss(self, params, model_state, batch, rng):
    frozen = model_state[FROZEN]
    vae_rng, model_rng, loss_rng = jax.random.split(rng, 3)
    z = self.latents(frozen, batch["image"], vae_rng)

    def model_fn(x_t, t, word_ids):
      context = jax.lax.stop_gradient(self.text_states(frozen, word_ids))
      return self.model.apply({"params": params}, x_t, t, context, train=True,
                              rngs={"dropout": model_rng})

    d = self.config.diffusion
    # The dropped captions become the empty prompt: its word ids are <bos> <eos> <pad>...
    null = self.source.tokenizer.encode("")
    loss, _ = diffusion_loss(model_fn, z, batch["input_ids"], loss_rng, self.schedule,
                             prediction=self.prediction, label_dropout=float(d.label_dropout),
                             null_label=jnp.asarray(null), min_snr_gamma=d.get("min_snr_gamma",
                                                                               0.0))
    return loss, ({}, model_state)

  # -- sampling --------------------------------------------------------------------------------

  def finetuned_pipeline(self, setup, state=None, use_ema: bool = True):
    """The StableDiffusionPipeline with the trained U-Net, on the run's mesh."""
    state = setup.state if state is None else state
    params = state.ema_params if use_ema else state.params
    return self.parts.pipeline({"params": params}, state.model_state[FROZEN], mesh=setup.mesh)

  def captions(self, split: str, num: int) -> list:
    """The captions of the first `num` fixed examples of a split."""
    return [self.source.caption(self.source.example(split, i, None)) for i in range(num)]

  def sample_prompts(self, setup, prompts: Sequence[str], state=None,
                     seed: Optional[int] = None) -> np.ndarray:
    """(N, H, W, 3) uint8 images at the training size, with the config's sampler."""
    s = self.config.sample
    pipe = self.finetuned_pipeline(setup, state)
    return pipe.to_uint8(pipe(list(prompts), negative_prompt=s.get("negative_prompt") or None,
                num_inference_steps=int(s.num_steps), guidance_scale=float(s.guidance_scale),
                height=self.pixel_size[0], width=self.pixel_size[1],
                seed=self.config.seed if seed is None else seed,
                scheduler=s.get("method") or None, batch_size=int(s.batch_size)))

  def write_sample_grid(self, setup, state, path: str) -> None:
    images = self.sample_prompts(setup, self.captions("test", 8), state, seed=0)
    if jax.process_index() == 0:
      visualize.save_png(path, visualize.image_grid(images, rows=2))

  def write_samples(self, setup, out: str) -> None:
    """samples.npz (uint8 images, captions), grid.png, prompts.txt for sample.num_prompts test
    captions."""
    prompts = self.captions("test", int(self.config.sample.get("num_prompts", 16)))
    images = self.sample_prompts(setup, prompts)
    if jax.process_index() != 0:
      return
    write_prompt_images(out, images, prompts)
    print(f"wrote {len(images)} samples of {self.pixel_size[0]}x{self.pixel_size[1]} to "
          f"{out}/samples.npz and {out}/grid.png (captions in {out}/prompts.txt)", flush=True)

  def evaluate(self, setup, out: str) -> dict:
    raise ConfigError("--mode=eval is not available for task text_to_image; use --mode=sample "
                      "(images for the test captions)")

  def write_static_visuals(self, workdir: str) -> None:
    visualize.plot_schedule(
        os.path.join(workdir, "schedule.png"), np.asarray(self.schedule.betas),
        np.asarray(self.schedule.alphas_cumprod),
        title=f"{self.parts.scheduler.config.get('beta_schedule')} (pipeline), "
              f"{self.prediction}-prediction")
    with open(os.path.join(workdir, "text_to_image.txt"), "w") as f:
      f.write(f"pipeline {os.path.abspath(self.parts.directory)}\nimages {self.image_shape} -> "
              f"{self.pixel_size} pixels -> latents {self.latent_shape}, scaling factor "
              f"{self.pipeline.scaling_factor}\nprediction {self.prediction}, "
              f"{self.schedule.num_steps} training timesteps\n")
