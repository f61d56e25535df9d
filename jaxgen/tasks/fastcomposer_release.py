"""Fine-tuning FastComposer's release (SD-1.5 + CLIP ViT-L/14 subjects) on the digit compositions.

  python -m jaxgen.main --config=configs/fastcomposer_release.py \
      --config.model.init_from=FC_DIR --workdir=DIR [--mode=train|sample]

FC_DIR is the pipeline directory `python -m jaxgen.convert --src=pytorch_model.bin --dst=FC_DIR
--tokenizer=SD15/tokenizer` writes (jaxgen.convert.fastcomposer); its components build the model
(`jaxgen.models.fastcomposer.FastComposer`, the official structure) and `jaxgen.train.init_from`
loads the trained ones. One step is the official `FastComposerModel.forward`
(mit-han-lab/fastcomposer fastcomposer/model.py, train.py), on `mnist_subjects` batches
(jaxgen.data.subjects):

  canvases -> RGB, resized to `text_to_image.image_size` -> VAE posterior sample * scaling
  factor (jaxgen.tasks.text_to_image.encode_latents);
  captions -> the directory's CLIP ids (jaxgen.text.retokenize: the ids the official code gives
  the caption with its `<|image|>` markers removed), each subject flagged at its noun's last
  token; caption dropout (p = diffusion.label_dropout, the official uncondition_prob): the
  empty caption and no subjects;
  subject images (the pasted digits, [-1, 1]) -> [0, 1] RGB -> the image encoder (resized to its
  size, CLIP-normalised, projected) -> fused into their nouns' text states (postfuse_module);
  loss = MSE of the pipeline's prediction type under its noise schedule (DDPMScheduler of
  scheduler_config.json, as the official train.py) + diffusion.loc_loss_weight (official 1e-3)
  x the balanced-L1 localisation loss of the subject tokens' cross-attention maps against the
  subjects' masks (every cross-attention layer of the U-Net; jaxgen.models.fastcomposer).

Trained, as the official train.py: the U-Net, the post-fuse MLP and, with
`text_to_image.train_image_encoder`, the last `text_to_image.image_encoder_trainable_layers`
layers of the image encoder (official default 2; 0: all of it); the text encoder with
`text_to_image.train_text_encoder`. The rest (always the VAE) is frozen: its variables live in
`model_state["frozen"]` (arguments of the jitted step, checkpointed, never updated). Not ported:
the official mask_loss option (the MSE restricted to the subjects' pixels half of the time) and
its object augmentations (the digits are already segmented, square crops).

Sampling (`--mode=sample`, `training.sample_every`): a `FastComposerPipeline` of the directory's
components with the trained weights (EMA) on the first `sample.num_prompts` test compositions:
"a 3 <|image|> on the left and a 7 <|image|> on the right" with their reference digits, delayed
subject conditioning from `sample.start_merge_step`, `sample.num_steps`,
`sample.guidance_scale`, `sample.method` ("" the directory's scheduler). samples/ then holds
samples.npz, grid.png (reference digits | generated image per row) and prompts.txt.
"""

import os
from typing import Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxgen import visualize
from jaxgen.convert import fastcomposer as fc_convert
from jaxgen.convert.common import read_json
from jaxgen.data import subjects
from jaxgen.diffusion import schedulers as schedulers_lib
from jaxgen.diffusion.losses import diffusion_loss, drop_labels
from jaxgen.errors import ConfigError
from jaxgen.models import fastcomposer as fc
from jaxgen.nn.transformer import ATTENTION_MAPS, recorded_maps
from jaxgen.registry import TASKS
from jaxgen.tasks import text_to_image as t2i
from jaxgen.text.clip_tokenizer import CLIPTokenizer
from jaxgen.text.retokenize import Retokenizer

FROZEN = t2i.FROZEN


def split_tree(tree: Dict, frozen: Callable[[Tuple[str, ...]], bool]) -> Tuple[Dict, Dict]:
  """A nested dict -> (leaves whose path `frozen` rejects, leaves it accepts), both nested."""
  def walk(node, path):
    if not isinstance(node, dict):
      return (None, node) if frozen(path) else (node, None)
    kept, taken = {}, {}
    for key, value in node.items():
      a, b = walk(value, path + (key,))
      if a is not None:
        kept[key] = a
      if b is not None:
        taken[key] = b
    return kept or None, taken or None
  kept, taken = walk(dict(tree), ())
  return kept or {}, taken or {}


