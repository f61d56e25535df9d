"""diffusers' `StableDiffusionPipeline` (SD 1.x / 2.x text-to-image) in JAX: the same images from
the same initial latents.

A pipeline directory holds `unet/` (UNet2DConditionModel), `text_encoder/` (transformers
CLIPTextModel), `tokenizer/` (CLIP BPE: vocab.json + merges.txt + tokenizer_config.json, or
tokenizer.json), `vae/` (AutoencoderKL) and `scheduler/` (scheduler_config.json). The
`safety_checker`, `feature_extractor` and `image_encoder` components, present or None, are not
read: no NSFW filtering is done, and IP-Adapter image prompts are not supported. The call follows
diffusers' `StableDiffusionPipeline.__call__` (diffusers 0.42.1):

* prompts are tokenised on the host, padded to `tokenizer.model_max_length` (77) and truncated
  (bos + 75 tokens + eos, with a warning); the text encoder runs inside the compiled program
  and gives its last hidden state after the final LayerNorm, or with `clip_skip=k` the output
  of layer N - k through that LayerNorm (negative prompts always use the last state); the
  attention mask goes to the text encoder only when its config sets `use_attention_mask`;
* classifier-free guidance when guidance_scale > 1: the negative prompt (default "") and the
  prompt in one doubled U-Net batch, eps = uncond + s (text - uncond), then with
  `guidance_rescale` > 0 the rescaled mix of Lin et al. 2023 (std with Bessel's correction,
  as torch); one prompt and its negative serve `num_images_per_prompt` consecutive images;
* initial latents (B, H / f, W / f, C) times `init_noise_sigma`; the U-Net sees
  `scale_model_input(latents)`, the scheduler steps the unscaled latents;
* decode: vae.decode(latents / scaling_factor), then (x / 2 + 0.5) clipped to [0, 1];
* default size: unet `sample_size` (an int or [h, w]) times f = 2 ** (len(vae block_out_channels)
  - 1); height and width must be multiples of 8 (diffusers' check);
* the scheduler as diffusers' constructor leaves it: a config with `steps_offset` != 1 is
  rewritten to 1 and `clip_sample: true` to false (its deprecation fixes, applied in place, so
  `scheduler=` other algorithms are built from the rewritten config as diffusers'
  `Other.from_config(pipe.scheduler.config)`); U-Nets saved before diffusers 0.9 with
  sample_size < 64 are read as 64.

Beyond diffusers: a single negative prompt string applies to every prompt of a list (diffusers
raises a TypeError there). Not supported: prompt embeddings as input, custom
timesteps / sigmas, LoRA, textual inversion, and U-Nets with a guidance embedding
(`time_cond_proj_dim`, refused when the U-Net is read). Stochastic steps (DDPM, Euler
ancestral, DDIM with `eta` > 0) draw each image's noise from a key of its own
(`base.image_keys`): reproducible per seed and independent of the batch, the same distribution
as diffusers' though not its torch generator stream.
"""

import logging
import os
import re
from typing import Callable, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert import clip as clip_convert
from jaxgen.convert import unet2d_condition as unet_convert
from jaxgen.convert import vae_kl as vae_convert
from jaxgen.convert.common import read_json
from jaxgen.diffusion import schedulers as schedulers_lib
from jaxgen.errors import ConfigError, WeightsError
from jaxgen.models.clip import CLIPEncoderLayer
from jaxgen.pipelines.base import Pipeline, image_keys, resolve_dtype, step_keys
from jaxgen.pipelines.dit import component_dir, read_model_index
from jaxgen.text.clip_tokenizer import CLIPTokenizer

logger = logging.getLogger(__name__)

Prompts = Union[str, Sequence[str]]


