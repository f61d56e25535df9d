"""Condition-aware depthwise conv: Pallas, XLA (vmap) and folded grouped conv, in GB/s.

  python -m benchmarks.ca_depthwise_conv [--shapes=64x32x32x1024:3,...] [--dtypes=float32,bfloat16] \
      [--impls=pallas,xla,folded] [--roofline_gbs=3350] [--backward] [--iters=20] [--repeats=3] \
      [--json=OUT.json]

Times `jaxgen.kernels.ca_depthwise_conv(x, w, b, impl=...)` (per-sample kxk kernels w (B, k, k, C)
and bias b (B, C), stride 1) jitted, median of --repeats windows of --iters calls. GB/s counts
the minimum traffic of one call (`bytes_moved`: read x, w, b once, write y once), so it is
comparable with the memory-bandwidth roofline: --roofline_gbs, else the device's nominal
bandwidth when it is in ROOFLINE_GBS, else (CPU) the measured bandwidth of a jitted
elementwise copy of a 256 MB array (read + write), printed as "copy".
--backward times value_and_grad (dx, dw, db) instead and counts 3 passes' minimum traffic.

On a CPU backend the Pallas kernel runs in interpret mode (a correctness path, not a fast one);
the default CPU shapes are small for that reason.
"""

import argparse
import importlib
import json
import statistics
import sys
import time

# Nominal HBM bandwidth (GB/s) by jax device_kind.
ROOFLINE_GBS = {
    "NVIDIA H100 80GB HBM3": 3350, "NVIDIA H100 PCIe": 2000, "NVIDIA H100 NVL": 3900,
    "NVIDIA H200": 4800, "NVIDIA A100-SXM4-80GB": 2039, "NVIDIA A100-SXM4-40GB": 1555,
    "NVIDIA A100 80GB PCIe": 1935, "NVIDIA L4": 300, "TPU v4": 1200, "TPU v5 lite": 819,
    "TPU v5": 2765, "TPU v6 lite": 1640,
}
ACCELERATOR_SHAPES = "64x32x32x1024:3,64x16x16x2048:3,256x16x16x1024:5"
CPU_SHAPES = "8x32x32x128:3,8x16x16x256:5,4x16x16x512:7"


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m benchmarks.ca_depthwise_conv",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--shapes", default=None, help="BxHxWxC:k,... (default depends on the backend)")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--impls", default="pallas,xla,folded")
  p.add_argument("--roofline_gbs", type=float, default=None)
  p.add_argument("--backward", action="store_true")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--json", default=None)
  return p.parse_args(argv)


def parse_shapes(spec: str):
  out = []
  for item in spec.split(","):
    dims, _, k = item.partition(":")
    out.append((tuple(int(v) for v in dims.lower().split("x")), int(k or 3)))
  return out


def time_fn(fn, args, iters: int, repeats: int) -> float:
  """Median seconds per call (after one compiling call)."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn(*args))
  windows = []
  for _ in range(repeats):
    tic = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    windows.append((time.perf_counter() - tic) / iters)
  return statistics.median(windows)


def copy_bandwidth_gbs(iters: int = 10) -> float:
  """Read + write GB/s of a jitted elementwise op over 256 MB (an achievable-bandwidth roofline)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jnp.ones((64, 1024, 1024), jnp.float32)
  t = time_fn(jax.jit(lambda a: a * 1.0001 + 1.0), (x,), iters, 3)
  return 2 * x.size * 4 / t / 1e9


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  # The module itself (jaxgen.kernels re-exports the function under the same name).
  kernel = importlib.import_module("jaxgen.kernels.ca_depthwise_conv")

  device = jax.devices()[0]
  cpu = jax.default_backend() == "cpu"
  shapes = parse_shapes(args.shapes or (CPU_SHAPES if cpu else ACCELERATOR_SHAPES))
  roofline, source = args.roofline_gbs, "--roofline_gbs"
  if roofline is None and device.device_kind in ROOFLINE_GBS:
    roofline, source = ROOFLINE_GBS[device.device_kind], f"nominal {device.device_kind}"
  copy = copy_bandwidth_gbs()
  if roofline is None:
    roofline, source = copy, "measured copy"
  print(f"device {device.device_kind} [{jax.default_backend()}], jax {jax.__version__}; "
        f"roofline {roofline:.0f} GB/s ({source}); measured copy {copy:.1f} GB/s"
        + ("; Pallas runs in interpret mode on CPU" if cpu else ""), flush=True)

  rows = []
  for (b, h, w, c), k in shapes:
    for dtype_name in args.dtypes.split(","):
      dtype = jnp.dtype(dtype_name)
      keys = jax.random.split(jax.random.PRNGKey(0), 3)
      x = jax.random.normal(keys[0], (b, h, w, c), dtype)
      wt = (0.1 * jax.random.normal(keys[1], (b, k, k, c))).astype(dtype)
      bias = jax.random.normal(keys[2], (b, c), dtype)
      moved = kernel.bytes_moved((b, h, w, c), k, 1, dtype.itemsize)
      for impl in args.impls.split(","):
        conv = lambda x, wt, bias, impl=impl: kernel.ca_depthwise_conv(x, wt, bias, impl=impl)
        if args.backward:
          fn = jax.jit(jax.value_and_grad(
              lambda x, wt, bias: jnp.sum(conv(x, wt, bias).astype(jnp.float32)),
              argnums=(0, 1, 2)))
          traffic = 3 * moved
        else:
          fn, traffic = jax.jit(conv), moved
        try:
          t = time_fn(fn, (x, wt, bias), args.iters, args.repeats)
        except Exception as e:  # pylint: disable=broad-except
          print(f"  {impl}: failed ({type(e).__name__}: {str(e)[:200]})", flush=True)
          continue
        gbs = traffic / t / 1e9
        row = dict(shape=f"{b}x{h}x{w}x{c}", k=k, dtype=dtype_name, impl=impl,
                   backward=args.backward, ms=1e3 * t, gbs=gbs, roofline_frac=gbs / roofline,
                   gflops=(3 if args.backward else 1) * kernel.flops((b, h, w, c), k) / t / 1e9)
        rows.append(row)
        print(f"{row['shape']} k{k} {dtype_name:<9} {impl:<7} {row['ms']:9.3f} ms "
              f"{gbs:9.1f} GB/s ({100 * row['roofline_frac']:.1f}% of roofline)", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=device.device_kind, backend=jax.default_backend(),
                     jax=jax.__version__, roofline_gbs=roofline, roofline_source=source,
                     copy_gbs=copy, rows=rows), f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
