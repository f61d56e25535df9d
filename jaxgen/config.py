"""Config loading: `configs/x.py[:preset]` files with `get_config(arg)`, plus `a.b=v` overrides.

Configs are ml_collections ConfigDicts, locked after loading so that a misspelt key is an error
instead of a silently ignored setting.
"""

import ast
import importlib.util
import os
import sys
from typing import Iterable, Optional, Tuple

import ml_collections

from jaxgen.errors import ConfigError

# Sections every training config names (issue 2); checked so a config file cannot forget one.
REQUIRED_SECTIONS = ("model", "data", "diffusion", "optimizer", "training", "checkpoint",
                     "sample", "mesh")


def split_config_arg(spec: str) -> Tuple[str, Optional[str]]:
  """'configs/x.py:smoke' -> ('configs/x.py', 'smoke')."""
  path, _, arg = spec.partition(":")
  return path, (arg or None)


def load_config(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """Loads `FILE[:preset]` and applies `a.b=v` overrides; unknown keys raise ConfigError."""
  path, arg = split_config_arg(spec)
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist; pass --config=configs/<name>.py")
  module_spec = importlib.util.spec_from_file_location(
      "jaxgen_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  # Config files import shared defaults as `configs.common`: put the configs' parent on the path.
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} has no get_config(arg) function")
  try:
    config = module.get_config(arg) if arg is not None else module.get_config()
  except ValueError as e:
    raise ConfigError(f"{spec}: {e}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}:get_config must return an ml_collections.ConfigDict")
  missing = [s for s in REQUIRED_SECTIONS if s not in config]
  if missing:
    raise ConfigError(f"{path} is missing config sections {missing}")
  config = ml_collections.ConfigDict(config.to_dict())  # Detach from FieldReferences.
  config.lock()
  for item in overrides:
    apply_override(config, item)
  return config


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
  """Applies one `a.b.c=value` override; the value is parsed to the existing field's type."""
  key, sep, raw = item.partition("=")
  if not sep:
    raise ConfigError(f"override {item!r} must look like --config.a.b=value")
  parts = key.split(".")
  node = config
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = ".".join(parts[:i]) or "config"
      known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      raise ConfigError(f"unknown config key {key!r}: {where} has no field {part!r}; "
                        f"known fields: {known}")
    if i < len(parts) - 1:
      node = node[part]
  old = node[parts[-1]]
  value = _parse_like(raw, old, key)
  with node.unlocked():
    node[parts[-1]] = value


def _parse_like(raw: str, old, key: str):
  if isinstance(old, str):
    return raw
  if isinstance(old, bool):
    if raw.lower() in ("true", "1", "yes"):
      return True
    if raw.lower() in ("false", "0", "no"):
      return False
    raise ConfigError(f"--config.{key} expects true/false, got {raw!r}")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    if old is None:
      return raw
    raise ConfigError(f"--config.{key}={raw!r} is not a valid {type(old).__name__}") from None
  if isinstance(old, float) and isinstance(value, int):
    value = float(value)
  if old is not None and not isinstance(value, type(old)) and not (
      isinstance(old, (tuple, list)) and isinstance(value, (tuple, list))):
    raise ConfigError(f"--config.{key}={raw!r}: expected {type(old).__name__}, "
                      f"got {type(value).__name__}")
  if isinstance(old, tuple):
    value = tuple(value)
  return value


# Model-section keys that are no constructor argument: `init_from` (weights to start a fresh
# run from; jaxgen/train/init_from.py).
NON_MODEL_KEYS = ("init_from",)


def model_kwargs(model_config: ml_collections.ConfigDict) -> dict:
  """The model section minus its `name` (and NON_MODEL_KEYS): the constructor's arguments."""
  kwargs = model_config.to_dict()
  kwargs.pop("name")
  for key in NON_MODEL_KEYS:
    kwargs.pop(key, None)
  return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def build_model(model_config: ml_collections.ConfigDict):
  """Builds `MODELS.get(config.name)(**rest)`; a wrong keyword is a ConfigError."""
  from jaxgen.registry import MODELS  # pylint: disable=g-import-not-at-top
  ctor = MODELS.get(model_config.name)
  try:
    return ctor(**model_kwargs(model_config))
  except TypeError as e:
    raise ConfigError(f"model {model_config.name!r} rejected its config: {e}") from None
