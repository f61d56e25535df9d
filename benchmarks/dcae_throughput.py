"""DC-AE encode / decode throughput of jaxgen against diffusers' AutoencoderDC, same weights.

  python -m benchmarks.dcae_throughput [--variant=f32c32-in-1.0] [--resolution=256,512] \
      [--batch=N] [--iters=5] [--warmup=1] [--repeats=3] [--dtype=float32|bfloat16] \
      [--device=cpu|cuda] [--compile] [--json=OUT.json]

Random weights: diffusers' `AutoencoderDC(**dcae_config(variant))` is built with torch's default
initialisation (BatchNorm statistics and norm affines then randomised, so no layer is the
identity) and its state dict goes through jaxgen's own diffusers converter
(`jaxgen.convert.dcae.convert_diffusers_state`), so both frameworks run identical weights. As a
sanity check the relative error max|jax - torch| / max|torch| of the float32 encode (same
images) and decode (same latents: jaxgen's) is printed: from the first resolution's benchmark
batch itself with --dtype=float32, else from one 64x64 image in float32 (expected ~1e-5 ..
1e-4 on CPU; TF32 on GPU raises it).

Timed: jaxgen `model.apply(v, x, method="encode"|"decode")` under jax.jit (NHWC), and the
PyTorch `ref.encoder` / `ref.decoder` modules (what `AutoencoderDC.encode/decode` call, NCHW,
no slicing or tiling) in eager mode and, with --compile, under torch.compile. Decode inputs
are jaxgen's latents of the encode benchmark's images. Same process, same batch. Each repeat
is a window of --iters calls; images/s is the median over --repeats windows, after --warmup
untimed calls (the first of which compiles); the windows are taken round-robin over the
implementations and ops, so that load from other jobs on a shared machine slows all alike.
--dtype=bfloat16: jaxgen computes in bf16 with float32 params (`dtype=jnp.bfloat16`), PyTorch
runs under autocast(bfloat16) (float32 params).
Default batch: cuda 32 at 256 scaled by (256 / resolution)^2 (8 at 512); cpu 1.
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m benchmarks.dcae_throughput",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--variant", default="f32c32-in-1.0", help="a jaxgen.models.dcae variant")
  p.add_argument("--resolution", default="256", help="comma-separated square sizes, e.g. 256,512")
  p.add_argument("--batch", type=int, default=None, help="default: see the module docstring")
  p.add_argument("--iters", type=int, default=5, help="calls per timed window")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls (the first compiles)")
  p.add_argument("--repeats", type=int, default=3, help="timed windows; the median is reported")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                 help="default: cuda when PyTorch sees a GPU, else cpu")
  p.add_argument("--compile", action="store_true", help="also time torch.compile")
  p.add_argument("--no_parity", action="store_true", help="skip the float32 parity print")
  p.add_argument("--json", default=None, help="write the results to this JSON file")
  args = p.parse_args(argv)
  args.resolution = [int(r) for r in args.resolution.split(",") if r]
  if min(args.iters, args.repeats, args.warmup) < 1:
    p.error("--iters, --repeats and --warmup must be >= 1")
  return args


def _first_call(call, sync):
  """(output, seconds) of the first (compiling) call."""
  tic = time.perf_counter()
  out = call()
  sync(out)
  return out, time.perf_counter() - tic


def _interleaved_windows(entries, args):
  """Median seconds per call of each entry {call, sync}; repeats are round-robin over the
  entries, so load from other processes on a shared machine hits every entry alike."""
  for _ in range(args.warmup - 1):
    for e in entries:
      e["sync"](e["call"]())
  windows = [[] for _ in entries]
  for _ in range(args.repeats):
    for e, w in zip(entries, windows):
      tic = time.perf_counter()
      for _ in range(args.iters):
        out = e["call"]()
      e["sync"](out)
      w.append((time.perf_counter() - tic) / args.iters)
  return windows


def build_reference(variant: str):
  """diffusers AutoencoderDC with random weights and non-trivial norms, and its config."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from jaxgen.models.dcae import dcae_config  # pylint: disable=g-import-not-at-top
  config = dcae_config(variant)
  torch.manual_seed(0)
  ref = diffusers.AutoencoderDC(**config)
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for m in ref.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
        m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
      if type(m).__name__ in ("BatchNorm2d", "RMSNorm") and getattr(m, "weight", None) is not None:
        m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
        if getattr(m, "bias", None) is not None:
          m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
  return ref.eval(), config


