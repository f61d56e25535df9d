"""The DC-AE paper's diffusion checkpoints (efficientvit `DCAE_Diffusion_HF`) -> jaxgen modules.

A checkpoint directory (hub `mit-han-lab/dc-ae-f32c32-in-1.0-uvit-h-in-512px` and siblings, as
huggingface_hub's PyTorchModelHubMixin saves `DCAE_Diffusion_HF`) holds
  config.json        {"model_name": "<name>"}: the name alone picks the recipe (efficientvit
                     `diffusion_model_zoo.REGISTERED_DCAE_DIFFUSION_MODEL`);
  model.safetensors  `autoencoder.*` (efficientvit's own DC-AE layout, converted by
                     `jaxgen.convert.dcae.original_to_diffusers`) and `diffusion_model.*` (the
                     UViT or DiT of `efficientvit/diffusioncore/models/{uvit,dit}.py`).

The recipe mirrors efficientvit's `EvaluatorConfig`: `autoencoder` (DC-AE name),
`scaling_factor`, `resolution` (512; the latent side is resolution // the autoencoder's
compression), `model` ("uvit" | "dit") and the `uvit` / `dit` config fields (UViTConfig /
DiTConfig names and defaults). config.json may carry any of these keys next to model_name to
override the named recipe (or, with `model` given, describe an unregistered model), plus
`autoencoder_config` (diffusers AutoencoderDC keys) for a DC-AE that is not a published
variant; efficientvit itself reads model_name only.

Backbone layouts (efficientvit names -> jaxgen):
  UViT: patch_embed.proj, label_emb.embedding_table (num_classes + 1 rows; the last is the
    null label), pos_embed (1, 2 + L, d) learned, [time_embed.0 / .2 with mlp_time_embed],
    in_blocks.i / mid_block / out_blocks.i . {norm1, attn.qkv (no bias), attn.proj, norm2,
    mlp.fc1, mlp.fc2, [skip_linear]}, norm, decoder_pred -> `jaxgen.models.uvit.UViT`
    (LayerNorm eps 1e-5, exact GELU, tokens [label, time, patches]).
  DiT: x_embedder.proj, t_embedder.mlp.0 / .2, y_embedder.embedding_table, pos_embed (the fixed
    sin-cos table, checked and recomputed), blocks.i . {attn.qkv (bias), attn.proj, mlp.fc1,
    mlp.fc2, adaLN_modulation.1}, final_layer.{linear, adaLN_modulation.1} ->
    `jaxgen.models.dit.DiT` (learn_sigma, tanh GELU, LayerNorm eps 1e-6).
The fused qkv Linear (rows [q; k; v], heads contiguous in each) is split into to_q/to_k/to_v.
"""

import contextlib
import copy
import dataclasses
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert import dcae as dcae_convert
from jaxgen.convert.common import (check_complete, conv_kernel, dense_kernel, naming_source,
                                   read_model_dir, unflatten, weights_file)
from jaxgen.errors import ConfigError, WeightsError
from jaxgen.models.dcae import DCAE, canonical_variant, dcae_config
from jaxgen.models.dit import DiT, get_2d_sincos_pos_embed
from jaxgen.models.uvit import UViT

WEIGHTS_NAME = "model.safetensors"

# efficientvit's UViTConfig / DiTConfig defaults (the fields that shape the network or its
# sampler; names as there).
UVIT_DEFAULTS = dict(patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                     mlp_ratio=4.0, mlp_time_embed=False, qkv_bias=False, act_layer="gelu",
                     class_dropout_prob=0.1, num_classes=1000, eval_scheduler="DPM_Solver",
                     num_inference_steps=30, train_scheduler="DPM_Solver")
DIT_DEFAULTS = dict(patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                    mlp_ratio=4.0, post_norm=False, class_dropout_prob=0.1, num_classes=1000,
                    learn_sigma=True, unconditional=False, eval_scheduler="GaussianDiffusion",
                    num_inference_steps=250)
# efficientvit's DiT builds its GaussianDiffusion sampler with create_diffusion("250") whatever
# num_inference_steps says (that field only sizes its UniPC alternative).
DIT_GAUSSIAN_DIFFUSION_STEPS = 250

_UVIT_SIZES = {"s": (12, 512, 8), "h": (28, 1152, 16), "2b": (28, 2048, 32)}
_USIT = dict(train_scheduler="SiTSampler", eval_scheduler="ODE_dopri5", num_inference_steps=250)


