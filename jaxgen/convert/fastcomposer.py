"""FastComposer's released checkpoint (mit-han-lab/fastcomposer `pytorch_model.bin`) -> jaxgen.

The release is `FastComposerModel.state_dict()` (fastcomposer/model.py) saved by torch.save:
one pickle, read here with `torch.load(weights_only=True)` only (a pickle that would run code is
refused); the same state dict as .safetensors is read too. Its keys, by component:

  text_encoder.{embeddings,encoder,final_layer_norm}.*   SD-1.5's CLIP text tower
                   (FastComposerTextEncoder holds the tower's parts without `text_model.`)
  image_encoder.vision_model.*, image_encoder.visual_projection.weight
                   CLIP ViT-L/14 (openai/clip-vit-large-patch14) and its 768-d projection
  vae.*            SD-1.5's AutoencoderKL (diffusers 0.16 names its mid-block attention
                   query / key / value / proj_attn)
  unet.*           SD-1.5's UNet2DConditionModel
  postfuse_module.{mlp1,mlp2}.{layernorm,fc1,fc2}.*, postfuse_module.layer_norm.*
                   FastComposerPostfuseModule (jaxgen.models.fastcomposer.PostfuseMLP)

The official code builds these from runwayml/stable-diffusion-v1-5 (unet/, vae/, text_encoder/)
and openai/clip-vit-large-patch14, so their configs are those models' (the constants below);
`release_configs` reads every size the tensors fix (widths, depths, block kinds, vocabulary,
patch and image size) from the state dict itself and takes the rest (head counts, GroupNorm
groups, activations) from the constants, so smaller checkpoints of the same structure convert
too; `overrides` replaces any field.

* `handles(path)`: whether `jaxgen.convert`'s dispatch sends a file here.
* `from_release(path)` -> (FastComposer, variables): every part through its existing converter
  (`jaxgen.convert.clip`, `vae_kl`, `unet2d_condition`; the post-fuse MLP here), each tensor
  used and shape-checked (WeightsError naming the rest).
* `write_pipeline(src, dst, tokenizer=None)` (what `python -m jaxgen.convert --src=... --dst=...`
  does with a release) -> a pipeline directory that `jaxgen.pipelines.load_pipeline` reads:
  model_index.json ("FastComposerPipeline") and one folder per component in its library's own
  layout (config.json + safetensors: diffusers unet/ vae/, transformers text_encoder/
  image_encoder/, postfuse_module/, scheduler/ = SD-1.5's PNDM config, and tokenizer/ copied
  from `tokenizer`, e.g. an SD-1.5 snapshot's tokenizer/ folder: the release carries none).
  Legacy VAE attention names are renamed to today's (to_q / to_k / to_v / to_out.0), the
  persisted `position_ids` buffers dropped.
* `from_pipeline_dir(dir)` -> (FastComposer, variables) from such a directory.
"""

import json
import math
import os
import re
import shutil
import struct
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert import clip as clip_convert
from jaxgen.convert import from_diffusers, from_transformers
from jaxgen.convert import unet2d_condition as unet_convert
from jaxgen.convert import vae_kl as vae_convert
from jaxgen.convert.common import (PICKLE_SUFFIXES, check_complete, dense_kernel, naming_source,
                                   read_json, read_safetensors, read_state_dict, unflatten)
from jaxgen.errors import ConfigError, WeightsError
from jaxgen.models.fastcomposer import (CLIP_IMAGE_MEAN, CLIP_IMAGE_STD, FastComposer,
                                        PostfuseMLP)

COMPONENTS = ("text_encoder", "image_encoder", "vae", "unet", "postfuse_module")
MARKER = "postfuse_module.mlp1.fc1.weight"  # A key only a FastComposer state dict holds.
PIPELINE_CLASS = "FastComposerPipeline"

# runwayml/stable-diffusion-v1-5's component configs (what the official code loads).
SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}
SD15_VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD15_TEXT_ENCODER = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
    "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "num_attention_heads": 12, "num_hidden_layers": 12,
    "pad_token_id": 1, "projection_dim": 768, "vocab_size": 49408,
}
CLIP_VIT_L14_VISION = {
    "architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
    "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 1024,
    "image_size": 224, "initializer_factor": 1.0, "initializer_range": 0.02,
    "intermediate_size": 4096, "layer_norm_eps": 1e-05, "num_attention_heads": 16,
    "num_channels": 3, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
}
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
HEAD_DIM = 64  # CLIP's head width in every published model (768 / 12, 1024 / 16).

