"""FastComposer training, sampling and evaluation on multi-subject data (jaxgen.data.subjects).

Training (`loss`): caption dropout with p = `diffusion.label_dropout` (the caption becomes the
empty one and the subjects are dropped), the text + subject-augmented context, the diffusion
objective of `jaxgen.diffusion.losses` on the canvas and, with `diffusion.loc_loss_weight` > 0,
FastComposer's localisation loss on the subject tokens' cross-attention maps of every U-Net
cross-attention layer against the subjects' segmentation masks (training only):
loss = MSE + loc_loss_weight * loc.

Sampling (`sample_batch`): the config's sampler with classifier-free guidance against the
empty caption, and delayed subject conditioning: the text-only context for the first
`sample.subject_start` fraction of the sampling steps, the subject-augmented one after
(`switch_timestep`). `subject_start` 0 conditions on the subjects throughout.

Cross-attention maps at inference (`attention_readout`): each subject token's attention
probability per pixel, averaged over heads and layers and resized to the canvas, of the
generated image noised back to grid points where the subject context is active (fixed noise)
and denoised once with that context. `jaxgen.models.fastcomposer.cross_attention_maps` gives
the raw per-layer maps of any (x_t, t, context).

Evaluation (`evaluate`, `subject_scores`): on the first `eval.num_samples` fixed test
compositions, with a digit classifier jaxgen trains on MNIST-5k at the half-canvas size:
  prompt_consistency  the requested digit is read in the requested half (per subject)
  identity            cosine similarity of the classifier's penultimate features between each
                      reference subject and its generated half
  identity_same_class_baseline  the same cosine between the reference and another real test
                      digit of the same class: identity above it is more than class transfer
  attention_in_place  share of each subject token's readout attention inside its own half
each also for the two-subject prompts alone (`*_two_subjects`).
"""

import os
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxgen import sharding
from jaxgen import visualize
from jaxgen.config import build_model
from jaxgen.data import subjects
from jaxgen.diffusion.losses import diffusion_loss
from jaxgen.diffusion.samplers import sample, sampling_timesteps
from jaxgen.diffusion.schedules import q_sample
from jaxgen.errors import ConfigError
from jaxgen.models import fastcomposer as fc
from jaxgen.nn.transformer import ATTENTION_MAPS, recorded_maps
from jaxgen.registry import TASKS
from jaxgen.tasks.diffusion import DiffusionTask

COND_KEYS = ("input_ids", "subject_images", "subject_positions", "subject_valid")


def switch_timestep(timesteps: np.ndarray, subject_start: float) -> int:
  """The first timestep of the grid that gets the subject context: steps t >= it get text only.

  The first round(subject_start * n) of the n grid points (descending) are text-only; with 0
  the returned value exceeds every timestep, so no step is text-only.
  """
  if not 0.0 <= subject_start <= 1.0:
    raise ConfigError(f"sample.subject_start must be in [0, 1], got {subject_start}")
  k = int(round(subject_start * len(timesteps)))
  return int(timesteps[0]) + 1 if k == 0 else int(timesteps[k - 1])


def halves(images: np.ndarray) -> np.ndarray:
  """(N, S, 2S, C) canvases -> (N, 2, S, S, C): left and right halves."""
  s = images.shape[1]
  return np.stack([images[:, :, :s], images[:, :, s:2 * s]], axis=1)


