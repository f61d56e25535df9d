"""CLIP text and image encoders (Radford et al. 2021), weight-compatible with transformers.

`CLIPModel` mirrors transformers' `CLIPModel` (and its text-only / vision-only variants):

  text:   token + position embeddings -> pre-LN encoder layers under a causal mask (and the
          padding mask, when given) -> final LayerNorm = `text_hidden_states`; the state at
          the end-of-text token -> text_projection (no bias) = `encode_text`.
  image:  patch conv (no bias), class token, position embeddings -> pre_layrnorm -> encoder
          layers = `image_hidden_states`; post_layernorm(class token) -> visual_projection
          = `encode_image` (NHWC pixels, normalised as CLIP's image processor does).

`encode_text` / `encode_image` return what transformers' `get_text_features` /
`get_image_features` return: projected, not L2-normalised. `__call__` gives CLIPModel's
forward (normalised embeddings and the scaled cosine logits). The end-of-text position follows
transformers: the largest id when `eos_token_id == 2` (configs from before transformers PR
#24773, where the real eos id 49407 is the largest), else the first `eos_token_id`.

Build from a transformers `config.json` with `clip(**config)` (registered as "clip"), or load
weights with `jaxgen.convert.from_transformers(path)`. Parameter names follow transformers'
(`text_model/layers_{i}/self_attn/...`); attention is jaxgen's shared `Attention` (to_q, to_k,
to_v, to_out) with a causal / padding mask.
"""

from typing import Any, Dict, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.errors import ConfigError, DataError
from jaxgen.nn.attention import Attention
from jaxgen.registry import MODELS

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


class CLIPEncoderLayer(nn.Module):
  """x + attn(LN(x)); x + fc2(act(fc1(LN(x))))."""
  hidden_size: int
  num_heads: int
  intermediate_size: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    norm = lambda name: nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name=name)
    x = x + Attention(self.hidden_size, self.num_heads, dtype=self.dtype, name="self_attn")(
        norm("layer_norm1")(x), mask=mask)
    h = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(norm("layer_norm2")(x))
    h = nn.Dense(self.hidden_size, dtype=self.dtype, name="fc2")(ACTIVATIONS[self.hidden_act](h))
    return x + h


def _check_act(act: str) -> str:
  if act not in ACTIVATIONS:
    raise ConfigError(f"CLIP hidden_act {act!r} is not supported; known: {sorted(ACTIVATIONS)}")
  return act