# Pipeline directory layout: component -> (library, class, weights file).
_LAYOUT = {
    "text_encoder": ("transformers", "CLIPTextModel", "model.safetensors"),
    "image_encoder": ("transformers", "CLIPVisionModelWithProjection", "model.safetensors"),
    "vae": ("diffusers", "AutoencoderKL", "diffusion_pytorch_model.safetensors"),
    "unet": ("diffusers", "UNet2DConditionModel", "diffusion_pytorch_model.safetensors"),
    "postfuse_module": ("fastcomposer", "FastComposerPostfuseModule", "model.safetensors"),
}
_LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json")


# ----------------------------------------------------------------------------- reading

def _safetensors_keys(path: str):
  """Tensor names of a .safetensors file from its header alone (None if unreadable)."""
  try:
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      if n > 100_000_000:
        return None
      header = json.loads(f.read(n).decode("utf-8"))
  except (OSError, ValueError, struct.error, UnicodeDecodeError):
    return None
  return [k for k in header if k != "__metadata__"] if isinstance(header, dict) else None


def _torch_keys(path: str):
  """Tensor names of a torch.save file (None if unreadable); zip files are mapped, not read."""
  import zipfile  # pylint: disable=g-import-not-at-top
  try:
    import torch  # pylint: disable=g-import-not-at-top
    state = torch.load(path, map_location="cpu", weights_only=True,
                       mmap=zipfile.is_zipfile(path))
  except Exception:  # pylint: disable=broad-except
    return None  # Not ours to judge: the converter the path goes to reports it.
  return list(state) if isinstance(state, Mapping) else None


def is_release(path: str) -> bool:
  """Whether `path` is a single-file FastComposer state dict (.bin / .pt / .safetensors)."""
  if not os.path.isfile(path):
    return False
  if path.endswith(".safetensors"):
    return MARKER in (_safetensors_keys(path) or ())
  if not path.endswith(PICKLE_SUFFIXES):
    return False
  return MARKER in (_torch_keys(path) or ())


def handles(path: str) -> bool:
  """Whether file `path` is this converter's: any .bin file (the release's name; no other
  converter reads .bin, so an unsafe or foreign pickle is reported here) or a FastComposer
  state dict under another name."""
  return (os.path.isfile(path) and path.endswith(".bin")) or is_release(path)


def split_state(state: Mapping[str, np.ndarray], source: str = "the checkpoint"
                ) -> Dict[str, Dict[str, np.ndarray]]:
  """{component: its state dict, prefix stripped}; unknown prefixes or missing parts raise."""
  parts: Dict[str, Dict[str, np.ndarray]] = {c: {} for c in COMPONENTS}
  unknown = []
  for key, value in state.items():
    prefix, _, rest = key.partition(".")
    if prefix in parts and rest:
      parts[prefix][rest] = value
    else:
      unknown.append(key)
  missing = [c for c in COMPONENTS if not parts[c]]
  if missing or unknown:
    problems = ([f"no {c}.* tensors" for c in missing] +
                ([f"{len(unknown)} tensors of no FastComposer component: {sorted(unknown)[:10]}"]
                 if unknown else []))
    raise WeightsError(f"{source} is not a FastComposer state dict ({'; '.join(problems)}); "
                       f"expected FastComposerModel.state_dict() with the prefixes {COMPONENTS} "
                       "(mit-han-lab/fastcomposer's pytorch_model.bin)")
  return parts


def read_release(path: str) -> Dict[str, Dict[str, np.ndarray]]:
  """The release's state dict split by component (torch.load(weights_only=True) or safetensors)."""
  if not path.endswith(PICKLE_SUFFIXES + (".safetensors",)):
    raise WeightsError(f"{path}: expected FastComposer's pytorch_model.bin (or the same state "
                       "dict as .safetensors / .pt)")
  return split_state(read_state_dict(path), path)


# ----------------------------------------------------------------------------- configs

def _count(state: Mapping[str, Any], pattern: str) -> int:
  """1 + the largest index {i} that `pattern` (a regex with one (\\d+) group) matches."""
  found = [int(m.group(1)) for m in map(re.compile(pattern).match, state) if m]
  return max(found) + 1 if found else 0