def apply_pipeline_scheduler_fixes(scheduler: schedulers_lib.Scheduler
                                   ) -> schedulers_lib.Scheduler:
  """`scheduler` with StableDiffusionPipeline.__init__'s config rewrites, in place as diffusers
  does (`scheduler._internal_dict = FrozenDict(new_config)`): steps_offset != 1 -> 1 and
  clip_sample True -> False, for any key the config holds (its own or carried along)."""
  config = dict(scheduler.config)
  if config.get("steps_offset", 1) != 1:
    config["steps_offset"] = 1
  if config.get("clip_sample", False) is True:
    config["clip_sample"] = False
  scheduler.config = config
  return scheduler


def _version_tuple(version: str) -> tuple:
  return tuple(int(v) for v in re.findall(r"\d+", version.split("dev")[0])[:3])


def default_latent_size(unet_config: Mapping) -> tuple:
  """(h, w) of the latents at the default image size: unet sample_size, read as diffusers'
  pipeline reads it (an int or [h, w]; < 64 in a pre-0.9 export means 64)."""
  size = unet_config.get("sample_size")
  if size is None:
    size = 64
  version = unet_config.get("_diffusers_version")
  if isinstance(size, int) and version and _version_tuple(version) < (0, 9, 0) and size < 64:
    size = 64
  return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def rescale_noise_cfg(noise_cfg: jax.Array, noise_pred_text: jax.Array,
                      guidance_rescale: jax.Array) -> jax.Array:
  """diffusers' `rescale_noise_cfg` per image (Lin et al. 2023, sec. 3.4); guidance_rescale
  (B,) and 0 leaves an image's noise_cfg unchanged (diffusers skips the call then)."""
  axes = tuple(range(1, noise_cfg.ndim))
  std_text = jnp.std(noise_pred_text, axis=axes, keepdims=True, ddof=1)
  std_cfg = jnp.std(noise_cfg, axis=axes, keepdims=True, ddof=1)
  r = jnp.reshape(guidance_rescale, (-1,) + (1,) * (noise_cfg.ndim - 1)).astype(jnp.float32)
  mixed = r * (noise_cfg * (std_text / std_cfg)) + (1 - r) * noise_cfg
  return jnp.where(r > 0, mixed, noise_cfg)


