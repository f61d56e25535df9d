"""Sampling throughput of jaxgen's DiTPipeline against diffusers' in the same process, and the
batch-1 memory of the published pipelines.

  python -m benchmarks.pipeline_throughput [--size=S] [--resolution=256] [--batch=4]
      [--steps=25] [--guidance=4] [--repeats=3] [--dtype=float32|bfloat16]
      [--memory] [--json=OUT.json]

Both pipelines are built from one random DiTPipeline saved by diffusers (DiT-{size}/2 at
`resolution` with the SD-VAE decoder of `facebook/DiT-XL-2-*`: block_out_channels
128/256/512/512), sample `batch` images from the same latents with DDIM and guidance, and
decode them. Reported: images/s (median over repeats, compilation excluded for jaxgen, one
untimed warm-up call for both) and the max abs difference of the two sets of images.

--memory adds, for each published pipeline at batch 1 (DiT-XL/2 256 and 512 with the SD-VAE;
the DC-AE paper's f32c32 + UViT-H / DiT-XL and f64c128 + UViT-H at 512), the weights and the
peak resident memory of a fresh process sampling one image (zero weights, 2 steps: the scan
keeps the peak independent of the step count), on this machine's device.
"""

import argparse
import datetime
import json
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
  p.add_argument("--size", choices=sorted(SIZES), default="S")
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
  from jaxgen.pipelines import load_pipeline  # pylint: disable=g-import-not-at-top
  import diffusers  # pylint: disable=g-import-not-at-top
  labels = list(range(args.batch))
  with tempfile.TemporaryDirectory() as d:
    build_diffusers(args.size, args.resolution).save_pretrained(d)
    pipe = load_pipeline(d, dtype=args.dtype)
    # Read back as a user does: eval mode (a fresh DiT drops labels at random in train mode).
    ref = diffusers.DiTPipeline.from_pretrained(d)
  s = args.resolution // 8
  latents = torch.randn(args.batch, 4, s, s, generator=torch.Generator().manual_seed(0))
  latents_nhwc = latents.permute(0, 2, 3, 1).numpy()

  ours = {}

  def run_jax():
    ours["images"] = pipe(labels, num_inference_steps=args.steps,
                          guidance_scale=args.guidance, latents=latents_nhwc)
  t_jax = time_call(run_jax, args.repeats)
  result = {
      "benchmark": "pipeline_throughput", "date": datetime.date.today().isoformat(),
      "device": jax.devices()[0].device_kind, "platform": platform.platform(),
      "versions": {"jax": jax.__version__, "torch": torch.__version__,
                   "diffusers": diffusers.__version__},
      "size": f"DiT-{args.size}/2", "resolution": args.resolution, "batch": args.batch,
      "steps": args.steps, "guidance": args.guidance, "dtype": args.dtype,
      "jaxgen_images_per_s": args.batch / t_jax}
  if not args.skip_torch:
    theirs = {}
    orig_randn = diffusers.pipelines.dit.pipeline_dit.randn_tensor

    def run_torch():
      # diffusers' DiTPipeline draws its own latents: hand it ours.
      diffusers.pipelines.dit.pipeline_dit.randn_tensor = lambda *a, **k: latents.clone()
      try:
        theirs["images"] = ref(class_labels=labels, num_inference_steps=args.steps,
                               guidance_scale=args.guidance, output_type="np").images
      finally:
        diffusers.pipelines.dit.pipeline_dit.randn_tensor = orig_randn
    ref.set_progress_bar_config(disable=True)
    with torch.inference_mode():
      t_torch = time_call(run_torch, args.repeats)
    result.update(diffusers_images_per_s=args.batch / t_torch, ratio=t_torch / t_jax,
                  torch_threads=torch.get_num_threads(),
                  max_abs_diff=float(np.max(np.abs(ours["images"] - theirs["images"]))))
  if args.memory:
    result["batch1_memory"] = memory_rows(args.dtype)
  print(json.dumps(result, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
