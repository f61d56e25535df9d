"""Published pipelines: jaxgen's DiTPipeline against diffusers' own, on tiny random components
saved by diffusers (`save_pretrained`), from the same initial latents."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxgen.errors import ConfigError, WeightsError  # noqa: E402
from jaxgen.pipelines import load_pipeline  # noqa: E402

ID2LABEL = {"0": "tench, Tinca tinca", "1": "goldfish", "207": "golden retriever",
            "360": "otter"}


def tiny_dit_pipeline(path, *, learn_sigma=True, sample_size=8, scheduler="ddim", seed=0):
  """A random DiTPipeline (2 blocks, width 32, 1000 classes, a 1-level VAE) saved to `path`."""
  torch.manual_seed(seed)
  latent_channels = 4
  transformer = diffusers.DiTTransformer2DModel(
      num_attention_heads=2, attention_head_dim=16, in_channels=latent_channels,
      out_channels=2 * latent_channels if learn_sigma else latent_channels, num_layers=2,
      sample_size=sample_size, patch_size=2, num_embeds_ada_norm=1000)
  # adaLN-Zero and the final layer start at zero in diffusers: randomise every weight so the
  # comparison sees the whole network.
  with torch.no_grad():
    for p in transformer.parameters():
      p.copy_(torch.randn_like(p) * 0.1)
  vae = diffusers.AutoencoderKL(block_out_channels=(32, 32), layers_per_block=1,
                                down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2,
                                latent_channels=latent_channels, norm_num_groups=16)
  config = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                beta_schedule="linear")
  if scheduler == "ddim":
    sched = diffusers.DDIMScheduler(clip_sample=False, **config)
  elif scheduler == "dpmpp_2m":
    sched = diffusers.DPMSolverMultistepScheduler(**config)
  else:
    raise ValueError(scheduler)
  diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=sched).save_pretrained(path)
  # The hub's model_index.json carries id2label (save_pretrained of diffusers 0.42 drops it);
  # from_pretrained hands it to the pipeline.
  index_path = os.path.join(path, "model_index.json")
  with open(index_path) as f:
    index = json.load(f)
  with open(index_path, "w") as f:
    json.dump(dict(index, id2label=ID2LABEL), f)
  # Read back as a user does (eval mode: a fresh module trains, and DiT's label embedding then
  # drops labels at random).
  return diffusers.DiTPipeline.from_pretrained(path)


def one_device_mesh():
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jaxgen.sharding import make_mesh  # pylint: disable=g-import-not-at-top
  return make_mesh(ml_collections.ConfigDict({"num_devices": 1}))


def reference_images(pipe, labels, steps, guidance, seed=0):
  """diffusers' images and the initial latents it drew (NHWC numpy)."""
  cfg = pipe.transformer.config
  shape = (len(labels), cfg.in_channels, cfg.sample_size, cfg.sample_size)
  latents = diffusers.utils.torch_utils.randn_tensor(
      shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
  out = pipe(class_labels=labels, guidance_scale=guidance, num_inference_steps=steps,
             generator=torch.Generator().manual_seed(seed), output_type="np")
  return np.asarray(out.images), latents.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("dit_pipeline"))
  pipe = tiny_dit_pipeline(path)
  return path, pipe


@pytest.mark.parametrize("scheduler,steps,guidance", [
    (None, 7, 1.0), (None, 10, 4.0), ("dpmpp_2m", 8, 1.0), ("dpmpp_2m", 12, 3.0)])
def test_dit_pipeline_matches_diffusers(dit_dir, scheduler, steps, guidance):
  path, pipe = dit_dir
  if scheduler == "dpmpp_2m":
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
  else:
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
  labels = [207, 360, 0]
  want, latents = reference_images(pipe, labels, steps, guidance)
  ours = load_pipeline(path)
  got = ours(class_labels=labels, num_inference_steps=steps, guidance_scale=guidance,
             latents=latents, scheduler=scheduler)
  assert got.shape == want.shape and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=2e-3, rtol=0)


def test_dit_pipeline_labels_latents_and_batching(dit_dir):
  path, pipe = dit_dir
  ours = load_pipeline(path)
  assert ours.get_label_ids(["golden retriever", "Tinca tinca"]) == [207, 0]
  assert ours.labels == pipe.labels
  with pytest.raises(ConfigError, match="unknown label"):
    ours.get_label_ids(["golden retrievr"])
  # Same seed: image i does not depend on the batch it was drawn in.
  a = ours([1, 207, 360], num_inference_steps=3, guidance_scale=2.0, seed=5)
  b = ours([1, 207, 360], num_inference_steps=3, guidance_scale=2.0, seed=5, batch_size=1)
  np.testing.assert_allclose(a, b, atol=1e-5)
  lat = ours([1, 207], num_inference_steps=3, output_type="latent")
  assert lat.shape == (2, 8, 8, 4)
  with pytest.raises(ConfigError, match="outside"):
    ours([1000], num_inference_steps=2)
  with pytest.raises(ConfigError, match="latents must have shape"):
    ours([1], latents=np.zeros((1, 4, 8, 8), np.float32))