@TASKS.register("fastcomposer")
class FastComposerTask(DiffusionTask):
  """FastComposer (jaxgen.models.fastcomposer) trained on `mnist_subjects` compositions."""

  def __init__(self, config: ml_collections.ConfigDict, image_shape, num_classes: int):
    if config.data.source != subjects.MnistSubjects.name:
      raise ConfigError(f"task fastcomposer needs data.source='{subjects.MnistSubjects.name}' "
                        f"(captions, subject images and masks); got {config.data.source!r}")
    super().__init__(config, image_shape, num_classes)
    self.source = subjects.MnistSubjects(config.data)
    self.tokenizer = self.source.tokenizer
    self.null_ids = self.tokenizer.encode("")  # The unconditional (empty) caption.
    text = self.model.text_encoder.text_model
    if text.vocab_size < self.tokenizer.vocab_size or (
        text.max_position_embeddings < self.tokenizer.max_length):
      raise ConfigError(
          f"model.text_config needs vocab_size >= {self.tokenizer.vocab_size} and "
          f"max_position_embeddings >= {self.tokenizer.max_length} (data.max_caption_length)")

  def set_compute_dtype(self, dtype) -> None:
    self.model = build_model(ml_collections.ConfigDict(dict(self.config.model.to_dict(),
                                                            dtype=dtype)))

  # -- training --------------------------------------------------------------------------------

  def _dummy_cond(self, batch: int) -> Dict[str, jax.Array]:
    s, subjects_max = self.source.size, subjects.MAX_SUBJECTS
    return {"input_ids": jnp.zeros((batch, self.tokenizer.max_length), jnp.int32),
            "subject_images": jnp.zeros((batch, subjects_max, s, s, 1), jnp.float32),
            "subject_positions": jnp.zeros((batch, subjects_max), jnp.int32),
            "subject_valid": jnp.zeros((batch, subjects_max), jnp.float32)}

  def init(self, rng, batch):
    del batch
    x = jnp.zeros((1,) + self.image_shape, jnp.float32)
    variables = dict(self.model.init({"params": rng, "dropout": rng}, x, jnp.zeros((1,)),
                                     self._dummy_cond(1)))
    return variables.pop("params"), variables

  def make_optimizer(self, total_steps: int):
    """The config's optimizer on the trained weights; frozen towers get no update at all."""
    import optax  # pylint: disable=g-import-not-at-top
    from jaxgen.train.optim import make_optimizer  # pylint: disable=g-import-not-at-top
    tx, schedule = make_optimizer(self.config.optimizer, total_steps)
    frozen = fc.frozen_paths(self.model)
    if not frozen:
      return tx, schedule

    def labels(params):
      def label(path, _):
        keys = tuple(getattr(k, "key", str(k)) for k in path)
        return "frozen" if any(keys[:len(f)] == f for f in frozen) else "train"
      return jax.tree_util.tree_map_with_path(label, params)

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels), schedule

  def loss(self, params, model_state, batch, rng):
    model_rng, loss_rng, drop_rng = jax.random.split(rng, 3)
    d = self.config.diffusion
    variables = {"params": params, **model_state}
    ids, valid = batch["input_ids"], batch["subject_valid"].astype(jnp.float32)
    if d.label_dropout > 0:  # Caption dropout: the empty caption and no subjects.
      dropped = jax.random.bernoulli(drop_rng, d.label_dropout, (ids.shape[0],))
      ids = jnp.where(dropped[:, None], jnp.asarray(self.null_ids)[None], ids)
      valid = jnp.where(dropped[:, None], 0.0, valid)
    positions = batch["subject_positions"]
    _, context = self.model.apply(variables, ids, batch["subject_images"], positions, valid,
                                  method="encode")
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

    mse, _ = diffusion_loss(model_fn, batch["image"], context, loss_rng, self.schedule,
                            prediction=d.prediction, min_snr_gamma=d.get("min_snr_gamma", 0.0))
    metrics = {"mse": mse}
    loss = mse
    if weight > 0:
      loc = fc.localization_loss(captured["maps"], positions, valid, batch["subject_masks"])
      metrics["loc_loss"] = loc
      loss = mse + weight * loc
    return loss, (metrics, model_state)

  # -- sampling --------------------------------------------------------------------------------

  def sample_batch(self, params, model_state, rng, cond, subject_start: float):
    """Canvases in [-1, 1] for a batch of prompts `cond` (COND_KEYS arrays), guided, delayed."""
    s = self.config.sample
    variables = {"params": params, **model_state}
    text, augmented = self.model.apply(variables, *(cond[k] for k in COND_KEYS), method="encode")
    null = self.model.apply(variables, jnp.asarray(self.null_ids)[None], method="text_states")
    switch = switch_timestep(sampling_timesteps(self.schedule.num_steps, s.num_steps),
                             subject_start)

    def model_fn(x, t, c):
      context = jnp.where((t >= switch)[:, None, None], c["text"], c["augmented"])
      return self.model.apply(variables, x, t, context, method="denoise")

    return sample(model_fn, rng, (text.shape[0],) + self.image_shape,
                  {"text": text, "augmented": augmented}, self.schedule, method=s.method,
                  num_steps=s.num_steps, eta=s.eta, guidance_scale=s.guidance_scale,
                  uncond={"text": null, "augmented": null},
                  prediction=self.config.diffusion.prediction, clip_x0=self.clip_x0)

  def generate(self, params, model_state, rng, labels):
    raise ConfigError("FastComposer generates from prompts, not class labels: use "
                      "FastComposerTask.generate_examples (or --mode=sample / --mode=eval)")

  def attention_readout(self, params, model_state, rng, images, cond, num_points: int = 2,
                        subject_start: Optional[float] = None):
    """(B, S, H, W) in [0, 1]: each subject token's cross-attention probability per canvas pixel
    (see the module docstring), averaged over heads, layers and `num_points` timesteps."""
    s = self.config.sample
    start = s.get("subject_start", 0.0) if subject_start is None else subject_start
    variables = {"params": params, **model_state}
    _, augmented = self.model.apply(variables, *(cond[k] for k in COND_KEYS), method="encode")
    ts = sampling_timesteps(self.schedule.num_steps, s.num_steps)
    active = ts[ts < switch_timestep(ts, start)]
    active = active if len(active) else ts  # subject_start 1: no subject steps; read all.
    points = active[np.linspace(0, len(active) - 1, num_points).round().astype(int)]
    b, h, w = images.shape[:3]
    total, count = 0.0, 0
    for i, t in enumerate(points):
      t = jnp.full((b,), t, jnp.int32)
      noise = jax.random.normal(jax.random.fold_in(rng, i), images.shape, jnp.float32)
      x_t = q_sample(self.schedule, images, t, noise)
      _, maps = fc.cross_attention_maps(self.model, variables, x_t, t, augmented)
      for m in fc.subject_maps(maps, cond["subject_positions"]).values():
        m = jnp.moveaxis(m.mean(1), -1, 1)  # (B, S, h', w')
        total = total + jax.image.resize(m, m.shape[:2] + (h, w), "linear")
        count += 1
    return total / count

  def _run_batched(self, setup, fn, state, use_ema: bool, arrays: Dict[str, np.ndarray],
                   seed: int) -> np.ndarray:
    """fn(params, model_state, rng, {k: (b, ...)}) over `arrays` in padded, mesh-sharded
    batches -> numpy. The weights are arguments (closed-over arrays would be compiled in)."""
    state = setup.state if state is None else state
    params = state.ema_params if use_ema else state.params
    n = len(next(iter(arrays.values())))
    # A few prompts (the smoke runs) need not fill a whole sampling batch.
    shards = sharding.num_batch_shards(setup.mesh)
    runner = sharding.BatchRunner(setup.mesh,
                                  min(int(self.config.sample.batch_size), -(-n // shards) * shards))
    jitted = jax.jit(fn)
    return runner.map(
        lambda i, batch: jitted(params, state.model_state, sharding.batch_rng(seed, i), batch),
        arrays)

  def generate_examples(self, setup, examples: Dict[str, np.ndarray], *, seed: int,
                        subject_start: Optional[float] = None, state=None,
                        use_ema: bool = True) -> np.ndarray:
    """Canvases (N, S, 2S, 1) in [-1, 1] for the prompts of `examples` (COND_KEYS arrays)."""
    start = self.config.sample.get("subject_start", 0.0) if subject_start is None else subject_start
    fn = lambda p, ms, rng, cond: self.sample_batch(p, ms, rng, cond, float(start))
    return self._run_batched(setup, fn, state, use_ema, {k: examples[k] for k in COND_KEYS}, seed)

  def attention_maps(self, setup, examples, images: np.ndarray, *, seed: int = 0, state=None,
                     use_ema: bool = True, subject_start: Optional[float] = None) -> np.ndarray:
    """(N, S, H, W) `attention_readout` of generated `images` for their prompts."""
    fn = lambda p, ms, rng, a: self.attention_readout(p, ms, rng, a["image"], a,
                                                      subject_start=subject_start)
    arrays = {k: examples[k] for k in COND_KEYS}
    arrays["image"] = np.asarray(images, np.float32)
    return self._run_batched(setup, fn, state, use_ema, arrays, seed)

  # -- outputs ---------------------------------------------------------------------------------

  def _panel(self, examples, images) -> np.ndarray:
    """uint8 rows [reference 1 | reference 2 | generated | real composition]."""
    to8 = visualize.to_uint8
    refs = to8(examples["subject_images"])  # (N, 2, S, S, 1)
    gen, real = to8(images), to8(examples["image"])
    gap = np.full(gen.shape[:2] + (2, gen.shape[-1]), 255, np.uint8)
    return np.concatenate([refs[:, 0], gap, refs[:, 1], gap, gen, gap, real], axis=2)

  def write_sample_grid(self, setup, state, path: str) -> None:
    examples = subjects.load_examples(self.config.data, "test", 8)
    images = self.generate_examples(setup, examples, seed=0, state=state)
    if jax.process_index() == 0:
      visualize.save_png(path, visualize.image_grid(self._panel(examples, images), rows=8))

  def write_samples(self, setup, out: str) -> None:
    """samples.npz (canvases, captions, references, attention maps), grid.png, attention.png."""
    n = int(self.config.sample.get("num_prompts", 16))
    examples = subjects.load_examples(self.config.data, "test", n)
    images = self.generate_examples(setup, examples, seed=self.config.seed)
    maps = self.attention_maps(setup, examples, images, seed=self.config.seed)
    if jax.process_index() != 0:
      return
    os.makedirs(out, exist_ok=True)
    captions = np.array([self.tokenizer.decode(ids) for ids in examples["input_ids"]])
    np.savez(os.path.join(out, "samples.npz"), images=visualize.to_uint8(images),
             captions=captions, attention=maps.astype(np.float32),
             **{k: v for k, v in examples.items() if k != "image"})
    visualize.save_png(os.path.join(out, "grid.png"),
                       visualize.image_grid(self._panel(examples, images), rows=n), min_size=512)
    # Heat maps scaled per map to [0, 255] next to the generated canvas.
    peak = maps.max(axis=(2, 3), keepdims=True) + 1e-8
    heat = np.round(255 * maps / peak).astype(np.uint8)[..., None]
    heat = np.where(examples["subject_valid"][:, :, None, None, None] > 0, heat, 0)
    gap = np.full(images.shape[:2] + (2, 1), 255, np.uint8)
    rows = np.concatenate([visualize.to_uint8(images), gap, heat[:, 0], gap, heat[:, 1]], axis=2)
    visualize.save_png(os.path.join(out, "attention.png"), visualize.image_grid(rows, rows=n),
                       min_size=512)
    with open(os.path.join(out, "captions.txt"), "w") as f:
      f.write("\n".join(f"{i}: {c}" for i, c in enumerate(captions)) + "\n")
    print(f"wrote {n} samples to {out}/samples.npz, grid.png and attention.png", flush=True)

  # -- evaluation ------------------------------------------------------------------------------

  def digit_classifier(self, cache_dir: str):
    """(model, params, real test accuracy) of the classifier on S x S MNIST-5k digits."""
    from jaxgen.metrics import classifier  # pylint: disable=g-import-not-at-top
    data = ml_collections.ConfigDict(dict(source="mnist5k", tfds_name="", tfds_data_dir="",
                                          image_size=self.source.size, random_flip=False,
                                          num_classes=10))
    return classifier.cached_classifier(data, cache_dir,
                                        epochs=int(self.config.eval.classifier_epochs))

  def evaluate(self, setup, out: str, subject_start: Optional[float] = None) -> dict:
    e = self.config.eval
    examples = subjects.load_examples(self.config.data, "test", int(e.num_samples))
    images = self.generate_examples(setup, examples, seed=self.config.seed + 12345,
                                    subject_start=subject_start)
    maps = self.attention_maps(setup, examples, images, seed=self.config.seed + 12345,
                               subject_start=subject_start)
    model, params, real_accuracy = self.digit_classifier(e.get("cache_dir") or out)
    scores = subject_scores(model, params, images, examples, self.source.digits("test"), maps)
    start = self.config.sample.get("subject_start", 0.0) if subject_start is None else subject_start
    return {"num_prompts": int(len(images)), **scores,
            "classifier_real_test_accuracy": real_accuracy, "subject_start": float(start),
            "loc_loss_weight": float(self.config.diffusion.get("loc_loss_weight", 0.0)),
            "sampler": self.config.sample.to_dict()}


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a = a / (np.linalg.norm(a, axis=-1, keepdims=True) + 1e-8)
  b = b / (np.linalg.norm(b, axis=-1, keepdims=True) + 1e-8)
  return np.sum(a * b, axis=-1)


def subject_scores(model, params, images: np.ndarray, examples: Dict[str, np.ndarray],
                   digits, maps: Optional[np.ndarray] = None) -> Dict[str, float]:
  """Prompt consistency, identity (and its same-class baseline), attention in place.

  images (N, S, 2S, 1) generated canvases; examples their prompts (jaxgen.data.subjects);
  digits the (images, labels) split the subjects come from; maps (N, 2, S, 2S) readouts.
  """
  from jaxgen.metrics import classifier  # pylint: disable=g-import-not-at-top
  valid = examples["subject_valid"] > 0                     # (N, 2)
  n_idx, s_idx = np.nonzero(valid)
  sides = examples["subject_sides"][n_idx, s_idx]
  wanted = examples["subject_digits"][n_idx, s_idx]
  crops = halves(np.asarray(images, np.float32))[n_idx, sides]
  refs = examples["subject_images"][n_idx, s_idx].astype(np.float32)
  # Another real digit of the same class for each reference (the next one in the split).
  pool_images, pool_labels = digits
  rows = examples["subject_rows"][n_idx, s_idx]
  others = []
  for row, label in zip(rows, wanted):
    same = np.flatnonzero(pool_labels == label)
    others.append(same[(np.searchsorted(same, row) + 1) % len(same)])
  others = np.asarray(pool_images)[np.asarray(others)]

  predicted = classifier.predict(model, params, crops)
  features = jax.jit(model.features)
  feat = lambda x: np.concatenate([np.asarray(features(params, x[i:i + 500]))
                                   for i in range(0, len(x), 500)])
  ref_feat = feat(refs)
  identity = _cosine(ref_feat, feat(crops))
  baseline = _cosine(ref_feat, feat(others))
  correct = (predicted == wanted).astype(np.float64)
  two = valid.sum(1)[n_idx] == 2
  out = {"num_subjects": int(len(n_idx)),
         "prompt_consistency": float(correct.mean()),
         "identity": float(identity.mean()),
         "identity_same_class_baseline": float(baseline.mean()),
         "prompt_consistency_two_subjects": float(correct[two].mean()) if two.any() else 0.0,
         "identity_two_subjects": float(identity[two].mean()) if two.any() else 0.0}
  if maps is not None:
    s = images.shape[1]
    mass = np.asarray(maps)[n_idx, s_idx]                    # (M, S, 2S)
    in_place = np.stack([mass[:, :, :s].sum((1, 2)), mass[:, :, s:].sum((1, 2))], 1)
    share = in_place[np.arange(len(sides)), sides] / (mass.sum((1, 2)) + 1e-12)
    out["attention_in_place"] = float(share.mean())
    out["attention_in_place_two_subjects"] = float(share[two].mean()) if two.any() else 0.0
  return out
