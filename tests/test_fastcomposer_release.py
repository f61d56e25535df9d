"""FastComposer's released checkpoint: conversion, loading, the fusion formula, the pipeline.

A random state dict with the official key structure (mit-han-lab/fastcomposer
`FastComposerModel.state_dict()`: text_encoder.* = a CLIPTextModel's tower without
`text_model.`, image_encoder.vision_model.* + visual_projection, vae.* with diffusers 0.16's
mid-block attention names, unet.*, postfuse_module.*) at tiny sizes is built from transformers'
and diffusers' own classes and a torch twin of FastComposerPostfuseModule (same key names),
saved with torch.save as pytorch_model.bin, converted and checked against those torch modules.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
F = torch.nn.functional

from jaxgen.convert import fastcomposer as fc_convert  # noqa: E402
from jaxgen.convert.__main__ import main as convert_main  # noqa: E402
from jaxgen.convert.saved import convert_any  # noqa: E402
from jaxgen.errors import ConfigError, WeightsError  # noqa: E402
from jaxgen.models import fastcomposer as fc  # noqa: E402
from jaxgen.text.tiny_vocab import write_clip_tokenizer  # noqa: E402

WIDTH = 128  # Text width = post-fuse width = image projection (two 64-wide heads).
TEXT = dict(vocab_size=600, hidden_size=WIDTH, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
            bos_token_id=0, eos_token_id=2, pad_token_id=1)  # SD-1.5's (legacy) special ids
VISION = dict(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=1,
              image_size=32, patch_size=8, projection_dim=WIDTH, hidden_act="quick_gelu")
UNET = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
            cross_attention_dim=WIDTH, sample_size=8)
VAE = dict(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=32, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
           sample_size=16)
WORDS = ("man", "woman", "and", "in", "cafe")
LEGACY_VAE_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


class TorchMLP(torch.nn.Module):
  """Twin of fastcomposer/model.py's MLP (same attribute names)."""

  def __init__(self, in_dim, out_dim, hidden_dim, use_residual):
    super().__init__()
    self.layernorm = torch.nn.LayerNorm(in_dim)
    self.fc1 = torch.nn.Linear(in_dim, hidden_dim)
    self.fc2 = torch.nn.Linear(hidden_dim, out_dim)
    self.use_residual = use_residual

  def forward(self, x):
    h = self.fc2(F.gelu(self.fc1(self.layernorm(x))))
    return h + x if self.use_residual else h


class TorchPostfuse(torch.nn.Module):
  """Twin of FastComposerPostfuseModule: fuse_fn and fuse_object_embeddings' masked_scatter."""

  def __init__(self, dim):
    super().__init__()
    self.mlp1 = TorchMLP(2 * dim, dim, dim, False)
    self.mlp2 = TorchMLP(dim, dim, dim, True)
    self.layer_norm = torch.nn.LayerNorm(dim)

  def fuse_fn(self, text, obj):
    h = self.mlp1(torch.cat([text, obj], -1)) + text
    return self.layer_norm(self.mlp2(h))

  def forward(self, text_embeds, object_embeds, image_token_mask, num_objects):
    b, max_objects = object_embeds.shape[:2]
    flat = object_embeds.view(-1, object_embeds.shape[-2], object_embeds.shape[-1])
    valid = torch.arange(max_objects)[None, :] < num_objects[:, None]
    objects = flat[valid.flatten()].view(-1, flat.shape[-1])
    out = text_embeds.clone().view(-1, text_embeds.shape[-1])
    mask = image_token_mask.view(-1)
    out.masked_scatter_(mask[:, None], self.fuse_fn(out[mask], objects))
    return out.view(b, text_embeds.shape[1], -1)