def _registry() -> Dict[str, Dict[str, Any]]:
  """REGISTERED_DCAE_DIFFUSION_MODEL as recipes (EvaluatorConfig-shaped dicts)."""
  out = {}
  # autoencoder name, scaling_factor, latent channels
  ae = {"f32c32": ("dc-ae-f32c32-in-1.0", 0.3189, 32),
        "f64c128": ("dc-ae-f64c128-in-1.0", 0.2889, 128)}

  def recipe(ae_key, model, fields):
    name, scaling, channels = ae[ae_key]
    return {"autoencoder": name, "scaling_factor": scaling, "resolution": 512, "model": model,
            model: dict(fields, in_channels=channels, patch_size=1)}
  for suffix in ("", "-trainbs1024"):
    out["dc-ae-f32c32-in-1.0-dit-xl-in-512px" + suffix] = recipe(
        "f32c32", "dit", dict(depth=28, hidden_size=1152, num_heads=16))
  for size in ("s", "h", "2b"):
    depth, width, heads = _UVIT_SIZES[size]
    fields = dict(depth=depth, hidden_size=width, num_heads=heads)
    out[f"dc-ae-f32c32-in-1.0-uvit-{size}-in-512px"] = recipe("f32c32", "uvit", fields)
    if size != "s":
      out[f"dc-ae-f32c32-in-1.0-usit-{size}-in-512px"] = recipe("f32c32", "uvit",
                                                                dict(fields, **_USIT))
      for suffix in ("", "-train2000k"):
        out[f"dc-ae-f64c128-in-1.0-uvit-{size}-in-512px{suffix}"] = recipe("f64c128", "uvit",
                                                                           fields)
  return out


REGISTERED = _registry()
_OVERRIDE_KEYS = ("autoencoder", "autoencoder_config", "scaling_factor", "resolution", "model",
                  "uvit", "dit")


def is_dcae_diffusion_config(config: Any) -> bool:
  """True for a DCAE_Diffusion_HF config.json: a JSON object whose "model_name" is a registered
  DC-AE diffusion model (an autoencoder + backbone name such as
  "dc-ae-f32c32-in-1.0-uvit-h-in-512px"), or which names its backbone with "model": "uvit" /
  "dit" next to a model_name. A DC-AE autoencoder alone (DCAE_HF: model_name
  "dc-ae-f32c32-in-1.0") and diffusers configs (`_class_name`) are not."""
  if not isinstance(config, Mapping) or not isinstance(config.get("model_name"), str):
    return False
  return config["model_name"] in REGISTERED or config.get("model") in ("uvit", "dit")


def resolve_config(config: Mapping) -> Dict[str, Any]:
  """The full recipe of a config.json: the registered one of its model_name, overridden by
  the EvaluatorConfig keys it carries, every backbone field filled with efficientvit's default."""
  name = config.get("model_name")
  if name in REGISTERED:
    recipe = copy.deepcopy(REGISTERED[name])
  elif config.get("model") in ("uvit", "dit"):
    recipe = {"resolution": 512}
  else:
    raise WeightsError(f"config.json model_name {name!r} is not a DC-AE diffusion model "
                       f"efficientvit publishes (known: {sorted(REGISTERED)}); an unregistered "
                       "model needs \"model\" (uvit | dit), its config fields and \"autoencoder\".")
  for key in _OVERRIDE_KEYS:
    if key not in config:
      continue
    if key in ("uvit", "dit") and isinstance(config[key], Mapping):
      recipe[key] = {**recipe.get(key, {}), **config[key]}
    else:
      recipe[key] = config[key]
  model = recipe.get("model")
  if model not in ("uvit", "dit"):
    raise WeightsError(f"config.json model {model!r}: efficientvit's DC-AE diffusion models are "
                       "'uvit' or 'dit'.")
  defaults = UVIT_DEFAULTS if model == "uvit" else DIT_DEFAULTS
  recipe[model] = {**defaults, **recipe.get(model, {})}
  unknown = sorted(set(recipe[model]) - set(defaults) - {"input_size", "name", "pretrained_path",
                                                         "pretrained_source", "use_checkpoint",
                                                         "attn_mode"})
  if unknown:
    raise WeightsError(f"config.json {model} fields {unknown} are not {model.upper()} config "
                       f"fields jaxgen reads (known: {sorted(defaults)}).")
  if recipe.get("autoencoder") is None and recipe.get("autoencoder_config") is None:
    raise WeightsError("config.json names no autoencoder: set \"autoencoder\" (a DC-AE name) or "
                       "\"autoencoder_config\".")
  if recipe.get("scaling_factor") is None:
    raise WeightsError("config.json gives no scaling_factor for the DC-AE latents.")
  return recipe


