"""FastComposer (Xiao et al. 2023, arXiv 2305.10431): tuning-free multi-subject generation.

The module tree follows mit-han-lab/fastcomposer's `FastComposerModel` (fastcomposer/model.py),
so its released `pytorch_model.bin` loads name for name (`jaxgen.convert.fastcomposer`):

  text_encoder     CLIP text tower, no projection (FastComposerTextEncoder; `jaxgen.models.clip`)
                   ids -> per-token states T (B, L, D) after the final LayerNorm
  image_encoder    CLIP vision tower + visual_projection (FastComposerCLIPImageEncoder):
                   subject crops (B, S, h, w, c) -> [resized to the tower's size, bilinear with
                   antialiasing, and normalised by `image_mean` / `image_std` when those are set,
                   as the official wrapper does] -> pooled post-LN class token -> projection
                   -> E (B, S, P)
  postfuse_module  at each flagged noun position p of subject s (FastComposerPostfuseModule):
                   T[p] <- LN(MLP2(MLP1([T[p], E[s]]) + T[p]))  with MLP = LN -> fc1 -> GELU
                   -> fc2 (+ its input for MLP2)
  unet             cross-attention U-Net on the augmented states: jaxgen's own `UNet` (the
                   digit-canvas model trained here) or diffusers' `UNet2DConditionModel` (the
                   SD-1.5 release)
  vae              optional SD-VAE (`jaxgen.models.vae_kl`) for latent-space models; None for
                   pixel-space ones

`FastComposer.apply(v, x, t, cond)` is the training forward (cond: a dict of the batch's
input_ids, subject_images, subject_positions, subject_valid; see jaxgen.data.subjects).
Inference splits it: `method="encode"` gives (text-only context, subject-augmented context)
once per prompt, `method="denoise"` runs the U-Net on a context per step, which is what delayed
subject conditioning needs (text-only context for the first steps; jaxgen.tasks.fastcomposer,
jaxgen.pipelines.fastcomposer).

Cross-attention maps, at training and at inference: apply "denoise" with
`mutable=["attention_maps"]`; `cross_attention_maps` wraps that and returns
{layer: (B, heads, h, w, L)}, `subject_maps` picks the subject tokens' columns.
The localisation loss on those maps (training only) is `localization_loss`.

Frozen towers: `train_text_encoder` / `train_image_encoder` False stop the gradient at the tower's
output (the task also excludes their weights from the optimizer, `frozen_paths`).
"""

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.errors import ConfigError
from jaxgen.models.clip import CLIPModel, clip
from jaxgen.models.unet import UNet
from jaxgen.models.unet2d_condition import UNet2DConditionModel, unet2d_condition
from jaxgen.models.vae_kl import AutoencoderKL, vae_kl
from jaxgen.nn.transformer import ATTENTION_MAPS, recorded_maps
from jaxgen.registry import MODELS

# The official image encoder's normalisation (openai CLIP's), applied inside the encoder.
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


class MLP(nn.Module):
  """LayerNorm -> fc1 -> GELU -> fc2 (+ the input when `use_residual`)."""
  out_dim: int
  hidden_dim: int
  use_residual: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(1e-5, dtype=self.dtype, name="layernorm")(x)
    h = nn.Dense(self.hidden_dim, dtype=self.dtype, name="fc1")(h)
    h = nn.Dense(self.out_dim, dtype=self.dtype, name="fc2")(jax.nn.gelu(h, approximate=False))
    return x + h if self.use_residual else h


class PostfuseMLP(nn.Module):
  """Fuses a subject's image embedding into its noun token's text state (same width out)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, text, image):
    d = text.shape[-1]
    h = MLP(d, d, use_residual=False, dtype=self.dtype, name="mlp1")(
        jnp.concatenate([text, image.astype(text.dtype)], axis=-1)) + text
    h = MLP(d, d, use_residual=True, dtype=self.dtype, name="mlp2")(h)
    return nn.LayerNorm(1e-5, dtype=self.dtype, name="layer_norm")(h)


def fuse_subjects(fuse, text, image_embeds, positions, valid):
  """text (B, L, D) with `fuse(text[b, p_s], E[b, s])` written at each valid subject's p_s."""
  b, length, _ = text.shape
  gathered = jnp.take_along_axis(text, positions[..., None].astype(jnp.int32), axis=1)
  fused = fuse(gathered, image_embeds)  # (B, S, D)
  out = text
  for s in range(positions.shape[1]):
    at = (jnp.arange(length)[None] == positions[:, s:s + 1]) & (valid[:, s:s + 1] > 0)
    out = jnp.where(at[..., None], fused[:, s:s + 1].astype(out.dtype), out)
  del b
  return out