def _tensor(state, key: str, component: str):
  if key not in state:
    raise WeightsError(f"the {component} part lacks {key!r}: not the structure of FastComposer's "
                       f"{component}")
  return state[key]


def _groups(channels, preferred: int = 32) -> int:
  """`preferred` GroupNorm groups if they divide every width, else their largest common divisor
  with it (sizes of the tensors do not fix the group count)."""
  return math.gcd(preferred, *[int(c) for c in channels])


def _unet_config(s: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  n = _count(s, r"down_blocks\.(\d+)\.")
  if n == 0:
    raise WeightsError("the unet part has no down_blocks.*: not a UNet2DConditionModel")
  channels = [int(_tensor(s, f"down_blocks.{i}.resnets.0.conv1.weight", "unet").shape[0])
              for i in range(n)]
  attends = lambda kind, i: any(k.startswith(f"{kind}_blocks.{i}.attentions.") for k in s)
  down = ["CrossAttnDownBlock2D" if attends("down", i) else "DownBlock2D" for i in range(n)]
  up = ["CrossAttnUpBlock2D" if attends("up", i) else "UpBlock2D" for i in range(n)]
  has_mid = any(k.startswith("mid_block.") for k in s)
  mid_attends = any(k.startswith("mid_block.attentions.") for k in s)
  cross = sorted({int(v.shape[1]) for k, v in s.items() if k.endswith("attn2.to_k.weight")})
  proj_in = [v for k, v in s.items() if k.endswith(".proj_in.weight")]
  depths = [_count(s, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.") or 1
            for i in range(n)]
  conv_in = _tensor(s, "conv_in.weight", "unet")
  time_dim = int(_tensor(s, "time_embedding.linear_1.weight", "unet").shape[0])
  heads = [math.gcd(SD15_UNET["attention_head_dim"], c) for c in channels]
  config = dict(SD15_UNET)
  config.update(
      block_out_channels=channels, down_block_types=down, up_block_types=up,
      layers_per_block=_count(s, r"down_blocks\.0\.resnets\.(\d+)\."),
      in_channels=int(conv_in.shape[1]), conv_in_kernel=int(conv_in.shape[2]),
      out_channels=int(_tensor(s, "conv_out.weight", "unet").shape[0]),
      conv_out_kernel=int(s["conv_out.weight"].shape[2]),
      attention_head_dim=heads[0] if len(set(heads)) == 1 else heads,
      norm_num_groups=_groups(channels, SD15_UNET["norm_num_groups"]),
      mid_block_type=(None if not has_mid else "UNetMidBlock2DCrossAttn" if mid_attends
                      else "UNetMidBlock2D"),
      use_linear_projection=bool(proj_in) and proj_in[0].ndim == 2,
      transformer_layers_per_block=depths[0] if len(set(depths)) == 1 else depths)
  if len(cross) == 1:
    config["cross_attention_dim"] = cross[0]
  if time_dim != 4 * channels[0]:
    config["time_embedding_dim"] = time_dim
  return config


def _vae_config(s: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  n = _count(s, r"encoder\.down_blocks\.(\d+)\.")
  channels = [int(_tensor(s, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", "vae").shape[0])
              for i in range(n)]
  config = dict(SD15_VAE)
  config.update(
      block_out_channels=channels, down_block_types=["DownEncoderBlock2D"] * n,
      up_block_types=["UpDecoderBlock2D"] * n,
      layers_per_block=_count(s, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
      in_channels=int(_tensor(s, "encoder.conv_in.weight", "vae").shape[1]),
      out_channels=int(_tensor(s, "decoder.conv_out.weight", "vae").shape[0]),
      latent_channels=int(_tensor(s, "decoder.conv_in.weight", "vae").shape[1]),
      norm_num_groups=_groups(channels, SD15_VAE["norm_num_groups"]))
  if "quant_conv.weight" not in s:
    config["use_quant_conv"] = False
  if "post_quant_conv.weight" not in s:
    config["use_post_quant_conv"] = False
  if not any(k.startswith("encoder.mid_block.attentions.") for k in s):
    config["mid_block_add_attention"] = False
  return config


def _heads(width: int) -> int:
  """CLIP's head count for a width: 64-wide heads (one head below 64 or off the grid)."""
  return width // HEAD_DIM if width % HEAD_DIM == 0 else 1


def _text_config(s: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  tokens = _tensor(s, "embeddings.token_embedding.weight", "text_encoder")
  width = int(tokens.shape[1])
  config = dict(SD15_TEXT_ENCODER)
  config.update(
      vocab_size=int(tokens.shape[0]), hidden_size=width,
      max_position_embeddings=int(
          _tensor(s, "embeddings.position_embedding.weight", "text_encoder").shape[0]),
      intermediate_size=int(
          _tensor(s, "encoder.layers.0.mlp.fc1.weight", "text_encoder").shape[0]),
      num_hidden_layers=_count(s, r"encoder\.layers\.(\d+)\."),
      num_attention_heads=_heads(width),
      projection_dim=width)
  return config


def _vision_config(s: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  part = "image_encoder"
  width = int(_tensor(s, "vision_model.embeddings.class_embedding", part).shape[0])
  patch = _tensor(s, "vision_model.embeddings.patch_embedding.weight", part)
  positions = int(_tensor(s, "vision_model.embeddings.position_embedding.weight", part).shape[0])
  side = math.isqrt(positions - 1)
  if side * side != positions - 1:
    raise WeightsError(f"image_encoder: {positions} position embeddings are not 1 + a square "
                       "number of patches")
  config = dict(CLIP_VIT_L14_VISION)
  config.update(
      hidden_size=width, patch_size=int(patch.shape[-1]), num_channels=int(patch.shape[1]),
      image_size=side * int(patch.shape[-1]),
      intermediate_size=int(
          _tensor(s, "vision_model.encoder.layers.0.mlp.fc1.weight", part).shape[0]),
      num_hidden_layers=_count(s, r"vision_model\.encoder\.layers\.(\d+)\."),
      num_attention_heads=_heads(width),
      projection_dim=int(_tensor(s, "visual_projection.weight", part).shape[0]))
  return config


def _postfuse_config(s: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  return {"embed_dim": int(_tensor(s, "layer_norm.weight", "postfuse_module").shape[0])}


_CONFIGS = {"text_encoder": _text_config, "image_encoder": _vision_config, "vae": _vae_config,
            "unet": _unet_config, "postfuse_module": _postfuse_config}


def release_configs(parts: Mapping[str, Mapping[str, np.ndarray]],
                    overrides: Optional[Mapping[str, Mapping[str, Any]]] = None
                    ) -> Dict[str, Dict[str, Any]]:
  """{component: config}: the SD-1.5 / ViT-L/14 configs with every size the tensors fix read from
  them, then `overrides` ({component: {key: value}}) applied."""
  overrides = dict(overrides or {})
  unknown = sorted(set(overrides) - set(COMPONENTS))
  if unknown:
    raise ConfigError(f"config overrides for unknown components {unknown}; known: {COMPONENTS}")
  return {c: {**_CONFIGS[c](parts[c]), **dict(overrides.get(c) or {})} for c in COMPONENTS}


# ----------------------------------------------------------------------------- conversion

def _postfuse_target(key: str) -> Optional[str]:
  """jaxgen path of a FastComposerPostfuseModule tensor ("mlp1.fc1.weight" -> mlp1/fc1/kernel)."""
  m = re.fullmatch(r"(mlp[12])\.(layernorm|fc1|fc2)\.(weight|bias)|(layer_norm)\.(weight|bias)",
                   key)
  if m is None:
    return None
  module = f"{m.group(1)}/{m.group(2)}" if m.group(1) else m.group(4)
  leaf = m.group(3) or m.group(5)
  if leaf == "bias":
    return f"{module}/bias"
  return f"{module}/{'kernel' if module.endswith(('fc1', 'fc2')) else 'scale'}"


def postfuse_abstract_variables(text_dim: int, image_dim: int) -> Dict:
  text = jax.ShapeDtypeStruct((1, 1, text_dim), jnp.float32)
  image = jax.ShapeDtypeStruct((1, 1, image_dim), jnp.float32)
  return jax.eval_shape(PostfuseMLP().init, jax.random.PRNGKey(0), text, image)


def convert_postfuse_state(state: Mapping[str, np.ndarray]) -> Tuple[PostfuseMLP, Dict]:
  """(PostfuseMLP, {"params": ...}) from a FastComposerPostfuseModule state dict."""
  flat, unused = {}, []
  for key, value in state.items():
    target = _postfuse_target(key)
    if target is None:
      unused.append(key)
      continue
    value = np.asarray(value, np.float32)
    flat[f"params/{target}"] = dense_kernel(value) if target.endswith("kernel") else value
  text_dim = int(np.shape(state.get("layer_norm.weight", np.zeros(0)))[0])
  image_dim = int(np.shape(state.get("mlp1.fc1.weight", np.zeros((0, text_dim))))[1]) - text_dim
  variables = unflatten(flat)
  check_complete(variables, postfuse_abstract_variables(text_dim, max(image_dim, 0)), unused)
  return PostfuseMLP(), jax.tree_util.tree_map(jnp.asarray, variables)


def _without_buffers(state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """The persisted position_ids buffers of older transformers exports are no weights."""
  return {k: v for k, v in state.items() if not k.endswith("embeddings.position_ids")}


def convert_parts(parts: Mapping[str, Mapping[str, np.ndarray]],
                  configs: Mapping[str, Mapping[str, Any]]) -> Tuple[FastComposer, Dict]:
  """(FastComposer, {"params": {component: ...}}) from the split state dict and its configs."""
  out = {}
  modules = {}
  for name, convert in (("text_encoder", clip_convert.convert_state),
                        ("image_encoder", clip_convert.convert_state),
                        ("vae", vae_convert.convert_diffusers_state),
                        ("unet", unet_convert.convert_diffusers_state)):
    try:
      modules[name], variables = convert(configs[name], parts[name])
    except WeightsError as e:
      raise WeightsError(f"{name}: {e}") from None
    out[name] = variables["params"]
  try:
    _, variables = convert_postfuse_state(parts["postfuse_module"])
  except WeightsError as e:
    raise WeightsError(f"postfuse_module: {e}") from None
  out["postfuse_module"] = variables["params"]
  width = modules["text_encoder"].text_model.hidden_size
  if configs["postfuse_module"]["embed_dim"] != width:
    raise WeightsError(f"postfuse_module width {configs['postfuse_module']['embed_dim']} differs "
                       f"from the text encoder's {width}")
  model = FastComposer(
      text_encoder=modules["text_encoder"], image_encoder=modules["image_encoder"],
      unet=modules["unet"], vae=modules["vae"], train_text_encoder=False,
      train_image_encoder=True, image_mean=CLIP_IMAGE_MEAN, image_std=CLIP_IMAGE_STD)
  return model, {"params": out}


def from_release(path: str, overrides: Optional[Mapping[str, Mapping[str, Any]]] = None
                 ) -> Tuple[FastComposer, Dict]:
  """(FastComposer, variables) of a FastComposer release file; errors name the file."""
  parts = read_release(path)
  with naming_source(path):
    return convert_parts(parts, release_configs(parts, overrides))


# ----------------------------------------------------------------------------- directories

def _torch_layout(name: str, state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """A component's tensors under the names its library loads today."""
  state = _without_buffers(state)
  if name == "text_encoder":  # CLIPTextModel keeps its tower under text_model.
    return {f"text_model.{k}": v for k, v in state.items()}
  if name == "vae":
    renamed = {}
    for key, value in state.items():
      module, _, leaf = key.rpartition(".")
      head, _, last = module.rpartition(".")
      if ".attentions." in module and last in _LEGACY_VAE_ATTENTION:
        module = f"{head}.{_LEGACY_VAE_ATTENTION[last]}"
        if value.ndim == 4:  # Very old exports stored these Linears as 1x1 convs.
          value = value[:, :, 0, 0]
      renamed[f"{module}.{leaf}"] = value
    return renamed
  return dict(state)


def _write_component(dst: str, name: str, config: Mapping[str, Any],
                     state: Mapping[str, np.ndarray]) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  library, cls, weights = _LAYOUT[name]
  folder = os.path.join(dst, name)
  os.makedirs(folder, exist_ok=True)
  config = dict(config)
  if library == "diffusers":
    config["_class_name"] = cls
  elif library == "transformers":
    config["architectures"] = [cls]
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  tensors = {k: np.ascontiguousarray(v) for k, v in _torch_layout(name, state).items()}
  save_file(tensors, os.path.join(folder, weights), metadata={"format": "pt"})


def copy_tokenizer(src: str, dst: str) -> None:
  """Copies a CLIP tokenizer folder (vocab.json + merges.txt or tokenizer.json, its configs) to
  dst/tokenizer; `src` may be the folder itself or a pipeline directory holding tokenizer/."""
  if os.path.isdir(os.path.join(src, "tokenizer")) and not os.path.isfile(
      os.path.join(src, "vocab.json")):
    src = os.path.join(src, "tokenizer")
  present = [f for f in _TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))]
  if not ({"vocab.json", "merges.txt"} <= set(present) or "tokenizer.json" in present):
    raise WeightsError(f"{src} holds no CLIP tokenizer (vocab.json + merges.txt or "
                       "tokenizer.json); pass Stable Diffusion 1.5's tokenizer/ folder")
  os.makedirs(os.path.join(dst, "tokenizer"), exist_ok=True)
  for f in present:
    shutil.copyfile(os.path.join(src, f), os.path.join(dst, "tokenizer", f))


def write_pipeline(src: str, dst: str, tokenizer: Optional[str] = None,
                   overrides: Optional[Mapping[str, Mapping[str, Any]]] = None) -> str:
  """Converts release `src` (checked tensor by tensor first) into pipeline directory `dst`.

  `tokenizer`: a CLIP tokenizer folder to copy into dst/tokenizer (SD-1.5's); without it the
  directory has none and `load_pipeline` asks for one. Returns dst.
  """
  parts = read_release(src)
  configs = release_configs(parts, overrides)
  with naming_source(src):
    convert_parts(parts, configs)  # Every tensor used and of the right shape, before writing.
  dst = os.path.abspath(dst)
  if os.path.exists(os.path.join(dst, "model_index.json")):
    raise WeightsError(f"{dst} already holds a pipeline (model_index.json); pass a new --dst or "
                       "remove it")
  os.makedirs(dst, exist_ok=True)
  for name in COMPONENTS:
    _write_component(dst, name, configs[name], parts[name])
  os.makedirs(os.path.join(dst, "scheduler"), exist_ok=True)
  with open(os.path.join(dst, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(SD15_SCHEDULER, f, indent=2, sort_keys=True)
  index = {"_class_name": PIPELINE_CLASS, "source": os.path.basename(src),
           "scheduler": ["diffusers", "PNDMScheduler"],
           "tokenizer": ["transformers", "CLIPTokenizer"] if tokenizer else [None, None]}
  index.update({name: list(_LAYOUT[name][:2]) for name in COMPONENTS})
  if tokenizer:
    copy_tokenizer(tokenizer, dst)
  with open(os.path.join(dst, "model_index.json"), "w") as f:
    json.dump(index, f, indent=2, sort_keys=True)
  return dst


def _component(path: str, name: str) -> str:
  folder = os.path.join(path, name)
  if not os.path.isdir(folder):
    raise WeightsError(f"{folder} not found: a FastComposer pipeline directory (python -m "
                       f"jaxgen.convert --src=pytorch_model.bin --dst=DIR) holds {COMPONENTS}")
  return folder


def from_pipeline_dir(path: str) -> Tuple[FastComposer, Dict]:
  """(FastComposer, variables) from a directory `write_pipeline` wrote."""
  modules, params = {}, {}
  for name, read in (("text_encoder", from_transformers), ("image_encoder", from_transformers),
                     ("vae", from_diffusers), ("unet", from_diffusers)):
    modules[name], variables = read(_component(path, name))
    params[name] = variables["params"]
  folder = _component(path, "postfuse_module")
  weights = os.path.join(folder, _LAYOUT["postfuse_module"][2])
  with naming_source(weights):
    _, variables = convert_postfuse_state(read_safetensors(weights))
  params["postfuse_module"] = variables["params"]
  config = read_json(os.path.join(folder, "config.json"), "the post-fuse module's config")
  width = modules["text_encoder"].text_model.hidden_size
  if config.get("embed_dim", width) != width:
    raise WeightsError(f"{folder}: embed_dim {config.get('embed_dim')} differs from the text "
                       f"encoder's width {width}")
  model = FastComposer(
      text_encoder=modules["text_encoder"], image_encoder=modules["image_encoder"],
      unet=modules["unet"], vae=modules["vae"], train_text_encoder=False,
      train_image_encoder=True, image_mean=CLIP_IMAGE_MEAN, image_std=CLIP_IMAGE_STD)
  return model, {"params": params}