@dataclasses.dataclass(frozen=True)
class DCAEDiffusion:
  """A converted checkpoint: the backbone and autoencoder modules with their variables."""
  name: Optional[str]
  recipe: Dict[str, Any]          # resolve_config's result
  backbone: Any                   # UViT or DiT
  backbone_variables: Dict
  autoencoder: DCAE
  autoencoder_variables: Dict

  @property
  def kind(self) -> str:
    return self.recipe["model"]

  @property
  def fields(self) -> Dict[str, Any]:
    return self.recipe[self.kind]

  @property
  def scaling_factor(self) -> float:
    return float(self.recipe["scaling_factor"])

  @property
  def latent_shape(self) -> Tuple[int, int, int]:
    side = latent_side(self.recipe, self.autoencoder)
    return (side, side, int(self.fields["in_channels"]))

  @property
  def num_classes(self) -> int:
    return int(self.fields["num_classes"])

  @property
  def sampler(self) -> str:
    """efficientvit's eval_scheduler: "DPM_Solver", "ODE_dopri5" / "ODE_heun2" (USiT) or
    "GaussianDiffusion" (DiT)."""
    return str(self.fields["eval_scheduler"])

  @property
  def num_inference_steps(self) -> int:
    if self.kind == "dit":
      return DIT_GAUSSIAN_DIFFUSION_STEPS
    return int(self.fields["num_inference_steps"])


def latent_side(recipe: Mapping, autoencoder: DCAE) -> int:
  """efficientvit's input_size: its Evaluator sets it to resolution // spatial compression."""
  return int(recipe.get("resolution", 512)) // autoencoder.spatial_compression_ratio


def from_directory(path: str, dtype=None) -> DCAEDiffusion:
  """Reads and converts a DCAE_Diffusion_HF directory (config.json + model.safetensors)."""
  config, state = read_model_dir(path, WEIGHTS_NAME)
  with naming_source(weights_file(path, WEIGHTS_NAME)):
    return convert_state(config, state, dtype=dtype)


def convert_state(config: Mapping, state: Mapping[str, np.ndarray], dtype=None) -> DCAEDiffusion:
  """A DCAEDiffusion from a config.json dict and the model.safetensors state dict."""
  if not is_dcae_diffusion_config(config):
    raise WeightsError(f"config.json {dict(config)!r} is not a DCAE_Diffusion_HF config (it "
                       "needs a registered DC-AE diffusion model_name, e.g. "
                       "'dc-ae-f32c32-in-1.0-uvit-h-in-512px').")
  recipe = resolve_config(config)
  parts: Dict[str, Dict[str, np.ndarray]] = {"autoencoder": {}, "diffusion_model": {}}
  stray = []
  for key, value in state.items():
    prefix, _, rest = key.partition(".")
    if prefix in parts and rest:
      parts[prefix][rest] = value
    else:
      stray.append(key)
  if stray:
    raise WeightsError(f"tensors outside autoencoder.* / diffusion_model.* ({len(stray)}): "
                       f"{sorted(stray)[:20]}; is this a DCAE_Diffusion_HF checkpoint?")
  for prefix, tensors in parts.items():
    if not tensors:
      raise WeightsError(f"no {prefix}.* tensors: a DCAE_Diffusion_HF checkpoint holds both the "
                         "autoencoder and the diffusion model.")

  ae_config = recipe.get("autoencoder_config")
  if ae_config is None:
    try:
      ae_config = dcae_config(canonical_variant(str(recipe["autoencoder"])))
    except ConfigError as e:
      raise WeightsError(f"autoencoder {recipe['autoencoder']!r}: {e}; give its architecture as "
                         "\"autoencoder_config\" (AutoencoderDC keys).") from None
  ae_module = dcae_convert.module_from_config(ae_config)
  side = latent_side(recipe, ae_module)
  with _prefixed("diffusion_model."):
    if recipe["model"] == "uvit":
      backbone, variables = convert_uvit(recipe["uvit"], parts["diffusion_model"], side, dtype)
    else:
      backbone, variables = convert_dit(recipe["dit"], parts["diffusion_model"], side, dtype)
  with _prefixed("autoencoder."):
    autoencoder, ae_vars = dcae_convert.convert_diffusers_state(
        ae_config, dcae_convert.original_to_diffusers(parts["autoencoder"], ae_config))
  if dtype is not None:
    autoencoder = autoencoder.clone(dtype=dtype)
  return DCAEDiffusion(config.get("model_name"), recipe, backbone, variables, autoencoder,
                       ae_vars)