def parity(model, variables, ref, size: int):
  """float32 relative errors (encode, decode) of one image, both on the CPU/GPU in use."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  dev = next(ref.parameters()).device
  x = np.random.default_rng(0).uniform(-1, 1, (1, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    z_ref = ref.encoder(torch.from_numpy(x.transpose(0, 3, 1, 2)).to(dev))
    y_ref = ref.decoder(z_ref).cpu().numpy().transpose(0, 2, 3, 1)
    z_ref = z_ref.cpu().numpy().transpose(0, 2, 3, 1)
  z = jax.jit(lambda v, x: model.apply(v, x, method="encode"))(variables, jnp.asarray(x))
  y = jax.jit(lambda v, z: model.apply(v, z, method="decode"))(variables, jnp.asarray(z_ref))
  return _rel(z, z_ref), _rel(y, y_ref)


def bench_resolution(model, variables, ref, size: int, batch: int, args, check: bool):
  """(rows {impl, op, images_per_s, ...}, float32 (encode, decode) rel errors or None)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(size)
  x = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  bf16 = args.dtype == "bfloat16"
  jmodel = model.clone(dtype=jnp.bfloat16) if bf16 else model
  encode = jax.jit(lambda v, x: jmodel.apply(v, x, method="encode"))
  decode = jax.jit(lambda v, z: jmodel.apply(v, z, method="decode"))
  xj = jax.device_put(jnp.asarray(x))
  jsync = jax.block_until_ready
  entries = []

  def first(impl, op, call, sync):
    out, seconds = _first_call(call, sync)
    entries.append(dict(impl=impl, op=op, call=call, sync=sync, first_s=seconds))
    print(f"  {size} {op:<6} {impl:<16} first call {seconds:.1f} s", flush=True)
    return out

  # No extra calls for the parity check (a CPU call takes seconds): the first (compiling)
  # calls' outputs are compared, and PyTorch decodes jaxgen's latents, so every decode input
  # is the same.
  zj = first("jaxgen (jax.jit)", "encode", lambda: encode(variables, xj), jsync)
  yj = first("jaxgen (jax.jit)", "decode", lambda: decode(variables, zj), jsync)
  zj_np, yj_np = (np.asarray(a, np.float32) for a in (zj, yj))

  dev = next(ref.parameters()).device
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(dev)
  zt = torch.from_numpy(zj_np.transpose(0, 3, 1, 2).copy()).to(dev)
  tsync = (lambda _: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda _: None)

  def torch_call(fn, inp):
    def call():
      with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        return fn(inp)
    return call

  impls = [("diffusers eager", ref.encoder, ref.decoder)]
  if args.compile:
    impls.append(("torch.compile", torch.compile(ref.encoder), torch.compile(ref.decoder)))
  errs = None
  for name, enc, dec in impls:
    z_ref = first(name, "encode", torch_call(enc, xt), tsync)
    y_ref = first(name, "decode", torch_call(dec, zt), tsync)
    if check and errs is None:  # Same weights and inputs: the outputs must agree.
      errs = tuple(_rel(a, b.float().cpu().numpy().transpose(0, 2, 3, 1))
                   for a, b in ((zj_np, z_ref), (yj_np, y_ref)))
      print(f"  parity float32: rel err encode {errs[0]:.1e} decode {errs[1]:.1e}", flush=True)

  rows = []
  for e, w in zip(entries, _interleaved_windows(entries, args)):
    t = statistics.median(w)
    rows.append(dict(impl=e["impl"], op=e["op"], resolution=size, batch=batch,
                     images_per_s=batch / t, ms_per_call=1e3 * t, first_call_s=e["first_s"],
                     window_s_per_call=w))
    print(f"  {size} {e['op']:<6} {e['impl']:<16} {batch / t:9.3f} images/s ({1e3 * t:.0f} "
          f"ms/call)", flush=True)
  return rows, errs


