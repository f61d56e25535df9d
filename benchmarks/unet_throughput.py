"""Train-step throughput of jaxgen's U-Net against the same network in PyTorch.

  python -m benchmarks.unet_throughput --config=configs/unet_cifar10.py [--batch=128] \
      [--steps=20] [--warmup=3] [--repeats=3] [--dtype=float32|bfloat16] [--device=cpu|cuda] \
      [--compile] [--json=OUT.json] [--config.model.base_channels=64 ...]

One train step = forward, eps (or v) MSE at uniform t with the config's noise schedule and label
dropout, backward, global-norm clipping, AdamW with the config's LR schedule, EMA update.
jaxgen runs its real `make_train_step` (jaxgen.train.state) on the diffusion task's loss, jitted
with the state donated, as the trainer does; PyTorch runs benchmarks/torch_unet.py (eager, plus
torch.compile of the model with --compile) starting from the same weights, on the same batch,
in the same process. Reported: images/s (median over repeats), ms/step and jaxgen/torch.

Differences kept on purpose: jaxgen's step also guards against non-finite losses (a select over
the state) and PyTorch has no such guard; PyTorch uses its fastest stock AdamW (fused on CUDA).
With --dtype=bfloat16 jaxgen computes convs/dense/attention in bf16 with float32 params and
norms, PyTorch uses autocast(bfloat16) (float32 params, group_norm in float32).
float32 on GPU: both allow TF32 matmuls/convs by default (JAX's default precision does;
PyTorch is set to match); --no-tf32 makes both use full float32.

Imports neither jaxgen.data nor jaxgen.train.loop, so it runs without grain, clu or tfds; it
needs jax, flax, optax, torch and ml_collections (jaxgen.config, the config files and the
optimizer use it).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np


def parse_args(argv):
  p = argparse.ArgumentParser(
      prog="python -m benchmarks.unet_throughput",
      description=__doc__.split("\n\n")[0],
      epilog="Extra --config.a.b=value arguments override config fields.")
  p.add_argument("--config", required=True, help="configs/<name>.py[:preset] (a U-Net config)")
  p.add_argument("--batch", type=int, default=None, help="default: config.training.batch_size")
  p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
  p.add_argument("--repeats", type=int, default=3, help="timed windows; the median is reported")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                 help="default: cuda when PyTorch sees a GPU, else cpu")
  p.add_argument("--compile", action="store_true", help="also time torch.compile(model)")
  p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                 help="PyTorch memory format (default: on for cuda, off for cpu)")
  p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                 help="allow TF32 in float32 convs/matmuls on GPU, in both frameworks")
  p.add_argument("--channels", type=int, default=3, help="image channels (3 for CIFAR-10)")
  p.add_argument("--json", default=None, help="write the results to this JSON file")
  args, rest = p.parse_known_args(argv)
  overrides = []
  for item in rest:
    if not item.startswith("--config."):
      p.error(f"unrecognized argument {item!r}")
    overrides.append(item[len("--config."):])
  if min(args.steps, args.repeats) < 1 or args.warmup < 0:
    p.error("--steps and --repeats must be >= 1 and --warmup >= 0")
  return args, overrides


def _require(module: str, pip_name: str):
  try:
    __import__(module)
  except ImportError:
    sys.exit(f"unet_throughput: the Python package {pip_name!r} is missing ({module} cannot be "
             f"imported). Install it (`pip install {pip_name}`) or, on a machine with no index, "
             f"carry its wheel and `pip install --no-deps` it there (ml_collections is pure "
             f"Python: a copy of its package folder on PYTHONPATH also works).")


def _median_rate(times, images_per_window):
  t = statistics.median(times)
  return images_per_window / t, t


def time_jax(config, images, labels, args):
  """The real jitted jaxgen train step -> (result, initial params on the host, LR per step)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxgen.tasks.diffusion import DiffusionTask  # pylint: disable=g-import-not-at-top
  from jaxgen.train.optim import make_optimizer  # pylint: disable=g-import-not-at-top
  from jaxgen.train.state import TrainState, make_train_step  # pylint: disable=g-import-not-at-top

  task = DiffusionTask(config, images.shape[1:], config.data.num_classes)
  if args.dtype == "bfloat16":
    task.model = task.model.clone(dtype=jnp.bfloat16)  # Compute dtype; params stay float32.
  tx, lr_schedule = make_optimizer(config.optimizer, config.training.steps)

  def init_state(rng):  # As jaxgen.train.loop.build does.
    params, model_state = task.init(rng, None)
    return TrainState(jnp.zeros((), jnp.int32), params, params, tx.init(params), model_state)

  state = jax.jit(init_state)(jax.random.PRNGKey(config.seed))
  params0 = jax.device_get(state.params)
  step = jax.jit(make_train_step(task.loss, tx, config.optimizer.ema_decay, lr_schedule),
                 donate_argnums=0)
  batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
  rng = jax.random.PRNGKey(config.seed + 1)
  tic = time.perf_counter()
  compiled = step.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - tic
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*donated buffers.*")
    for _ in range(args.warmup):
      state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(state)
    times = []
    for _ in range(args.repeats):
      tic = time.perf_counter()
      for _ in range(args.steps):
        state, metrics = compiled(state, batch, rng)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - tic)
  rate, t = _median_rate(times, args.steps * len(images))
  num_lrs = args.warmup + 1 + args.steps * args.repeats  # Schedules are scalar functions.
  lrs = np.asarray(jax.device_get(jax.vmap(lr_schedule)(jnp.arange(num_lrs))))
  result = dict(name="jaxgen (jax.jit)", images_per_s=rate, ms_per_step=1e3 * t / args.steps,
                compile_or_first_step_s=compile_s, window_s=times,
                final_loss=float(metrics["loss"]), finite=bool(metrics["finite"]),
                num_params=int(sum(np.size(p) for p in jax.tree.leaves(params0))))
  return result, params0, lrs