def _perturb(module, seed):
  torch.manual_seed(seed)
  with torch.no_grad():  # Non-trivial norms and zero-initialised layers too.
    for p in module.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return module.eval()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """(path of pytorch_model.bin, {component: torch module}, state dict)."""
  text = _perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)), 0)
  vision = _perturb(transformers.CLIPVisionModelWithProjection(
      transformers.CLIPVisionConfig(**VISION)), 1)
  unet = _perturb(diffusers.UNet2DConditionModel(**UNET), 2)
  vae = _perturb(diffusers.AutoencoderKL(**VAE), 3)
  postfuse = _perturb(TorchPostfuse(WIDTH), 4)
  state = {}
  for k, v in text.state_dict().items():  # FastComposerTextEncoder: the tower's parts.
    state["text_encoder." + k.removeprefix("text_model.")] = v
  # transformers 4.29 (the release's) persisted this buffer; it is no weight.
  state["text_encoder.embeddings.position_ids"] = torch.arange(77)[None]
  state.update({"image_encoder." + k: v for k, v in vision.state_dict().items()})
  for k, v in vae.state_dict().items():  # diffusers 0.16's AttentionBlock names.
    module, _, leaf = k.rpartition(".")
    for new, old in LEGACY_VAE_ATTENTION.items():
      if module.endswith(".attentions.0." + new):
        module = module[:-len(new)] + old
    state[f"vae.{module}.{leaf}"] = v
  state.update({"unet." + k: v for k, v in unet.state_dict().items()})
  state.update({"postfuse_module." + k: v for k, v in postfuse.state_dict().items()})
  path = str(tmp_path_factory.mktemp("release") / "pytorch_model.bin")
  torch.save(state, path)
  modules = dict(text_encoder=text, image_encoder=vision, unet=unet, vae=vae,
                 postfuse_module=postfuse)
  return path, modules, state


@pytest.fixture(scope="module")
def converted(release):
  return fc_convert.from_release(release[0])


def _apply(model, variables, *args, method):
  """model.apply jitted (eager flax runs op by op: slower than compiling these tiny models)."""
  return jax.jit(lambda v, *a: model.apply(v, *a, method=method))(variables, *args)


def _close(got, want, rel=1e-4):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  scale = np.abs(want).max() + 1e-12
  assert np.abs(got - want).max() / scale < rel, np.abs(got - want).max() / scale


def test_release_converts_and_loads(release, converted):
  _, modules, state = release
  model, variables = converted
  # Every tensor used (the converters' check_complete), shapes as the torch modules'.
  n_source = sum(v.numel() for k, v in state.items() if not k.endswith("position_ids"))
  assert sum(np.size(x) for x in jax.tree.leaves(variables)) == n_source
  assert set(variables["params"]) == set(fc_convert.COMPONENTS)
  p = variables["params"]
  assert p["unet"]["conv_in"]["kernel"].shape == (3, 3, 4, 32)
  assert p["postfuse_module"]["mlp1"]["fc1"]["kernel"].shape == (2 * WIDTH, WIDTH)
  assert model.text_encoder.text_model.num_attention_heads == 2  # 64-wide heads, as CLIP's
  assert model.unet.attention_head_dim == 8 and model.unet.norm_num_groups == 32
  assert model.image_encoder.vision_model.image_size == 32

  rng = np.random.default_rng(0)
  ids = rng.integers(0, TEXT["vocab_size"], (2, 77))
  with torch.no_grad():
    want = modules["text_encoder"](torch.from_numpy(ids)).last_hidden_state.numpy()
  _close(_apply(model, variables, jnp.asarray(ids), method="text_states"), want)

  # Subject crops of another size: resized (bilinear, antialiased) and CLIP-normalised inside
  # the image encoder, as FastComposerCLIPImageEncoder.forward.
  crops = rng.uniform(0, 1, (1, 2, 40, 40, 3)).astype(np.float32)
  with torch.no_grad():
    x = torch.from_numpy(crops.reshape(2, 40, 40, 3)).permute(0, 3, 1, 2)
    x = F.interpolate(x, (32, 32), mode="bilinear", antialias=True)
    mean, std = torch.tensor(fc.CLIP_IMAGE_MEAN), torch.tensor(fc.CLIP_IMAGE_STD)
    x = (x - mean[:, None, None]) / std[:, None, None]
    want = modules["image_encoder"](pixel_values=x).image_embeds.numpy().reshape(1, 2, WIDTH)
  _close(_apply(model, variables, jnp.asarray(crops), method="subject_embeddings"), want, 1e-3)

  latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  context = rng.standard_normal((2, 77, WIDTH)).astype(np.float32)
  t = np.array([10, 900])
  with torch.no_grad():
    want = modules["unet"](torch.from_numpy(latents).permute(0, 3, 1, 2), torch.from_numpy(t),
                           torch.from_numpy(context)).sample.permute(0, 2, 3, 1).numpy()
    image = modules["vae"].decode(torch.from_numpy(latents[:1]).permute(0, 3, 1, 2) / 0.18215)
  _close(_apply(model, variables, jnp.asarray(latents), jnp.asarray(t), jnp.asarray(context),
                method="denoise"), want)
  _close(_apply(model, variables, jnp.asarray(latents[:1]), method="decode_latents"),
         image.sample.permute(0, 2, 3, 1).numpy())


