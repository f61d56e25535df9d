"""Converted models on disk, and one loader for every form an autoencoder comes in.

A converted directory (written by `python -m jaxgen.convert`) holds

  jaxgen_model.json   {"format": "jaxgen-converted", "version": 1, "module": "pkg.mod.Class",
                       "fields": {...the module's dataclass fields...}, "source": ...,
                       "num_params": ..., plus the source config's scaling_factor when present}
  variables/          an orbax (StandardSave) checkpoint of the variables dict

`load_converted(dir) -> (module, variables)` rebuilds the module from its fields (tuples,
dtypes and submodule fields such as CLIPModel's towers restored) and reads the variables.
`convert_any(path)` converts any source the converters read (dispatching on config.json);
`load_autoencoder(path)` accepts a converted directory, a jaxgen training workdir (task
"autoencoder"), a diffusers model directory or an original efficientvit DC-AE checkpoint.
"""

import dataclasses
import importlib
import json
import os
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert.common import describe_exception, read_json
from jaxgen.errors import CheckpointError, WeightsError

FORMAT = "jaxgen-converted"
VERSION = 1
META_NAME = "jaxgen_model.json"
VARIABLES_DIR = "variables"


def _encode(value: Any):
  """A module field -> JSON (dtypes become {"dtype": name}; a submodule field, as CLIPModel's
  towers, {"module": "pkg.mod.Class", "fields": {...}})."""
  if isinstance(value, nn.Module):
    cls = type(value)
    return {"module": f"{cls.__module__}.{cls.__qualname__}",
            "fields": {k: _encode(v) for k, v in module_fields(value).items()}}
  if isinstance(value, (tuple, list)):
    return [_encode(v) for v in value]
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  try:
    return {"dtype": jnp.dtype(value).name}
  except TypeError:
    raise WeightsError(f"cannot store module field value {value!r} in {META_NAME}") from None


def _decode(value: Any, meta_path: str):
  if isinstance(value, list):
    return tuple(_decode(v, meta_path) for v in value)
  if isinstance(value, dict) and set(value) == {"dtype"}:
    return jnp.dtype(value["dtype"])
  if isinstance(value, dict) and set(value) == {"module", "fields"}:
    return _build_module(value, meta_path)
  return value


def _build_module(spec: Dict[str, Any], meta_path: str):
  """The jaxgen module {"module": "pkg.mod.Class", "fields": {...}} describes."""
  module_path, _, cls_name = str(spec["module"]).rpartition(".")
  if not module_path.startswith("jaxgen."):
    raise CheckpointError(f"{meta_path}: module {spec['module']!r} is not a jaxgen module")
  try:
    cls = getattr(importlib.import_module(module_path), cls_name)
  except (ImportError, AttributeError):
    raise CheckpointError(f"{meta_path}: module {spec['module']!r} does not exist in this "
                          "jaxgen version; convert the source again") from None
  return cls(**{k: _decode(v, meta_path) for k, v in spec["fields"].items()})


def module_fields(module) -> Dict[str, Any]:
  """The constructor fields of a flax module (parent and name left out)."""
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
          if f.name not in ("parent", "name")}


def save_converted(dst: str, module, variables, source: str = "",
                   extra: Optional[Dict[str, Any]] = None) -> str:
  """Writes `dst`/jaxgen_model.json and `dst`/variables (orbax). Returns dst."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  dst = os.path.abspath(dst)
  target = os.path.join(dst, VARIABLES_DIR)
  if os.path.exists(target):
    raise CheckpointError(f"{target} already exists; pass a new --dst or remove it")
  os.makedirs(dst, exist_ok=True)
  cls = type(module)
  meta = {"format": FORMAT, "version": VERSION, "module": f"{cls.__module__}.{cls.__qualname__}",
          "fields": {k: _encode(v) for k, v in module_fields(module).items()},
          "source": source,
          "num_params": int(sum(np.size(x) for x in jax.tree.leaves(variables.get("params", {}))))}
  meta.update(extra or {})
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(target, jax.tree.map(np.asarray, dict(variables)))
  checkpointer.wait_until_finished()
  checkpointer.close()
  with open(os.path.join(dst, META_NAME), "w") as f:
    json.dump(meta, f, indent=1)
  return dst


def is_converted(path: str) -> bool:
  return os.path.isfile(os.path.join(path, META_NAME))


def load_converted(path: str) -> Tuple[Any, Dict]:
  """(module, variables) from a directory written by `save_converted` / the convert CLI."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  meta_path = os.path.join(path, META_NAME)
  if not os.path.isfile(meta_path):
    raise CheckpointError(f"{path} is not a converted jaxgen model ({META_NAME} missing); "
                          "write one with python -m jaxgen.convert --src=... --dst=...")
  meta = read_json(meta_path, "the converted model's description (python -m jaxgen.convert "
                              "writes it)", CheckpointError)
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise CheckpointError(f"{meta_path}: format {meta.get('format')!r} version "
                          f"{meta.get('version')!r}; expected {FORMAT!r} version {VERSION}")
  module = _build_module(meta, meta_path)
  try:
    variables = ocp.StandardCheckpointer().restore(
        os.path.abspath(os.path.join(path, VARIABLES_DIR)))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{path}/{VARIABLES_DIR} is unreadable ({describe_exception(e)})"
                          ) from None
  return module, jax.tree.map(jnp.asarray, dict(variables))


