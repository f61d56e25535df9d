"""DC-AE weights -> jaxgen `DCAE` variables, from diffusers or the original efficientvit layout.

diffusers (`AutoencoderDC.save_pretrained`, the hub's `mit-han-lab/dc-ae-*-diffusers`):
  `from_diffusers(path)` reads config.json + diffusion_pytorch_model.safetensors.
original efficientvit (`DCAE_HF` hub repos: config.json {"model_name": ...} + model.safetensors,
or a training .pt/.pth holding {"state_dict": ...}):
  `from_original(path, name=None)`; .pt/.pth files are read with torch.load(weights_only=True)
  only, never with plain pickle.

Both return `(DCAE module, {"params": ..., ["batch_stats": ...]})`. BatchNorm running
statistics go to `batch_stats`; every missing, unexpected or mis-shaped tensor is named in a
`WeightsError`.
"""

import dataclasses
import logging
import os
import re
from typing import Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert.common import (check_complete, conv_kernel, convert_model_dir,
                                   describe_exception, naming_source, read_json,
                                   read_safetensors, unflatten)
from jaxgen.errors import WeightsError
from jaxgen.models.dcae import DCAE, canonical_variant, dcae, dcae_config

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

_BN_STATS = {"running_mean": "mean", "running_var": "var"}


def from_diffusers(path: str):
  """(DCAE, variables) from a diffusers AutoencoderDC directory."""
  return convert_model_dir(path, WEIGHTS_NAME, convert_diffusers_state)


def module_from_config(config: Mapping) -> DCAE:
  """DCAE from AutoencoderDC config keys; unknown keys are ignored (as diffusers does) with a
  warning: a config that does not fit the weights fails the tensor check, naming tensors."""
  fields = {f.name for f in dataclasses.fields(DCAE)} - {"parent", "name"}
  unknown = sorted(k for k in config if k not in fields and not k.startswith("_"))
  if unknown:
    logging.warning("AutoencoderDC config keys ignored: %s", unknown)
  return dcae(**{k: v for k, v in config.items() if k in fields})


def abstract_variables(model: DCAE) -> Dict:
  """Variable shapes of `model` (jax.eval_shape of init: no memory is allocated)."""
  f = model.spatial_compression_ratio
  x = jax.ShapeDtypeStruct((1, f, f, model.in_channels), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)


def convert_diffusers_state(config: Mapping, state: Mapping[str, np.ndarray]):
  """(DCAE, variables) from a diffusers config dict and state dict {name: array}."""
  model = module_from_config(config)
  flat: Dict[str, np.ndarray] = {}
  unused = []
  qkv: Dict[str, Dict[str, np.ndarray]] = {}
  for key, value in state.items():
    value = np.asarray(value, dtype=np.float32)
    if key.endswith("num_batches_tracked"):
      continue
    m = re.fullmatch(r"(.*)\.attn\.to_([qkv])\.weight", key)
    if m:  # to_q/to_k/to_v are the thirds of efficientvit's single 1x1 qkv conv.
      qkv.setdefault(m.group(1), {})[m.group(2)] = value
      continue
    target = _diffusers_target(key)
    if target is None:
      unused.append(key)
      continue
    flat[target] = _layout(target, value)
  for prefix, parts in qkv.items():
    if set(parts) != {"q", "k", "v"}:
      unused.extend(f"{prefix}.attn.to_{p}.weight" for p in parts)
      continue
    w = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)  # (3*inner, C)
    flat[f"params/{_block_path(prefix)}/context_module/qkv/conv/kernel"] = w.T[None, None]
  variables = unflatten(flat)
  check_complete(variables, abstract_variables(model), unused)
  return model, jax.tree_util.tree_map(jnp.asarray, variables)


