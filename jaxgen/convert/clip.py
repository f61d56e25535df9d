"""transformers CLIP weights -> jaxgen `CLIPModel` (e.g. openai/clip-vit-large-patch14).

`model, variables = from_transformers(path)` reads config.json + model.safetensors written by
`save_pretrained` for `CLIPModel` (model_type "clip"), `CLIPTextModel[WithProjection]`
("clip_text_model") or `CLIPVisionModel[WithProjection]` ("clip_vision_model"). The
single-tower classes store their tower with or without the `text_model.` / `vision_model.`
prefix (transformers 4 vs 5); both are read. Torch Linear (out, in) becomes a Dense kernel
(in, out), the patch conv OIHW becomes HWIO; the persisted `position_ids` buffers of older
exports are skipped. Every missing, unexpected or mis-shaped tensor is named in a WeightsError.
"""

import re
from typing import Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert.common import (check_complete, conv_kernel, convert_model_dir, dense_kernel,
                                   unflatten)
from jaxgen.errors import WeightsError
from jaxgen.models.clip import CLIPModel, clip

WEIGHTS_NAME = "model.safetensors"
MODEL_TYPES = ("clip", "clip_text_model", "clip_vision_model")

_LAYER = {  # transformers name inside encoder.layers.{i}. -> jaxgen path inside layers_{i}/
    "self_attn.q_proj": "self_attn/to_q",
    "self_attn.k_proj": "self_attn/to_k",
    "self_attn.v_proj": "self_attn/to_v",
    "self_attn.out_proj": "self_attn/to_out",
    "layer_norm1": "layer_norm1",
    "layer_norm2": "layer_norm2",
    "mlp.fc1": "fc1",
    "mlp.fc2": "fc2",
}
_TOWER = {  # transformers name inside {text,vision}_model. -> jaxgen path (no layers)
    "embeddings.token_embedding": "token_embedding",
    "embeddings.position_embedding": "position_embedding",
    "embeddings.patch_embedding": "patch_embedding",
    "final_layer_norm": "final_layer_norm",
    "pre_layrnorm": "pre_layrnorm",
    "post_layernorm": "post_layernorm",
}
_NORMS = ("layer_norm1", "layer_norm2", "final_layer_norm", "pre_layrnorm", "post_layernorm")


def from_transformers(path: str):
  """(CLIPModel, {"params": ...}) from a transformers CLIP directory."""
  return convert_model_dir(path, WEIGHTS_NAME, convert_state)


def module_from_config(config: Mapping, state_keys=()) -> CLIPModel:
  """The CLIPModel a transformers config describes; single-tower configs get one tower.

  A single tower is projected when its class (config "architectures") is *WithProjection,
  or, without that field, when the checkpoint holds the projection.
  """
  model_type = config.get("model_type")
  if model_type == "clip":
    return clip(text_config=config.get("text_config") or {},
                vision_config=config.get("vision_config") or {},
                projection_dim=config.get("projection_dim") or 512,
                logit_scale_init_value=config.get("logit_scale_init_value", 2.6592))
  if model_type not in MODEL_TYPES:
    raise WeightsError(f"config model_type {model_type!r} is not CLIP; supported: {MODEL_TYPES}")
  text = model_type == "clip_text_model"
  projection = "text_projection" if text else "visual_projection"
  archs = config.get("architectures") or []
  projected = (any(a.endswith("WithProjection") for a in archs) if archs else
               any(k.startswith(projection + ".") for k in state_keys))
  return clip(text_config=config if text else None, vision_config=None if text else config,
              projection_dim=(config.get("projection_dim") or 512) if projected else None)


def abstract_variables(model: CLIPModel) -> Dict:
  """Variable shapes of `model` (jax.eval_shape of init: nothing is allocated)."""
  rng = jax.random.PRNGKey(0)
  ids = pixels = None
  if model.text_model is not None:
    ids = jax.ShapeDtypeStruct((1, model.text_model.max_position_embeddings), jnp.int32)
  if model.vision_model is not None:
    v = model.vision_model
    pixels = jax.ShapeDtypeStruct((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
  if ids is not None and pixels is not None:
    return jax.eval_shape(model.init, rng, ids, pixels)
  if ids is not None:
    return jax.eval_shape(lambda r, x: model.init(r, x, method="text_outputs"), rng, ids)
  return jax.eval_shape(lambda r, x: model.init(r, x, method="image_outputs"), rng, pixels)


def _canonical(key: str, model_type: str) -> str:
  """Single-tower keys without their tower prefix (transformers 5) get it back."""
  if model_type == "clip" or key.split(".")[0] in (
      "text_model", "vision_model", "text_projection", "visual_projection", "logit_scale"):
    return key
  return ("text_model." if model_type == "clip_text_model" else "vision_model.") + key


def _target(key: str) -> Optional[Tuple[str, str]]:
  """(jaxgen module path, "dense" | "conv" | "embed" | "norm" | "param") or None if unknown."""
  module, _, leaf = key.rpartition(".")
  if key == "logit_scale":
    return "logit_scale", "param"
  if module in ("text_projection", "visual_projection") and leaf == "weight":
    return module, "dense"
  m = re.fullmatch(r"(text_model|vision_model)\.(.*)", module)
  if m is None:
    return None
  tower, rest = m.groups()
  if rest == "embeddings" and leaf == "class_embedding":
    return f"{tower}/class_embedding", "param"
  lm = re.fullmatch(r"encoder\.layers\.(\d+)\.(.*)", rest)
  if lm and lm.group(2) in _LAYER:
    path = f"{tower}/layers_{lm.group(1)}/{_LAYER[lm.group(2)]}"
    kind = "norm" if lm.group(2) in _NORMS else "dense"
  elif rest in _TOWER:
    path = f"{tower}/{_TOWER[rest]}"
    kind = ("norm" if rest in _NORMS else "conv" if rest.endswith("patch_embedding") else
            "embed")
  else:
    return None
  return path, kind


def convert_state(config: Mapping, state: Mapping[str, np.ndarray]):
  """(CLIPModel, {"params": ...}) from a transformers config dict and state dict."""
  model_type = config.get("model_type")
  model = module_from_config(config, state.keys())
  flat: Dict[str, np.ndarray] = {}
  unused = []
  for key, value in state.items():
    value = np.asarray(value, dtype=np.float32)
    key = _canonical(key, model_type)
    if key.endswith("embeddings.position_ids"):  # A persisted arange buffer, not a weight.
      continue
    target = _target(key)
    leaf = key.rpartition(".")[2]
    if target is None or (target[1] != "param" and leaf not in ("weight", "bias")):
      unused.append(key)
      continue
    path, kind = target
    if kind == "param":
      flat[f"params/{path}"] = value
    elif leaf == "bias":
      flat[f"params/{path}/bias"] = value
    elif kind == "dense":
      flat[f"params/{path}/kernel"] = dense_kernel(value)
    elif kind == "conv":
      flat[f"params/{path}/kernel"] = conv_kernel(value)
    elif kind == "embed":
      flat[f"params/{path}/embedding"] = value
    else:  # norm
      flat[f"params/{path}/scale"] = value
  variables = unflatten(flat)
  check_complete(variables, abstract_variables(model), unused)
  return model, jax.tree_util.tree_map(jnp.asarray, variables)