def test_dit_pipeline_memory_budget(dit_dir):
  path, _ = dit_dir
  ours = load_pipeline(path, mesh=one_device_mesh())
  kw = dict(num_inference_steps=2)
  smallest = ours.compiled_peak_bytes(1, decode_per_image=True, **kw)
  roomy = ours.plan(2, max_memory_gb=64, **kw)
  assert roomy.batch_size == 2 and not roomy.decode_per_image
  assert roomy.peak_bytes > smallest
  budget = smallest * 1.001
  tight = ours.plan(2, max_memory_gb=budget / 2 ** 30, **kw)
  assert tight.peak_bytes <= budget and (tight.batch_size, tight.decode_per_image) != (2, False)
  with pytest.raises(ConfigError, match="max_memory_gb"):
    ours.plan(2, max_memory_gb=smallest * 0.5 / 2 ** 30, **kw)
  # The call honours the plan and gives the unconstrained images.
  np.testing.assert_allclose(ours([1, 207], max_memory_gb=budget / 2 ** 30, **kw),
                             ours([1, 207], **kw), atol=1e-5)


def test_load_pipeline_errors(tmp_path):
  with pytest.raises(WeightsError, match="not a directory"):
    load_pipeline(str(tmp_path / "missing"))
  (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
  with pytest.raises(WeightsError, match="not supported"):
    load_pipeline(str(tmp_path))
  (tmp_path / "model_index.json").write_text("{ truncated")
  with pytest.raises(WeightsError, match="not JSON"):
    load_pipeline(str(tmp_path))
  (tmp_path / "model_index.json").write_text(json.dumps(
      {"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"]}))
  with pytest.raises(WeightsError, match="folder is missing"):
    load_pipeline(str(tmp_path))
  os.remove(tmp_path / "model_index.json")
  with pytest.raises(WeightsError, match="neither model_index.json nor config.json"):
    load_pipeline(str(tmp_path))


def run_cli(module, *args):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        timeout=600)


def test_generate_cli(dit_dir, tmp_path):
  path, _ = dit_dir
  out = tmp_path / "out"
  proc = run_cli("jaxgen.generate", f"--model={path}", "--labels=207",
                 "--label_names=otter,goldfish", "--num_per_label=2", "--steps=2",
                 "--guidance=3", "--scheduler=dpmpp_2m", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  with np.load(out / "images.npz") as f:
    assert f["images"].shape == (6, 16, 16, 3) and f["images"].dtype == np.uint8
    assert f["labels"].tolist() == [207, 207, 360, 360, 1, 1]
  assert (out / "grid.png").is_file() and (out / "00005_class1.png").is_file()
  # The PNGs hold the pipeline's images for the same seed.
  ours = load_pipeline(path)
  want = ours.to_uint8(ours([207, 207, 360, 360, 1, 1], num_inference_steps=2,
                            guidance_scale=3, scheduler="dpmpp_2m"))
  with np.load(out / "images.npz") as f:
    assert np.abs(f["images"].astype(int) - want).max() <= 1

  bad = run_cli("jaxgen.generate", f"--model={tmp_path / 'nothing'}", "--labels=1")
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "not a directory" in bad.stderr


def test_generate_eval(dit_dir, tmp_path):
  """--eval's scoring path: alexnet features of generated images against saved statistics."""
  from jaxgen import generate  # pylint: disable=g-import-not-at-top
  from jaxgen.metrics import fid as fid_lib  # pylint: disable=g-import-not-at-top
  path, _ = dit_dir
  ours = load_pipeline(path)
  rng = np.random.default_rng(0)
  ref = str(tmp_path / "ref.npz")
  fid_lib.save_statistics(ref, rng.normal(size=(40, 1152)).astype(np.float32))
  config = generate.eval_config()
  config.eval.update(metrics="fd_alexnet,pr_alexnet", alexnet_size=32, pr_k=2)
  result = generate.evaluate_pipeline(ours, config, 6, ref,
                                      dict(num_inference_steps=2, guidance_scale=2.0))
  assert result["num_samples"] == 6
  assert np.isfinite(result["fd_alexnet"]) and 0 <= result["precision_alexnet"] <= 1
  with pytest.raises(ConfigError, match="reference_stats"):
    generate.evaluate_pipeline(ours, config, 6, "", {})
