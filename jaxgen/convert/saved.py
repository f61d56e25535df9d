"""Converted models on disk, and one loader for every form an autoencoder comes in.

A converted directory (written by `python -m jaxgen.convert`) holds

  jaxgen_model.json   {"format": "jaxgen-converted", "version": 1, "module": "pkg.mod.Class",
                       "fields": {...the module's dataclass fields...}, "source": ...,
                       "num_params": ..., plus the source config's scaling_factor when present}
  variables/          an orbax (StandardSave) checkpoint of the variables dict

`load_converted(dir) -> (module, variables)` rebuilds the module from its fields (tuples and
dtypes restored) and reads the variables. `load_autoencoder(path)` accepts a converted
directory, a jaxgen training workdir (task "autoencoder"), a diffusers model directory or
an original efficientvit DC-AE checkpoint.
"""

import dataclasses
import importlib
import json
import os
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import CheckpointError, WeightsError

FORMAT = "jaxgen-converted"
VERSION = 1
META_NAME = "jaxgen_model.json"
VARIABLES_DIR = "variables"


def _encode(value: Any):
  """A module field -> JSON (dtypes become {"dtype": name})."""
  if isinstance(value, (tuple, list)):
    return [_encode(v) for v in value]
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  try:
    return {"dtype": jnp.dtype(value).name}
  except TypeError:
    raise WeightsError(f"cannot store module field value {value!r} in {META_NAME}") from None


def _decode(value: Any):
  if isinstance(value, list):
    return tuple(_decode(v) for v in value)
  if isinstance(value, dict) and set(value) == {"dtype"}:
    return jnp.dtype(value["dtype"])
  return value


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
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise CheckpointError(f"{meta_path}: format {meta.get('format')!r} version "
                          f"{meta.get('version')!r}; expected {FORMAT!r} version {VERSION}")
  module_path, _, cls_name = meta["module"].rpartition(".")
  if not module_path.startswith("jaxgen."):
    raise CheckpointError(f"{meta_path}: module {meta['module']!r} is not a jaxgen module")
  cls = getattr(importlib.import_module(module_path), cls_name)
  module = cls(**{k: _decode(v) for k, v in meta["fields"].items()})
  try:
    variables = ocp.StandardCheckpointer().restore(
        os.path.abspath(os.path.join(path, VARIABLES_DIR)))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{path}/{VARIABLES_DIR} is unreadable ({type(e).__name__}: "
                          f"{str(e)[:300]})") from None
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
  """(module, variables, description) from a diffusers directory or an original checkpoint."""
  config_path = os.path.join(path, "config.json") if os.path.isdir(path) else ""
  config = {}
  if config_path and os.path.isfile(config_path):
    with open(config_path) as f:
      config = json.load(f)
  if config.get("_class_name"):
    from jaxgen.convert import from_diffusers  # pylint: disable=g-import-not-at-top
    module, variables = from_diffusers(path)
    return module, variables, f"diffusers {config['_class_name']}"
  from jaxgen.convert import dcae  # pylint: disable=g-import-not-at-top
  if os.path.isfile(path) or config.get("model_name") or any(
      os.path.isfile(os.path.join(path, f))
      for f in ("model.safetensors", "model.pt", "model.pth")):
    module, variables = dcae.from_original(path, name=name)
    return module, variables, "original efficientvit DC-AE"
  raise WeightsError(f"{path}: not a diffusers model directory (config.json with _class_name), "
                     "an efficientvit DC-AE checkpoint, a converted jaxgen directory or a "
                     "training workdir")
