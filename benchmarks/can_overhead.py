"""Train-step time of CAN-DiT against plain DiT of the same size (the CAN training overhead).

  python -m benchmarks.can_overhead [--preset=DiT-S/2] [--input=32x32x4] [--batch=16] \
      [--ca_rank=16] [--steps=10] [--warmup=2] [--repeats=3] [--dtype=float32|bfloat16] \
      [--arms=adaln,both,can] [--json=OUT.json]

Arms (the presets of configs/can_ablation.py, sized by --preset):
  adaln  plain DiT (adaLN-Zero, static layers): the baseline
  both   CAN-DiT: adaLN-Zero plus condition-aware patch embedding, attention output
         projections and FFN linears
  can    CAN-DiT without adaLN (the condition enters through the condition-aware layers only)
One train step is the trainer's own (`benchmarks.unet_throughput.time_jax`: the diffusion
task's loss, backward, clipping, AdamW, EMA, jitted with the state donated) on a random batch
of inputs shaped --input (latents: 32x32x4 is SD-VAE at 256, 16x16x32 DC-AE f32 at 512).
Reported: ms/step (median of the windows), parameters, and the overhead over the DiT arm.

--ca_rank: the condition-aware layers generate the r x r core of W_c = U G(c) V
(jaxgen.nn.condition_aware; full-rank generators of a 384-wide DiT's FFN would hold
384 x 384*1536 = 226M parameters per layer); `--ca_rank=0` generates full weights (only
sensible for small widths).
"""

import argparse
import json
import os
import sys

import numpy as np

ARM_NAMES = {"adaln": "DiT (adaLN-Zero)", "both": "CAN-DiT (adaLN + CA)",
             "can": "CAN-DiT (CA only)"}


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m benchmarks.can_overhead",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="DiT-S/2",
                 help="DiT size/patch, e.g. DiT-S/2, DiT-B/1; 'ablation': configs/can_ablation.py's")
  p.add_argument("--input", default="32x32x4", help="HxWxC of the backbone input")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--ca_rank", type=int, default=16, help="0: full-rank weight generation")
  p.add_argument("--steps", type=int, default=10, help="timed steps per window")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--arms", default="adaln,both,can")
  p.add_argument("--num_classes", type=int, default=1000)
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  args.input = tuple(int(v) for v in args.input.lower().split("x"))
  args.arms = [a for a in args.arms.split(",") if a]
  if len(args.input) != 3 or any(a not in ARM_NAMES for a in args.arms):
    p.error("--input must be HxWxC and --arms a subset of adaln,both,can")
  return args


def arm_config(arm: str, args):
  """configs/can_ablation.py's arm, resized to --preset (no data is read)."""
  from configs import can_ablation  # pylint: disable=g-import-not-at-top
  from jaxgen.models.dit import dit_preset  # pylint: disable=g-import-not-at-top
  c = can_ablation.get_config(arm)
  if args.preset != "ablation":  # "ablation": the ablation's own small DiT.
    c.model.update(dit_preset(args.preset))
  c.model.update(dict(num_classes=args.num_classes, ca_rank=args.ca_rank or None))
  c.data.num_classes = args.num_classes
  c.training.batch_size = args.batch
  return c


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks.unet_throughput import time_jax  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  images = rng.standard_normal((args.batch,) + args.input).astype(np.float32)
  labels = rng.integers(0, args.num_classes, (args.batch,)).astype(np.int32)
  results = []
  for arm in args.arms:
    config = arm_config(arm, args)
    result, _, _ = time_jax(config, images, labels, args)
    result.update(arm=arm, name=ARM_NAMES[arm])
    results.append(result)
    print(f"{result['name']}: {result['ms_per_step']:.1f} ms/step, "
          f"{result['num_params'] / 1e6:.2f}M params (compile {result['compile_or_first_step_s']:.0f} s)",
          flush=True)
  base = next((r["ms_per_step"] for r in results if r["arm"] == "adaln"), None)
  print(f"\n{args.preset} on {'x'.join(map(str, args.input))} inputs, batch {args.batch}, "
        f"{args.dtype}, CA rank {args.ca_rank or 'full'}, {jax.devices()[0].device_kind} "
        f"[{jax.default_backend()}], jax {jax.__version__}")
  print(f"{'arm':<26}{'params (M)':>12}{'ms/step':>10}{'img/s':>9}{'vs DiT':>9}")
  for r in results:
    ratio = f"{100 * (r['ms_per_step'] / base - 1):+.0f}%" if base else "-"
    print(f"{r['name']:<26}{r['num_params'] / 1e6:>12.2f}{r['ms_per_step']:>10.1f}"
          f"{r['images_per_s']:>9.1f}{ratio:>9}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(vars(args), device=jax.devices()[0].device_kind, jax=jax.__version__,
                     results=results), f, indent=1, default=str)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
