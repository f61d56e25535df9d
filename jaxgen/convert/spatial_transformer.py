"""diffusers `Transformer2DModel` (continuous input, LDM's SpatialTransformer) -> jaxgen.

`convert_diffusers_state(config, state)` returns (SpatialTransformer, {"params": ...}) for the
cross-attention transformer that Stable Diffusion / LDM U-Nets use at their attention levels;
`params_from_state(state, prefix)` maps one such block inside a larger state dict (a U-Net's
`down_blocks.1.attentions.0.`), so U-Net converters reuse it. Tensor names map one to one:
"transformer_blocks.{i}.attn2.to_out.0" -> "transformer_blocks_{i}/attn2/to_out",
"ff.net.0.proj" -> "ff/net_0/proj"; norms' weight -> scale; Linear / 1x1 conv layouts are
transposed. (The `Transformer2DModel` class name in `DIFFUSERS_CONVERTERS` is DiT's legacy
name; these configs are told apart by `norm_type` "layer_norm" and no `patch_size`.)
"""

import re
from typing import Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert.common import (check_complete, conv_kernel, convert_model_dir, dense_kernel,
                                   unflatten)
from jaxgen.errors import WeightsError
from jaxgen.nn.transformer import SpatialTransformer

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_NORMS = re.compile(r"(^|/)(norm|norm\d)$")


def module_from_config(config: Mapping) -> SpatialTransformer:
  """The SpatialTransformer a continuous-input Transformer2DModel config describes."""
  get = lambda k, default: config.get(k) if config.get(k) is not None else default
  checks = {
      "norm_type": (get("norm_type", "layer_norm"), "layer_norm"),
      "activation_fn": (get("activation_fn", "geglu"), "geglu"),
      "attention_bias": (get("attention_bias", False), False),
      "double_self_attention": (get("double_self_attention", False), False),
      "norm_elementwise_affine": (get("norm_elementwise_affine", True), True),
      "patch_size": (get("patch_size", None), None),
      "out_channels": (get("out_channels", get("in_channels", None)), get("in_channels", None)),
  }
  bad = {k: v for k, (v, want) in checks.items() if v != want}
  if bad or config.get("in_channels") is None:
    raise WeightsError("config is not a continuous-input Transformer2DModel (LDM "
                       f"SpatialTransformer: GEGLU, LayerNorm, no QKV bias): unsupported "
                       f"{bad or 'in_channels None'}.")
  return SpatialTransformer(
      num_heads=get("num_attention_heads", 16), head_dim=get("attention_head_dim", 88),
      depth=get("num_layers", 1), num_groups=get("norm_num_groups", 32),
      use_linear_projection=bool(get("use_linear_projection", False)),
      norm_eps=float(get("norm_eps", 1e-5)),
      only_cross_attention=bool(get("only_cross_attention", False)))


def _target(module: str) -> str:
  """diffusers module path -> jaxgen path ("transformer_blocks.0.attn2.to_out.0" -> ...)."""
  path = re.sub(r"transformer_blocks\.(\d+)", r"transformer_blocks_\1", module)
  path = path.replace(".to_out.0", ".to_out").replace("ff.net.0.proj", "ff.net_0.proj")
  return path.replace("ff.net.2", "ff.net_2").replace(".", "/")


def params_from_state(state: Mapping[str, np.ndarray], prefix: str = "") -> Tuple[Dict, list]:
  """({"a/b/kernel": array} of one transformer under `prefix`, unused keys under it)."""
  flat, unused = {}, []
  for key, value in state.items():
    if not key.startswith(prefix):
      continue
    module, _, leaf = key[len(prefix):].rpartition(".")
    target = _target(module)
    value = np.asarray(value, np.float32)
    if leaf == "bias":
      flat[f"{target}/bias"] = value
    elif leaf == "weight" and (_NORMS.search(target)):
      flat[f"{target}/scale"] = value
    elif leaf == "weight":
      # 1x1 conv proj_in / proj_out stay convs; Linear weights (2-D) become Dense kernels.
      flat[f"{target}/kernel"] = conv_kernel(value) if value.ndim == 4 else dense_kernel(value)
    else:
      unused.append(key)
  return flat, unused


def convert_diffusers_state(config: Mapping, state: Mapping[str, np.ndarray]):
  """(SpatialTransformer, {"params": ...}) from a Transformer2DModel config and state dict."""
  model = module_from_config(config)
  flat, unused = params_from_state(state)
  variables = {"params": unflatten(flat)}
  c = int(config["in_channels"])
  x = jax.ShapeDtypeStruct((1, 2, 2, c), jnp.float32)
  ctx_dim = config.get("cross_attention_dim")
  ctx = None if ctx_dim is None else jax.ShapeDtypeStruct((1, 1, int(ctx_dim)), jnp.float32)
  expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, ctx)
  check_complete(variables, expected, unused)
  return model, jax.tree_util.tree_map(jnp.asarray, variables)


def from_diffusers(path: str):
  """(SpatialTransformer, variables) from a Transformer2DModel directory."""
  return convert_model_dir(path, WEIGHTS_NAME, convert_diffusers_state)
