"""Sampling throughput of jaxgen's pipelines against diffusers' in the same process, and the
batch-1 memory of the published pipelines.

  python -m benchmarks.pipeline_throughput [--pipeline=dit|sd] [--size=S] [--sd_width=320]
      [--resolution=256] [--batch=4] [--steps=25] [--guidance=4] [--repeats=3]
      [--dtype=float32|bfloat16] [--memory] [--json=OUT.json]

Both pipelines are built from one random pipeline saved by diffusers and sample `batch` images
from the same latents with guidance, then decode them:
  dit  DiTPipeline: DiT-{size}/2 at `resolution`, DDIM, with the SD-VAE decoder of
       `facebook/DiT-XL-2-*` (block_out_channels 128/256/512/512).
  sd   StableDiffusionPipeline with SD-1.5's structure: its UNet2DConditionModel with
       block_out_channels sd_width x (1, 2, 4, 4) (320: SD-1.5's own), CLIP ViT-L/14's text
       encoder (12 layers, width 768, a cut-down vocabulary), the SD-VAE, its PNDM scheduler
       config; `batch` different prompts, an empty negative prompt.
Reported: images/s (median over repeats, compilation excluded for jaxgen, one untimed warm-up
call for both) and the max abs difference of the two sets of images.

--memory adds, for each published pipeline at batch 1 (DiT-XL/2 256 and 512 with the SD-VAE;
the DC-AE paper's f32c32 + UViT-H / DiT-XL and f64c128 + UViT-H at 512), the weights and the
peak resident memory of a fresh process sampling one image (zero weights, 2 steps: the scan
keeps the peak independent of the step count), on this machine's device.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np

# DiT sizes (depth, hidden, heads); patch 2.
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DCAE_MODELS = ("dc-ae-f32c32-in-1.0-uvit-h-in-512px", "dc-ae-f32c32-in-1.0-dit-xl-in-512px",
               "dc-ae-f64c128-in-1.0-uvit-h-in-512px")
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              latent_channels=4, norm_num_groups=32, sample_size=256)


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.pipeline_throughput",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--pipeline", choices=("dit", "sd"), default="dit")
  p.add_argument("--size", choices=sorted(SIZES), default="S", help="DiT size (dit)")
  p.add_argument("--sd_width", type=int, default=320, help="the U-Net's base width (sd)")
  p.add_argument("--resolution", type=int, default=256)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--steps", type=int, default=25)
  p.add_argument("--guidance", type=float, default=4.0)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--memory", action="store_true")
  p.add_argument("--skip_torch", action="store_true", help="time jaxgen only")
  p.add_argument("--json", default=None)
  p.add_argument("--rss_index", type=int, default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def build_diffusers(size: str, resolution: int):
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  depth, hidden, heads = SIZES[size]
  transformer = diffusers.DiTTransformer2DModel(
      num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=4,
      out_channels=8, num_layers=depth, sample_size=resolution // 8, patch_size=2,
      num_embeds_ada_norm=1000)
  vae = diffusers.AutoencoderKL(**SD_VAE)
  scheduler = diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False)
  return diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)


SD15_SCHEDULER = dict(_class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1,
                      set_alpha_to_one=False, clip_sample=False)
SD_WORDS = ("photo", "painting", "of", "cat", "dog", "house", "tree", "car", "red", "blue")


def sd_prompts(n: int):
  nouns, styles = SD_WORDS[3:8], ("a photo of a", "a painting of a", "a red", "a blue")
  return [f"{styles[i % len(styles)]} {nouns[i % len(nouns)]}" for i in range(n)]


def build_diffusers_sd(width: int, resolution: int, directory: str):
  """A random StableDiffusionPipeline of SD-1.5's structure, saved to `directory`."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from jaxgen.text.tiny_vocab import write_clip_tokenizer  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(
      sample_size=resolution // 8, block_out_channels=tuple(width * m for m in (1, 2, 4, 4)),
      attention_head_dim=8, cross_attention_dim=768)
  source = os.path.join(directory, "tokenizer_src")
  vocab = write_clip_tokenizer(source, SD_WORDS)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(source)
  text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=vocab, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id))
  vae = diffusers.AutoencoderKL(**dict(SD_VAE, sample_size=resolution))
  scheduler = diffusers.PNDMScheduler.from_config(SD15_SCHEDULER)
  diffusers.StableDiffusionPipeline(
      unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae, scheduler=scheduler,
      safety_checker=None, feature_extractor=None,
      requires_safety_checker=False).save_pretrained(os.path.join(directory, "sd"))
  return os.path.join(directory, "sd")


