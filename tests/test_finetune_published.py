"""Fine-tuning published text-to-image weights with `jaxgen.main` (jaxgen/tasks/text_to_image.py,
jaxgen/tasks/fastcomposer_release.py) on the captioned digit canvases.

Stable Diffusion: a tiny random StableDiffusionPipeline saved by diffusers (SD-1.5's PNDM config,
epsilon; tests/test_stable_diffusion.py's tiny CLIP tokenizer) is fine-tuned: the loss is finite
and falls over 20 steps, the frozen text encoder and VAE are the directory's at the end, and
`--mode=sample` draws the test captions through a StableDiffusionPipeline holding the trained
U-Net (which, given the directory's U-Net instead, is the directory's pipeline). The caption ids
equal transformers' CLIPTokenizer on the decoded captions, and the training noise schedule is
diffusers' DDPMScheduler of the pipeline's scheduler config.

FastComposer: a tiny random release state dict (the official key names) converted to a pipeline
directory is fine-tuned with the MSE + localisation loss: the loss falls, exactly the official
trainable parts are trained (U-Net, post-fuse MLP, the image encoder's last layer here), the rest
is the directory's, and `--mode=sample` runs the FastComposerPipeline on the test compositions.
One U-Net level and one text layer keep the models' compiles (most of the time) short.
"""

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from jaxgen import main as jaxgen_main  # noqa: E402
from jaxgen.config import load_config  # noqa: E402
from jaxgen.data import subjects  # noqa: E402
from jaxgen.diffusion import schedulers as schedulers_lib  # noqa: E402
from jaxgen.errors import ConfigError  # noqa: E402
from jaxgen.pipelines import load_pipeline  # noqa: E402
from jaxgen.tasks import text_to_image  # noqa: E402
from jaxgen.text.clip_tokenizer import CLIPTokenizer  # noqa: E402
from jaxgen.text.retokenize import Retokenizer  # noqa: E402
from jaxgen.train import loop  # noqa: E402
from test_stable_diffusion import one_device_mesh, write_tokenizer  # noqa: E402

SD_CONFIG = "configs/sd_finetune.py"
STEPS = 20
UNET = dict(block_out_channels=(32,), layers_per_block=1, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
            attention_head_dim=4, sample_size=8, mid_block_type=None)
VAE = dict(block_out_channels=(32, 32), layers_per_block=1, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, mid_block_add_attention=False)


def _perturb(module, seed):
  torch.manual_seed(seed)
  with torch.no_grad():  # Non-zero everywhere (zero-initialised layers too).
    for p in module.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return module.eval()


def tiny_sd_dir(path):
  """A random StableDiffusionPipeline (SD-1.5's PNDM config, epsilon) saved by diffusers, with
  tests/test_stable_diffusion.py's tiny CLIP tokenizer in the hub's layout; VAE factor 2."""
  tokenizer_dir = os.path.join(path, "tokenizer_src")
  vocab = write_tokenizer(tokenizer_dir)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
  text_encoder = _perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
      num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id)), 0)
  scheduler = diffusers.PNDMScheduler(
      beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
      steps_offset=1, set_alpha_to_one=False)
  diffusers.StableDiffusionPipeline(
      unet=_perturb(diffusers.UNet2DConditionModel(**UNET, cross_attention_dim=32), 1),
      text_encoder=text_encoder, tokenizer=tokenizer,
      vae=_perturb(diffusers.AutoencoderKL(**VAE, norm_num_groups=16), 2),
      scheduler=scheduler, safety_checker=None, feature_extractor=None,
      requires_safety_checker=False).save_pretrained(path)
  for file in os.listdir(os.path.join(path, "tokenizer")):
    os.remove(os.path.join(path, "tokenizer", file))
  write_tokenizer(os.path.join(path, "tokenizer"))
  return path


def sd_overrides(pipeline_dir, steps=STEPS):
  return [f"model.init_from={pipeline_dir}", "data.num_train=64", "data.num_test=8",
          "training.batch_size=8", f"training.steps={steps}", "training.log_every=1",
          "training.sample_every=0", f"checkpoint.every={steps}", "checkpoint.async_save=False",
          "optimizer.lr=1e-3", "mesh.num_devices=1", "sample.num_steps=3", "sample.num_prompts=4",
          "sample.batch_size=4"]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
  return tiny_sd_dir(str(tmp_path_factory.mktemp("sd")))


