"""Published generators end to end: `pipe = load_pipeline(DIR)`, then `pipe(...)` -> images.

DIR is a diffusers pipeline directory (`model_index.json` + one subfolder per component, as
`save_pretrained` writes it and hub snapshots hold it; the pipeline is picked by its
`_class_name`) or one of the DC-AE paper's diffusion checkpoints (efficientvit's
`DCAE_Diffusion_HF`: `config.json` + `model.safetensors`). Every pipeline returns float32 NHWC
images in [0, 1] and runs its whole sampling loop as one jitted program over the device mesh
(`jaxgen.pipelines.base`).
"""

import importlib
import os
from typing import Optional

from jaxgen.errors import WeightsError

# model_index.json `_class_name` -> "module:class".
DIFFUSERS_PIPELINES = {
    "DiTPipeline": "jaxgen.pipelines.dit:DiTPipeline",
    # Written by `python -m jaxgen.convert --src=pytorch_model.bin` (FastComposer's release).
    "FastComposerPipeline": "jaxgen.pipelines.fastcomposer:FastComposerPipeline",
    "StableDiffusionPipeline": "jaxgen.pipelines.stable_diffusion:StableDiffusionPipeline",
}
# The DC-AE paper's checkpoints (a config.json, no model_index.json).
DCAE_DIFFUSION = "jaxgen.pipelines.dcae_diffusion:DCAEDiffusionPipeline"


def _load_class(target: str):
  module, name = target.split(":")
  return getattr(importlib.import_module(module), name)


def pipeline_class(path: str):
  """The pipeline class that reads directory `path`."""
  if not os.path.isdir(path):
    raise WeightsError(f"{path} is not a directory: pass a diffusers pipeline directory "
                       "(model_index.json + components) or a DC-AE diffusion checkpoint "
                       "(config.json + model.safetensors).")
  if os.path.isfile(os.path.join(path, "model_index.json")):
    from jaxgen.pipelines.dit import read_model_index  # pylint: disable=g-import-not-at-top
    name = read_model_index(path).get("_class_name")
    if name not in DIFFUSERS_PIPELINES:
      raise WeightsError(f"{path}: pipeline class {name!r} is not supported; supported: "
                         f"{sorted(DIFFUSERS_PIPELINES)}.")
    return _load_class(DIFFUSERS_PIPELINES[name])
  config_path = os.path.join(path, "config.json")
  if os.path.isfile(config_path):
    from jaxgen.convert.common import read_json  # pylint: disable=g-import-not-at-top
    cls = _load_class(DCAE_DIFFUSION)
    if cls.accepts_config(read_json(config_path)):
      return cls
    raise WeightsError(f"{config_path} is a single model, not a pipeline: load_pipeline reads "
                       "a diffusers pipeline directory (model_index.json) or a DC-AE diffusion "
                       "checkpoint; for one model use jaxgen.convert.")
  raise WeightsError(f"{path} holds neither model_index.json nor config.json: pass a diffusers "
                     f"pipeline directory or a DC-AE diffusion checkpoint (holds "
                     f"{sorted(os.listdir(path))[:10]}).")


def load_pipeline(path: str, dtype: Optional[str] = None, mesh=None):
  """The pipeline stored in directory `path` (dtype "float32" | "bfloat16"; mesh: default all
  devices, data-parallel)."""
  return pipeline_class(path).from_directory(path, dtype=dtype, mesh=mesh)
