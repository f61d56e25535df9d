"""Fine-tuning from published weights: `model.init_from=DIR` starts a fresh run from them.

DIR is one of
  a diffusers pipeline    model_index.json + one folder per component; the denoiser (`transformer/`
                          of a DiTPipeline, else `unet/`) is converted
  a diffusers model       config.json with `_class_name`, read by `jaxgen.convert.from_diffusers`
  a converted directory   written by `python -m jaxgen.convert`, read by `load_converted`
  FastComposer's release  its pytorch_model.bin, or the pipeline directory the convert CLI
                          makes of it: all components (text / image encoders, unet, vae,
                          postfuse_module), named as `jaxgen.models.fastcomposer.FastComposer`

`jaxgen.train.loop.build` calls `warm_start` right after a fresh run's initialisation; a workdir
that has a checkpoint resumes from it and init_from is not read (`note_resumed` says so). The
weights' parameters are matched to the config's model by name ("blocks_0/attn/to_q/kernel"):
  * same name and shape: loaded (cast to the model's parameter dtype);
  * a class-label table (`LabelEmbedder`: num_classes + 1 rows, the last the null label of
    classifier-free guidance) with another class count: resized. Rows of the classes both have
    are kept, the weights' null row becomes the new null row, and the rows of classes the
    weights lack keep the model's initialisation;
  * any other shape mismatch: a ConfigError naming the parameter, both shapes and the model
    fields that differ (the fix);
  * parameters the weights lack keep their initial values, and weights the model has no
    parameter for are left out: both are named in the log (none loaded at all is an error).
Module fields that differ without changing a shape (e.g. a diffusers DiT's time_freq_shift=1 and
norm_eps=1e-5) are listed in the log too: the weights were trained with those values. The EMA
starts from the merged weights and the optimizer state is the fresh one.
"""

import dataclasses
import functools
import json
import os
from typing import Any, Dict, List, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert.common import flatten
from jaxgen.errors import ConfigError

KEY = "model.init_from"
# Pipeline components that hold the denoiser, in the order they are looked for.
DENOISER_COMPONENTS = ("transformer", "unet")
# A `LabelEmbedder` table (jaxgen.nn.embeddings): its nn.Embed is named "embedding_table".
LABEL_TABLE_SUFFIX = "embedding_table/embedding"
_MAX_NAMES = 40  # Parameter names listed per log line.


def load_weights(path: str) -> Tuple[Any, Dict, str]:
  """(module, variables, description) of the weights in `path` (a form the module doc lists)."""
  from jaxgen.convert import from_diffusers, load_converted  # pylint: disable=g-import-not-at-top
  from jaxgen.convert import fastcomposer  # pylint: disable=g-import-not-at-top
  from jaxgen.convert.saved import is_converted  # pylint: disable=g-import-not-at-top
  if fastcomposer.handles(path):  # FastComposer's released pytorch_model.bin: every component.
    module, variables = fastcomposer.from_release(path)
    return module, variables, f"the FastComposer release {path}"
  if not os.path.isdir(path):
    raise ConfigError(f"{KEY}={path}: no such directory; pass a diffusers pipeline or model "
                      "directory, or one written by python -m jaxgen.convert")
  if is_converted(path):
    module, variables = load_converted(path)
    return module, variables, f"converted {type(module).__name__} in {path}"
  index_path = os.path.join(path, "model_index.json")
  if os.path.isfile(index_path):
    with open(index_path) as f:
      index = json.load(f)
    if index.get("_class_name") == fastcomposer.PIPELINE_CLASS:  # All components, not the unet.
      module, variables = fastcomposer.from_pipeline_dir(path)
      return module, variables, f"the FastComposer pipeline {path}"
    present = [c for c in DENOISER_COMPONENTS
               if isinstance(index.get(c), list) and any(index[c])]
    if not present:
      components = sorted(k for k in index if not k.startswith("_"))
      raise ConfigError(f"{KEY}={path}: pipeline {index.get('_class_name')!r} has no "
                        f"denoiser component {list(DENOISER_COMPONENTS)} (it has {components}); "
                        "pass the denoiser's model directory instead")
    module, variables = from_diffusers(os.path.join(path, present[0]))
    return module, variables, (f"diffusers {index.get('_class_name')} {present[0]}/ "
                               f"({type(module).__name__}) in {path}")
  if os.path.isfile(os.path.join(path, "config.json")):
    module, variables = from_diffusers(path)
    return module, variables, f"diffusers {type(module).__name__} in {path}"
  raise ConfigError(f"{KEY}={path}: neither a diffusers pipeline (model_index.json), a "
                    "diffusers model (config.json) nor a converted directory (jaxgen_model.json)")


