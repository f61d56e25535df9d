"""diffusers `AutoencoderKL` weights -> jaxgen `AutoencoderKL` (SD-VAE, e.g. the hub's vae/ folders).

`model, variables = from_diffusers(path)` reads config.json + diffusion_pytorch_model.safetensors;
`from_diffusers` in `jaxgen.convert` dispatches here on `_class_name` "AutoencoderKL", so
`jaxgen.convert.load_autoencoder` and the latent-diffusion task read such directories too.
diffusers' module lists become flat names (`down_blocks.1.resnets.0` ->
`down_blocks_1_resnets_0`, `downsamplers.0.conv` -> `down_blocks_1_downsample`); the mid-block
attention's `group_norm` / `to_out.0` become `attentions_0/norm` / `attentions_0/attn/to_out`.
Older exports name the attention projections query / key / value / proj_attn; both are read.
"""

import re
from typing import Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert.common import (check_complete, conv_kernel, convert_model_dir, dense_kernel,
                                   unflatten)
from jaxgen.models.vae_kl import AutoencoderKL, vae_kl

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

_ATTENTION = {"group_norm": "norm", "to_q": "attn/to_q", "to_k": "attn/to_k",
              "to_v": "attn/to_v", "to_out.0": "attn/to_out",
              # Pre-0.14 diffusers names.
              "query": "attn/to_q", "key": "attn/to_k", "value": "attn/to_v",
              "proj_attn": "attn/to_out"}
_RESNET_PARTS = ("norm1", "conv1", "norm2", "conv2", "conv_shortcut")


def from_diffusers(path: str):
  """(AutoencoderKL, {"params": ...}) from a diffusers AutoencoderKL directory."""
  return convert_model_dir(path, WEIGHTS_NAME, convert_diffusers_state)


def module_from_config(config: Mapping) -> AutoencoderKL:
  return vae_kl(**config)


def abstract_variables(model: AutoencoderKL) -> Dict:
  """Variable shapes of `model` (jax.eval_shape of init: nothing is allocated)."""
  f = model.spatial_compression_ratio
  x = jax.ShapeDtypeStruct((1, f, f, model.in_channels), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)


def _target(module: str) -> Optional[str]:
  """jaxgen module path of a diffusers module name, or None if it has no counterpart."""
  if module in ("quant_conv", "post_quant_conv"):
    return module
  m = re.fullmatch(r"(encoder|decoder)\.(.*)", module)
  if m is None:
    return None
  part, rest = m.groups()
  if rest in ("conv_in", "conv_out", "conv_norm_out"):
    return f"{part}/{rest}"
  m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", rest)
  if m and m.group(4) in _RESNET_PARTS:
    return f"{part}/{m.group(1)}_blocks_{m.group(2)}_resnets_{m.group(3)}/{m.group(4)}"
  m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.conv", rest)
  if m and m.group(1) == m.group(3):
    return f"{part}/{m.group(1)}_blocks_{m.group(2)}_{m.group(1)}sample"
  m = re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)", rest)
  if m and m.group(2) in _RESNET_PARTS:
    return f"{part}/mid_block/resnets_{m.group(1)}/{m.group(2)}"
  m = re.fullmatch(r"mid_block\.attentions\.0\.(.*)", rest)
  if m and m.group(1) in _ATTENTION:
    return f"{part}/mid_block/attentions_0/{_ATTENTION[m.group(1)]}"
  return None


def convert_diffusers_state(config: Mapping, state: Mapping[str, np.ndarray]):
  """(AutoencoderKL, {"params": ...}) from a diffusers config dict and state dict."""
  model = module_from_config(config)
  flat: Dict[str, np.ndarray] = {}
  unused = []
  for key, value in state.items():
    value = np.asarray(value, dtype=np.float32)
    module, _, leaf = key.rpartition(".")
    target = _target(module)
    if target is None or leaf not in ("weight", "bias"):
      unused.append(key)
      continue
    if leaf == "bias":
      flat[f"params/{target}/bias"] = value
    elif value.ndim == 1:  # GroupNorm
      flat[f"params/{target}/scale"] = value
    elif target.endswith(("/attn/to_q", "/attn/to_k", "/attn/to_v", "/attn/to_out")):
      flat[f"params/{target}/kernel"] = dense_kernel(value)  # Linear (or legacy 1x1 conv).
    else:
      flat[f"params/{target}/kernel"] = conv_kernel(value)
  variables = unflatten(flat)
  check_complete(variables, abstract_variables(model), unused)
  return model, jax.tree_util.tree_map(jnp.asarray, variables)