def time_torch(config, images, labels, params0, lrs, args, *, compiled: bool):
  """The same step in PyTorch, from the same weights, batch, schedule and LR values."""
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_unet  # pylint: disable=g-import-not-at-top
  from jaxgen.config import model_kwargs  # pylint: disable=g-import-not-at-top
  from jaxgen.diffusion.schedules import make_schedule  # pylint: disable=g-import-not-at-top

  dev = torch.device(args.device)
  fmt = torch.channels_last if args.channels_last else torch.contiguous_format
  kwargs = model_kwargs(config.model)
  kwargs.pop("dtype", None)
  model = torch_unet.TorchUNet(in_channels=images.shape[-1], **kwargs)
  torch_unet.load_jax_params(model, params0)
  model = model.to(dev, memory_format=fmt).train()
  forward = torch.compile(model) if compiled else model
  params = [p for p in model.parameters()]
  o = config.optimizer
  opt = torch.optim.AdamW(params, lr=float(lrs[0]), betas=(o.b1, o.b2), eps=o.get("eps", 1e-8),
                          weight_decay=o.weight_decay, fused=True if dev.type == "cuda" else None)
  ema = [p.detach().clone() for p in params]
  d = config.diffusion
  sched = make_schedule(d.schedule, d.num_steps)
  ab = torch.tensor(np.asarray(sched.alphas_cumprod), device=dev)
  x0 = torch.tensor(images).permute(0, 3, 1, 2).to(dev).contiguous(memory_format=fmt)
  y0 = torch.tensor(labels, dtype=torch.long, device=dev)
  null = config.data.num_classes
  batch = x0.shape[0]
  bf16 = args.dtype == "bfloat16"

  def train_step(i):
    t = torch.randint(0, sched.num_steps, (batch,), device=dev)
    noise = torch.randn_like(x0)
    a = ab[t].sqrt()[:, None, None, None]
    s = (1.0 - ab[t]).sqrt()[:, None, None, None]
    x_t = a * x0 + s * noise
    y = torch.where(torch.rand(batch, device=dev) < d.label_dropout, null, y0)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
      out = forward(x_t, t.float(), y)
    target = noise if d.prediction == "eps" else a * noise - s * x0
    loss = torch.mean(torch.square(out.float() - target))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if o.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(params, o.grad_clip, foreach=True)
    for group in opt.param_groups:
      group["lr"] = float(lrs[i])
    opt.step()
    decay = min(o.ema_decay, (1.0 + i) / (10.0 + i))
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1.0 - decay)  # ema = decay ema + (1 - decay) p.
    return loss.detach()

  sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
  tic = time.perf_counter()
  train_step(0)  # Compiles (torch.compile) / initialises (eager).
  sync()
  first_s = time.perf_counter() - tic
  i = 1
  for _ in range(max(args.warmup - 1, 0)):
    train_step(i)
    i += 1
  sync()
  times = []
  for _ in range(args.repeats):
    tic = time.perf_counter()
    for _ in range(args.steps):
      loss = train_step(i)
      i += 1
    sync()
    times.append(time.perf_counter() - tic)
  rate, t = _median_rate(times, args.steps * batch)
  name = "torch.compile" if compiled else "torch eager"
  if args.channels_last:
    name += " (channels_last)"
  return dict(name=name, images_per_s=rate, ms_per_step=1e3 * t / args.steps,
              compile_or_first_step_s=first_s, window_s=times, final_loss=float(loss),
              num_params=int(sum(p.numel() for p in params)))


def environment(args):
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  env = dict(
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      python=platform.python_version(), jax=jax.__version__,
      jaxlib=getattr(jax.lib, "__version__", None) or _version("jaxlib"),
      flax=flax.__version__, optax=optax.__version__, torch=torch.__version__,
      jax_backend=jax.default_backend(), jax_device=jax.devices()[0].device_kind,
      host=platform.machine(), cpu_count=os.cpu_count())
  if args.device == "cuda":
    env.update(torch_device=torch.cuda.get_device_name(), torch_cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version())
  else:
    env.update(torch_device="cpu", torch_threads=torch.get_num_threads())
  return env


