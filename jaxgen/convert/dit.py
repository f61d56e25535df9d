"""diffusers `DiTTransformer2DModel` weights -> jaxgen `DiT` (the facebook/DiT-XL-2-256/512 models).

`model, variables = from_diffusers(path)` reads config.json + diffusion_pytorch_model.safetensors
(the hub's `transformer/` folder; its older `_class_name` "Transformer2DModel" with
`norm_type="ada_norm_zero"` is the same model); `model.apply(variables, x, t, y)` takes NHWC
latents. diffusers keeps a copy of the timestep and class embedders in every block
(`transformer_blocks.{i}.norm1.emb`): when all copies are equal (the hub checkpoints) one shared
embedder holds them; when any differ (a DiT fine-tuned in diffusers) the model gets
`per_block_embedders=True` and block i's copy becomes `t_embedder_{i}` / `y_embedder_{i}`. Its
timestep features use frequency shift 1 and its pre-FFN norm `norm_eps` (1e-5 by default); both
become `DiT` fields. The sin-cos position table is recomputed, not read.
"""

import re
from typing import Dict, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert.common import check_complete, conv_kernel, dense_kernel, read_model_dir, unflatten
from jaxgen.errors import WeightsError
from jaxgen.models.dit import DiT

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# diffusers name (inside transformer_blocks.{i}.) -> jaxgen path (inside blocks_{i}/).
_BLOCK_DENSE = {
    "norm1.linear": "adaLN_modulation",
    "attn1.to_q": "attn/to_q",
    "attn1.to_k": "attn/to_k",
    "attn1.to_v": "attn/to_v",
    "attn1.to_out.0": "attn/to_out",
    "ff.net.0.proj": "fc1",
    "ff.net.2": "fc2",
}
_TOP_DENSE = {"proj_out_1": "final_layer/adaLN_modulation", "proj_out_2": "final_layer/linear"}
_EMBEDDERS = {  # per-block copies -> the jaxgen embedder (suffixed _{i} when per block)
    "norm1.emb.timestep_embedder.linear_1": "t_embedder/linear_1",
    "norm1.emb.timestep_embedder.linear_2": "t_embedder/linear_2",
    "norm1.emb.class_embedder.embedding_table": "y_embedder/embedding_table",
}


def from_diffusers(path: str):
  """(DiT, {"params": ...}) from a diffusers DiTTransformer2DModel directory."""
  config, state = read_model_dir(path, WEIGHTS_NAME)
  return convert_diffusers_state(config, state)


def module_from_config(config: Mapping, per_block_embedders: bool = False) -> DiT:
  """The `DiT` that a DiTTransformer2DModel config describes (diffusers defaults filled in)."""
  get = lambda k, default: config.get(k, default) if config.get(k) is not None else default
  checks = {
      "norm_type": (get("norm_type", "ada_norm_zero"), "ada_norm_zero"),
      "activation_fn": (get("activation_fn", "gelu-approximate"), "gelu-approximate"),
      "norm_elementwise_affine": (get("norm_elementwise_affine", False), False),
      "attention_bias": (get("attention_bias", True), True),
  }
  bad = {k: v for k, (v, want) in checks.items() if v != want}
  if bad or config.get("patch_size") is None or config.get("num_embeds_ada_norm", 1) is None:
    raise WeightsError(f"config is not a class-conditional DiT (adaLN-Zero, patch embedding, "
                       f"GELU-tanh): unsupported {bad or 'patch_size/num_embeds_ada_norm None'}.")
  heads, head_dim = get("num_attention_heads", 16), get("attention_head_dim", 72)
  in_channels, patch = get("in_channels", 4), get("patch_size", 2)
  return DiT(
      depth=get("num_layers", 28), hidden_size=heads * head_dim, num_heads=heads,
      patch_size=patch, num_classes=get("num_embeds_ada_norm", 1000),
      out_channels=get("out_channels", in_channels), learn_sigma=False,
      norm_eps=float(get("norm_eps", 1e-5)), time_freq_shift=1.0,
      pos_embed_base_size=get("sample_size", 32) // patch,
      per_block_embedders=per_block_embedders)


def abstract_variables(model: DiT, in_channels: int, sample_size: int) -> Dict:
  x = jax.ShapeDtypeStruct((1, sample_size, sample_size, in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  y = jax.ShapeDtypeStruct((1,), jnp.int32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, y)


def _layout(name: str, value: np.ndarray) -> Dict[str, np.ndarray]:
  """{param leaf: array} of one diffusers module's .weight / .bias."""
  if name.endswith("embedding_table"):
    return {"embedding": value}
  return {"kernel": dense_kernel(value) if value.ndim == 2 else conv_kernel(value)}


def convert_diffusers_state(config: Mapping, state: Mapping[str, np.ndarray]):
  """(DiT, {"params": ...}) from a diffusers config dict and state dict {name: array}."""
  flat: Dict[str, np.ndarray] = {}
  embedder_copies: Dict[str, Dict[int, np.ndarray]] = {}
  unused = []
  for key, value in state.items():
    value = np.asarray(value, dtype=np.float32)
    module, _, leaf = key.rpartition(".")
    if module == "pos_embed":  # The fixed sin-cos table (persistent in some exports).
      continue
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.*)", module)
    if m and m.group(2) in _EMBEDDERS:
      embedder_copies.setdefault(f"{_EMBEDDERS[m.group(2)]}:{leaf}", {})[int(m.group(1))] = value
      continue
    if m and m.group(2) in _BLOCK_DENSE:
      target = f"blocks_{m.group(1)}/{_BLOCK_DENSE[m.group(2)]}"
    elif module in _TOP_DENSE:
      target = _TOP_DENSE[module]
    elif module == "pos_embed.proj":
      target = "x_embedder"
    else:
      unused.append(key)
      continue
    if leaf == "bias":
      flat[f"params/{target}/bias"] = value
    elif leaf == "weight":
      flat.update({f"params/{target}/{k}": v for k, v in _layout(target, value).items()})
    else:
      unused.append(key)
  # One shared embedder when every block holds the same copy; otherwise one per block.
  per_block = any(not np.array_equal(v, copies[min(copies)])
                  for copies in embedder_copies.values() for v in copies.values())
  for name, copies in embedder_copies.items():
    target, leaf = name.split(":")
    chosen = copies.items() if per_block else [(None, copies[min(copies)])]
    for i, value in chosen:
      module, _, sub = target.partition("/")
      path = f"params/{module if i is None else f'{module}_{i}'}/{sub}"
      if leaf == "bias":
        flat[f"{path}/bias"] = value
      else:
        flat.update({f"{path}/{k}": v for k, v in _layout(target, value).items()})
  model = module_from_config(config, per_block_embedders=per_block)
  variables = unflatten(flat)
  in_channels = int(config.get("in_channels") or 4)
  check_complete(variables, abstract_variables(model, in_channels, model.patch_size), unused)
  return model, jax.tree_util.tree_map(jnp.asarray, variables)
