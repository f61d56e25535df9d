"""StableDiffusionPipeline: jaxgen's against diffusers' own, on tiny random components saved by
diffusers (`save_pretrained`, read back with `from_pretrained`, so every module is in eval mode),
from the same initial latents; max abs difference of the [0, 1] images <= 2e-3.

Two pipelines: "sd15" (SD-1.5's PNDM config: scaled_linear, skip_prk_steps, steps_offset 1,
set_alpha_to_one False; a conv-projection U-Net without mid block, the cheapest to compile
(test_unet2d_condition covers the U-Net's structure); the hub's tokenizer layout vocab.json +
merges.txt + tokenizer_config.json), run with PNDM, DDIM and DPM-Solver++ through `scheduler=`,
guidance and negative prompts; "sd2" (linear projections, per-block heads, GELU text encoder
reading the attention mask, pad token "!", a DDIM v-prediction config with trailing spacing and
zero terminal SNR, written with the outdated steps_offset 0 / clip_sample true that diffusers'
pipeline rewrites), run with guidance_rescale and clip_skip. The CLI test runs
`jaxgen.generate --prompt` on all 8 devices without guidance and compares its PNGs. Each distinct
call compiles the whole program, so the cases share two fixtures and few configs.
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from jaxgen import generate  # noqa: E402
from jaxgen.errors import ConfigError  # noqa: E402
from jaxgen.pipelines import load_pipeline  # noqa: E402
from jaxgen.pipelines.stable_diffusion import StableDiffusionPipeline  # noqa: E402
from jaxgen.text.tiny_vocab import write_clip_tokenizer  # noqa: E402

WORDS = ("photo", "cat", "dog", "the", "blurry", "painting", "red", "house")
PROMPTS = ["a photo of a cat", "a red house, painting"]
NEGATIVES = ["blurry", "a photo of the dog"]


def write_tokenizer(directory, pad_token="<|endoftext|>"):
  """A CLIP BPE tokenizer in the hub's layout spelling WORDS; model_max_length 77."""
  return write_clip_tokenizer(directory, WORDS, pad_token)


VARIANTS = {
    "sd15": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
                  cross_attention_dim=32, sample_size=8, mid_block_type=None),
        text=dict(hidden_act="quick_gelu"),
        scheduler=("PNDMScheduler", dict(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, clip_sample=False)),
        pad_token="<|endoftext|>"),
    "sd2": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
                  cross_attention_dim=32, sample_size=8),
        text=dict(hidden_act="gelu", use_attention_mask=True),
        scheduler=("DDIMScheduler", dict(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type="v_prediction", timestep_spacing="trailing",
            rescale_betas_zero_snr=True, set_alpha_to_one=False, steps_offset=0,
            clip_sample=True)),
        pad_token="!"),
}


