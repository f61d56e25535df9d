"""diffusers `UNet2DConditionModel` weights -> jaxgen `UNet2DConditionModel` (Stable Diffusion).

`model, variables = from_diffusers(path)` reads a `unet/` folder (config.json +
diffusion_pytorch_model.safetensors); `jaxgen.convert.from_diffusers` dispatches here on
`_class_name` "UNet2DConditionModel". `convert_diffusers_state(config, state)` converts a state
dict already in memory (e.g. the `unet.` part of a single-file release, prefix stripped).

The parameter tree mirrors diffusers' module tree, so names map one to one: list indices join
their list ("down_blocks.1.resnets.0.conv1" -> "down_blocks_1/resnets_0/conv1",
"downsamplers.0.conv" -> "downsamplers_0/conv"); the resnets' time_emb_proj / conv_shortcut
are jaxgen ResBlock's emb_proj / skip; every `attentions.{j}` subtree is a Transformer2DModel
converted by `jaxgen.convert.spatial_transformer.params_from_state`. Norm weights become scales,
Linear and conv weights are transposed.
"""

import re
from typing import Dict, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert.common import (check_complete, conv_kernel, convert_model_dir, dense_kernel,
                                   unflatten)
from jaxgen.convert.spatial_transformer import params_from_state
from jaxgen.models.unet2d_condition import UNet2DConditionModel, unet2d_condition

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_ATTENTION_PREFIX = re.compile(r"^((?:down_blocks|up_blocks)\.\d+|mid_block)\.attentions\.\d+\.")
_RESNET_RENAMES = {"time_emb_proj": "emb_proj", "conv_shortcut": "skip"}


def module_from_config(config: Mapping) -> UNet2DConditionModel:
  return unet2d_condition(**config)


def abstract_variables(model: UNet2DConditionModel) -> Dict:
  """Variable shapes of `model` (jax.eval_shape of init on the smallest input it takes)."""
  plan = model.plan()
  f = 2 ** (len(model.block_out_channels) - 1)
  sample = jax.ShapeDtypeStruct((1, f, f, model.in_channels), jnp.float32)
  context = jax.ShapeDtypeStruct((1, 1, plan.cross_attention_dim[-1]), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), sample, t, context)


def _target(module: str) -> str:
  """jaxgen path of a diffusers module outside the attentions ("a.0.b" -> "a_0/b")."""
  path = re.sub(r"\.(\d+)(?=\.|$)", r"_\1", module).split(".")
  if len(path) > 1 and path[-2].startswith("resnets_"):
    path[-1] = _RESNET_RENAMES.get(path[-1], path[-1])
  return "/".join(path)


def convert_diffusers_state(config: Mapping, state: Mapping[str, np.ndarray]):
  """(UNet2DConditionModel, {"params": ...}) from a diffusers config dict and state dict."""
  model = module_from_config(config)
  flat: Dict[str, np.ndarray] = {}
  unused = []
  prefixes = sorted({m.group(0) for m in map(_ATTENTION_PREFIX.match, state) if m})
  for prefix in prefixes:
    params, rest = params_from_state(state, prefix)
    root = _target(prefix[:-1])
    flat.update({f"{root}/{k}": v for k, v in params.items()})
    unused.extend(rest)
  for key, value in state.items():
    if _ATTENTION_PREFIX.match(key):
      continue
    module, _, leaf = key.rpartition(".")
    value = np.asarray(value, np.float32)
    target = _target(module)
    if leaf == "bias":
      flat[f"{target}/bias"] = value
    elif leaf == "weight" and value.ndim == 1:  # GroupNorm
      flat[f"{target}/scale"] = value
    elif leaf == "weight" and value.ndim == 2:  # Linear
      flat[f"{target}/kernel"] = dense_kernel(value)
    elif leaf == "weight" and value.ndim == 4:
      flat[f"{target}/kernel"] = conv_kernel(value)
    else:
      unused.append(key)
  variables = {"params": unflatten(flat)}
  check_complete(variables, abstract_variables(model), unused)
  return model, jax.tree_util.tree_map(jnp.asarray, variables)


def from_diffusers(path: str):
  """(UNet2DConditionModel, variables) from a diffusers UNet2DConditionModel directory."""
  return convert_model_dir(path, WEIGHTS_NAME, convert_diffusers_state)