def merge_trees(a: Dict, b: Dict) -> Dict:
  """The union of two nested dicts with disjoint leaves."""
  out = dict(a)
  for key, value in b.items():
    out[key] = merge_trees(out[key], value) if key in out else value
  return out


def frozen_predicate(model: fc.FastComposer, trainable_layers: int):
  """path -> frozen, as the official train.py sets requires_grad (module docstring)."""
  layers = model.image_encoder.vision_model.num_hidden_layers
  trained_layers = {f"layers_{i}" for i in range(max(0, layers - trainable_layers), layers)}

  def frozen(path: Tuple[str, ...]) -> bool:
    part = path[0]
    if part in ("unet", "postfuse_module"):
      return False
    if part == "text_encoder":
      return not model.train_text_encoder
    if part == "image_encoder":
      if not model.train_image_encoder:
        return True
      return trainable_layers > 0 and not (path[1:2] == ("vision_model",)
                                           and path[2:3] and path[2] in trained_layers)
    return True  # The VAE.
  return frozen


def sample_prompt(example: Dict[str, np.ndarray]) -> Tuple[str, List[np.ndarray]]:
  """(the caption with a `<|image|>` after each subject's noun, its reference digits as
  (S, S, 1) float images in [0, 1]) of one composition."""
  valid = np.flatnonzero(example["subject_valid"] > 0)
  caption = subjects.caption_for([(int(example["subject_digits"][i]),
                                   int(example["subject_sides"][i])) for i in valid])
  refs = [np.clip((example["subject_images"][i] + 1.0) / 2.0, 0.0, 1.0) for i in valid]
  return caption, refs