def _block_path(prefix: str) -> str:
  """'encoder.down_blocks.1.3' -> 'encoder/down_blocks_1_3'."""
  m = re.fullmatch(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(\d+)", prefix)
  if not m:
    raise WeightsError(f"unexpected DC-AE block {prefix!r}")
  return f"{m.group(1)}/{m.group(2)}_{m.group(3)}_{m.group(4)}"


# Inside a down/up-block entry: diffusers sub-path -> jaxgen sub-path (leaf name kept apart).
_BLOCK_RULES = (
    (r"conv1", "conv1/conv"),
    (r"conv2", "conv2/conv"),
    (r"norm", "conv2/norm"),
    (r"conv", "conv"),
    (r"attn\.to_out", "context_module/proj/conv"),
    (r"attn\.norm_out", "context_module/proj/norm"),
    (r"attn\.to_qkv_multiscale\.(\d+)\.(proj_in|proj_out)", r"context_module/aggreg_\1/\2"),
    (r"conv_out\.conv_inverted", "local_module/inverted_conv/conv"),
    (r"conv_out\.conv_depth", "local_module/depth_conv/conv"),
    (r"conv_out\.conv_point", "local_module/point_conv/conv"),
    (r"conv_out\.norm", "local_module/point_conv/norm"),
)

_TOP_RULES = (
    (r"(encoder|decoder)\.conv_in", r"\1/conv_in"),
    (r"(encoder|decoder)\.conv_in\.conv", r"\1/conv_in/conv"),
    (r"(encoder|decoder)\.conv_out", r"\1/conv_out"),
    (r"(encoder|decoder)\.conv_out\.conv", r"\1/conv_out/conv"),
    (r"decoder\.norm_out", "decoder/norm_out"),
)


def _diffusers_target(key: str) -> Optional[str]:
  """diffusers tensor name -> 'params/...' or 'batch_stats/...' flax path (None: unknown)."""
  module, _, leaf = key.rpartition(".")
  m = re.fullmatch(r"((?:encoder|decoder)\.(?:down_blocks|up_blocks)\.\d+\.\d+)\.(.+)", module)
  if m:
    head, rules, rest = _block_path(m.group(1)), _BLOCK_RULES, m.group(2)
  else:
    head, rules, rest = "", _TOP_RULES, module
  for pattern, repl in rules:
    if re.fullmatch(pattern, rest):
      path = "/".join(p for p in (head, re.sub(pattern, repl, rest)) if p)
      break
  else:
    return None
  if leaf in _BN_STATS:
    return f"batch_stats/{path}/{_BN_STATS[leaf]}"
  # Norm weights are flax "scale"; conv/linear weights "kernel".
  is_norm = path.endswith("norm") or path.endswith("norm_out")
  names = {"weight": "scale" if is_norm else "kernel", "bias": "bias"}
  if leaf not in names:
    return None
  return f"params/{path}/{names[leaf]}"


def _layout(target: str, value: np.ndarray) -> np.ndarray:
  if target.endswith("/kernel"):
    if value.ndim == 4:
      return conv_kernel(value)  # OIHW -> HWIO (grouped: (k, k, I/groups, O) as flax wants).
    if value.ndim == 2:
      return value.T[None, None]  # Linear (out, in) used as a 1x1 conv.
  return value


# -- Original efficientvit layout -----------------------------------------------------------


def from_original(path: str, name: Optional[str] = None, config: Optional[Mapping] = None):
  """(DCAE, variables) from an efficientvit DC-AE checkpoint.

  `path`: a DCAE_HF directory (config.json with "model_name" + model.safetensors), a
  .safetensors file, or a .pt/.pth file ({"state_dict": ...}). The architecture comes from
  `config` (AutoencoderDC keys) if given, else from the variant `name` (e.g.
  "dc-ae-f32c32-in-1.0"), else from the directory's config.json.
  """
  state, found_name, weights_path = _read_original(path)
  if config is None:
    name = name or found_name
    if name is None:
      raise WeightsError(f"{path}: which DC-AE is this? pass name= (one of dc-ae-f32c32-in-1.0, "
                         "...-mix-1.0, dc-ae-f64c128-*, dc-ae-f128c512-*, dc-ae-f32c32-sana-1.0).")
    config = dcae_config(canonical_variant(name))
  with naming_source(weights_path):
    return convert_diffusers_state(config, original_to_diffusers(state, config))


def _read_original(path: str) -> Tuple[Dict[str, np.ndarray], Optional[str], str]:
  """(state dict, config.json's model_name or None, the weights file read)."""
  name = None
  if os.path.isdir(path):
    config_path = os.path.join(path, "config.json")
    if os.path.lexists(config_path):
      name = read_json(config_path, 'an efficientvit DC-AE config ({"model_name": ...})').get(
          "model_name")
    candidates = [os.path.join(path, f) for f in ("model.safetensors", "model.pt", "model.pth")]
    # lexists: a broken hub-cache link is reported by the reader, not skipped.
    found = [c for c in candidates if os.path.lexists(c)] or [
        c for c in candidates[:1] if os.path.isfile(c + ".index.json")]  # Sharded.
    if not found:
      raise WeightsError(f"{path} holds none of model.safetensors / model.pt / model.pth "
                         f"(it holds {sorted(os.listdir(path))[:20]}).")
    path = found[0]
  if path.endswith(".safetensors"):
    state = read_safetensors(path)
  elif path.endswith((".pt", ".pth", ".ckpt")):
    if not os.path.isfile(path):
      raise WeightsError(f"{path} not found")
    import torch  # pylint: disable=g-import-not-at-top
    try:
      # weights_only: tensors and plain containers only, no code runs while loading.
      state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise WeightsError(f"{path}: not loadable with torch.load(weights_only=True) "
                         f"({describe_exception(e)}); expected a tensor checkpoint "
                         "(truncated by an interrupted download?).") from None
    for wrapper in ("model", "module", "state_dict"):
      if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
        state = state[wrapper]
    state = {k: v.float().numpy() for k, v in state.items() if hasattr(v, "numpy")}
  else:
    raise WeightsError(f"{path}: expected .safetensors, .pt or .pth")
  return state, name, path


# Original efficientvit sub-path (after dropping "main." / "op_list.") -> diffusers sub-path,
# inside an encoder/decoder stage entry.
_ORIGINAL_BLOCK_RULES = (
    (r"conv1\.conv\.(weight|bias)", r"conv1.\1"),
    (r"conv2\.conv\.(weight|bias)", r"conv2.\1"),
    (r"conv2\.norm\.(\w+)", r"norm.\1"),
    (r"conv\.conv\.(weight|bias)", r"conv.\1"),  # conv + pixel (un)shuffle, interpolate + conv
    (r"conv\.(weight|bias)", r"conv.\1"),  # stride-2 conv
    (r"context_module\.aggreg\.(\d+)\.0\.weight", r"attn.to_qkv_multiscale.\1.proj_in.weight"),
    (r"context_module\.aggreg\.(\d+)\.1\.weight", r"attn.to_qkv_multiscale.\1.proj_out.weight"),
    (r"context_module\.proj\.norm\.(\w+)", r"attn.norm_out.\1"),
    (r"local_module\.inverted_conv\.conv\.(weight|bias)", r"conv_out.conv_inverted.\1"),
    (r"local_module\.depth_conv\.conv\.(weight|bias)", r"conv_out.conv_depth.\1"),
    (r"local_module\.point_conv\.conv\.(weight|bias)", r"conv_out.conv_point.\1"),
    (r"local_module\.point_conv\.norm\.(\w+)", r"conv_out.norm.\1"),
)


def original_to_diffusers(state: Mapping[str, np.ndarray],
                          config: Mapping) -> Dict[str, np.ndarray]:
  """Renames an efficientvit DC-AE state dict to diffusers AutoencoderDC names.

  Unknown names are kept as they are, so the completeness check reports them.
  """
  out: Dict[str, np.ndarray] = {}
  first_stage_empty = config["encoder_layers_per_block"][0] == 0
  for key, value in state.items():
    value = np.asarray(value)
    k = re.sub(r"(?:(?<=\.)|^)(?:main|op_list)\.", "", key)
    m = re.fullmatch(r"(encoder|decoder)\.stages\.(\d+)\.(\d+)\.(.+)", k)
    if m:
      where = "down_blocks" if m.group(1) == "encoder" else "up_blocks"
      prefix, rest = f"{m.group(1)}.{where}.{m.group(2)}.{m.group(3)}", m.group(4)
      if rest == "context_module.qkv.conv.weight":
        for part, w in zip("qkv", np.split(value[:, :, 0, 0], 3, axis=0)):
          out[f"{prefix}.attn.to_{part}.weight"] = w
        continue
      if rest == "context_module.proj.conv.weight":
        out[f"{prefix}.attn.to_out.weight"] = value[:, :, 0, 0]
        continue
      for pattern, repl in _ORIGINAL_BLOCK_RULES:
        if re.fullmatch(pattern, rest):
          out[f"{prefix}.{re.sub(pattern, repl, rest)}"] = value
          break
      else:
        out[key] = value
      continue
    top = (
        (r"encoder\.project_in\.conv\.conv\.(weight|bias)", r"encoder.conv_in.conv.\1"),
        (r"encoder\.project_in\.conv\.(weight|bias)",
         r"encoder.conv_in.conv.\1" if first_stage_empty else r"encoder.conv_in.\1"),
        (r"encoder\.project_out\.0\.conv\.(weight|bias)", r"encoder.conv_out.\1"),
        (r"decoder\.project_in\.conv\.(weight|bias)", r"decoder.conv_in.\1"),
        (r"decoder\.project_out\.0\.(weight|bias)", r"decoder.norm_out.\1"),
        (r"decoder\.project_out\.2\.conv\.conv\.(weight|bias)", r"decoder.conv_out.conv.\1"),
        (r"decoder\.project_out\.2\.conv\.(weight|bias)", r"decoder.conv_out.\1"),
    )
    for pattern, repl in top:
      if re.fullmatch(pattern, k):
        out[re.sub(pattern, repl, k)] = value
        break
    else:
      out[key] = value
  return out