def test_fused_embeddings_equal_official_formula(release, converted):
  _, modules, _ = release
  model, variables = converted
  rng = np.random.default_rng(1)
  text = rng.standard_normal((2, 9, WIDTH)).astype(np.float32)
  objects = rng.standard_normal((2, 2, 1, WIDTH)).astype(np.float32)  # (B, max objects, 1, D)
  mask = np.zeros((2, 9), bool)
  mask[0, [2, 6]] = True  # "a man <|image|> ... a woman <|image|>"
  mask[1, 3] = True       # one subject; the second object slot is padding
  num_objects = np.array([2, 1])
  with torch.no_grad():
    want = modules["postfuse_module"](torch.from_numpy(text), torch.from_numpy(objects),
                                      torch.from_numpy(mask), torch.from_numpy(num_objects))
  positions = np.array([[2, 6], [3, 0]])
  valid = (np.arange(2)[None] < num_objects[:, None]).astype(np.float32)
  got = _apply(model, variables, jnp.asarray(text), jnp.asarray(objects[:, :, 0]),
               jnp.asarray(positions), jnp.asarray(valid), method="fuse")
  _close(got, want.numpy(), 1e-5)
  np.testing.assert_array_equal(np.asarray(got)[~mask], text[~mask])  # Only the nouns change.


def write_tokenizer(directory):
  """A CLIP BPE tokenizer in the hub's layout spelling WORDS; model_max_length 77."""
  return write_clip_tokenizer(directory, WORDS)


@pytest.fixture(scope="module")
def pipeline_dir(release, tmp_path_factory):
  """The pipeline directory `python -m jaxgen.convert --src=... --tokenizer=...` writes."""
  root = tmp_path_factory.mktemp("pipeline")
  assert write_tokenizer(str(root / "tokenizer_src")) <= TEXT["vocab_size"]
  dst = str(root / "fastcomposer")
  assert convert_main([f"--src={release[0]}", f"--dst={dst}",
                       f"--tokenizer={root / 'tokenizer_src'}"]) == 0
  return dst


def test_pipeline_directory_and_cli(release, converted, pipeline_dir):
  path, modules, _ = release
  dst = pipeline_dir
  index = json.load(open(os.path.join(dst, "model_index.json")))
  assert index["_class_name"] == "FastComposerPipeline"
  model, variables = fc_convert.from_pipeline_dir(dst)
  assert model == converted[0]
  jax.tree.map(np.testing.assert_array_equal, variables, converted[1])
  # Each folder is its library's own layout: diffusers / transformers load them as they are.
  loaded = {
      "unet": diffusers.UNet2DConditionModel.from_pretrained(os.path.join(dst, "unet")),
      "vae": diffusers.AutoencoderKL.from_pretrained(os.path.join(dst, "vae")),
      "text_encoder": transformers.CLIPTextModel.from_pretrained(os.path.join(dst,
                                                                             "text_encoder")),
      "image_encoder": transformers.CLIPVisionModelWithProjection.from_pretrained(
          os.path.join(dst, "image_encoder"))}
  for name, module in loaded.items():
    want = modules[name].state_dict()
    got = module.state_dict()
    assert set(got) == set(want), name
    for k in want:
      torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
  # convert_any (the programmatic dispatch) reads the release too.
  module, _, kind = convert_any(path)
  assert kind == "FastComposer release" and isinstance(module, fc.FastComposer)
  with pytest.raises(WeightsError, match="already holds a pipeline"):
    fc_convert.write_pipeline(path, dst)


def official_tokenize(tokenizer, caption, image_token_id):
  """fastcomposer/data.py's _tokenize_and_mask_noun_phrases_ends (transformers' tokenizer with
  the added <|image|> token)."""
  input_ids = tokenizer.encode(caption)
  mask = [False] * len(input_ids)
  clean = []
  for token in input_ids:
    if token == image_token_id:
      mask[len(clean) - 1] = True
    else:
      clean.append(token)
  n = tokenizer.model_max_length
  clean = clean[:n] + [tokenizer.pad_token_id] * (n - len(clean))
  mask = mask[:n] + [False] * (n - len(mask))
  return torch.tensor([clean]), torch.tensor([mask])


