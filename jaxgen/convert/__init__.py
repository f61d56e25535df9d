"""Weight conversion from diffusers / transformers directories to jaxgen modules.

`model, variables = from_diffusers(path)` picks the converter by config.json's `_class_name`.
`python -m jaxgen.convert --src=DIR --dst=DIR` writes a converted directory;
`load_converted(dir)` reads it back and `load_autoencoder(path)` reads any autoencoder form
(converted, training workdir, diffusers, original); both live in `jaxgen.convert.saved`.
"""

import json
import os

from jaxgen.errors import WeightsError

# diffusers `_class_name` -> module under jaxgen.convert exposing `from_diffusers(path)`.
DIFFUSERS_CONVERTERS = {
    "AutoencoderDC": "jaxgen.convert.dcae",
    "DiTTransformer2DModel": "jaxgen.convert.dit",
    "Transformer2DModel": "jaxgen.convert.dit",  # The DiT hub checkpoints' legacy class name.
}


def from_diffusers(path: str):
  """Returns (flax module, variables) for a diffusers-format model directory."""
  import importlib  # pylint: disable=g-import-not-at-top
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise WeightsError(f"{config_path} not found: pass a diffusers model directory "
                       "(config.json + diffusion_pytorch_model.safetensors).")
  with open(config_path) as f:
    class_name = json.load(f).get("_class_name")
  if class_name not in DIFFUSERS_CONVERTERS:
    raise WeightsError(f"{path}: diffusers class {class_name!r} has no converter; "
                       f"supported: {sorted(DIFFUSERS_CONVERTERS)}.")
  return importlib.import_module(DIFFUSERS_CONVERTERS[class_name]).from_diffusers(path)


def load_converted(path: str):
  """(module, variables) from a directory written by `python -m jaxgen.convert`."""
  from jaxgen.convert.saved import load_converted as load  # pylint: disable=g-import-not-at-top
  return load(path)


def load_autoencoder(path: str, use_ema=None):
  """(module, variables) of an autoencoder: converted dir, training workdir, diffusers dir or
  original efficientvit checkpoint."""
  from jaxgen.convert.saved import load_autoencoder as load  # pylint: disable=g-import-not-at-top
  return load(path, use_ema)