def _version(dist):
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    return metadata.version(dist)
  except Exception:  # pylint: disable=broad-except
    return None


def format_table(results, info) -> str:
  lines = [
      f"U-Net train-step throughput, {info['date']}",
      f"config {info['config']} | batch {info['batch']} | image {info['image_shape']} | "
      f"{info['dtype']}{' (tf32 allowed)' if info['tf32'] and info['device'] == 'cuda' else ''}"
      f" | {info['num_params'] / 1e6:.2f}M params",
      f"device {info['device']}: jax {info['jax_device']} [{info['jax_backend']}], torch "
      f"{info['torch_device']}",
      f"versions: python {info['python']}, jax {info['jax']}, jaxlib {info['jaxlib']}, "
      f"flax {info['flax']}, optax {info['optax']}, torch {info['torch']}"
      + (f" (cuda {info['torch_cuda']}, cudnn {info['cudnn']})" if "torch_cuda" in info else ""),
      f"step = forward + {info['prediction']}-MSE ({info['schedule']} schedule) + backward + "
      f"clip + AdamW + EMA; median of {info['repeats']} x {info['steps']} steps after "
      f"{info['warmup']} warm-up",
      "",
      f"{'implementation':<32}{'images/s':>11}{'ms/step':>10}{'compile/1st s':>15}"
      f"{'jaxgen/this':>13}",
  ]
  base = results[0]["images_per_s"]
  for r in results:
    lines.append(f"{r['name']:<32}{r['images_per_s']:>11.1f}{r['ms_per_step']:>10.2f}"
                 f"{r['compile_or_first_step_s']:>15.1f}{base / r['images_per_s']:>13.2f}")
  return "\n".join(lines)


def main(argv=None):
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  _require("torch", "torch")
  import torch  # pylint: disable=g-import-not-at-top
  if args.device is None:
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
  if args.device == "cuda" and not torch.cuda.is_available():
    sys.exit("unet_throughput: --device=cuda but PyTorch sees no GPU (is this a CUDA build?)")
  if args.channels_last is None:
    args.channels_last = args.device == "cuda"
  # Before jax starts: pick its platform, and let both frameworks share the GPU's memory.
  if args.device == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  for module, pip_name in (("jax", "jax"), ("flax", "flax"), ("optax", "optax"),
                           ("ml_collections", "ml_collections")):
    _require(module, pip_name)
  import jax  # pylint: disable=g-import-not-at-top
  from jaxgen.config import load_config  # pylint: disable=g-import-not-at-top

  if args.device == "cuda" and jax.default_backend() != "gpu":
    sys.exit(f"unet_throughput: --device=cuda but jax's backend is {jax.default_backend()!r}; "
             "install a CUDA build of jax (jax[cuda12] / jax[cuda13]).")
  if not args.tf32:
    jax.config.update("jax_default_matmul_precision", "highest")
  torch.backends.cuda.matmul.allow_tf32 = args.tf32
  torch.backends.cudnn.allow_tf32 = args.tf32

  from jaxgen.errors import JaxgenError  # pylint: disable=g-import-not-at-top
  try:
    config = load_config(args.config, overrides)
  except JaxgenError as e:
    sys.exit(f"unet_throughput: {e}")
  if config.model.name != "unet":
    sys.exit(f"unet_throughput: {args.config} builds model {config.model.name!r}; this "
             "benchmark compares the U-Net only (config.model.name == 'unet').")
  batch = args.batch or config.training.batch_size
  size = config.data.image_size
  rng = np.random.default_rng(config.seed)
  images = rng.uniform(-1, 1, (batch, size, size, args.channels)).astype(np.float32)
  labels = rng.integers(0, config.data.num_classes, (batch,)).astype(np.int32)

  jax_result, params0, lrs = time_jax(config, images, labels, args)
  print(f"jaxgen: {jax_result['images_per_s']:.1f} images/s", flush=True)
  results = [jax_result]
  for compiled in ([False, True] if args.compile else [False]):
    results.append(time_torch(config, images, labels, params0, lrs, args, compiled=compiled))
    print(f"{results[-1]['name']}: {results[-1]['images_per_s']:.1f} images/s", flush=True)
  if len({r["num_params"] for r in results}) != 1:
    sys.exit(f"unet_throughput: parameter counts differ: {[r['num_params'] for r in results]}")

  info = dict(environment(args), config=args.config, overrides=overrides, batch=batch,
              image_shape="x".join(map(str, images.shape[1:])), dtype=args.dtype,
              device=args.device, tf32=args.tf32, channels_last=args.channels_last,
              steps=args.steps, warmup=args.warmup, repeats=args.repeats,
              num_params=jax_result["num_params"], schedule=config.diffusion.schedule,
              prediction=config.diffusion.prediction, model=config.model.to_dict())
  print()
  print(format_table(results, info))
  if args.json:
    ratios = {r["name"]: jax_result["images_per_s"] / r["images_per_s"] for r in results[1:]}
    with open(args.json, "w") as f:
      json.dump(dict(info, results=results, jaxgen_over_torch=ratios), f, indent=2, default=str)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
