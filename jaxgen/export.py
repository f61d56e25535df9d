"""Serialized `jax.export` artifacts (StableHLO) of a published generator, for small devices.

  python -m jaxgen.export --model=DIR --platform=cuda --batch=1 --out=OUT
      [--steps=N --guidance=G --scheduler=NAME --dtype=bfloat16 --artifacts=denoiser,decoder]

DIR is anything `jaxgen.pipelines.load_pipeline` reads. The programs are lowered here (a
machine without a GPU lowers for `--platform=cuda` as well) and OUT receives:

  denoiser.jax_export  (weights, x (B,h,w,c) f32, t (B,) f32, labels (B,) i32) -> (B,h,w,C')
                       f32: one guided denoiser evaluation in the checkpoint's own units (its t
                       convention and raw output channels, `pipe.denoiser`), classifier-free
                       guidance included at --guidance;
  decoder.jax_export   (weights, latents (B,h,w,c) f32) -> images (B,H,W,3) f32 in [0, 1];
  sampler.jax_export   (weights, noise (B,h,w,c) f32, labels (B,) i32) -> images: the whole
                       sampling loop at --steps / --guidance / --scheduler, then the decode
                       (`pipe(labels, latents=noise, ...)`);
  weights.safetensors  every parameter once, named by its flattened tree path; each program
                       takes them as its first argument, a tuple in the manifest's order
                       (weights are arguments, not constants: a published DiT-XL's 2.7 GB
                       would not fit a serialized module);
  manifest.json        per program its file, input and output shapes and dtypes and how to
                       call it; the weight names in argument order; the jax version, platform,
                       batch, dtype and sampling settings.

`load(OUT)` deserializes them into callables taking the arrays alone (it reads and places the
weights once). It and this module's top level need only jax, numpy and safetensors (and the
dependency-free `jaxgen.errors`): jaxgen's models, flax and torch are imported by the export
path only, so a device with a bare jax install runs the artifacts. jax runs a serialized
module up to ~6 months newer than the jax that wrote it (and ~3 weeks older).

Kernels: the lowering runs inside `jaxgen.kernels.target.lowering_for(platform)`, so "auto"
kernel choices are made for the target, not for this machine: XLA's grouped conv for a CUDA
artifact (no Pallas-Triton custom call, whose IR is not stable; no CPU shifted sums), the
shifted sums for a CPU one. jax.export's own check (never disabled here) refuses any custom
call outside its stable list; `custom_call_targets` lists what a module holds.

The denoiser's guidance is the checkpoint's own (`pipe.guided_denoiser`, as its sampler
evaluates it): DiTPipeline's uncond + s (cond - uncond) on the latent channels for s > 1, the
DC-AE paper's models' formula for theirs.
"""

import dataclasses
import json
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
from jax import export as jax_export
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import ConfigError, WeightsError, cli

FORMAT = "jaxgen.export/1"
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
ARTIFACTS = ("denoiser", "decoder", "sampler")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
SUFFIX = ".jax_export"


# ------------------------------------------------------------------------------------------------
# Weights as arguments.


def _key_name(key) -> str:
  tu = jax.tree_util
  if isinstance(key, (tu.DictKey, tu.FlattenedIndexKey)):
    return str(key.key)
  if isinstance(key, tu.GetAttrKey):
    return key.name
  if isinstance(key, tu.SequenceKey):
    return str(key.idx)
  raise TypeError(f"unexpected pytree key {key!r}")


def weight_names(variables) -> List[str]:
  """The '/'-joined tree path of every leaf of `variables`, in `jax.tree.leaves` order."""
  return ["/".join(_key_name(k) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]]


def export_function(fn: Callable, variables, args: Sequence[jax.ShapeDtypeStruct],
                    platform: str) -> jax_export.Exported:
  """`fn(variables, *args)` exported for `platform` as `f(weights, *args)`, weights the tuple
  of `variables`' leaves (in `weight_names` order); kernels chosen for `platform`."""
  from jaxgen.kernels import target  # pylint: disable=g-import-not-at-top
  leaves, treedef = jax.tree_util.tree_flatten(variables)

  def flat(weights, *arrays):
    return fn(jax.tree_util.tree_unflatten(treedef, list(weights)), *arrays)

  specs = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves)
  with target.lowering_for(platform):
    return jax_export.export(jax.jit(flat), platforms=[platform])(specs, *args)


_CUSTOM_CALL = re.compile(r'stablehlo\.custom_call\s*@([\w.$]+)|call_target_name\s*=\s*"([^"]+)"')


def custom_call_targets(exported: jax_export.Exported) -> List[str]:
  """The custom-call targets a module holds (sorted, unique)."""
  text = exported.mlir_module()
  return sorted({a or b for a, b in _CUSTOM_CALL.findall(text)})


# ------------------------------------------------------------------------------------------------
# The pipeline's programs.