def time_call(fn, repeats: int):
  fn()  # Warm-up (and, for jaxgen, compilation).
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def published_pipelines(dtype: str):
  """[(name, pipeline)] of the published pipelines with abstract weights (nothing allocated)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jaxgen.convert import dit as dit_convert  # pylint: disable=g-import-not-at-top
  from jaxgen.convert import efficientvit_diffusion  # pylint: disable=g-import-not-at-top
  from jaxgen.convert import vae_kl as vae_convert  # pylint: disable=g-import-not-at-top
  from jaxgen.diffusion import schedulers  # pylint: disable=g-import-not-at-top
  from jaxgen.models.vae_kl import vae_kl  # pylint: disable=g-import-not-at-top
  from jaxgen.pipelines.dcae_diffusion import DCAEDiffusionPipeline  # pylint: disable=g-import-not-at-top
  from jaxgen.pipelines.dit import DiTPipeline  # pylint: disable=g-import-not-at-top
  from jaxgen.sharding import make_mesh  # pylint: disable=g-import-not-at-top
  mesh = make_mesh(ml_collections.ConfigDict({"num_devices": 1}))
  sched = schedulers.from_config({"_class_name": "DDIMScheduler", "beta_schedule": "linear",
                                  "clip_sample": False})
  out = []
  for res in (256, 512):
    config = {"num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4,
              "out_channels": 8, "num_layers": 28, "sample_size": res // 8, "patch_size": 2,
              "num_embeds_ada_norm": 1000}
    transformer = dit_convert.module_from_config(config)
    vae = vae_kl(**SD_VAE)
    variables = {"transformer": dit_convert.abstract_variables(transformer, 4, res // 8),
                 "vae": vae_convert.abstract_variables(vae)}
    out.append((f"DiT-XL/2 {res} + SD-VAE (DDIM, cfg 4)",
                DiTPipeline(transformer, config, vae, SD_VAE, sched, variables, dtype=dtype,
                            mesh=mesh)))
  for name in DCAE_MODELS:
    pipe = DCAEDiffusionPipeline(efficientvit_diffusion.abstract_checkpoint(name), dtype=dtype,
                                 mesh=mesh)
    out.append((f"{name} (cfg {pipe.default_guidance:g})", pipe))
  return out


def measure_rss(index: int, dtype: str) -> dict:
  """In this (fresh) process: pipeline `index` with zero weights sampling one image in 2 steps;
  peak resident memory above the process's after the imports and the weights."""
  import resource  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  name, pipe = published_pipelines(dtype)[index]
  weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(pipe.variables))
  pipe.variables = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), pipe.variables)
  jax.block_until_ready(pipe.variables)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  pipe([1], num_inference_steps=2)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return {"pipeline": name, "weights_gib": weights / 2 ** 30,
          "peak_rss_gib": peak / 2 ** 30, "above_weights_gib": (peak - before) / 2 ** 30}