def _rel(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float32) - b).max() / np.abs(b).max())


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  import torch  # pylint: disable=g-import-not-at-top
  if args.device is None:
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
  if args.device == "cuda" and not torch.cuda.is_available():
    sys.exit("dcae_throughput: --device=cuda but PyTorch sees no GPU (is this a CUDA build?)")
  if args.device == "cpu":  # Before jax starts.
    os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import diffusers  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from benchmarks.unet_throughput import environment  # pylint: disable=g-import-not-at-top
  from jaxgen.convert.dcae import convert_diffusers_state  # pylint: disable=g-import-not-at-top
  from jaxgen.models.dcae import canonical_variant  # pylint: disable=g-import-not-at-top

  if args.device == "cuda" and jax.default_backend() != "gpu":
    sys.exit(f"dcae_throughput: --device=cuda but jax's backend is {jax.default_backend()!r}")
  variant = canonical_variant(args.variant)
  tic = time.perf_counter()
  ref, config = build_reference(variant)
  state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  model, variables = convert_diffusers_state(config, state)
  del state
  variables = jax.device_put(variables)
  ref = ref.to(args.device)
  num_params = int(sum(p.numel() for p in ref.parameters()))
  print(f"DC-AE {variant}: {num_params / 1e6:.1f}M params, weights built and converted in "
        f"{time.perf_counter() - tic:.0f} s", flush=True)

  parity_err, parity_on = None, None
  if not args.no_parity and args.dtype != "float32":
    parity_on = f"1 image {model.spatial_compression_ratio * 2}px"
    parity_err = parity(model, variables, ref, model.spatial_compression_ratio * 2)
    print(f"parity float32 ({parity_on}): rel err encode {parity_err[0]:.1e} decode "
          f"{parity_err[1]:.1e}", flush=True)

  rows = []
  for i, size in enumerate(args.resolution):
    batch = args.batch or (max(1, 32 * 256 ** 2 // size ** 2) if args.device == "cuda" else 1)
    check = i == 0 and not args.no_parity and args.dtype == "float32"
    new_rows, errs = bench_resolution(model, variables, ref, size, batch, args, check)
    rows += new_rows
    if check:
      parity_err, parity_on = errs, f"benchmark batch {batch}x{size}px"

  info = dict(environment(args), diffusers=diffusers.__version__, variant=variant,
              num_params=num_params, dtype=args.dtype, device=args.device, iters=args.iters,
              warmup=args.warmup, repeats=args.repeats,
              parity_rel_err=dict(encode=parity_err[0], decode=parity_err[1], on=parity_on)
              if parity_err else None)
  print(f"\nDC-AE {variant} {args.dtype}, {info['jax_device']} [{info['jax_backend']}] / torch "
        f"{info['torch_device']}; jax {info['jax']}, torch {info['torch']}, diffusers "
        f"{info['diffusers']}; median of {args.repeats} x {args.iters} calls")
  print(f"{'res':>5}{'batch':>6}  {'implementation':<18}{'enc img/s':>11}{'dec img/s':>11}"
        f"{'jaxgen/this enc':>17}{'dec':>7}")
  ratios = {}
  for size in args.resolution:
    by = {(r["impl"], r["op"]): r for r in rows if r["resolution"] == size}
    impls = list(dict.fromkeys(r["impl"] for r in rows if r["resolution"] == size))
    base = [by[(impls[0], op)]["images_per_s"] for op in ("encode", "decode")]
    for impl in impls:
      rate = [by[(impl, op)]["images_per_s"] for op in ("encode", "decode")]
      ratio = [b / r for b, r in zip(base, rate)]
      if impl != impls[0]:
        ratios[f"{size}/{impl}"] = dict(encode=ratio[0], decode=ratio[1])
      print(f"{size:>5}{by[(impl, 'encode')]['batch']:>6}  {impl:<18}{rate[0]:>11.3g}"
            f"{rate[1]:>11.3g}{ratio[0]:>17.2f}{ratio[1]:>7.2f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(info, results=rows, jaxgen_over_torch=ratios), f, indent=2, default=str)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
