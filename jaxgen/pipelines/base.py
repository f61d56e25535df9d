"""Pipelines: a condition in, images out, the whole sampler as one jitted program.

A subclass holds a published generator (its converted modules and `variables`) and says, as
pure functions of (variables, arrays), how the denoising loop runs (`sample_latents`), how
latents become images (`decode`), and what the condition of one image is (`condition_spec`:
a class id, prompt token ids, ...); class-conditional ones also give one backbone evaluation in
the checkpoint's own units (`denoiser`). `Pipeline` does what every pipeline shares:

* labels (`ClassConditionalPipeline`): ids, or names through the `id2label` map (diffusers'
  `get_label_ids`: each value is a comma-separated list of synonyms);
* initial noise: `latents=` as given (NHWC), else image i of a call draws
  N(0, I) from `fold_in(PRNGKey(seed), i)`, so an image does not depend on the batch size, the
  device count or the other labels of the call; a stochastic scheduler's fresh noise at each
  step is drawn per image too, from a key derived from that image's initial noise
  (`image_keys`, `step_keys`);
* batching over the device mesh (`sharding.BatchRunner`: fixed-size global batches split over
  the data axes, parameters replicated), one compilation per (batch, steps, scheduler,
  guidance, output) and no Python loop over steps;
* `max_memory_gb=`: the largest batch, then a decode one image at a time, whose compiled peak
  (XLA's memory analysis of the program, per device) stays under the budget;
* `dtype="bfloat16"`: parameters and activations in bf16, the scheduler arithmetic in float32.
"""

import dataclasses
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxgen import sharding
from jaxgen.errors import ConfigError

OUTPUT_TYPES = ("np", "latent")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_dtype(dtype: Union[str, Any, None]):
  """None / "float32" / "bfloat16" (or the jnp dtype) -> the jnp dtype."""
  if dtype is None:
    return jnp.float32
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ConfigError(f"unknown pipeline dtype {dtype!r}; known: {sorted(DTYPES)}.")
    return DTYPES[dtype]
  return jnp.dtype(dtype).type


def cast_floats(tree, dtype):
  """Floating leaves of a parameter tree cast to `dtype` (integer leaves kept); abstract
  leaves (ShapeDtypeStructs) get the new dtype."""
  def cast(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dtype)
    return jnp.asarray(x).astype(dtype)
  return jax.tree.map(cast, tree)


def label_map(id2label: Optional[Mapping[Any, str]]) -> Dict[str, int]:
  """Name -> class id from an id2label map whose values are comma-separated synonyms."""
  labels = {}
  for key, value in (id2label or {}).items():
    for name in str(value).split(","):
      labels[name.strip()] = int(key)
  return dict(sorted(labels.items()))


def image_keys(latents: jax.Array) -> jax.Array:
  """One PRNG key per image, folded from the bits of its first two initial-noise values: the
  noise a stochastic sampler draws for an image then depends on that image alone (its seed and
  index, or the latents the caller gave), not on the batch it shares."""
  flat = latents.reshape(latents.shape[0], -1)[:, :2].astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(flat, jnp.uint32)

  def key(row):
    k = jax.random.PRNGKey(0)
    for j in range(row.shape[0]):
      k = jax.random.fold_in(k, row[j])
    return k

  return jax.vmap(key)(bits)


def step_keys(keys: jax.Array, i) -> jax.Array:
  """The per-image keys (B, 2) of step i (a traced int is fine)."""
  return jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)


@dataclasses.dataclass(frozen=True)
class Plan:
  """How one call runs: the global batch, whether the decode goes one image at a time, and the
  compiled peak bytes per device (None when not measured)."""
  batch_size: int
  decode_per_image: bool
  peak_bytes: Optional[int] = None