@TASKS.register("fastcomposer_release")
class FastComposerReleaseTask:
  """FastComposer's release fine-tuned with its official objective (module docstring)."""

  def __init__(self, config: ml_collections.ConfigDict, image_shape, num_classes: int):
    del num_classes
    self.config = config
    path = str(config.model.get("init_from", "") or "")
    if not path:
      raise ConfigError("task fastcomposer_release fine-tunes FastComposer's release: set "
                        "--config.model.init_from=DIR, the directory written by python -m "
                        "jaxgen.convert --src=pytorch_model.bin --dst=DIR --tokenizer=<SD-1.5's "
                        "tokenizer/>")
    t2i.check_pipeline_diffusion(config.diffusion, path)
    if config.data.source != subjects.MnistSubjects.name:
      raise ConfigError(f"task fastcomposer_release needs data.source="
                        f"'{subjects.MnistSubjects.name}' (captions, subject images and masks); "
                        f"got {config.data.source!r}")
    from jaxgen.pipelines.dit import read_model_index  # pylint: disable=g-import-not-at-top
    index = read_model_index(path)
    if index.get("_class_name") != fc_convert.PIPELINE_CLASS:
      raise ConfigError(f"model.init_from={path} is a {index.get('_class_name')!r} directory; "
                        f"task fastcomposer_release reads a {fc_convert.PIPELINE_CLASS} "
                        "directory (for Stable Diffusion use configs/sd_finetune.py)")
    if not index.get("tokenizer") or index["tokenizer"][0] is None:
      raise ConfigError(f"{path} has no tokenizer/: convert the release again with "
                        "--tokenizer=<Stable Diffusion 1.5's tokenizer/ folder>")
    self.directory = path
    opts = config.text_to_image
    composer, variables = fc_convert.from_pipeline_dir(path)
    self.model = composer.clone(train_text_encoder=bool(opts.train_text_encoder),
                                train_image_encoder=bool(opts.train_image_encoder))
    self.is_frozen = frozen_predicate(self.model, int(opts.image_encoder_trainable_layers))
    trainable, frozen = split_tree(jax.device_get(variables["params"]), self.is_frozen)
    self.trainable_shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                                         trainable)
    self.frozen = frozen
    self.tokenizer = CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    self.scheduler = schedulers_lib.load_scheduler(os.path.join(path, "scheduler"))
    self.schedule, self.prediction = t2i.training_schedule(self.scheduler)
    self.image_shape = tuple(image_shape)
    self.source = t2i.caption_source(config.data, self.model.vae.in_channels)
    vae = self.model.vae
    multiple = t2i.size_multiple(vae.spatial_compression_ratio,
                                 len(self.model.unet.block_out_channels))
    self.pixel_size = t2i.pipeline_image_size(self.image_shape[:2], opts.get("image_size"),
                                              multiple)
    self.retokenize = Retokenizer(self.source.tokenizer, self.tokenizer)
    self.null_ids = self.tokenizer([""])["input_ids"][0]

  def set_compute_dtype(self, dtype) -> None:
    """The trained parts compute in `dtype` (the frozen text encoder and VAE in float32)."""
    m = self.model
    self.model = m.clone(dtype=dtype, unet=m.unet.clone(dtype=dtype),
                         image_encoder=m.image_encoder.clone(
                             dtype=dtype, vision_model=m.image_encoder.vision_model.clone(
                                 dtype=dtype)))

  # -- training --------------------------------------------------------------------------------

  def init(self, rng, batch):
    """Zeros: the architecture is the directory's, so init_from fills every trained parameter
    and `warm_start` the frozen ones."""
    del rng, batch
    zeros = lambda tree: jax.tree.map(lambda v: jnp.zeros(np.shape(v), v.dtype), tree)
    return zeros(self.trainable_shapes), {FROZEN: zeros(self.frozen)}

  def warm_start(self, state):
    """A fresh run: the directory's frozen values replace init's zeros, same shardings."""
    placed = jax.tree.map(
        lambda v, old: jax.device_put(np.asarray(v, old.dtype), old.sharding),
        self.frozen, state.model_state[FROZEN])
    if jax.process_index() == 0:
      # init_from lists these as unused: they are the frozen model state instead.
      print(f"fastcomposer_release: {len(jax.tree.leaves(self.frozen))} frozen tensors "
            f"({', '.join(sorted(self.frozen))}: all but the trained layers) from "
            f"{self.directory}, kept in model_state", flush=True)
    return state.replace(model_state={**state.model_state, FROZEN: placed})

  def subject_pixels(self, subject_images):
    """(B, S, h, w, 1) digits in [-1, 1] -> [0, 1] with the image encoder's channels."""
    x = (subject_images.astype(jnp.float32) + 1.0) / 2.0
    channels = self.model.image_encoder.vision_model.num_channels
    return jnp.repeat(x, channels, axis=-1) if x.shape[-1] != channels else x

  def loss(self, params, model_state, batch, rng):
    variables = {"params": merge_trees(params, model_state[FROZEN])}
    vae_rng, drop_rng, model_rng, loss_rng = jax.random.split(rng, 4)
    opts = self.config.text_to_image
    pixels = t2i.to_pipeline_pixels(batch["image"], self.pixel_size, self.model.vae.in_channels)
    z = t2i.encode_latents(self.model.vae, {"params": variables["params"]["vae"]}, pixels,
                           self.model.vae.scaling_factor,
                           vae_rng if opts.get("sample_posterior", True) else None)
    clip = self.retokenize(batch["input_ids"])
    positions = jnp.take_along_axis(clip["word_ends"], batch["subject_positions"], axis=1)
    # A noun cut by the truncation has no token (word end 0): its subject is left out.
    valid = batch["subject_valid"].astype(jnp.float32) * (positions > 0)
    d = self.config.diffusion
    ids = clip["input_ids"]
    if d.label_dropout > 0:  # Caption dropout: the empty caption and no subjects.
      ids, dropped = drop_labels(drop_rng, ids, float(d.label_dropout), jnp.asarray(self.null_ids))
      valid = jnp.where(dropped[:, None], 0.0, valid)
    _, context = self.model.apply(variables, ids, self.subject_pixels(batch["subject_images"]),
                                  positions, valid, method="encode")
    weight = float(d.get("loc_loss_weight", 0.0))
    captured = {}

    def model_fn(x_t, t, ctx):
      kwargs = dict(method="denoise", rngs={"dropout": model_rng})
      if weight <= 0:
        return self.model.apply(variables, x_t, t, ctx, True, **kwargs)
      out, state = self.model.apply(variables, x_t, t, ctx, True, mutable=[ATTENTION_MAPS],
                                    **kwargs)
      captured["maps"] = recorded_maps(state[ATTENTION_MAPS])  # Same trace: read just below.
      return out

    mse, _ = diffusion_loss(model_fn, z, context, loss_rng, self.schedule,
                            prediction=self.prediction,
                            min_snr_gamma=d.get("min_snr_gamma", 0.0))
    metrics = {"mse": mse}
    loss = mse
    if weight > 0:
      loc = fc.localization_loss(captured["maps"], positions, valid, batch["subject_masks"])
      metrics["loc_loss"] = loc
      loss = mse + weight * loc
    return loss, (metrics, model_state)

  # -- sampling --------------------------------------------------------------------------------

  def finetuned_pipeline(self, setup, state=None, use_ema: bool = True):
    """The FastComposerPipeline with the trained weights, on the run's mesh."""
    from jaxgen.pipelines.fastcomposer import (  # pylint: disable=g-import-not-at-top
        FastComposerPipeline)
    state = setup.state if state is None else state
    params = merge_trees(state.ema_params if use_ema else state.params,
                         state.model_state[FROZEN])
    config = lambda name: read_json(os.path.join(self.directory, name, "config.json"))
    return FastComposerPipeline(
        self.model, config("unet"), config("text_encoder"),
        self.tokenizer, config("vae"), schedulers_lib.from_config(self.scheduler.config),
        {name: {"params": p} for name, p in params.items()}, mesh=setup.mesh)

  def prompts(self, split: str, num: int) -> Tuple[List[str], List[List[np.ndarray]]]:
    pairs = [sample_prompt(self.source.example(split, i, None)) for i in range(num)]
    return [p for p, _ in pairs], [r for _, r in pairs]

  def sample_prompts(self, setup, captions, references, state=None,
                     seed: Optional[int] = None) -> np.ndarray:
    """(N, H, W, 3) uint8 images at the training size, with the config's sampler."""
    s = self.config.sample
    pipe = self.finetuned_pipeline(setup, state)
    return pipe.to_uint8(pipe(list(captions), subject_images=references,
                negative_prompt=s.get("negative_prompt") or None,
                num_inference_steps=int(s.num_steps), guidance_scale=float(s.guidance_scale),
                start_merge_step=int(s.start_merge_step), height=self.pixel_size[0],
                width=self.pixel_size[1], seed=self.config.seed if seed is None else seed,
                scheduler=s.get("method") or None, batch_size=int(s.batch_size)))

  def _panel(self, images: np.ndarray, references) -> np.ndarray:
    """uint8 rows [reference digits (scaled to the image height; white: no subject) |
    generated image]."""
    h = images.shape[1]
    rows = []
    for image, refs in zip(images, references):
      tiles = [np.asarray(jax.image.resize(jnp.repeat(jnp.asarray(r), 3, -1), (h, h, 3),
                                           "nearest")) for r in refs]
      tiles += [np.ones((h, h, 3), np.float32)] * (subjects.MAX_SUBJECTS - len(tiles))
      tiles = np.clip(np.round(np.concatenate(tiles, axis=1) * 255), 0, 255).astype(np.uint8)
      rows.append(np.concatenate([tiles, image], axis=1))
    return np.stack(rows)

  def write_sample_grid(self, setup, state, path: str) -> None:
    captions, refs = self.prompts("test", 4)
    images = self.sample_prompts(setup, captions, refs, state, seed=0)
    if jax.process_index() == 0:
      visualize.save_png(path, visualize.image_grid(self._panel(images, refs), rows=4))

  def write_samples(self, setup, out: str) -> None:
    captions, refs = self.prompts("test", int(self.config.sample.get("num_prompts", 16)))
    images = self.sample_prompts(setup, captions, refs)
    if jax.process_index() != 0:
      return
    panel = self._panel(images, refs)
    t2i.write_prompt_images(out, images, captions,
                            grid=visualize.image_grid(panel, rows=len(panel)))
    print(f"wrote {len(images)} samples to {out}/samples.npz and {out}/grid.png (references | "
          f"generated; captions in {out}/prompts.txt)", flush=True)

  def evaluate(self, setup, out: str) -> dict:
    raise ConfigError("--mode=eval is not available for task fastcomposer_release; use "
                      "--mode=sample")

  def write_static_visuals(self, workdir: str) -> None:
    visualize.plot_schedule(
        os.path.join(workdir, "schedule.png"), np.asarray(self.schedule.betas),
        np.asarray(self.schedule.alphas_cumprod),
        title=f"FastComposer release schedule, {self.prediction}-prediction")