def _flat(tree):
  return {jax.tree_util.keystr(k, simple=True, separator="/"): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


def test_sd_finetune_train_and_sample(sd_dir, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  config = load_config(SD_CONFIG, sd_overrides(sd_dir))
  setup = loop.train(config, workdir)
  log = capsys.readouterr().out
  assert "model.init_from: initialised" in log, log

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [json.loads(line)["loss"] for line in f]
  assert len(losses) == STEPS and np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses

  # The frozen parts are the directory's; the U-Net moved away from it.
  parts = text_to_image.read_stable_diffusion(sd_dir)
  frozen = _flat(setup.state.model_state[text_to_image.FROZEN])
  want = _flat(parts.frozen)
  assert sorted(frozen) == sorted(want)
  for name, value in want.items():
    np.testing.assert_array_equal(frozen[name], value, err_msg=name)
  from jaxgen.convert import from_diffusers  # pylint: disable=g-import-not-at-top
  original = jax.device_get(from_diffusers(os.path.join(sd_dir, "unet"))[1])
  trained = _flat(setup.state.params)
  assert max(np.abs(trained[k] - v).max() for k, v in _flat(original["params"]).items()) > 1e-3

  # --mode=sample: the test captions through a StableDiffusionPipeline with the trained U-Net.
  argv = [f"--config={SD_CONFIG}", f"--workdir={workdir}", "--mode=sample"]
  assert jaxgen_main.main(argv + [f"--config.{o}" for o in sd_overrides(sd_dir)]) == 0
  saved = np.load(os.path.join(workdir, "samples", "samples.npz"))
  task = setup.task
  captions = task.captions("test", 4)
  assert saved["captions"].tolist() == captions
  assert saved["images"].shape == (4, 16, 32, 3) and saved["images"].dtype == np.uint8
  for name in ("grid.png", "prompts.txt"):
    assert os.path.isfile(os.path.join(workdir, "samples", name))

  s = config.sample
  call = dict(num_inference_steps=3, guidance_scale=float(s.guidance_scale), height=16,
              width=32, seed=config.seed)
  mesh = one_device_mesh()
  finetuned = task.parts.pipeline({"params": setup.state.ema_params}, parts.frozen, mesh=mesh)
  got = finetuned(captions, **call)
  np.testing.assert_array_equal(finetuned.to_uint8(got), saved["images"])
  directory = load_pipeline(sd_dir, mesh=mesh)(captions, **call)
  assembled = task.parts.pipeline(original, parts.frozen, mesh=mesh)(captions, **call)
  np.testing.assert_allclose(assembled, directory, atol=1e-6)
  assert np.abs(got - directory).max() > 0.05  # The fine-tuned U-Net samples differently.


def test_caption_ids_equal_the_pipeline_tokenizer(sd_dir):
  """Retokenized word ids == transformers' CLIPTokenizer on the decoded captions, also when
  truncating; the empty caption is the pipeline's empty prompt."""
  hf = transformers.CLIPTokenizer.from_pretrained(os.path.join(sd_dir, "tokenizer"))
  tokenizer = CLIPTokenizer.from_pretrained(os.path.join(sd_dir, "tokenizer"))
  data = load_config(SD_CONFIG, sd_overrides(sd_dir)).data
  source = subjects.MnistSubjects(data)
  examples = subjects.load_examples(data, "test", 8)
  captions = [source.tokenizer.decode(ids) for ids in examples["input_ids"]]
  for length in (77, 9):
    out = jax.device_get(jax.jit(Retokenizer(source.tokenizer, tokenizer, length))(
        examples["input_ids"]))
    want = hf(captions, padding="max_length", max_length=length, truncation=True)
    np.testing.assert_array_equal(out["input_ids"], np.asarray(want["input_ids"]))
    np.testing.assert_array_equal(out["attention_mask"], np.asarray(want["attention_mask"]))
  empty = Retokenizer(source.tokenizer, tokenizer)(source.tokenizer.encode("")[None])
  np.testing.assert_array_equal(
      np.asarray(empty["input_ids"][0]),
      hf([""], padding="max_length", max_length=77)["input_ids"][0])


@pytest.mark.parametrize("name, config", [
    ("PNDMScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                           skip_prk_steps=True, steps_offset=1)),
    ("DDIMScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                           prediction_type="v_prediction", rescale_betas_zero_snr=True,
                           timestep_spacing="trailing")),
])
def test_training_schedule_is_diffusers_ddpm(name, config):
  """What diffusers' train_text_to_image.py trains with: DDPMScheduler.from_config(config)."""
  config = dict(config, _class_name=name)
  schedule, prediction = text_to_image.training_schedule(schedulers_lib.from_config(config))
  ref = diffusers.DDPMScheduler.from_config(config)
  np.testing.assert_allclose(np.asarray(schedule.alphas_cumprod), ref.alphas_cumprod.numpy(),
                             rtol=1e-6, atol=1e-9)
  assert prediction == {"epsilon": "eps", "v_prediction": "v"}[ref.config.prediction_type]


def test_sizes_and_config_errors(sd_dir):
  assert text_to_image.size_multiple(8, 4) == 64 and text_to_image.size_multiple(2, 2) == 16
  assert text_to_image.pipeline_image_size((16, 32), (0, 0), 64) == (64, 128)
  assert text_to_image.pipeline_image_size((16, 32), (0, 0), 16) == (16, 32)
  assert text_to_image.pipeline_image_size((28, 28), (0, 0), 64) == (448, 448)
  with pytest.raises(ConfigError, match="multiples of 64"):
    text_to_image.pipeline_image_size((16, 32), (64, 100), 64)
  with pytest.raises(ConfigError, match="init_from"):
    loop.make_task(load_config(SD_CONFIG))
  with pytest.raises(ConfigError, match="noise schedule and prediction"):
    loop.make_task(load_config(SD_CONFIG, sd_overrides(sd_dir) + ["diffusion.prediction=v"]))
  with pytest.raises(ConfigError, match="has no captions"):
    loop.make_task(load_config(SD_CONFIG, sd_overrides(sd_dir) + ["data.source=mnist5k"]))


# ----------------------------------------------------------------------------- FastComposer

FC_CONFIG = "configs/fastcomposer_release.py"
FC_STEPS = 10


def tiny_fastcomposer_dir(root):
  """A random release state dict (the official key names, tiny sizes: see
  tests/test_fastcomposer_release.py) converted to a pipeline directory with a tiny CLIP
  tokenizer."""
  from jaxgen.convert import fastcomposer as fc_convert  # pylint: disable=g-import-not-at-top
  from test_fastcomposer_release import TorchPostfuse  # pylint: disable=g-import-not-at-top
  width = 64  # One 64-wide head (the release's head count rule).
  tokenizer_dir = os.path.join(root, "tokenizer")
  vocab = write_tokenizer(tokenizer_dir)
  text = _perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=vocab, hidden_size=width, intermediate_size=48, num_hidden_layers=1,
      num_attention_heads=1, max_position_embeddings=77, hidden_act="quick_gelu",
      bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)), 0)
  vision = _perturb(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
      hidden_size=width, intermediate_size=48, num_hidden_layers=2, num_attention_heads=1,
      image_size=16, patch_size=8, projection_dim=width, hidden_act="quick_gelu")), 1)
  # The release's conversion reads 32 GroupNorm groups and 8 heads (SD-1.5's) where it can.
  unet = _perturb(diffusers.UNet2DConditionModel(
      **dict(UNET, norm_num_groups=32, attention_head_dim=8), cross_attention_dim=width), 2)
  vae = _perturb(diffusers.AutoencoderKL(**VAE, norm_num_groups=32), 3)
  state = {"text_encoder." + k.removeprefix("text_model."): v
           for k, v in text.state_dict().items()}
  for name, module in (("image_encoder", vision), ("vae", vae), ("unet", unet),
                       ("postfuse_module", _perturb(TorchPostfuse(width), 4))):
    state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
  src = os.path.join(root, "pytorch_model.bin")
  torch.save(state, src)
  return fc_convert.write_pipeline(src, os.path.join(root, "fastcomposer"),
                                   tokenizer=tokenizer_dir)