def official_object_pixels(image, resolution):
  """get_test_object_transforms (torchvision 0.14's tensor path): PadToSquare, uint8 Resize
  (float, antialiased bilinear, clamped, rounded), ConvertImageDtype."""
  x = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
  _, h, w = x.shape
  pad = abs(h - w) // 2
  x = F.pad(x, (pad, pad, 0, 0) if h > w else (0, 0, pad, pad) if w > h else (0, 0, 0, 0))
  x = F.interpolate(x[None].float(), (resolution, resolution), mode="bilinear",
                    antialias=True)[0]
  return torch.round(x.clamp(0, 255)).to(torch.uint8).float() / 255


@torch.no_grad()
def official_images(modules, tokenizer_dir, prompt, images, latents, steps, guidance,
                    start_merge_step):
  """fastcomposer/inference.py + stable_diffusion_call_with_references_delayed_conditioning
  on the same components (diffusers' PNDM with SD-1.5's config)."""
  tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
  special = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
  special.add_tokens(["<|image|>"], special_tokens=True)
  ids, mask = official_tokenize(special, prompt, special.convert_tokens_to_ids("<|image|>"))
  pixels = torch.stack([official_object_pixels(im, VISION["image_size"]) for im in images])
  mean, std = torch.tensor(fc.CLIP_IMAGE_MEAN), torch.tensor(fc.CLIP_IMAGE_STD)
  pixels = (pixels - mean[:, None, None]) / std[:, None, None]
  vision = modules["image_encoder"]
  objects = vision.visual_projection(vision.vision_model(pixel_values=pixels)[1])
  text = modules["text_encoder"]
  augmented = modules["postfuse_module"](text(ids)[0], objects[None, :, None], mask,
                                         mask.sum(1))
  encode = lambda p: text(tokenizer([p], padding="max_length", max_length=77, truncation=True,
                                    return_tensors="pt").input_ids)[0]
  text_only, null = encode(prompt.replace("<|image|>", "")), encode("")
  scheduler = diffusers.PNDMScheduler.from_config(fc_convert.SD15_SCHEDULER)
  scheduler.set_timesteps(steps)
  x = torch.from_numpy(latents).permute(0, 3, 1, 2) * scheduler.init_noise_sigma
  for i, t in enumerate(scheduler.timesteps):
    current = torch.cat([null, text_only if i <= start_merge_step else augmented])
    out = modules["unet"](scheduler.scale_model_input(torch.cat([x, x]), t), t,
                          encoder_hidden_states=current).sample
    uncond, cond = out.chunk(2)
    x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
  image = modules["vae"].decode(x / 0.18215).sample
  return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_pipeline_matches_official_inference(release, pipeline_dir):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jaxgen.pipelines import load_pipeline  # pylint: disable=g-import-not-at-top
  from jaxgen.sharding import make_mesh  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  # Odd, non-square sizes: padding to a square and up / down sampling to the encoder's 32.
  images = [Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8))
            for size in ((45, 30, 3), (17, 26, 3))]
  prompt = "a man <|image|> and a woman <|image|> in a cafe"
  latents = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
  kwargs = dict(num_inference_steps=3, guidance_scale=5.0, start_merge_step=1, height=16,
                width=16)  # (sample_size is not in the tensors: SD-1.5's 64 by default)
  pipe = load_pipeline(pipeline_dir, mesh=make_mesh(ml_collections.ConfigDict(
      {"num_devices": 1})))
  got = pipe(prompt, images, latents=latents, **kwargs)
  want = official_images(release[1], os.path.join(pipeline_dir, "tokenizer"), prompt, images,
                         latents, kwargs["num_inference_steps"], kwargs["guidance_scale"],
                         kwargs["start_merge_step"])
  assert got.shape == (1, 16, 16, 3) and got.dtype == np.float32
  assert 0.2 < np.mean((want > 0.01) & (want < 0.99))  # Images, not a clipped plateau.
  np.testing.assert_allclose(got, want, atol=2e-3, rtol=0)  # (3e-6 measured)
  # The subjects reach the image only after start_merge_step: all text-only, other subjects
  # change nothing; subject-conditioned, they do.
  others = [im.transpose(Image.FLIP_LEFT_RIGHT) for im in images]
  text_only = dict(kwargs, start_merge_step=10)
  np.testing.assert_array_equal(pipe(prompt, images, latents=latents, **text_only),
                                pipe(prompt, others, latents=latents, **text_only))
  assert np.abs(pipe(prompt, others, latents=latents, **kwargs) - got).max() > 1e-4
  with pytest.raises(ConfigError, match="marks 2 subjects"):
    pipe(prompt, images[:1])
  with pytest.raises(ConfigError, match="must follow a word"):
    pipe("<|image|> a man", images[:1])