class StableDiffusionPipeline(Pipeline):
  """`pipe(prompt, negative_prompt=None, num_inference_steps=50, guidance_scale=7.5, ...)`
  -> float32 NHWC images in [0, 1], as diffusers' StableDiffusionPipeline (module docstring)."""

  def __init__(self, unet, unet_config: Mapping, text_encoder, text_encoder_config: Mapping,
               tokenizer: CLIPTokenizer, vae, vae_config: Mapping,
               scheduler: schedulers_lib.Scheduler, variables, *, dtype=None, mesh=None):
    dtype = resolve_dtype(dtype)
    self.unet = unet.clone(dtype=dtype)
    self.text_encoder = text_encoder.clone(
        dtype=dtype, text_model=text_encoder.text_model.clone(dtype=dtype))
    self.tokenizer = tokenizer
    self.vae = vae.clone(dtype=dtype)
    self.scheduler = apply_pipeline_scheduler_fixes(scheduler)
    self.scaling_factor = float(vae_config.get("scaling_factor") or 0.18215)
    self.vae_scale_factor = 2 ** (len(vae_config.get("block_out_channels") or (64,)) - 1)
    self.use_attention_mask = bool(text_encoder_config.get("use_attention_mask"))
    self.num_text_layers = int(self.text_encoder.text_model.num_hidden_layers)
    self.max_length = int(tokenizer.model_max_length)
    positions = int(self.text_encoder.text_model.max_position_embeddings)
    if self.max_length > positions:
      raise WeightsError(f"the tokenizer pads to {self.max_length} tokens but the text encoder "
                         f"has {positions} positions: tokenizer_config.json model_max_length "
                         "must not exceed the text encoder's max_position_embeddings.")
    self.latent_channels = int(unet_config.get("in_channels") or 4)
    h, w = default_latent_size(unet_config)
    super().__init__(variables, latent_shape=(h, w, self.latent_channels), default_steps=50,
                     default_guidance=7.5, dtype=dtype, mesh=mesh)

  @classmethod
  def from_directory(cls, path: str, dtype=None, mesh=None) -> "StableDiffusionPipeline":
    index = read_model_index(path)
    unet_dir = component_dir(path, index, "unet")
    text_dir = component_dir(path, index, "text_encoder")
    vae_dir = component_dir(path, index, "vae")
    unet, u_vars = unet_convert.from_diffusers(unet_dir)
    text_encoder, t_vars = clip_convert.from_transformers(text_dir)
    if text_encoder.text_model is None:
      raise WeightsError(f"{text_dir} holds a CLIP vision model; Stable Diffusion's "
                         "text_encoder is a CLIPTextModel.")
    tokenizer = CLIPTokenizer.from_pretrained(component_dir(path, index, "tokenizer"))
    vae, v_vars = vae_convert.from_diffusers(vae_dir)
    scheduler = schedulers_lib.load_scheduler(component_dir(path, index, "scheduler"))
    return cls(unet, read_json(os.path.join(unet_dir, "config.json")), text_encoder,
               read_json(os.path.join(text_dir, "config.json")), tokenizer, vae,
               read_json(os.path.join(vae_dir, "config.json")), scheduler,
               {"unet": u_vars, "text_encoder": t_vars, "vae": v_vars}, dtype=dtype, mesh=mesh)

  # -- the condition: token ids per image, built on the host --------------------------------------

  def condition_spec(self):
    ids = jax.ShapeDtypeStruct((self.max_length,), jnp.int32)
    return {"input_ids": ids, "attention_mask": ids, "negative_input_ids": ids,
            "negative_attention_mask": ids, "clip_skip": jax.ShapeDtypeStruct((), jnp.int32),
            "guidance_rescale": jax.ShapeDtypeStruct((), jnp.float32)}

  def tokenize(self, texts: Sequence[str]) -> Mapping[str, np.ndarray]:
    """{"input_ids", "attention_mask"} (B, model_max_length) as diffusers' encode_prompt asks
    the tokenizer (padding="max_length", truncation=True); warns about truncated text."""
    out = self.tokenizer(list(texts), max_length=self.max_length, padding=True, truncation=True)
    for text in texts:
      ids = self.tokenizer.encode(text)
      if len(ids) > self.max_length:
        removed = self.tokenizer.decode(ids[self.max_length - 1:-1])
        logger.warning("The following part of your input was truncated because CLIP can only "
                       "handle sequences up to %d tokens: %s", self.max_length, removed)
    return out

  def prompt_condition(self, prompt: Prompts, negative_prompt: Optional[Prompts] = None,
                       num_images_per_prompt: int = 1, clip_skip: Optional[int] = None,
                       guidance_rescale: float = 0.0) -> Mapping[str, np.ndarray]:
    """The condition of every image (batched `condition_spec`): prompt i for images
    i * num_images_per_prompt ... (i + 1) * num_images_per_prompt - 1."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
    if not prompts or not all(isinstance(p, str) for p in prompts):
      raise ConfigError(f"prompt must be a string or a non-empty list of strings; got "
                        f"{prompt!r}.")
    if negative_prompt is None:
      negatives = [""] * len(prompts)
    elif isinstance(negative_prompt, str):
      negatives = [negative_prompt] * len(prompts)
    else:
      negatives = list(negative_prompt)
      if len(negatives) != len(prompts):
        raise ConfigError(f"negative_prompt has {len(negatives)} entries but prompt has "
                          f"{len(prompts)}: pass one negative prompt per prompt (or one string "
                          "for all).")
    per_prompt = int(num_images_per_prompt)
    if per_prompt < 1:
      raise ConfigError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}.")
    skip = 0 if clip_skip is None else int(clip_skip)
    if not 0 <= skip < self.num_text_layers:
      raise ConfigError(f"clip_skip={clip_skip}: the text encoder has {self.num_text_layers} "
                        f"layers; use 0 ... {self.num_text_layers - 1} (or None).")
    if float(guidance_rescale) < 0:
      raise ConfigError(f"guidance_rescale must be >= 0, got {guidance_rescale}.")
    pos, neg = self.tokenize(prompts), self.tokenize(negatives)
    repeat = lambda x: np.repeat(np.asarray(x, np.int32), per_prompt, axis=0)
    n = len(prompts) * per_prompt
    return {"input_ids": repeat(pos["input_ids"]), "attention_mask": repeat(pos["attention_mask"]),
            "negative_input_ids": repeat(neg["input_ids"]),
            "negative_attention_mask": repeat(neg["attention_mask"]),
            "clip_skip": np.full((n,), skip, np.int32),
            "guidance_rescale": np.full((n,), guidance_rescale, np.float32)}

  def latent_size(self, height: Optional[int], width: Optional[int]) -> tuple:
    """(h, w, c) of the latents of a height x width image (both None: the default size)."""
    if not height or not width:  # diffusers: either missing -> both default.
      h, w = self.latent_shape[:2]
      height, width = h * self.vae_scale_factor, w * self.vae_scale_factor
    if height % 8 or width % 8:
      raise ConfigError(f"height and width must be multiples of 8, got {height} x {width}.")
    return (int(height) // self.vae_scale_factor, int(width) // self.vae_scale_factor,
            self.latent_channels)

  def __call__(self, prompt: Prompts, negative_prompt: Optional[Prompts] = None,
               num_inference_steps: Optional[int] = 50, guidance_scale: Optional[float] = 7.5,
               height: Optional[int] = None, width: Optional[int] = None, latents=None,
               seed: int = 0, scheduler: Optional[str] = None, num_images_per_prompt: int = 1,
               eta: float = 0.0, guidance_rescale: float = 0.0, clip_skip: Optional[int] = None,
               output_type: str = "np", batch_size: Optional[int] = None,
               max_memory_gb: Optional[float] = None,
               progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """Images (len(prompt) * num_images_per_prompt, height, width, 3) float32 in [0, 1].

    Args:
      prompt: a string or a list of strings.
      negative_prompt: None (""), one string for every prompt, or one per prompt.
      num_inference_steps, guidance_scale: None means the defaults, 50 and 7.5.
      height, width: the image size (default: unet sample_size times the VAE factor).
      latents: optional (N, height / f, width / f, C) NHWC initial noise, not yet multiplied
        by init_noise_sigma (diffusers' `latents=`, transposed from NCHW); else drawn per
        image from `seed` (see `Pipeline.noise`).
      scheduler: None (the directory's) or another algorithm by name or alias.
      eta, guidance_rescale, clip_skip: as diffusers' arguments of the same names (eta: DDIM's
        noise level, ignored by the other schedulers).
      output_type: "np" (images) or "latent" (the final latents, still scaled).
      batch_size, max_memory_gb, progress: see `Pipeline.generate`.
    """
    cond = self.prompt_condition(prompt, negative_prompt, num_images_per_prompt, clip_skip,
                                 guidance_rescale)
    return self.generate(cond, len(cond["input_ids"]), num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, latents=latents, seed=seed,
                         scheduler=scheduler, output_type=output_type, batch_size=batch_size,
                         max_memory_gb=max_memory_gb, progress=progress,
                         latent_shape=self.latent_size(height, width), eta=eta)

  # -- the program --------------------------------------------------------------------------------

  def text_states(self, variables, input_ids, attention_mask, clip_skip=None) -> jax.Array:
    """(B, L, D) prompt embeddings: the text encoder's last hidden state, or per image with
    clip_skip[b] = k > 0 the output of layer N - k through the final LayerNorm."""
    mask = attention_mask if self.use_attention_mask else None
    is_layer = lambda module, method: isinstance(module, CLIPEncoderLayer)
    hidden, inter = self.text_encoder.apply(
        variables["text_encoder"], input_ids, mask, method="text_hidden_states",
        capture_intermediates=is_layer, mutable=["intermediates"])
    if clip_skip is None:
      return hidden
    layers = inter["intermediates"]["text_model"]
    # Layer outputs, last first: index k is the output of layer N - k (k = 0: the last layer).
    outputs = jnp.stack([layers[f"layers_{i}"]["__call__"][0]
                         for i in reversed(range(self.num_text_layers))])
    picked = outputs[clip_skip, jnp.arange(hidden.shape[0])]
    norm = nn.LayerNorm(self.text_encoder.text_model.layer_norm_eps, dtype=self.dtype)
    normed = norm.apply(
        {"params": variables["text_encoder"]["params"]["text_model"]["final_layer_norm"]}, picked)
    return jnp.where((clip_skip > 0)[:, None, None], normed.astype(hidden.dtype), hidden)

  def encode_prompt(self, variables, cond, guidance_scale: float) -> jax.Array:
    """The U-Net's encoder_hidden_states: the prompts' (B, L, D), with guidance the negative
    prompts' first ((2B, L, D), diffusers' cat([negative, prompt]))."""
    text = self.text_states(variables, cond["input_ids"], cond["attention_mask"],
                            cond["clip_skip"])
    if guidance_scale <= 1:
      return text
    negative = self.text_states(variables, cond["negative_input_ids"],
                                cond["negative_attention_mask"])
    return jnp.concatenate([negative, text])

  def get_scheduler(self, name: Optional[str] = None) -> schedulers_lib.Scheduler:
    """The directory's scheduler, or algorithm `name` built from its config."""
    if name is None:
      return self.scheduler
    return schedulers_lib.from_config(self.scheduler.config, name)

  def noise_prediction(self, variables, x, t, context, cond, guidance_scale: float):
    """The guided U-Net output at model input x (B, h, w, C) and timestep t."""
    if guidance_scale <= 1:
      return self._unet(variables, x, t, context)
    b = x.shape[0]
    out = self._unet(variables, jnp.concatenate([x, x]), t, context)
    uncond, text = out[:b], out[b:]
    guided = uncond + guidance_scale * (text - uncond)
    return rescale_noise_cfg(guided, text, cond["guidance_rescale"])

  def _unet(self, variables, x, t, context):
    t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
    return self.unet.apply(variables["unet"], x.astype(self.dtype), t,
                           context.astype(self.dtype)).astype(jnp.float32)

  def sample_latents(self, variables, latents, cond, guidance_scale, num_inference_steps,
                     scheduler, eta=0.0):
    sched = self.get_scheduler(scheduler)
    plan = sched.plan(num_inference_steps, eta=eta)
    keys = image_keys(latents)  # Each image's own stochastic-step noise.
    context = self.encode_prompt(variables, cond, guidance_scale)

    def step(carry, i):
      x, state = carry
      model_input = sched.scale_model_input(plan, i, x)
      noise_pred = self.noise_prediction(variables, model_input, plan.timesteps[i], context,
                                         cond, guidance_scale)
      x, state = sched.step(plan, i, noise_pred, x, state,
                            step_keys(keys, i))
      return (x, state), None

    x = latents.astype(jnp.float32) * plan.init_noise_sigma
    (x, _), _ = jax.lax.scan(step, (x, sched.init_state(plan, x)), jnp.arange(plan.n_evals))
    return x

  def decode(self, variables, latents):
    z = (latents / self.scaling_factor).astype(self.dtype)
    images = self.vae.apply(variables["vae"], z, method="decode").astype(jnp.float32)
    return jnp.clip(images / 2 + 0.5, 0.0, 1.0)