def load_autoencoder(path: str, use_ema: Optional[bool] = None) -> Tuple[Any, Dict]:
  """(module, variables) of an autoencoder from any of its on-disk forms.

  `path`: a converted directory (jaxgen_model.json), a training workdir (checkpoints/, its
  newest step; `use_ema` picks EMA or raw weights, default the config's
  autoencoder.use_ema), a diffusers directory (config.json with _class_name) or an original
  efficientvit DC-AE checkpoint (directory or .safetensors / .pt file).
  """
  if not os.path.exists(path):
    raise CheckpointError(f"{path} does not exist")
  if os.path.isdir(path) and is_converted(path):
    return load_converted(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    from jaxgen.tasks.autoencoder import load_workdir  # pylint: disable=g-import-not-at-top
    return load_workdir(path, use_ema)
  return convert_any(path)[:2]


def convert_any(path: str, name: Optional[str] = None):
  """(module, variables, description) from any source directory or file a converter reads.

  A directory's config.json picks the converter: `_class_name` -> diffusers
  (`jaxgen.convert.from_diffusers`), `model_type` -> transformers (`from_transformers`),
  `model_name` (or no config.json, or a file) -> the original efficientvit DC-AE layout, whose
  variant `name` gives when nothing else does. A .bin file, or a file holding FastComposer's
  state dict, is FastComposer's release (`jaxgen.convert.fastcomposer`).
  """
  if not os.path.exists(path):
    what = f"is a broken link to {os.readlink(path)}" if os.path.islink(path) else "does not exist"
    raise WeightsError(f"{path} {what}; expected a diffusers or transformers model "
                       "directory (config.json + safetensors weights) or a DC-AE checkpoint")
  from jaxgen.convert import fastcomposer  # pylint: disable=g-import-not-at-top
  if fastcomposer.handles(path):  # FastComposer's single-file release (pytorch_model.bin).
    module, variables = fastcomposer.from_release(path)
    return module, variables, "FastComposer release"
  config_path = os.path.join(path, "config.json")
  config = {}
  if os.path.isdir(path) and os.path.lexists(config_path):
    config = read_json(config_path, "a model config: diffusers (_class_name), transformers "
                                    "(model_type) or efficientvit DC-AE (model_name)")
  elif os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json")):
    parts = sorted(d for d in os.listdir(path)
                   if os.path.isfile(os.path.join(path, d, "config.json")))
    raise WeightsError(f"{path} is a diffusers pipeline (model_index.json); convert one of its "
                       f"models: {[os.path.join(path, d) for d in parts]}")
  if config.get("_class_name"):
    from jaxgen.convert import from_diffusers  # pylint: disable=g-import-not-at-top
    module, variables = from_diffusers(path)
    return module, variables, f"diffusers {config['_class_name']}"
  if config.get("model_type"):
    from jaxgen.convert import from_transformers  # pylint: disable=g-import-not-at-top
    module, variables = from_transformers(path)
    return module, variables, f"transformers {config['model_type']}"
  if os.path.isdir(path) and not config.get("model_name") and not name:
    if config:
      raise WeightsError(f"{config_path} names no model: it has none of _class_name (diffusers), "
                         "model_type (transformers), model_name (efficientvit DC-AE); for an "
                         "original DC-AE checkpoint pass --name=VARIANT (e.g. dc-ae-f32c32-in-1.0)")
    if is_converted(path):
      raise WeightsError(f"{path} is already a converted jaxgen directory; load it with "
                         "jaxgen.convert.load_converted")
    raise WeightsError(f"{config_path} not found ({path} holds {sorted(os.listdir(path))[:20]}); "
                       "expected a diffusers or transformers model directory (config.json + "
                       "safetensors weights: download config.json again) or, for an original "
                       "efficientvit DC-AE checkpoint, --name=VARIANT (e.g. dc-ae-f32c32-in-1.0)")
  from jaxgen.convert import dcae  # pylint: disable=g-import-not-at-top
  module, variables = dcae.from_original(path, name=name)
  return module, variables, "original efficientvit DC-AE"