class CLIPTextTransformer(nn.Module):
  """input_ids (B, L) -> (last_hidden_state (B, L, D), pooled (B, D))."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask=None):
    _check_act(self.hidden_act)
    b, length = input_ids.shape
    if length > self.max_position_embeddings:
      raise DataError(f"CLIP text: {length} tokens > max_position_embeddings "
                      f"{self.max_position_embeddings}")
    embed = lambda n, name: nn.Embed(n, self.hidden_size, dtype=self.dtype, name=name)
    x = (embed(self.vocab_size, "token_embedding")(input_ids) +
         embed(self.max_position_embeddings, "position_embedding")(jnp.arange(length))[None])
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is not None:  # Padding keys are masked too (transformers' causal mask).
      mask = mask & (jnp.asarray(attention_mask) > 0)[:, None, None, :]
    for i in range(self.num_hidden_layers):
      x = CLIPEncoderLayer(self.hidden_size, self.num_attention_heads, self.intermediate_size,
                           self.hidden_act, self.layer_norm_eps, self.dtype,
                           name=f"layers_{i}")(x, mask)
    x = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x)
    if self.eos_token_id == 2:  # Legacy configs: the eot id is the largest id of the sequence.
      eos_pos = jnp.argmax(input_ids, axis=-1)
    else:
      eos_pos = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
    return x, x[jnp.arange(b), eos_pos]


class CLIPVisionTransformer(nn.Module):
  """NHWC pixels (B, S, S, C) -> (last_hidden_state (B, 1 + N, D), pooled (B, D))."""
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels):
    _check_act(self.hidden_act)
    b, h, w, _ = pixels.shape
    if (h, w) != (self.image_size, self.image_size):
      raise DataError(f"CLIP vision: input {h}x{w} but the model takes "
                      f"{self.image_size}x{self.image_size} (resize/crop first)")
    p = self.patch_size
    x = nn.Conv(self.hidden_size, (p, p), (p, p), padding="VALID", use_bias=False,
                dtype=self.dtype, name="patch_embedding")(pixels)
    x = x.reshape(b, -1, self.hidden_size)  # Row-major patches, as torch's flatten(2).
    cls = self.param("class_embedding", nn.initializers.normal(1.0), (self.hidden_size,))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.hidden_size)), x], 1)
    x = x + nn.Embed(x.shape[1], self.hidden_size, dtype=self.dtype,
                     name="position_embedding")(jnp.arange(x.shape[1]))[None]
    x = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="pre_layrnorm")(x)
    for i in range(self.num_hidden_layers):
      x = CLIPEncoderLayer(self.hidden_size, self.num_attention_heads, self.intermediate_size,
                           self.hidden_act, self.layer_norm_eps, self.dtype,
                           name=f"layers_{i}")(x)
    pooled = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(x[:, 0])
    return x, pooled


class CLIPModel(nn.Module):
  """Text and/or image towers with their projections (either tower may be None).

  `projection_dim=None` leaves the towers unprojected (transformers' CLIPTextModel /
  CLIPVisionModel): `encode_text` / `encode_image` then return the pooled states.
  """
  text_model: Optional[CLIPTextTransformer] = None
  vision_model: Optional[CLIPVisionTransformer] = None
  projection_dim: Optional[int] = 512
  logit_scale_init_value: float = 2.6592
  dtype: Any = jnp.float32

  def setup(self):
    if self.projection_dim is not None:
      dense = lambda: nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype)
      if self.text_model is not None:
        self.text_projection = dense()
      if self.vision_model is not None:
        self.visual_projection = dense()
    if self.text_model is not None and self.vision_model is not None:
      self.logit_scale = self.param(
          "logit_scale", nn.initializers.constant(self.logit_scale_init_value), ())

  def _tower(self, which: str):
    tower = getattr(self, which)
    if tower is None:
      raise ConfigError(f"this CLIP model has no {which} (loaded from a single-tower checkpoint)")
    return tower

  def text_outputs(self, input_ids, attention_mask=None) -> Dict[str, jnp.ndarray]:
    """{"last_hidden_state", "pooler_output", "text_embeds"} (embeds projected, unnormalised)."""
    hidden, pooled = self._tower("text_model")(input_ids, attention_mask)
    embeds = pooled if self.projection_dim is None else self.text_projection(pooled)
    return {"last_hidden_state": hidden, "pooler_output": pooled, "text_embeds": embeds}

  def image_outputs(self, pixels) -> Dict[str, jnp.ndarray]:
    """{"last_hidden_state", "pooler_output", "image_embeds"} of NHWC pixels."""
    hidden, pooled = self._tower("vision_model")(pixels)
    embeds = pooled if self.projection_dim is None else self.visual_projection(pooled)
    return {"last_hidden_state": hidden, "pooler_output": pooled, "image_embeds": embeds}

  def encode_text(self, input_ids, attention_mask=None):
    """(B, projection_dim): transformers' get_text_features."""
    return self.text_outputs(input_ids, attention_mask)["text_embeds"]

  def text_hidden_states(self, input_ids, attention_mask=None):
    """(B, L, D) per-token states after the final LayerNorm (what SD / FastComposer use)."""
    return self.text_outputs(input_ids, attention_mask)["last_hidden_state"]

  def encode_image(self, pixels):
    """(B, projection_dim): transformers' get_image_features of NHWC pixels."""
    return self.image_outputs(pixels)["image_embeds"]

  def image_hidden_states(self, pixels):
    """(B, 1 + N, D) encoder output (before post_layernorm, as transformers returns it)."""
    return self.image_outputs(pixels)["last_hidden_state"]

  def __call__(self, input_ids, pixels, attention_mask=None) -> Dict[str, jnp.ndarray]:
    """transformers' CLIPModel forward: normalised embeddings and logits exp(s) * cos."""
    text = self.text_outputs(input_ids, attention_mask)["text_embeds"]
    image = self.image_outputs(pixels)["image_embeds"]
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
    logits_per_text = jnp.exp(self.logit_scale) * text @ image.T
    return {"text_embeds": text, "image_embeds": image, "logits_per_text": logits_per_text,
            "logits_per_image": logits_per_text.T}


_TEXT_KEYS = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps",
              "eos_token_id"}
_VISION_KEYS = {"image_size", "patch_size", "num_channels", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "hidden_act", "layer_norm_eps"}
# Keys a config leaves out take the dataclass defaults above, which are transformers'
# CLIPTextConfig / CLIPVisionConfig defaults (openai/clip-vit-base-patch32).


def _tower_kwargs(config: Optional[Mapping], keys, dtype) -> Optional[Dict[str, Any]]:
  if config is None:
    return None
  out = {k: v for k, v in dict(config).items() if k in keys and v is not None}
  if "hidden_act" in out:
    _check_act(out["hidden_act"])
  return {**out, "dtype": dtype}


@MODELS.register("clip")
def clip(text_config: Optional[Mapping] = None, vision_config: Optional[Mapping] = None,
         projection_dim: Optional[int] = 512, logit_scale_init_value: float = 2.6592,
         dtype: Any = jnp.float32, **unused) -> CLIPModel:
  """CLIPModel from transformers CLIPConfig keys (text_config / vision_config dicts).

  Other top-level keys of a hub config.json (architectures, model_type, ...) are ignored.
  Pass `text_config=None` or `vision_config=None` for a single tower. `dtype` is the compute
  dtype (None: float32); parameters stay float32.
  """
  del unused
  dtype = jnp.float32 if dtype is None else dtype
  text = _tower_kwargs(text_config, _TEXT_KEYS, dtype)
  vision = _tower_kwargs(vision_config, _VISION_KEYS, dtype)
  if text is None and vision is None:
    raise ConfigError("clip: give text_config and/or vision_config")
  return CLIPModel(
      text_model=CLIPTextTransformer(**text) if text is not None else None,
      vision_model=CLIPVisionTransformer(**vision) if vision is not None else None,
      projection_dim=projection_dim, logit_scale_init_value=logit_scale_init_value,
      dtype=dtype)