class Pipeline:
  """Base of every pipeline: noise + a condition (a pytree of per-image arrays) -> images.

  Subclasses set the attributes below through `__init__` and implement `sample_latents`,
  `decode` and `condition_spec`; their `__call__` turns user input (class ids, prompts) into
  the condition and calls `generate`.
  """
  latent_shape: Tuple[int, int, int]   # (h, w, c) of one latent, NHWC
  default_steps: int
  default_guidance: float

  def __init__(self, variables, *, latent_shape: Sequence[int], default_steps: int,
               default_guidance: float, dtype=None, mesh=None):
    self.dtype = resolve_dtype(dtype)
    self.variables = variables if self.dtype == jnp.float32 else cast_floats(variables,
                                                                             self.dtype)
    self.latent_shape = tuple(int(v) for v in latent_shape)
    self.default_steps = int(default_steps)
    self.default_guidance = float(default_guidance)
    self.mesh = mesh if mesh is not None else sharding.make_mesh(
        ml_collections.ConfigDict({"data": -1}))
    self._compiled: Dict[tuple, Any] = {}
    self._placed_variables = None

  # -- what a subclass provides ------------------------------------------------------------------

  def condition_spec(self):
    """The condition of ONE image: a pytree of jax.ShapeDtypeStruct (no batch axis)."""
    raise NotImplementedError

  def sample_latents(self, variables, latents: jax.Array, cond, guidance_scale: float,
                     num_inference_steps: int, scheduler: Optional[str],
                     eta: float = 0.0) -> jax.Array:
    """Initial noise (B, h, w, c) float32 and the condition (batched `condition_spec`) -> final
    latents; pure and jittable (guidance_scale, num_inference_steps, scheduler, eta static).
    `eta`: DDIM's noise level (diffusers' pipeline argument; the other schedulers ignore it)."""
    raise NotImplementedError

  def decode(self, variables, latents: jax.Array) -> jax.Array:
    """Final latents -> float32 NHWC images in [0, 1]; pure and jittable."""
    raise NotImplementedError

  def to_uint8(self, images: np.ndarray) -> np.ndarray:
    """[0, 1] images -> uint8 as the reference pipeline converts them (diffusers'
    numpy_to_pil: round(255 x))."""
    return np.clip(np.round(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)

  def noise(self, seed: int, num_images: int, latent_shape=None) -> np.ndarray:
    """(num_images, h, w, c) float32: image i from fold_in(PRNGKey(seed), i)."""
    shape = tuple(latent_shape or self.latent_shape)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(
        jnp.arange(num_images))
    draw = jax.jit(jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32)))
    return np.asarray(draw(keys))

  # -- the program -------------------------------------------------------------------------------

  def _program(self, guidance_scale: float, num_inference_steps: int,
               scheduler: Optional[str], eta: float, output_type: str,
               decode_per_image: bool) -> Callable:
    def run(variables, latents, cond):
      latents = self.sample_latents(variables, latents, cond, guidance_scale,
                                    num_inference_steps, scheduler, eta=eta)
      if output_type == "latent":
        return latents.astype(jnp.float32)
      if decode_per_image:  # One image at a time: the decoder's activations for one image.
        images = jax.lax.map(lambda z: self.decode(variables, z[None])[0], latents)
      else:
        images = self.decode(variables, latents)
      return images.astype(jnp.float32)
    return run

  def _placed(self):
    if self._placed_variables is None:
      self._placed_variables = jax.device_put(self.variables, sharding.replicated(self.mesh))
    return self._placed_variables

  def _compile(self, key: tuple, batch: int, latent_shape=None):
    """The compiled program for (guidance, steps, scheduler, eta, output, per-image decode), a batch
    and a latent shape (default `self.latent_shape`)."""
    latent_shape = tuple(latent_shape or self.latent_shape)
    full = key + (batch, latent_shape)
    if full not in self._compiled:
      fn = jax.jit(self._program(*key))
      split, repl = sharding.batch_sharding(self.mesh), sharding.replicated(self.mesh)
      latents = jax.ShapeDtypeStruct((batch,) + latent_shape, jnp.float32, sharding=split)
      cond = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct((batch,) + tuple(x.shape), x.dtype, sharding=split),
          self.condition_spec())
      variables = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), self.variables)
      self._compiled[full] = fn.lower(variables, latents, cond).compile()
    return self._compiled[full]

  def plan(self, num_images: int, *, guidance_scale: Optional[float] = None,
           num_inference_steps: Optional[int] = None, scheduler: Optional[str] = None,
           output_type: str = "np", batch_size: Optional[int] = None,
           max_memory_gb: Optional[float] = None, latent_shape=None, eta: float = 0.0) -> Plan:
    """The batch (and decode mode) a call runs with; under `max_memory_gb`, the largest batch
    (at most `batch_size`, default all images) whose compiled peak per device fits, trying
    the whole-batch decode before the per-image one at each size."""
    key = self._key(guidance_scale, num_inference_steps, scheduler, output_type, eta)
    shards = sharding.num_batch_shards(self.mesh)
    want = max(1, int(batch_size or num_images))
    want = shards * math.ceil(want / shards)
    if max_memory_gb is None:
      return Plan(want, False)
    budget = float(max_memory_gb) * 2 ** 30
    best = None
    sizes = sorted({shards * max(1, (want // shards) >> k) for k in range(64)}, reverse=True)
    for size in sizes:
      for per_image in ((False, True) if output_type != "latent" else (False,)):
        peak = peak_bytes(self._compile(key + (per_image,), size, latent_shape))
        best = Plan(size, per_image, peak)
        if peak <= budget:
          return best
    raise ConfigError(
        f"max_memory_gb={max_memory_gb}: even a batch of {best.batch_size} with a per-image "
        f"decode needs {best.peak_bytes / 2 ** 20:.1f} MiB per device; raise the budget, use "
        "dtype='bfloat16', or use more devices.")

  def compiled_peak_bytes(self, batch_size: int = 1, *, guidance_scale=None,
                          num_inference_steps=None, scheduler=None, output_type: str = "np",
                          decode_per_image: bool = False, latent_shape=None,
                          eta: float = 0.0) -> int:
    """Peak bytes per device of the compiled sampler (+ decode) at `batch_size`, weights
    included. Works with abstract `variables` (ShapeDtypeStructs): nothing is allocated."""
    key = self._key(guidance_scale, num_inference_steps, scheduler, output_type, eta)
    shards = sharding.num_batch_shards(self.mesh)
    batch = shards * math.ceil(batch_size / shards)
    return peak_bytes(self._compile(key + (decode_per_image,), batch, latent_shape))

  def _key(self, guidance_scale, num_inference_steps, scheduler, output_type, eta=0.0):
    """(guidance, steps, scheduler, eta, output_type): what a compiled program is specific to
    besides the batch, the latent shape and the per-image decode."""
    if output_type not in OUTPUT_TYPES:
      raise ConfigError(f"output_type {output_type!r}; known: {list(OUTPUT_TYPES)}.")
    guidance = self.default_guidance if guidance_scale is None else float(guidance_scale)
    steps = self.default_steps if num_inference_steps is None else int(num_inference_steps)
    if steps < 1:
      raise ConfigError(f"num_inference_steps must be >= 1, got {steps}.")
    if not float(eta) >= 0:
      raise ConfigError(f"eta must be >= 0 (DDIM's noise level: 0 deterministic, 1 DDPM-like), "
                        f"got {eta}.")
    return (guidance, steps, scheduler, float(eta), output_type)

  def generate(self, cond, num_images: int, *, num_inference_steps: Optional[int] = None,
               guidance_scale: Optional[float] = None, latents=None, seed: int = 0,
               scheduler: Optional[str] = None, output_type: str = "np",
               batch_size: Optional[int] = None, max_memory_gb: Optional[float] = None,
               progress: Optional[Callable[[int], None]] = None,
               latent_shape=None, eta: float = 0.0) -> np.ndarray:
    """Images (N, H, W, 3) float32 in [0, 1], or with output_type="latent" the final latents
    (N, h, w, c) before unscaling and decoding, for `cond` (numpy, batched condition_spec).

    Args:
      num_inference_steps, guidance_scale: default to the checkpoint's recipe.
      latents: optional (N, h, w, c) initial noise; else drawn from `seed` per image.
      scheduler: None (the directory's own) or another algorithm by name, keeping the
        directory's scheduler config (as diffusers' `Other.from_config(pipe.scheduler.config)`).
      batch_size: images per compiled batch (default: all at once, or what max_memory_gb allows).
      progress: called with the number of images done after each batch.
      latent_shape: (h, w, c) of this call (pipelines whose size is a call argument, e.g. SD's
        height / width); default `self.latent_shape`.
      eta: DDIM's eta (see `sample_latents`).
    """
    n = int(num_images)
    latent_shape = tuple(latent_shape or self.latent_shape)
    if latents is None:
      latents = self.noise(seed, n, latent_shape)
    latents = np.asarray(latents, np.float32)
    if latents.shape != (n,) + latent_shape:
      raise ConfigError(f"latents must have shape {(n,) + latent_shape} (N, h, w, c: NHWC) "
                        f"for {n} images; got {latents.shape}.")
    key = self._key(guidance_scale, num_inference_steps, scheduler, output_type, eta)
    plan = self.plan(n, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                     scheduler=scheduler, output_type=output_type, batch_size=batch_size,
                     max_memory_gb=max_memory_gb, latent_shape=latent_shape, eta=eta)
    compiled = self._compile(key + (plan.decode_per_image,), plan.batch_size, latent_shape)
    runner = sharding.BatchRunner(self.mesh, plan.batch_size)
    variables = self._placed()
    return runner.map(lambda _, batch: compiled(variables, *batch), (latents, cond),
                      progress=progress)


class ClassConditionalPipeline(Pipeline):
  """Base of the class-conditional pipelines (DiT, the DC-AE paper's U-ViT / DiT models): the
  condition is the class id; subclasses also give `denoiser`."""
  num_classes: int

  def __init__(self, variables, *, num_classes: int, latent_shape: Sequence[int],
               default_steps: int, default_guidance: float,
               id2label: Optional[Mapping[Any, str]] = None, dtype=None, mesh=None):
    super().__init__(variables, latent_shape=latent_shape, default_steps=default_steps,
                     default_guidance=default_guidance, dtype=dtype, mesh=mesh)
    self.num_classes = int(num_classes)
    self.id2label = dict(id2label) if id2label else None
    self.labels = label_map(self.id2label)

  def condition_spec(self):
    return jax.ShapeDtypeStruct((), jnp.int32)

  def denoiser(self, x: jax.Array, t: jax.Array, labels: jax.Array) -> jax.Array:
    """One backbone evaluation in the checkpoint's own units (t convention, raw output
    channels), NHWC in and out."""
    raise NotImplementedError

  def guided_denoiser(self, variables, x: jax.Array, t: jax.Array, labels: jax.Array,
                      guidance_scale: float) -> jax.Array:
    """One classifier-free-guided backbone evaluation with the checkpoint's own guidance
    convention, pure in `variables` (what `sample_latents` evaluates at each step; export
    serialises it)."""
    raise NotImplementedError

  def get_label_ids(self, label: Union[str, Sequence[str]]) -> List[int]:
    """Class ids of label names (diffusers' DiTPipeline.get_label_ids)."""
    names = [label] if isinstance(label, str) else list(label)
    if not self.labels:
      raise ConfigError("this pipeline has no id2label map: pass class ids, not names.")
    unknown = [n for n in names if n not in self.labels]
    if unknown:
      close = [k for k in self.labels if any(u.lower() in k.lower() for u in unknown)][:10]
      raise ConfigError(f"unknown label name(s) {unknown}; "
                        f"{'close matches: ' + str(close) if close else 'see pipe.labels'}.")
    return [self.labels[n] for n in names]

  def check_labels(self, class_labels) -> np.ndarray:
    labels = np.asarray(class_labels, np.int64).reshape(-1)
    if labels.size == 0:
      raise ConfigError("no class labels given: pass at least one class id.")
    bad = labels[(labels < 0) | (labels >= self.num_classes)]
    if bad.size:
      raise ConfigError(f"class ids {sorted(set(bad.tolist()))} are outside "
                        f"[0, {self.num_classes}) for this model.")
    return labels.astype(np.int32)

  def __call__(self, class_labels: Sequence[int], num_inference_steps: Optional[int] = None,
               guidance_scale: Optional[float] = None, latents=None, seed: int = 0,
               scheduler: Optional[str] = None, output_type: str = "np",
               batch_size: Optional[int] = None, max_memory_gb: Optional[float] = None,
               progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """Images for N class ids (names: `get_label_ids` first); see `Pipeline.generate`."""
    labels = self.check_labels(class_labels)
    return self.generate(labels, len(labels), num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, latents=latents, seed=seed,
                         scheduler=scheduler, output_type=output_type, batch_size=batch_size,
                         max_memory_gb=max_memory_gb, progress=progress)


def peak_bytes(compiled) -> int:
  """Peak bytes per device of a compiled program (XLA's memory analysis)."""
  stats = compiled.memory_analysis()
  if stats.peak_memory_in_bytes:
    return int(stats.peak_memory_in_bytes)
  # Backends that report only the parts (the peak is then an upper bound).
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