class FastComposer(nn.Module):
  """CLIP text and image encoders, the post-fuse MLP, a cross-attention U-Net (+ a VAE)."""
  text_encoder: CLIPModel   # The text tower (projection unused).
  image_encoder: CLIPModel  # The vision tower and its visual projection (gives E).
  unet: Union[UNet, UNet2DConditionModel]  # Context width = the text width.
  vae: Optional[AutoencoderKL] = None      # Latent-space models only.
  train_text_encoder: bool = False
  train_image_encoder: bool = True
  image_mean: Optional[Sequence[float]] = None  # Subject pixel normalisation (per channel),
  image_std: Optional[Sequence[float]] = None   # inside the image encoder; None: as given.
  dtype: Any = jnp.float32

  def setup(self):
    self.postfuse_module = PostfuseMLP(self.dtype)

  def text_states(self, input_ids):
    """(B, L, D) text-encoder states: the text-only context."""
    states = self.text_encoder.text_hidden_states(input_ids)
    return states if self.train_text_encoder else jax.lax.stop_gradient(states)

  def subject_embeddings(self, subject_images):
    """(B, S, h, w, c) crops -> (B, S, P) projected CLIP image embeddings.

    As FastComposerCLIPImageEncoder: crops of another size are resized to the tower's (bilinear,
    antialiased), then normalised with image_mean / image_std when the model has them.
    """
    b, s = subject_images.shape[:2]
    pixels = subject_images.reshape((b * s,) + subject_images.shape[2:])
    size = self.image_encoder.vision_model.image_size
    if pixels.shape[1:3] != (size, size):
      pixels = jax.image.resize(pixels.astype(jnp.float32), (b * s, size, size, pixels.shape[3]),
                                "linear", antialias=True)
    if self.image_mean is not None:
      mean = jnp.asarray(self.image_mean, jnp.float32)
      std = jnp.asarray(self.image_std if self.image_std is not None else 1.0, jnp.float32)
      pixels = (pixels - mean) / std
    embeds = self.image_encoder.encode_image(pixels)
    embeds = embeds if self.train_image_encoder else jax.lax.stop_gradient(embeds)
    return embeds.reshape(b, s, -1)

  def fuse(self, text, subject_embeds, subject_positions, subject_valid):
    """The text states with each valid subject fused into its noun token (postfuse_module)."""
    return fuse_subjects(self.postfuse_module, text, subject_embeds, subject_positions,
                         subject_valid)

  def encode(self, input_ids, subject_images, subject_positions, subject_valid):
    """(text-only context, subject-augmented context), each (B, L, D)."""
    text = self.text_states(input_ids)
    embeds = self.subject_embeddings(subject_images)
    return text, self.fuse(text, embeds, subject_positions, subject_valid)

  def denoise(self, x, t, context, train: bool = False):
    """The U-Net's prediction for x_t at timesteps t, cross-attending to `context`."""
    if isinstance(self.unet, UNet2DConditionModel):
      return self.unet(x, t, context, train=train)
    y = jnp.zeros((x.shape[0],), jnp.int32)  # The U-Net ignores labels (label_conditioning none).
    return self.unet(x, t, y, train=train, context=context)

  def encode_latents(self, images, rng: Optional[jax.Array] = None):
    """Images in [-1, 1] -> VAE latents times the scaling factor (a posterior sample with rng,
    as the official training draws one; else the mean)."""
    return self._vae().encode(images, rng=rng) * self._vae().scaling_factor

  def decode_latents(self, latents):
    """Scaled latents -> images in [-1, 1]."""
    return self._vae().decode(latents / self._vae().scaling_factor)

  def _vae(self) -> AutoencoderKL:
    if self.vae is None:
      raise ConfigError("this FastComposer has no VAE (a pixel-space model); latents need "
                        "model.vae (the SD-VAE of a latent-space model)")
    return self.vae

  def __call__(self, x, t, cond: Mapping[str, jax.Array], train: bool = False):
    _, context = self.encode(cond["input_ids"], cond["subject_images"],
                             cond["subject_positions"], cond["subject_valid"])
    return self.denoise(x, t, context, train)


def frozen_paths(model: FastComposer) -> Tuple[Tuple[str, ...], ...]:
  """Parameter path prefixes that the optimizer must not update (a VAE is always frozen)."""
  out = [("vae",)] if model.vae is not None else []
  if not model.train_text_encoder:
    out.append(("text_encoder",))
  if not model.train_image_encoder:
    out.append(("image_encoder",))
  return tuple(out)


def cross_attention_maps(model: FastComposer, variables, x, t, context) -> Tuple[jax.Array, Dict]:
  """(prediction, {layer: (B, heads, h, w, L) softmax maps}) of one denoising pass."""
  out, state = model.apply(variables, x, t, context, method="denoise", mutable=[ATTENTION_MAPS])
  return out, recorded_maps(state[ATTENTION_MAPS])


