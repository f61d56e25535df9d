"""3x3 convolutions on small maps with many channels (Stable Diffusion's U-Net at low
resolution): XLA's convolution, the same conv as im2col + one matmul in XLA, and PyTorch.

  python -m benchmarks.cpu_conv [--batch=4] [--repeats=5]

Prints one row per (channels, map size): the best of `repeats` timed calls (after one
untimed call) and the max abs difference of the im2col result from XLA's conv.
"""

import argparse
import time

import numpy as np

SHAPES = ((320, 16), (640, 8), (1280, 4), (1280, 2))


def best_ms(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times) * 1e3


def im2col_conv3x3(x, w):
  """SAME 3x3 conv, NHWC x HWIO, as the 9 shifted maps side by side times the (9C, O) kernel."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  b, h, width, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  cols = jnp.concatenate([xp[:, i:i + h, j:j + width] for i in range(3) for j in range(3)], -1)
  return (cols.reshape(-1, 9 * c) @ w.reshape(9 * c, -1)).reshape(b, h, width, -1)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_conv")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  cols = jax.jit(im2col_conv3x3)
  print(f"3x3 conv, batch {args.batch}, float32, {jax.devices()[0].device_kind}, "
        f"torch threads {torch.get_num_threads()}")
  print(f"{'C':>6}{'map':>6}{'XLA conv ms':>13}{'im2col ms':>11}{'torch ms':>10}{'diff':>10}")
  for c, s in SHAPES:
    rng = np.random.RandomState(0)
    x = rng.randn(args.batch, s, s, c).astype(np.float32)
    w = (rng.randn(3, 3, c, c) * 0.01).astype(np.float32)
    t_conv = best_ms(lambda: conv(x, w).block_until_ready(), args.repeats)
    t_cols = best_ms(lambda: cols(x, w).block_until_ready(), args.repeats)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous()
    with torch.inference_mode():
      t_torch = best_ms(lambda: torch.nn.functional.conv2d(xt, wt, padding=1), args.repeats)
    diff = float(np.abs(np.asarray(conv(x, w)) - np.asarray(cols(x, w))).max())
    print(f"{c:>6}{s:>4}x{s:<2}{t_conv:>12.1f}{t_cols:>11.1f}{t_torch:>10.1f}{diff:>10.1e}")


if __name__ == "__main__":
  main()
