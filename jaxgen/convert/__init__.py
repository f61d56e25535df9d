"""Weight conversion from diffusers / transformers directories to jaxgen modules.

`model, variables = from_diffusers(path)` picks the converter by config.json's `_class_name`;
`from_transformers(path)` does the same for transformers directories by `model_type`.
`python -m jaxgen.convert --src=DIR --dst=DIR` writes a converted directory;
`load_converted(dir)` reads it back and `load_autoencoder(path)` reads any autoencoder form
(converted, training workdir, diffusers, original); both live in `jaxgen.convert.saved`.
"""

import os

from jaxgen.convert.common import naming_source, read_json, weights_file
from jaxgen.errors import WeightsError

# diffusers `_class_name` -> module under jaxgen.convert exposing `from_diffusers(path)`.
DIFFUSERS_CONVERTERS = {
    "AutoencoderDC": "jaxgen.convert.dcae",
    "AutoencoderKL": "jaxgen.convert.vae_kl",
    "DiTTransformer2DModel": "jaxgen.convert.dit",
    "Transformer2DModel": "jaxgen.convert.dit",  # The DiT hub checkpoints' legacy class name.
    "UNet2DConditionModel": "jaxgen.convert.unet2d_condition",
}


def _dispatch(path: str, library: str, key: str, weights_name: str, converters: dict):
  """The (module, variables) of the converter that `converters` names for config.json[key]."""
  import importlib  # pylint: disable=g-import-not-at-top
  config_path = os.path.join(path, "config.json")
  if not os.path.isdir(path):
    raise WeightsError(f"{path} is not a directory: pass a {library} model directory "
                       f"(config.json + {weights_name}).")
  name = read_json(config_path, f"a {library} model config (with {key!r}) next to "
                                f"{weights_name}").get(key)
  if name not in converters:
    raise WeightsError(f"{config_path}: {library} {key} {name!r} has no converter; "
                       f"supported: {sorted(converters)}.")
  # Converters check tensors (check_complete) without knowing the file; name it for them.
  with naming_source(weights_file(path, weights_name)):
    return getattr(importlib.import_module(converters[name]), f"from_{library}")(path)


def from_diffusers(path: str):
  """Returns (flax module, variables) for a diffusers-format model directory."""
  return _dispatch(path, "diffusers", "_class_name", "diffusion_pytorch_model.safetensors",
                   DIFFUSERS_CONVERTERS)


# transformers config `model_type` -> module under jaxgen.convert exposing
# `from_transformers(path)`.
TRANSFORMERS_CONVERTERS = {
    "clip": "jaxgen.convert.clip",
    "clip_text_model": "jaxgen.convert.clip",
    "clip_vision_model": "jaxgen.convert.clip",
}


def from_transformers(path: str):
  """Returns (flax module, variables) for a transformers-format model directory
  (config.json + model.safetensors, as `save_pretrained` writes it)."""
  return _dispatch(path, "transformers", "model_type", "model.safetensors",
                   TRANSFORMERS_CONVERTERS)


def load_converted(path: str):
  """(module, variables) from a directory written by `python -m jaxgen.convert`."""
  from jaxgen.convert.saved import load_converted as load  # pylint: disable=g-import-not-at-top
  return load(path)


def load_autoencoder(path: str, use_ema=None):
  """(module, variables) of an autoencoder: converted dir, training workdir, diffusers dir or
  original efficientvit checkpoint."""
  from jaxgen.convert.saved import load_autoencoder as load  # pylint: disable=g-import-not-at-top
  return load(path, use_ema)
