"""FastComposer's released model (SD-1.5 + CLIP ViT-L/14 subjects) as a text-to-image pipeline.

`pipe = load_pipeline(DIR)` on the directory `python -m jaxgen.convert
--src=pytorch_model.bin --dst=DIR` writes (`jaxgen.convert.fastcomposer`), then

  pipe(prompt="a man <|image|> and a woman <|image|> in a cafe", subject_images=[img1, img2],
       num_inference_steps=50, guidance_scale=5, start_merge_step=10)

-> float32 NHWC images in [0, 1]. It follows the official inference (mit-han-lab/fastcomposer
fastcomposer/inference.py with pipeline.py's `stable_diffusion_call_with_references_delayed_
conditioning`, whose defaults scripts/run_inference.sh sets: 50 steps, guidance 5,
start_merge_step 10, 512 x 512, SD-1.5's PNDM scheduler):

* the prompt marks each subject after its noun with `<|image|>` (a token the official code adds
  to the CLIP tokenizer). The augmented prompt is tokenised with the marker as its own token
  (bos + ids + eos, untruncated), every marker removed and the token before it flagged, then cut
  to 77 ids (an over-long prompt loses its eos, as there) and padded with the pad token. The
  text-only prompt is the prompt with the markers deleted, tokenised as Stable Diffusion's;
* each subject image (PIL or HWC array; uint8, or float in [0, 1]) is padded to a square with
  black ((long - short) // 2 on both sides: PadToSquare), resized to the image encoder's size
  (224; bilinear, antialiased) and rounded to uint8 as torchvision's uint8 resize does, scaled
  to [0, 1]; the image encoder normalises it with CLIP's mean / std and gives the projected
  pooled embedding (FastComposerCLIPImageEncoder);
* augmented embeddings: the text encoder's last hidden state of the augmented ids with subject
  k fused into the k-th flagged token (FastComposerPostfuseModule; `jaxgen.models.fastcomposer`);
* delayed subject conditioning: at denoising step i (the scheduler's i-th model evaluation,
  PNDM's repeated timestep included), i <= start_merge_step uses the text-only embeddings,
  later steps the augmented ones; classifier-free guidance against the negative prompt (default
  "") at every step: eps = uncond + s (cond - uncond);
* the rest is `StableDiffusionPipeline`'s (initial noise, schedulers, decode, batching, dtype).

Differences from the official code: a subject count that differs from the number of markers,
a marker with no word before it (or right after another marker) and a subject whose word the
77-token cut removes raise ConfigError (the official code crashes or silently drops subjects);
prompts may be a list (one list of subject images per prompt); guidance_scale <= 1 runs without
guidance (the official code asserts guidance). Images come from jax's random numbers, not
torch's generator (pass `latents=` for the same start).
"""

from typing import Callable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert import fastcomposer as fc_convert
from jaxgen.convert.common import read_json
from jaxgen.diffusion import schedulers as schedulers_lib
from jaxgen.errors import ConfigError, WeightsError
from jaxgen.models.fastcomposer import FastComposer
from jaxgen.pipelines.base import image_keys, resolve_dtype, step_keys
from jaxgen.pipelines.dit import read_model_index
from jaxgen.pipelines.stable_diffusion import Prompts, StableDiffusionPipeline
from jaxgen.text.clip_tokenizer import CLIPTokenizer

IMAGE_TOKEN = "<|image|>"
MAX_SUBJECTS = 4  # Subject slots per image (the official training's max_num_objects).