def memory_rows(dtype: str):
  """Batch-1 memory of each published pipeline, each measured in a fresh subprocess (XLA:CPU's
  memory analysis reports arguments only, no temporaries, so the resident peak is measured)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  rows = []
  for i in range(len(DCAE_MODELS) + 2):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.pipeline_throughput",
                           f"--rss_index={i}", f"--dtype={dtype}"], capture_output=True,
                          text=True, check=True)
    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  return rows


def main(argv=None):
  args = parse_args(argv)
  if args.rss_index is not None:
    print(json.dumps(measure_rss(args.rss_index, args.dtype)))
    return
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import diffusers  # pylint: disable=g-import-not-at-top
  model, ours, theirs, t_jax, t_torch = time_pipelines(args)
  result = {
      "benchmark": "pipeline_throughput", "date": datetime.date.today().isoformat(),
      "device": jax.devices()[0].device_kind, "platform": platform.platform(),
      "versions": {"jax": jax.__version__, "torch": torch.__version__,
                   "diffusers": diffusers.__version__},
      "pipeline": args.pipeline, "model": model, "resolution": args.resolution,
      "batch": args.batch, "steps": args.steps, "guidance": args.guidance,
      "dtype": args.dtype, "jaxgen_images_per_s": args.batch / t_jax}
  if t_torch is not None:
    result.update(diffusers_images_per_s=args.batch / t_torch, ratio=t_torch / t_jax,
                  torch_threads=torch.get_num_threads(),
                  max_abs_diff=float(np.max(np.abs(ours - theirs))))
  if args.memory:
    result["batch1_memory"] = memory_rows(args.dtype)
  print(json.dumps(result, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


def dit_runners(args):
  """(model name, jaxgen call, diffusers call): each maps NCHW torch latents to images."""
  import diffusers  # pylint: disable=g-import-not-at-top
  from jaxgen.pipelines import load_pipeline  # pylint: disable=g-import-not-at-top
  labels = list(range(args.batch))
  with tempfile.TemporaryDirectory() as d:
    build_diffusers(args.size, args.resolution).save_pretrained(d)
    pipe = load_pipeline(d, dtype=args.dtype)
    # Read back as a user does: eval mode (a fresh DiT drops labels at random in train mode).
    ref = diffusers.DiTPipeline.from_pretrained(d)
  kwargs = dict(num_inference_steps=args.steps, guidance_scale=args.guidance)
  module = diffusers.pipelines.dit.pipeline_dit

  def theirs(latents):
    # diffusers' DiTPipeline draws its own latents: hand it ours.
    orig_randn, module.randn_tensor = module.randn_tensor, lambda *a, **k: latents.clone()
    try:
      return ref(class_labels=labels, output_type="np", **kwargs).images
    finally:
      module.randn_tensor = orig_randn
  ours = lambda latents: pipe(labels, latents=latents.permute(0, 2, 3, 1).numpy(), **kwargs)
  return f"DiT-{args.size}/2", ours, theirs, ref


def sd_runners(args):
  """As dit_runners, for the Stable Diffusion pipeline (`batch` prompts, empty negatives)."""
  import diffusers  # pylint: disable=g-import-not-at-top
  from jaxgen.pipelines import load_pipeline  # pylint: disable=g-import-not-at-top
  prompts = sd_prompts(args.batch)
  with tempfile.TemporaryDirectory() as d:
    path = build_diffusers_sd(args.sd_width, args.resolution, d)
    pipe = load_pipeline(path, dtype=args.dtype)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
  kwargs = dict(num_inference_steps=args.steps, guidance_scale=args.guidance,
                height=args.resolution, width=args.resolution)
  ours = lambda latents: pipe(prompts, latents=latents.permute(0, 2, 3, 1).numpy(), **kwargs)
  theirs = lambda latents: ref(prompts, latents=latents.clone(), output_type="np",
                               **kwargs).images
  return f"SD-1.5 structure, U-Net width {args.sd_width}", ours, theirs, ref


def time_pipelines(args):
  """(model, jaxgen images, diffusers images | None, jaxgen s, diffusers s | None), both
  pipelines sampling from the same latents."""
  import torch  # pylint: disable=g-import-not-at-top
  model, ours, theirs, ref = (dit_runners if args.pipeline == "dit" else sd_runners)(args)
  s = args.resolution // 8
  latents = torch.randn(args.batch, 4, s, s, generator=torch.Generator().manual_seed(0))
  out = {}
  t_jax = time_call(lambda: out.update(ours=ours(latents)), args.repeats)
  if args.skip_torch:
    return model, out["ours"], None, t_jax, None
  ref.set_progress_bar_config(disable=True)
  with torch.inference_mode():
    t_torch = time_call(lambda: out.update(theirs=theirs(latents)), args.repeats)
  return model, out["ours"], out["theirs"], t_jax, t_torch


if __name__ == "__main__":
  main()