def subject_maps(maps: Mapping[str, jax.Array], positions) -> Dict[str, jax.Array]:
  """{layer: (B, heads, h, w, S)}: the columns of the subject tokens (positions (B, S))."""
  def pick(m):
    idx = positions[:, None, None, None, :].astype(jnp.int32)
    return jnp.take_along_axis(m, jnp.broadcast_to(idx, m.shape[:-1] + idx.shape[-1:]), axis=-1)
  return {k: pick(m) for k, m in maps.items()}


def resize_masks(masks, size: Sequence[int]):
  """(B, S, H, W) segmentation masks -> (B, S, h, w), bilinear with antialiasing (FastComposer)."""
  b, s = masks.shape[:2]
  return jax.image.resize(masks.astype(jnp.float32), (b, s, *size), "linear", antialias=True)


def balanced_l1(maps, masks):
  """Mean attention outside the mask minus mean inside, per (B, heads, S) (BalancedL1Loss).

  maps (B, heads, h, w, S) subject-token probabilities; masks (B, S, h, w) in [0, 1].
  """
  obj = jnp.moveaxis(masks, 1, -1)[:, None]  # (B, 1, h, w, S)
  bg = 1.0 - obj
  inside = (maps * obj).sum((2, 3)) / (obj.sum((2, 3)) + 1e-5)
  outside = (maps * bg).sum((2, 3)) / (bg.sum((2, 3)) + 1e-5)
  return outside - inside


def localization_loss(maps: Mapping[str, jax.Array], positions, valid, masks):
  """FastComposer's object localisation loss, averaged over the given cross-attention layers.

  maps {layer: (B, heads, h, w, L)}; positions / valid (B, S); masks (B, S, H, W). Per layer:
  balanced L1 of each valid subject token and head, summed over subjects / their count,
  averaged over batch and heads.
  """
  if not maps:
    raise ConfigError("the localisation loss needs cross-attention maps: the U-Net has none "
                      "(set model.unet.attention_levels)")
  valid = valid.astype(jnp.float32)
  total = 0.0
  for m in subject_maps(maps, positions).values():
    loss = balanced_l1(m.astype(jnp.float32), resize_masks(masks, m.shape[2:4]))
    loss = (loss * valid[:, None]).sum(-1) / (valid.sum(-1)[:, None] + 1e-5)
    total = total + loss.mean()
  return total / len(maps)


@MODELS.register("fastcomposer")
def fastcomposer(text_config: Mapping, vision_config: Mapping, unet: Mapping,
                 projection_dim: int = 64, train_text_encoder: bool = False,
                 train_image_encoder: bool = True, vae: Optional[Mapping] = None,
                 image_mean: Optional[Sequence[float]] = None,
                 image_std: Optional[Sequence[float]] = None,
                 dtype: Any = jnp.float32) -> FastComposer:
  """FastComposer from config dicts: CLIP `text_config` / `vision_config` (transformers keys;
  jaxgen.models.clip; the image embedding has `projection_dim` features), the U-Net's and
  optionally the VAE's.

  `unet` with `_class_name` "UNet2DConditionModel" (a diffusers config, as the release's
  SD-1.5 U-Net) builds `jaxgen.models.unet2d_condition`, whose `cross_attention_dim` must be the
  text width; else jaxgen's `UNet` fields (`context_dim` is set to the text width and
  `label_conditioning` to "none"). `vae`: diffusers AutoencoderKL keys (latent-space models).
  """
  text_encoder = clip(text_config=dict(text_config), vision_config=None, projection_dim=None,
                      dtype=dtype)
  image_encoder = clip(text_config=None, vision_config=dict(vision_config),
                       projection_dim=projection_dim, dtype=dtype)
  width = text_encoder.text_model.hidden_size
  unet = dict(unet)
  if unet.get("_class_name") == "UNet2DConditionModel":
    unet_module = unet2d_condition(**dict(unet, dtype=dtype))
    dims = set(unet_module.plan().cross_attention_dim)
    if dims != {width}:
      raise ConfigError(f"model.unet.cross_attention_dim {sorted(dims)} must equal the text "
                        f"width {width}")
  else:
    unet_kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in unet.items()}
    if unet_kwargs.get("context_dim", width) != width:
      raise ConfigError(f"model.unet.context_dim must equal the text width {width} (or be unset)")
    unet_kwargs.update(context_dim=width, label_conditioning="none", dtype=dtype)
    unet_kwargs.setdefault("num_classes", 0)
    unet_module = UNet(**unet_kwargs)
  vae_module = vae_kl(**dict(vae, dtype=dtype)) if vae else None
  as_tuple = lambda v: None if v is None else tuple(float(x) for x in v)
  return FastComposer(text_encoder, image_encoder, unet_module, vae_module, train_text_encoder,
                      train_image_encoder, as_tuple(image_mean), as_tuple(image_std), dtype)