def tokenize_with_subjects(tokenizer: CLIPTokenizer, caption: str, max_length: int,
                           image_token: str = IMAGE_TOKEN):
  """(ids (max_length,) int32, flagged positions) of `caption` as the official
  `_tokenize_and_mask_noun_phrases_ends`: markers removed, the token before each flagged."""
  ids = [tokenizer.bos_token_id]
  positions: List[int] = []
  for k, chunk in enumerate(caption.split(image_token)):
    if k:  # A marker precedes this chunk: it flags the last token so far.
      if len(ids) == 1 or (positions and positions[-1] == len(ids) - 1):
        raise ConfigError(f"{image_token} must follow a word (its subject's noun), once: "
                          f"{caption!r}")
      positions.append(len(ids) - 1)
    ids.extend(tokenizer.encode(chunk, add_special_tokens=False))
  ids.append(tokenizer.eos_token_id)
  cut = [p for p in positions if p >= max_length]
  if cut:
    raise ConfigError(f"the prompt is too long: the subject word at token {cut[0]} is past the "
                      f"text encoder's {max_length} tokens; shorten {caption!r}")
  ids = ids[:max_length] + [tokenizer.pad_token_id] * max(0, max_length - len(ids))
  return np.asarray(ids, np.int32), positions


def _uint8_rgb(image) -> np.ndarray:
  """A PIL image or HWC / HW array (uint8, or float in [0, 1]) -> (h, w, 3) uint8."""
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
  except ImportError:
    Image = None  # pylint: disable=invalid-name
  if Image is not None and isinstance(image, Image.Image):
    return np.asarray(image.convert("RGB"))
  array = np.asarray(image)
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or 0 in array.shape:
    raise ConfigError(f"a subject image must be a PIL image or an (H, W[, 1|3|4]) array; got "
                      f"shape {array.shape}")
  if array.dtype.kind == "f":
    if array.min() < 0 or array.max() > 1:
      raise ConfigError("float subject images must lie in [0, 1] (or pass uint8)")
    array = np.round(array * 255.0)
  elif array.dtype != np.uint8:
    raise ConfigError(f"subject images must be uint8 or float in [0, 1]; got {array.dtype}")
  array = array.astype(np.uint8)[..., :3]  # RGBA -> RGB drops alpha, as PIL's convert.
  return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


def subject_pixels(image, resolution: int) -> np.ndarray:
  """(resolution, resolution, 3) float32 in [0, 1]: the official test object transforms
  (PadToSquare with black, Resize bilinear antialiased on uint8, ConvertImageDtype)."""
  x = _uint8_rgb(image)
  h, w = x.shape[:2]
  pad = abs(h - w) // 2
  if h > w:
    x = np.pad(x, ((0, 0), (pad, pad), (0, 0)))
  elif w > h:
    x = np.pad(x, ((pad, pad), (0, 0), (0, 0)))
  resized = jax.image.resize(jnp.asarray(x, jnp.float32), (resolution, resolution, 3), "linear",
                             antialias=True)
  # torchvision's uint8 resize rounds and clamps back to uint8 before the float conversion.
  return (np.clip(np.round(np.asarray(resized)), 0, 255) / 255.0).astype(np.float32)