def resize_label_table(source, initial):
  """A (S + 1, d) class table (null row last) refitted to `initial`'s (T + 1, d) rows.

  Classes 0..min(S, T)-1 and the null row come from `source`; the other rows stay `initial`'s.
  Works under jit (the output keeps `initial`'s sharding).
  """
  s, t = source.shape[0] - 1, initial.shape[0] - 1
  k = min(s, t)
  source = jnp.asarray(source, initial.dtype)
  return jnp.asarray(initial).at[:k].set(source[:k]).at[t].set(source[s])


def _fields(module) -> Dict[str, Any]:
  from jaxgen.convert.saved import module_fields  # pylint: disable=g-import-not-at-top
  # dtype is the computation dtype (training.compute_dtype), not a property of the weights.
  return {k: v for k, v in module_fields(module).items() if k != "dtype"}


def _comparable(value):
  """A field value with the computation dtype left out of submodules too (a composite model
  in training.compute_dtype has bfloat16 towers)."""
  if isinstance(value, nn.Module):
    return type(value), {k: _comparable(v) for k, v in _fields(value).items()}
  return value


def field_differences(source_module, model) -> Dict[str, Tuple[Any, Any]]:
  """{field: (weights' value, config's value)} for modules of one class; {} otherwise."""
  if source_module is None or type(source_module) is not type(model):
    return {}
  src, own = _fields(source_module), _fields(model)
  return {k: (src[k], own[k]) for k in src
          if k in own and _comparable(src[k]) != _comparable(own[k])}


def _overrides(diffs: Mapping[str, Tuple[Any, Any]]) -> str:
  """'model.a=1, model.b=2': the settings (config file or --config.model.*) to change."""
  return ", ".join(f"model.{k}={v[0]!r}" for k, v in diffs.items())


def _names(names: List[str]) -> str:
  more = f" ... and {len(names) - _MAX_NAMES} more" if len(names) > _MAX_NAMES else ""
  return ", ".join(names[:_MAX_NAMES]) + more


@dataclasses.dataclass
class Merge:
  """What `merge` decided for each parameter (flat "a/b/kernel" names)."""
  loaded: Dict[str, np.ndarray]   # Same name and shape: the weights' values.
  resized: Dict[str, np.ndarray]  # Label tables of another class count: the weights' tables.
  resized_rows: Dict[str, Tuple[int, int]]  # name -> (rows in the weights, rows in the model).
  not_loaded: List[str]           # The model's parameters that keep their initial values.
  unused: List[str]               # The weights' tensors that no parameter takes.


def merge(target: Mapping, source: Mapping, *, where: str, source_module=None,
          model=None) -> Merge:
  """Matches `source` params (nested dict) to `target`'s (nested; leaves with .shape).

  Raises ConfigError for a shape mismatch other than a label table's row count, and when
  nothing matches. `where` names the weights in messages; the two modules, when given, name
  the fields that differ (the fix).
  """
  want, got = flatten(target), flatten(source)
  loaded, resized, rows, mismatched = {}, {}, {}, []
  for name in sorted(set(want) & set(got)):
    value = np.asarray(got[name])
    w, g = tuple(want[name].shape), tuple(value.shape)
    if w == g:
      loaded[name] = value
    elif name.endswith(LABEL_TABLE_SUFFIX) and len(w) == len(g) == 2 and w[1] == g[1]:
      resized[name], rows[name] = value, (g[0], w[0])
    else:
      mismatched.append(f"{name}: weights {g} vs model {w}")
  if mismatched:
    # The class count is fixed by resizing; the other differing fields are what to change.
    diffs = {k: v for k, v in field_differences(source_module, model).items()
             if k != "num_classes"}
    fix = (f"build the model the weights describe: set {_overrides(diffs)} (then any "
           "remaining mismatch comes from the data: its channels or image size)" if diffs else
           "build the model the weights describe (same architecture, widths, depth, patch "
           "size and channels, and the image size for learned position tables)")
    raise ConfigError(f"{KEY}={where}: {len(mismatched)} parameter(s) do not fit this "
                      f"config's model: {_names(mismatched)}. Fix: {fix}.")
  if not loaded and not resized:
    kind = type(source_module).__name__ if source_module is not None else "the weights"
    raise ConfigError(
        f"{KEY}={where}: none of the model's {len(want)} parameters is in the weights "
        f"({kind}, {len(got)} tensors, e.g. {_names(sorted(got)[:5])}); set model.name and "
        "its fields to the architecture the weights belong to")
  return Merge(loaded, resized, rows, sorted(set(want) - set(got)), sorted(set(got) - set(want)))