def fc_overrides(pipeline_dir, steps=FC_STEPS):
  return [f"model.init_from={pipeline_dir}", "data.num_train=64", "data.num_test=8",
          "training.batch_size=8", f"training.steps={steps}", "training.log_every=1",
          "training.sample_every=0", f"checkpoint.every={steps}", "checkpoint.async_save=False",
          "optimizer.lr=1e-3", "mesh.num_devices=1", "sample.num_steps=3",
          "sample.start_merge_step=1", "sample.num_prompts=4", "sample.batch_size=4",
          "text_to_image.image_encoder_trainable_layers=1"]


def test_fastcomposer_release_finetune_and_sample(tmp_path, capsys):
  from jaxgen.convert import fastcomposer as fc_convert  # pylint: disable=g-import-not-at-top
  fc_dir = tiny_fastcomposer_dir(str(tmp_path))
  workdir = str(tmp_path / "run")
  setup = loop.train(load_config(FC_CONFIG, fc_overrides(fc_dir)), workdir)
  assert "model.init_from: initialised" in capsys.readouterr().out
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  losses = [r["loss"] for r in rows]
  assert len(losses) == FC_STEPS and np.all(np.isfinite(losses)) and "loc_loss" in rows[0]
  assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses

  # Trained as the official train.py: U-Net, post-fuse, the image encoder's last layer(s).
  params = setup.state.params
  assert sorted(params) == ["image_encoder", "postfuse_module", "unet"]
  assert sorted(params["image_encoder"]["vision_model"]) == ["layers_1"]
  _, original = fc_convert.from_pipeline_dir(fc_dir)
  original = _flat(original["params"])
  frozen = _flat(setup.state.model_state[text_to_image.FROZEN])
  assert {k.split("/")[0] for k in frozen} == {"image_encoder", "text_encoder", "vae"}
  for name, value in frozen.items():
    np.testing.assert_array_equal(value, original[name], err_msg=name)
  trained = _flat(params)
  assert set(trained) | set(frozen) == set(original)
  assert max(np.abs(v - original[k]).max() for k, v in trained.items()) > 1e-3

  argv = [f"--config={FC_CONFIG}", f"--workdir={workdir}", "--mode=sample"]
  assert jaxgen_main.main(argv + [f"--config.{o}" for o in fc_overrides(fc_dir)]) == 0
  saved = np.load(os.path.join(workdir, "samples", "samples.npz"))
  captions, _ = setup.task.prompts("test", 4)
  assert saved["captions"].tolist() == captions and "<|image|>" in captions[0]
  assert saved["images"].shape == (4, 16, 32, 3) and saved["images"].dtype == np.uint8
  assert os.path.isfile(os.path.join(workdir, "samples", "grid.png"))