def guided_denoiser(pipe, guidance_scale: float) -> Callable:
  """(variables, x, t, labels) -> one guided evaluation in the checkpoint's convention (the
  pipeline's own `guided_denoiser`), pure in `variables`."""
  def denoise(variables, x, t, labels):
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    return pipe.guided_denoiser(variables, x, t, labels, guidance_scale).astype(jnp.float32)
  return denoise


def pipeline_programs(pipe, batch: int, steps: int, guidance: float,
                      scheduler: Optional[str]) -> Dict[str, Tuple[Callable, list, str]]:
  """name -> (fn(variables, *arrays), [(input name, ShapeDtypeStruct)], how to call)."""
  latents = jax.ShapeDtypeStruct((batch,) + tuple(pipe.latent_shape), jnp.float32)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  times = jax.ShapeDtypeStruct((batch,), jnp.float32)

  def sampler(variables, noise, class_labels):
    final = pipe.sample_latents(variables, noise, class_labels, guidance, steps, scheduler)
    return pipe.decode(variables, final).astype(jnp.float32)

  def decoder(variables, z):
    return pipe.decode(variables, z).astype(jnp.float32)

  return {
      "denoiser": (guided_denoiser(pipe, guidance),
                   [("x", latents), ("t", times), ("labels", labels)],
                   f"denoiser(x, t, labels) -> the guided model output (guidance {guidance}) "
                   "in the checkpoint's units: x the noisy latents NHWC, t its timesteps, "
                   "labels class ids"),
      "decoder": (decoder, [("latents", latents)],
                  "decoder(latents) -> images NHWC in [0, 1] (latents as the sampler ends "
                  "with them, before unscaling)"),
      "sampler": (sampler, [("noise", latents), ("labels", labels)],
                  f"sampler(noise, labels) -> images NHWC in [0, 1] after {steps} steps "
                  f"(guidance {guidance}, scheduler {scheduler or 'of the directory'})"),
  }


def _spec(name: Optional[str], aval) -> Dict[str, Any]:
  spec = {"shape": [int(d) for d in aval.shape], "dtype": str(np.dtype(aval.dtype))}
  return {"name": name, **spec} if name else spec