class FastComposerPipeline(StableDiffusionPipeline):
  """`pipe(prompt, subject_images, ...)` -> float32 NHWC images in [0, 1] (module docstring)."""

  def __init__(self, composer: FastComposer, unet_config, text_encoder_config,
               tokenizer: CLIPTokenizer, vae_config, scheduler: schedulers_lib.Scheduler,
               variables, *, image_token: str = IMAGE_TOKEN, dtype=None, mesh=None):
    dtype = resolve_dtype(dtype)
    super().__init__(composer.unet, unet_config, composer.text_encoder, text_encoder_config,
                     tokenizer, composer.vae, vae_config, scheduler, variables, dtype=dtype,
                     mesh=mesh)
    image_encoder = composer.image_encoder
    self.composer = composer.clone(
        dtype=dtype, text_encoder=self.text_encoder, unet=self.unet, vae=self.vae,
        image_encoder=image_encoder.clone(
            dtype=dtype, vision_model=image_encoder.vision_model.clone(dtype=dtype)))
    self.image_token = image_token
    self.resolution = int(image_encoder.vision_model.image_size)
    self.default_guidance = 5.0

  @classmethod
  def from_directory(cls, path: str, dtype=None, mesh=None) -> "FastComposerPipeline":
    index = read_model_index(path)
    tokenizer_dir = f"{path}/tokenizer"
    if not index.get("tokenizer") or index["tokenizer"][0] is None:
      raise WeightsError(f"{path} has no tokenizer: copy Stable Diffusion 1.5's tokenizer/ "
                         f"folder (vocab.json, merges.txt, ...) to {tokenizer_dir} and set "
                         '"tokenizer": ["transformers", "CLIPTokenizer"] in model_index.json, '
                         "or convert again with --tokenizer=DIR (the release carries none).")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    composer, variables = fc_convert.from_pipeline_dir(path)
    scheduler = schedulers_lib.load_scheduler(f"{path}/scheduler")
    config = lambda name: read_json(f"{path}/{name}/config.json")
    per_component = {name: {"params": p} for name, p in variables["params"].items()}
    return cls(composer, config("unet"), config("text_encoder"), tokenizer, config("vae"),
               scheduler, per_component, dtype=dtype, mesh=mesh)

  # -- the condition ------------------------------------------------------------------------------

  def condition_spec(self):
    spec = dict(super().condition_spec())
    r = self.resolution
    spec.update(
        augmented_input_ids=jax.ShapeDtypeStruct((self.max_length,), jnp.int32),
        subject_pixels=jax.ShapeDtypeStruct((MAX_SUBJECTS, r, r, 3), jnp.float32),
        subject_positions=jax.ShapeDtypeStruct((MAX_SUBJECTS,), jnp.int32),
        subject_valid=jax.ShapeDtypeStruct((MAX_SUBJECTS,), jnp.float32),
        start_merge_step=jax.ShapeDtypeStruct((), jnp.int32))
    return spec

  def subject_condition(self, prompts: Sequence[str], subject_images, per_prompt: int):
    """augmented ids, subject pixels / positions / validity of every image (batched)."""
    if subject_images is None:
      subject_images = [[] for _ in prompts]
    elif len(prompts) == 1 and not (len(subject_images) and all(
        isinstance(s, (list, tuple)) for s in subject_images)):
      subject_images = [subject_images]  # One prompt: a flat list of its subjects.
    groups = [list(s) for s in subject_images]
    if len(groups) != len(prompts):
      raise ConfigError(f"subject_images: give one list of subject images per prompt; got "
                        f"{len(groups)} lists for {len(prompts)} prompts")
    r = self.resolution
    ids = np.zeros((len(prompts), self.max_length), np.int32)
    pixels = np.zeros((len(prompts), MAX_SUBJECTS, r, r, 3), np.float32)
    positions = np.zeros((len(prompts), MAX_SUBJECTS), np.int32)
    valid = np.zeros((len(prompts), MAX_SUBJECTS), np.float32)
    for i, (prompt, images) in enumerate(zip(prompts, groups)):
      ids[i], flagged = tokenize_with_subjects(self.tokenizer, prompt, self.max_length,
                                               self.image_token)
      if len(flagged) != len(images):
        raise ConfigError(f"prompt {prompt!r} marks {len(flagged)} subjects with "
                          f"{self.image_token} but {len(images)} subject images were given: "
                          "one image per marker, in the prompt's order")
      if len(images) > MAX_SUBJECTS:
        raise ConfigError(f"at most {MAX_SUBJECTS} subjects per prompt; got {len(images)}")
      for k, (image, p) in enumerate(zip(images, flagged)):
        pixels[i, k], positions[i, k], valid[i, k] = subject_pixels(image, r), p, 1.0
    repeat = lambda x: np.repeat(x, per_prompt, axis=0)
    return {"augmented_input_ids": repeat(ids), "subject_pixels": repeat(pixels),
            "subject_positions": repeat(positions), "subject_valid": repeat(valid)}

  def __call__(self, prompt: Prompts, subject_images=None,
               negative_prompt: Optional[Prompts] = None,
               num_inference_steps: Optional[int] = 50, guidance_scale: Optional[float] = 5.0,
               start_merge_step: int = 10, height: Optional[int] = None,
               width: Optional[int] = None, latents=None, seed: int = 0,
               scheduler: Optional[str] = None, num_images_per_prompt: int = 1,
               eta: float = 0.0, output_type: str = "np", batch_size: Optional[int] = None,
               max_memory_gb: Optional[float] = None,
               progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """Images (len(prompt) * num_images_per_prompt, height, width, 3) float32 in [0, 1].

    Args:
      prompt: a string (or a list) marking each subject after its noun with `<|image|>`.
      subject_images: for one prompt, its subject images in marker order (PIL images or HWC
        arrays, uint8 or float in [0, 1]); for a list of prompts, one such list per prompt.
      negative_prompt: None (""), one string for every prompt, or one per prompt.
      start_merge_step: steps i <= start_merge_step condition on the text only.
      The other arguments are `StableDiffusionPipeline.__call__`'s (defaults: 50 steps,
      guidance 5, the unet's sample size: 512 x 512 for the release).
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
    if not prompts or not all(isinstance(p, str) for p in prompts):
      raise ConfigError(f"prompt must be a string or a non-empty list of strings; got "
                        f"{prompt!r}.")
    text_only = [p.replace(self.image_token, "") for p in prompts]
    cond = dict(self.prompt_condition(text_only, negative_prompt, num_images_per_prompt))
    cond.update(self.subject_condition(prompts, subject_images, int(num_images_per_prompt)))
    n = len(cond["input_ids"])
    cond["start_merge_step"] = np.full((n,), int(start_merge_step), np.int32)
    return self.generate(cond, n, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, latents=latents, seed=seed,
                         scheduler=scheduler, output_type=output_type, batch_size=batch_size,
                         max_memory_gb=max_memory_gb, progress=progress,
                         latent_shape=self.latent_size(height, width), eta=eta)

  # -- the program --------------------------------------------------------------------------------

  def augmented_prompt(self, variables, cond) -> jax.Array:
    """(B, L, D): the augmented ids' text states with each subject fused into its noun."""
    text = self.text_states(variables, cond["augmented_input_ids"], None)
    subjects = {"params": {k: variables[k]["params"] for k in ("image_encoder",
                                                               "postfuse_module")}}
    embeds = self.composer.apply(subjects, cond["subject_pixels"], method="subject_embeddings")
    return self.composer.apply(subjects, text, embeds, cond["subject_positions"],
                               cond["subject_valid"], method="fuse")

  def sample_latents(self, variables, latents, cond, guidance_scale, num_inference_steps,
                     scheduler, eta=0.0):
    sched = self.get_scheduler(scheduler)
    plan = sched.plan(num_inference_steps, eta=eta)
    keys = image_keys(latents)  # Each image's own stochastic-step noise.
    context = self.encode_prompt(variables, cond, guidance_scale)  # [negative;] text-only
    augmented = self.augmented_prompt(variables, cond).astype(context.dtype)
    b = latents.shape[0]

    def step(carry, i):
      x, state = carry
      text_only = (i <= cond["start_merge_step"])[:, None, None]  # Delayed conditioning.
      current = jnp.where(text_only, context[-b:], augmented)
      if guidance_scale > 1:
        current = jnp.concatenate([context[:b], current])
      model_input = sched.scale_model_input(plan, i, x)
      noise_pred = self.noise_prediction(variables, model_input, plan.timesteps[i], current,
                                         cond, guidance_scale)
      x, state = sched.step(plan, i, noise_pred, x, state,
                            step_keys(keys, i))
      return (x, state), None

    x = latents.astype(jnp.float32) * plan.init_noise_sigma
    (x, _), _ = jax.lax.scan(step, (x, sched.init_state(plan, x)), jnp.arange(plan.n_evals))
    return x