def tiny_sd_pipeline(path, variant, seed=0):
  """A random StableDiffusionPipeline saved to `path`, read back by diffusers."""
  spec = VARIANTS[variant]
  torch.manual_seed(seed)
  unet = diffusers.UNet2DConditionModel(**spec["unet"])
  with torch.no_grad():  # Non-zero everywhere (zero-initialised convs and projections too).
    for p in unet.parameters():
      p.add_(0.05 * torch.randn_like(p))
  tokenizer_dir = os.path.join(path, "tokenizer_src")
  vocab_size = write_tokenizer(tokenizer_dir, spec["pad_token"])
  tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
  text_config = transformers.CLIPTextConfig(
      vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
      num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **spec["text"])
  text_encoder = transformers.CLIPTextModel(text_config)
  vae = diffusers.AutoencoderKL(block_out_channels=(32, 32), layers_per_block=1,
                                down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                norm_num_groups=16)
  name, config = spec["scheduler"]
  scheduler = getattr(diffusers, name).from_config(dict(config, _class_name=name))
  pipe = diffusers.StableDiffusionPipeline(
      unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae, scheduler=scheduler,
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(path)
  # The scheduler config as written (save_pretrained writes the pipeline's rewritten one), and
  # the hub's tokenizer layout.
  with open(os.path.join(path, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(dict(config, _class_name=name), f)
  for file in os.listdir(os.path.join(path, "tokenizer")):
    os.remove(os.path.join(path, "tokenizer", file))
  write_tokenizer(os.path.join(path, "tokenizer"), spec["pad_token"])
  return diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None)


def one_device_mesh():
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jaxgen.sharding import make_mesh  # pylint: disable=g-import-not-at-top
  return make_mesh(ml_collections.ConfigDict({"num_devices": 1}))


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
  """{variant: (diffusers pipeline, its original scheduler, jaxgen pipeline, directory)}, built
  once. The jaxgen pipeline runs on one device (an 8-way sharded program compiles slower);
  the CLI test runs the default all-device mesh."""
  cache = {}

  def get(variant):
    if variant not in cache:
      path = str(tmp_path_factory.mktemp(variant))
      ref = tiny_sd_pipeline(path, variant)
      cache[variant] = ref, ref.scheduler, load_pipeline(path, mesh=one_device_mesh()), path
    return cache[variant]
  return get


def reference(ref, n, latent_hw, seed=0, **kwargs):
  """diffusers' images and the (NHWC) latents it started from."""
  latents = torch.randn((n, 4) + tuple(latent_hw), generator=torch.Generator().manual_seed(seed))
  out = ref(latents=latents, output_type="np", **kwargs)
  return np.asarray(out.images), latents.permute(0, 2, 3, 1).numpy()


def check_close(got, want):
  assert got.shape == want.shape and got.dtype == np.float32
  # The comparison sees the images, not a clipped plateau.
  assert 0.2 < np.mean((want > 0.01) & (want < 0.99))
  np.testing.assert_allclose(got, want, atol=2e-3, rtol=0)


SD15_CASES = {  # scheduler (None: the directory's PNDM) -> call arguments
    None: dict(prompt=PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=6,
               guidance_scale=7.5),
    "ddim": dict(prompt=PROMPTS[1], negative_prompt="blurry", num_inference_steps=5,
                 guidance_scale=5.0, height=16, width=24, num_images_per_prompt=2),
    "dpmpp_2m": dict(prompt=PROMPTS, num_inference_steps=8, guidance_scale=3.0),
}
DIFFUSERS_CLASSES = {"ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


@pytest.mark.parametrize("scheduler", list(SD15_CASES))
def test_sd15_matches_diffusers(pipelines, scheduler):
  ref, original, ours, _ = pipelines("sd15")
  kwargs = SD15_CASES[scheduler]
  ref.scheduler = original if scheduler is None else getattr(
      diffusers, DIFFUSERS_CLASSES[scheduler]).from_config(original.config)
  n = (1 if isinstance(kwargs["prompt"], str) else len(kwargs["prompt"])) * kwargs.get(
      "num_images_per_prompt", 1)
  latent_hw = (kwargs.get("height", 16) // 2, kwargs.get("width", 16) // 2)
  want, latents = reference(ref, n, latent_hw, **kwargs)
  got = ours(latents=latents, scheduler=scheduler, **kwargs)
  check_close(got, want)


def clip_skip_embeddings(ref, prompts, clip_skip):
  """diffusers' encode_prompt with clip_skip (its own call fails with transformers 5, whose
  CLIPTextModel has no `text_model`): layer N - clip_skip through the final LayerNorm."""
  tokens = ref.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt")
  with torch.no_grad():
    out = ref.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask,
                           output_hidden_states=True)
    return ref.text_encoder.final_layer_norm(out.hidden_states[-(clip_skip + 1)])


def test_sd2_vprediction_trailing_rescale_clip_skip(pipelines):
  ref, original, ours, _ = pipelines("sd2")
  ref.scheduler = original
  # diffusers' constructor rewrote the outdated config; jaxgen reads it the same way.
  assert ours.scheduler.config["steps_offset"] == original.config.steps_offset == 1
  assert ours.scheduler.config["clip_sample"] is original.config.clip_sample is False
  assert ours.use_attention_mask and ours.tokenizer.pad_token == "!"
  kwargs = dict(negative_prompt=NEGATIVES, num_inference_steps=5, guidance_scale=6.0,
                guidance_rescale=0.7)
  want, latents = reference(ref, 2, (8, 8),
                            prompt_embeds=clip_skip_embeddings(ref, PROMPTS, 1), **kwargs)
  check_close(ours(PROMPTS, latents=latents, clip_skip=1, **kwargs), want)
  # A swap builds from the rewritten config, as Other.from_config(pipe.scheduler.config).
  for name, cls in (("pndm", "PNDMScheduler"), ("euler", "EulerDiscreteScheduler")):
    theirs = getattr(diffusers, cls).from_config(original.config)
    theirs.set_timesteps(7)
    plan = ours.get_scheduler(name).plan(7)
    np.testing.assert_array_equal(np.asarray(plan.timesteps), theirs.timesteps.numpy())
    assert plan.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1e-6)


def test_prompts_sizes_and_errors(pipelines):
  _, _, ours, path = pipelines("sd15")
  assert isinstance(ours, StableDiffusionPipeline)
  assert ours.latent_size(None, None) == (8, 8, 4) and ours.latent_size(32, 48) == (16, 24, 4)
  cond = ours.prompt_condition(PROMPTS, "blurry", num_images_per_prompt=3)
  assert cond["input_ids"].shape == (6, 77) and cond["negative_input_ids"].shape == (6, 77)
  np.testing.assert_array_equal(cond["input_ids"][:3], np.repeat(cond["input_ids"][:1], 3, 0))
  hf = transformers.CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
  want = hf(PROMPTS, padding="max_length", max_length=77, truncation=True)["input_ids"]
  np.testing.assert_array_equal(cond["input_ids"][::3], np.asarray(want))
  with pytest.raises(ConfigError, match="multiples of 8"):
    ours("a cat", height=20, width=16)
  with pytest.raises(ConfigError, match="negative_prompt has 1 entries"):
    ours(PROMPTS, negative_prompt=["x"])
  with pytest.raises(ConfigError, match="prompt must be"):
    ours([])
  with pytest.raises(ConfigError, match="clip_skip"):
    ours("a cat", clip_skip=3)
  with pytest.raises(ConfigError, match="latents must have shape"):
    ours("a cat", latents=np.zeros((1, 4, 8, 8), np.float32))


def test_stochastic_steps_draw_per_image_noise(pipelines):
  """DDIM with eta > 0 (diffusers' `eta=`; eta=0 is the deterministic default): each image's
  step noise comes from its own key, so an image is the same alone or in a batch, and differs
  from the eta=0 image."""
  _, _, ours, _ = pipelines("sd15")
  latents = np.random.RandomState(0).randn(2, 8, 8, 4).astype(np.float32)
  kwargs = dict(num_inference_steps=3, guidance_scale=1.0, scheduler="ddim")
  both = ours(PROMPTS, latents=latents, eta=1.0, **kwargs)
  alone = ours(PROMPTS[1:], latents=latents[1:], eta=1.0, **kwargs)
  np.testing.assert_allclose(alone[0], both[1], atol=1e-6)
  assert np.abs(both[0] - both[1]).max() > 1e-3
  deterministic = ours(PROMPTS[1:], latents=latents[1:], eta=0.0, **kwargs)
  assert np.abs(deterministic[0] - alone[0]).max() > 1e-4
  with pytest.raises(ConfigError, match="eta must be >= 0"):
    ours("a cat", eta=-1.0)
  # Another stochastic path (Euler ancestral: init_noise_sigma, scaled inputs, sigma_up noise)
  # on the other fixture (SD 2: v-prediction, linear projections): the same per-image property.
  _, _, sd2, _ = pipelines("sd2")
  both = sd2(PROMPTS, latents=latents, num_inference_steps=3, guidance_scale=4.0,
             scheduler="euler_a", seed=1)
  alone = sd2(PROMPTS[:1], latents=latents[:1], num_inference_steps=3, guidance_scale=4.0,
              scheduler="euler_a", seed=1)
  np.testing.assert_allclose(alone[0], both[0], atol=1e-5)


def test_generate_cli(pipelines, tmp_path, capsys):
  """`python -m jaxgen.generate --model=DIR --prompt=...` on all devices, without guidance:
  the PNGs are diffusers' images from the noise jaxgen draws for the seed."""
  ref, original, ours, path = pipelines("sd15")
  prompts = ["a photo of a cat", "a red house"]
  out = str(tmp_path / "out")

  def run(*args):
    generate.FLAGS(["generate", f"--model={path}", f"--out={out}", *args])
    try:
      return generate.run(["generate"])
    finally:
      generate.FLAGS.unparse_flags()

  assert run(*[f"--prompt={p}" for p in prompts], "--negative_prompt=blurry", "--steps=3",
             "--guidance=1", "--height=16", "--width=24", "--seed=3") == 0
  assert "wrote 2 images" in capsys.readouterr().out
  saved = np.load(os.path.join(out, "images.npz"))
  assert saved["prompts"].tolist() == prompts
  assert sorted(os.listdir(out)) == ["00000.png", "00001.png", "grid.png", "images.npz"]
  ref.scheduler = original
  noise = ours.noise(3, 2, (8, 12, 4))
  want = ref(prompt=prompts, num_inference_steps=3, guidance_scale=1.0, height=16, width=24,
             latents=torch.from_numpy(noise.copy()).permute(0, 3, 1, 2), output_type="np").images
  want_u8 = np.round(np.asarray(want) * 255).astype(int)
  assert np.abs(saved["images"].astype(int) - want_u8).max() <= 1
  assert run("--labels=3") == 2
  assert "takes --prompt" in capsys.readouterr().err
  assert run() == 2
  assert "pass --prompt" in capsys.readouterr().err