def export_pipeline(model: str, out: str, *, platform: str = "cuda", batch: int = 1,
                    steps: Optional[int] = None, guidance: Optional[float] = None,
                    scheduler: Optional[str] = None, dtype: str = "float32",
                    artifacts: Sequence[str] = ARTIFACTS) -> Dict[str, Any]:
  """Writes the artifacts of pipeline directory `model` to `out`; returns the manifest."""
  from jaxgen.pipelines import load_pipeline  # pylint: disable=g-import-not-at-top
  if platform not in PLATFORMS:
    raise ConfigError(f"--platform={platform!r}: jax.export lowers for one of {PLATFORMS}.")
  if batch < 1:
    raise ConfigError(f"--batch must be >= 1, got {batch}.")
  unknown = sorted(set(artifacts) - set(ARTIFACTS))
  if unknown or not artifacts:
    raise ConfigError(f"artifacts {list(artifacts)}: choose from {list(ARTIFACTS)}.")
  pipe = load_pipeline(model, dtype=dtype)
  steps = pipe.default_steps if steps is None else int(steps)
  guidance = pipe.default_guidance if guidance is None else float(guidance)
  if steps < 1:
    raise ConfigError(f"--steps must be >= 1, got {steps}.")
  variables = jax.device_get(pipe.variables)
  names = weight_names(variables)
  programs = pipeline_programs(pipe, batch, steps, guidance, scheduler)
  os.makedirs(out, exist_ok=True)
  entries = {}
  for name in artifacts:
    fn, inputs, how = programs[name]
    exported = export_function(fn, variables, [spec for _, spec in inputs], platform)
    path = os.path.join(out, name + SUFFIX)
    with open(path, "wb") as f:
      f.write(exported.serialize())
    entries[name] = {
        "file": name + SUFFIX, "call": how,
        "inputs": [_spec(n, s) for n, s in inputs],
        "outputs": [_spec(None, a) for a in exported.out_avals],
        "custom_calls": custom_call_targets(exported),
        "calling_convention_version": exported.calling_convention_version,
    }
  leaves = [np.asarray(x) for x in jax.tree.leaves(variables)]
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(dict(zip(names, leaves)), os.path.join(out, WEIGHTS))
  manifest = {
      "format": FORMAT, "jax_version": jax.__version__, "platform": platform,
      "pipeline": type(pipe).__name__, "model": os.path.abspath(model), "batch": batch,
      "dtype": dtype, "steps": steps, "guidance": guidance, "scheduler": scheduler,
      "latent_shape": list(pipe.latent_shape), "num_classes": pipe.num_classes,
      "weights": {"file": WEIGHTS, "count": len(names),
                  "bytes": int(sum(x.nbytes for x in leaves)), "names": names},
      "artifacts": entries,
      "usage": ("from jaxgen.export import load; programs = load(OUT); "
                "images = programs['sampler'](noise, labels)  # the arrays only, as "
                "'inputs' lists them; the weights are bound by load"),
  }
  with open(os.path.join(out, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1)
  return manifest


# ------------------------------------------------------------------------------------------------
# Loading (jax + numpy + safetensors only).


@dataclasses.dataclass
class Program:
  """A deserialized artifact bound to its weights: `program(*arrays)` with the arrays its
  manifest entry lists (converted to the declared dtypes)."""
  name: str
  exported: jax_export.Exported
  weights: Tuple[jax.Array, ...]
  inputs: List[Dict[str, Any]]
  call_doc: str

  def __post_init__(self):
    self._call = jax.jit(self.exported.call)

  def __call__(self, *arrays):
    if len(arrays) != len(self.inputs):
      raise ConfigError(f"{self.name} takes {len(self.inputs)} arrays "
                        f"({[s['name'] for s in self.inputs]}), got {len(arrays)}: "
                        f"{self.call_doc}.")
    cast = []
    for spec, array in zip(self.inputs, arrays):
      array = np.asarray(array, spec["dtype"])
      if list(array.shape) != spec["shape"]:
        raise ConfigError(f"{self.name}: {spec['name']} must have shape {spec['shape']} (the "
                          f"exported batch); got {list(array.shape)}.")
      cast.append(array)
    return self._call(self.weights, *cast)


def read_manifest(out: str) -> Dict[str, Any]:
  path = os.path.join(out, MANIFEST)
  if not os.path.isfile(path):
    raise WeightsError(f"{path} not found: pass a directory `python -m jaxgen.export` wrote.")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise WeightsError(f"{path} is not valid JSON ({e}); export again.") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise WeightsError(f"{path} is not a {FORMAT} manifest.")
  return manifest


def load(out: str, device: Optional[jax.Device] = None) -> Dict[str, Program]:
  """The artifacts in `out` as callables (name -> Program), the weights read once and placed
  on `device` (default: the first device)."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  manifest = read_manifest(out)
  spec = manifest["weights"]
  path = os.path.join(out, spec["file"])
  try:
    tensors = load_file(path)
  except Exception as e:  # pylint: disable=broad-except  (safetensors' own error types)
    raise WeightsError(f"{path} is unreadable ({type(e).__name__}: {e}); export again.") from None
  missing = [n for n in spec["names"] if n not in tensors]
  if missing:
    raise WeightsError(f"{path} lacks {len(missing)} weights the manifest lists "
                       f"(e.g. {missing[:3]}); export again.")
  device = device or jax.devices()[0]
  weights = tuple(jax.device_put(tensors[n], device) for n in spec["names"])
  programs = {}
  for name, entry in manifest["artifacts"].items():
    with open(os.path.join(out, entry["file"]), "rb") as f:
      exported = jax_export.deserialize(bytearray(f.read()))
    programs[name] = Program(name, exported, weights, entry["inputs"], entry["call"])
  return programs


# ------------------------------------------------------------------------------------------------
# Command line.


def _define_flags():
  # Defined when the command runs: absl is not a dependency of the loader above.
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("model", None, "Pipeline directory (diffusers or DC-AE diffusion).")
  flags.DEFINE_enum("platform", "cuda", list(PLATFORMS), "jax.export lowering platform.")
  flags.DEFINE_integer("batch", 1, "Images per call of every artifact.")
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_integer("steps", None, "Sampler steps (default: the checkpoint's recipe).")
  flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (default: the recipe's).")
  flags.DEFINE_string("scheduler", None, "Sampling algorithm (default: the directory's own).")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter / activation dtype.")
  flags.DEFINE_list("artifacts", list(ARTIFACTS), "Which programs to export.")


@cli
def run(argv: List[str]) -> int:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags_ = flags.FLAGS
  if len(argv) > 1:
    raise ConfigError(f"unexpected arguments {argv[1:]}; see --help.")
  if not flags_.model or not flags_.out:
    raise ConfigError("--model=DIR (a pipeline directory) and --out=DIR are required.")
  manifest = export_pipeline(
      flags_.model, flags_.out, platform=flags_.platform, batch=flags_.batch,
      steps=flags_.steps, guidance=flags_.guidance, scheduler=flags_.scheduler,
      dtype=flags_.dtype, artifacts=flags_.artifacts)
  sizes = {n: os.path.getsize(os.path.join(flags_.out, e["file"]))
           for n, e in manifest["artifacts"].items()}
  print(f"wrote {', '.join(f'{n} ({s / 1e6:.1f} MB)' for n, s in sizes.items())} and "
        f"{manifest['weights']['count']} weights ({manifest['weights']['bytes'] / 1e6:.1f} MB) "
        f"for {manifest['platform']} to {flags_.out}", flush=True)
  return 0


def main():
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(run)


if __name__ == "__main__":
  main()