def warm_start(config, task, state):
  """A fresh run's state with `config.model.init_from`'s weights merged in (no-op without it).

  `task.model` is the config's model. Arrays keep the shardings `state` has; params and EMA
  get separate buffers (the train step donates both).
  """
  src = str(config.model.get("init_from", "") or "")
  if not src:
    return state
  source_module, variables, description = load_weights(src)
  variables = dict(variables)
  source_params = variables.pop("params", {})
  result = merge(state.params, source_params, where=src, source_module=source_module,
                 model=task.model)

  def new_leaf(path, old):
    """The merged value of one parameter, a new buffer where it changes."""
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    if name in result.loaded:
      return jax.device_put(np.asarray(result.loaded[name], old.dtype), old.sharding)
    if name in result.resized:
      return jax.jit(functools.partial(resize_label_table, result.resized[name]),
                     out_shardings=old.sharding)(old)
    return old

  params = jax.tree_util.tree_map_with_path(new_leaf, state.params)
  ema = jax.tree_util.tree_map_with_path(new_leaf, state.ema_params)
  if jax.process_index() == 0:
    print(_report(description, result, sorted(variables),
                  field_differences(source_module, task.model)), flush=True)
  return state.replace(params=params, ema_params=ema)


def _report(description: str, result: Merge, other_collections: List[str],
            diffs: Mapping[str, Tuple[Any, Any]]) -> str:
  """The log lines of a merge."""
  n = len(result.loaded) + len(result.resized)
  lines = [f"{KEY}: initialised {n} of {n + len(result.not_loaded)} parameter tensors from "
           f"{description}; the EMA starts from them"]
  for name, (src_rows, rows) in result.resized_rows.items():
    lines.append(f"  resized {name} from {src_rows} to {rows} rows (classes {src_rows - 1} -> "
                 f"{rows - 1}): classes 0..{min(src_rows, rows) - 2} keep the weights' rows, "
                 f"the null-class row {src_rows - 1} maps to the new null row {rows - 1}, "
                 f"{max(rows - src_rows, 0)} new class rows initialised as the model inits them")
  if result.not_loaded:
    lines.append(f"  not in the weights, left as initialised ({len(result.not_loaded)}): "
                 f"{_names(result.not_loaded)}")
  unused = result.unused + [f"{c} (collection)" for c in other_collections]
  if unused:
    lines.append(f"  in the weights but not used by the model ({len(unused)}): {_names(unused)}")
  notes = {k: v for k, v in diffs.items() if k != "num_classes"}
  if notes:
    lines.append("  note: the weights' model differs in fields that change no shape: " +
                 ", ".join(f"{k}={v[0]!r} (config: {v[1]!r})" for k, v in notes.items()) +
                 f"; set {_overrides(notes)} to compute as they were trained")
  return "\n".join(lines)


def note_resumed(config, directory: str, step: int) -> None:
  """Says that a resumed run does not read model.init_from."""
  src = str(config.model.get("init_from", "") or "")
  if src and jax.process_index() == 0:
    print(f"{KEY}={src} not applied: the weights come from this workdir's checkpoint (step "
          f"{step} in {directory}); init_from applies only when training starts fresh",
          flush=True)