def abstract_checkpoint(model_name: str) -> DCAEDiffusion:
  """The registered checkpoint `model_name` with abstract variables (ShapeDtypeStructs, nothing
  allocated): what compiling or memory planning of a published model needs without its file."""
  recipe = resolve_config({"model_name": model_name})
  ae_config = dcae_config(canonical_variant(str(recipe["autoencoder"])))
  autoencoder = dcae_convert.module_from_config(ae_config)
  side = latent_side(recipe, autoencoder)
  fields = recipe[recipe["model"]]
  backbone = uvit_module(fields) if recipe["model"] == "uvit" else dit_module(fields)
  return DCAEDiffusion(model_name, recipe, backbone,
                       _abstract(backbone, side, int(fields["in_channels"])), autoencoder,
                       dcae_convert.abstract_variables(autoencoder))


@contextlib.contextmanager
def _prefixed(prefix: str):
  """Names the part of the checkpoint a WeightsError is about (its tensor names are relative
  to `prefix`)."""
  try:
    yield
  except WeightsError as e:
    raise WeightsError(f"{prefix}* (tensor names below are relative to it): {e}") from None


def uvit_module(fields: Mapping, dtype=None) -> UViT:
  """efficientvit's UViT(cfg) as a jaxgen UViT."""
  if fields["act_layer"] != "gelu":
    raise WeightsError(f"uvit act_layer {fields['act_layer']!r}: only 'gelu' (every published "
                       "model's) is supported.")
  if int(fields["num_classes"]) <= 0 or not float(fields["class_dropout_prob"]) > 0:
    raise WeightsError("uvit: only class-conditional models with a null label (num_classes > "
                       "0, class_dropout_prob > 0) are supported.")
  d = int(fields["hidden_size"])
  return UViT(depth=int(fields["depth"]), hidden_size=d, num_heads=int(fields["num_heads"]),
              patch_size=int(fields["patch_size"]), num_classes=int(fields["num_classes"]),
              mlp_ratio=float(fields["mlp_ratio"]), qkv_bias=bool(fields["qkv_bias"]),
              mlp_time_embed=bool(fields["mlp_time_embed"]),
              time_embed_hidden=4 * d if fields["mlp_time_embed"] else None,
              out_channels=int(fields["in_channels"]), norm_eps=1e-5,
              dtype=dtype or jnp.float32)


def dit_module(fields: Mapping, dtype=None) -> DiT:
  """efficientvit's DiT(cfg) as a jaxgen DiT."""
  if fields["post_norm"] or fields["unconditional"]:
    raise WeightsError("dit: post_norm / unconditional DiTs are not supported (no published "
                       "model uses them).")
  if not float(fields["class_dropout_prob"]) > 0:
    raise WeightsError("dit: only models with a null label (class_dropout_prob > 0) are "
                       "supported.")
  return DiT(depth=int(fields["depth"]), hidden_size=int(fields["hidden_size"]),
             num_heads=int(fields["num_heads"]), patch_size=int(fields["patch_size"]),
             num_classes=int(fields["num_classes"]), learn_sigma=bool(fields["learn_sigma"]),
             mlp_ratio=float(fields["mlp_ratio"]), norm_eps=1e-6, time_freq_shift=0.0,
             dtype=dtype or jnp.float32)