def test_init_from_release_names_every_parameter(release, pipeline_dir, tmp_path):
  """`model.init_from` (fine-tuning) reads the release or its pipeline directory: a FastComposer
  built from config dicts (the registry's builder) takes every tensor by name."""
  from jaxgen.train import init_from  # pylint: disable=g-import-not-at-top
  model = fc.fastcomposer(
      text_config=TEXT, vision_config=VISION, projection_dim=WIDTH, vae=VAE,
      unet=dict(UNET, _class_name="UNet2DConditionModel"))
  cond = {"input_ids": jnp.zeros((1, 77), jnp.int32),
          "subject_images": jnp.zeros((1, 2, 32, 32, 3)),
          "subject_positions": jnp.zeros((1, 2), jnp.int32), "subject_valid": jnp.ones((1, 2))}
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)),
                          jnp.zeros((1,)), cond)["params"]
  for src in (release[0], pipeline_dir):
    _, variables, description = init_from.load_weights(src)
    assert "FastComposer" in description
    result = init_from.merge(shapes, variables["params"], where=src)
    assert not result.not_loaded and not result.resized
    # The training forward does not run the (frozen) VAE, so its weights are the only extra.
    assert result.unused and all(name.startswith("vae/") for name in result.unused)
  # Without a tokenizer (the release has none) the pipeline says what to copy.
  (tmp_path / "model_index.json").write_text(json.dumps(
      {"_class_name": "FastComposerPipeline", "tokenizer": [None, None]}))
  from jaxgen.pipelines import load_pipeline  # pylint: disable=g-import-not-at-top
  with pytest.raises(WeightsError, match="tokenizer"):
    load_pipeline(str(tmp_path))


def test_full_size_release_reads_the_official_configs():
  """At the release's sizes (modules on torch's meta device: shapes, no memory) the configs read
  from the tensors are SD-1.5's and CLIP ViT-L/14's, as the official code loads them."""
  strip = lambda c, drop=("architectures", "model_type"): {
      k: v for k, v in c.items() if not k.startswith("_") and k not in drop}
  with torch.device("meta"):
    unet = diffusers.UNet2DConditionModel(**strip(fc_convert.SD15_UNET))
    vae = diffusers.AutoencoderKL(**strip(fc_convert.SD15_VAE))
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        **strip(fc_convert.SD15_TEXT_ENCODER)))
    vision = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        **strip(fc_convert.CLIP_VIT_L14_VISION)))
    parts = {"unet": unet.state_dict(), "vae": vae.state_dict(),
             "text_encoder": {k.removeprefix("text_model."): v
                              for k, v in text.state_dict().items()},
             "image_encoder": vision.state_dict(),
             "postfuse_module": {"layer_norm.weight": torch.empty(768)}}
  configs = fc_convert.release_configs(parts)
  for name, want in (("unet", fc_convert.SD15_UNET), ("vae", fc_convert.SD15_VAE),
                     ("text_encoder", fc_convert.SD15_TEXT_ENCODER),
                     ("image_encoder", fc_convert.CLIP_VIT_L14_VISION)):
    assert {k: configs[name][k] for k in want} == want, name
  assert configs["postfuse_module"] == {"embed_dim": 768}


def test_unsafe_pickle_is_refused(tmp_path):
  marker = tmp_path / "ran"

  class RunsCode:
    def __reduce__(self):
      return (open, (str(marker), "w"))

  path = str(tmp_path / "pytorch_model.bin")
  torch.save({"postfuse_module.layer_norm.weight": torch.ones(4), "payload": RunsCode()}, path)
  with pytest.raises(WeightsError, match="weights_only"):
    fc_convert.from_release(path)
  assert convert_main([f"--src={path}", f"--dst={tmp_path / 'out'}"]) == 2  # one error: line
  assert not marker.exists()


def test_bad_state_dicts_are_named(release, tmp_path):
  _, _, state = release
  broken = dict(state)
  del broken["postfuse_module.mlp2.fc2.bias"]
  path = str(tmp_path / "broken.bin")
  torch.save(broken, path)
  with pytest.raises(WeightsError, match=r"postfuse_module.*mlp2/fc2/bias"):
    fc_convert.from_release(path)
  foreign = str(tmp_path / "foreign.bin")
  torch.save({"model.conv.weight": torch.zeros(2)}, foreign)
  with pytest.raises(WeightsError, match="not a FastComposer state dict"):
    fc_convert.from_release(foreign)