def _abstract(model, side: int, channels: int) -> Dict:
  x = jax.ShapeDtypeStruct((1, side, side, channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  y = jax.ShapeDtypeStruct((1,), jnp.int32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, y)


def _put(flat: Dict, target: str, leaf: str, value: np.ndarray):
  """One torch tensor (.weight / .bias) into the flat flax map."""
  value = np.asarray(value, np.float32)
  if leaf == "bias":
    flat[f"params/{target}/bias"] = value
  elif target.endswith("embedding_table"):
    flat[f"params/{target}/embedding"] = value
  elif re.search(r"(^|/)(norm\w*)$", target):
    flat[f"params/{target}/scale"] = value
  else:
    flat[f"params/{target}/kernel"] = conv_kernel(value) if value.ndim == 4 else dense_kernel(
        value)


def _put_qkv(flat: Dict, attn: str, leaf: str, value: np.ndarray):
  """The fused qkv Linear ((3 d, d) weight, (3 d,) bias) as to_q / to_k / to_v."""
  for part, chunk in zip(("to_q", "to_k", "to_v"), np.split(np.asarray(value), 3, axis=0)):
    _put(flat, f"{attn}/{part}", leaf, chunk)


_BLOCK_PARTS = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attn/to_out",
                "mlp.fc1": "fc1", "mlp.fc2": "fc2", "skip_linear": "skip_linear",
                "adaLN_modulation.1": "adaLN_modulation"}


def _block_target(block: str, rest: str) -> Optional[Tuple[str, str]]:
  module, _, leaf = rest.rpartition(".")
  if module in _BLOCK_PARTS and leaf in ("weight", "bias"):
    return f"{block}/{_BLOCK_PARTS[module]}", leaf
  return None


def convert_uvit(fields: Mapping, state: Mapping[str, np.ndarray], side: int, dtype=None):
  """(UViT, {"params": ...}) from efficientvit UViT tensors (names without diffusion_model.)."""
  model = uvit_module(fields, dtype)
  top = {"patch_embed.proj": "patch_embed", "label_emb.embedding_table": "label_emb/"
         "embedding_table", "time_embed.0": "time_embed/linear_1", "time_embed.2":
         "time_embed/linear_2", "norm": "norm", "decoder_pred": "decoder_pred"}
  flat: Dict[str, np.ndarray] = {}
  unused = []
  for key, value in state.items():
    if key == "pos_embed":
      flat["params/pos_embed"] = np.asarray(value, np.float32)
      continue
    m = re.fullmatch(r"(in_blocks)\.(\d+)\.(.+)|(mid_block)\.(.+)|(out_blocks)\.(\d+)\.(.+)", key)
    if m:
      if m.group(1) or m.group(6):
        block, rest = (f"{m.group(1)}_{m.group(2)}", m.group(3)) if m.group(1) else (
            f"{m.group(6)}_{m.group(7)}", m.group(8))
      else:
        block, rest = "mid_block", m.group(5)
      qkv = re.fullmatch(r"attn\.qkv\.(weight|bias)", rest)
      if qkv:
        _put_qkv(flat, f"{block}/attn", qkv.group(1), value)
        continue
      target = _block_target(block, rest)
    else:
      module, _, leaf = key.rpartition(".")
      target = (top[module], leaf) if module in top and leaf in ("weight", "bias") else None
    if target is None:
      unused.append(key)
      continue
    _put(flat, target[0], target[1], value)
  variables = unflatten(flat)
  check_complete(variables, _abstract(model, side, int(fields["in_channels"])), unused)
  return model, jax.tree_util.tree_map(jnp.asarray, variables)


def convert_dit(fields: Mapping, state: Mapping[str, np.ndarray], side: int, dtype=None):
  """(DiT, {"params": ...}) from efficientvit DiT tensors (names without diffusion_model.)."""
  model = dit_module(fields, dtype)
  top = {"x_embedder.proj": "x_embedder", "t_embedder.mlp.0": "t_embedder/linear_1",
         "t_embedder.mlp.2": "t_embedder/linear_2",
         "y_embedder.embedding_table": "y_embedder/embedding_table",
         "final_layer.linear": "final_layer/linear",
         "final_layer.adaLN_modulation.1": "final_layer/adaLN_modulation"}
  flat: Dict[str, np.ndarray] = {}
  unused = []
  for key, value in state.items():
    if key == "pos_embed":
      _check_pos_embed(np.asarray(value, np.float32), int(fields["hidden_size"]),
                       side // int(fields["patch_size"]))
      continue
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if m:
      block, rest = f"blocks_{m.group(1)}", m.group(2)
      qkv = re.fullmatch(r"attn\.qkv\.(weight|bias)", rest)
      if qkv:
        _put_qkv(flat, f"{block}/attn", qkv.group(1), value)
        continue
      target = _block_target(block, rest)
    else:
      module, _, leaf = key.rpartition(".")
      target = (top[module], leaf) if module in top and leaf in ("weight", "bias") else None
    if target is None:
      unused.append(key)
      continue
    _put(flat, target[0], target[1], value)
  variables = unflatten(flat)
  check_complete(variables, _abstract(model, side, int(fields["in_channels"])), unused)
  return model, jax.tree_util.tree_map(jnp.asarray, variables)


def _check_pos_embed(table: np.ndarray, dim: int, grid: int):
  """DiT's pos_embed is a frozen sin-cos table that jaxgen recomputes: it must be that table."""
  want = get_2d_sincos_pos_embed(dim, grid, grid)[None]
  if table.shape != want.shape:
    raise WeightsError(f"pos_embed: checkpoint {table.shape} vs model {want.shape} (a {grid}x"
                       f"{grid} token grid of width {dim}); check resolution / patch_size.")
  err = float(np.abs(table - want).max())
  if err > 1e-5:
    raise WeightsError(f"pos_embed differs from DiT's fixed sin-cos table by {err:.2e}: jaxgen's "
                       "DiT recomputes that table and cannot hold a trained one.")

