"""CAN vs adaLN: trains the three arms of a setting and scores their samples.

  python -m benchmarks.can_ablation [--setting=dit_pixels|cat_latents] [--workdir=DIR] \
      [--arms=can,adaln,both] [--num_samples=500] [--json=OUT.json] [--config.a.b=value ...]

Settings (each config's presets are the arms; everything else in an arm is identical):
  dit_pixels   configs/can_ablation.py: a small DiT on MNIST-5k pixels (14x14, patch 2);
               default workdir workdirs/can_ablation
  cat_latents  configs/can_digits.py: CaT on the latents of a small DC-AE (MNIST-5k 32x32 ->
               4x4x16), the paper's own setting in miniature. The autoencoder and the latent
               cache are trained / written once, in WORKDIR/autoencoder and WORKDIR/latents
               (jaxgen/tasks/two_stage.py), and shared by the arms; default workdir
               workdirs/can_ablation_cat

Each arm trains in WORKDIR/<arm> with `jaxgen.train.loop.train` (a finished workdir is only
read; an interrupted one resumes), then draws num_samples class-conditional samples (equal per
class, the config's sampler and guidance, EMA weights, one fixed seed for every arm) and reports:

  class accuracy   the fraction of samples the digit classifier (jaxgen.metrics.classifier,
                   trained once on the real train digits, cached in WORKDIR/classifier) labels
                   as the requested class
  feature FD       the Frechet distance (jaxgen.metrics.fid) between the classifier's
                   penultimate (128-d) features of the samples and of the 1000 real test digits;
                   the row "real train digits" is the same distance for 1000 real train digits
                   (the floor a perfect generator reaches with this many samples)

Extra --config.a.b=value arguments override every arm's config (e.g. --config.training.steps=400).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

ARMS = ("can", "adaln", "both")
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
# setting -> (config file, default workdir)
SETTINGS = {
    "dit_pixels": ("can_ablation.py", "workdirs/can_ablation"),
    "cat_latents": ("can_digits.py", "workdirs/can_ablation_cat"),
}


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m benchmarks.can_ablation",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--setting", default="dit_pixels", choices=sorted(SETTINGS))
  p.add_argument("--workdir", default=None, help="default: the setting's (see above)")
  p.add_argument("--arms", default=",".join(ARMS))
  p.add_argument("--num_samples", type=int, default=None, help="default: config eval.num_samples")
  p.add_argument("--seed", type=int, default=1234, help="sampling seed (the same for every arm)")
  p.add_argument("--json", default=None, help="default: WORKDIR/results.json")
  args, rest = p.parse_known_args(argv)
  args.workdir = args.workdir or SETTINGS[args.setting][1]
  args.arms = [a for a in args.arms.split(",") if a]
  if any(a not in ARMS for a in args.arms):
    p.error(f"--arms must be a subset of {','.join(ARMS)}")
  args.overrides = []
  for item in rest:
    if not item.startswith("--config."):
      p.error(f"unrecognized argument {item!r}")
    args.overrides.append(item[len("--config."):])
  return args


def describe(setting: str, config, setup) -> str:
  """The data and backbone of a setting, for the table's title."""
  m, size = config.model, config.data.image_size
  if setting == "dit_pixels":
    return (f"MNIST-5k {size}x{size} (pixel space): DiT depth {m.depth}, width "
            f"{m.hidden_size}, patch {m.patch_size}")
  return (f"MNIST-5k {size}x{size} through a DC-AE trained in stage 1 (latents "
          f"{'x'.join(map(str, setup.task.image_shape))}, scaling factor "
          f"{config.autoencoder.scaling_factor:.3f}): CaT widths {tuple(m.widths)}, depths "
          f"{tuple(m.depths)}, blocks {tuple(m.block_kinds)}")


def batched(fn, x, batch=500):
  return np.concatenate([np.asarray(fn(x[i:i + batch])) for i in range(0, len(x), batch)])


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  import jax  # pylint: disable=g-import-not-at-top
  from jaxgen import data as data_lib  # pylint: disable=g-import-not-at-top
  from jaxgen.config import load_config  # pylint: disable=g-import-not-at-top
  from jaxgen.metrics import classifier  # pylint: disable=g-import-not-at-top
  from jaxgen.metrics.fid import feature_frechet_distance  # pylint: disable=g-import-not-at-top
  from jaxgen.models.flops import count_params  # pylint: disable=g-import-not-at-top
  from jaxgen.tasks import two_stage  # pylint: disable=g-import-not-at-top
  from jaxgen.train import loop  # pylint: disable=g-import-not-at-top

  path = os.path.join(CONFIGS, SETTINGS[args.setting][0])
  configs = {arm: load_config(f"{path}:{arm}", args.overrides) for arm in args.arms}
  if args.setting == "cat_latents":
    # Stages 1-2 once in WORKDIR (the arms' configs differ only in the backbone); each arm
    # then trains on the shared latents.
    for arm in configs:
      configs[arm] = two_stage.prepare(configs[arm], args.workdir)
      if configs[arm] is None:
        print("the autoencoder stage was preempted; rerun the same command to resume")
        return
  first = next(iter(configs.values()))
  tic = time.perf_counter()
  clf, clf_params, real_acc = classifier.cached_classifier(
      first.data, os.path.join(args.workdir, "classifier"), epochs=first.eval.classifier_epochs)
  print(f"classifier: {real_acc:.4f} on real test digits ({time.perf_counter() - tic:.0f} s)",
        flush=True)
  features = jax.jit(lambda x: clf.features(clf_params, x))
  test_images, _ = data_lib.load_arrays(first.data, "test")
  train_images, _ = data_lib.load_arrays(first.data, "train")
  test_features = batched(features, test_images)
  floor = feature_frechet_distance(batched(features, train_images[::4]), test_features)

  rows = []
  for arm, config in configs.items():
    workdir = os.path.join(args.workdir, arm)
    tic = time.perf_counter()
    setup = loop.train(config, workdir)
    train_s = time.perf_counter() - tic
    logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    n = args.num_samples or config.eval.num_samples
    labels = loop.class_labels(setup.task.num_classes, -(-n // setup.task.num_classes))
    tic = time.perf_counter()
    images = loop.generate(setup, labels, seed=args.seed)
    sample_s = time.perf_counter() - tic
    predicted = classifier.predict(clf, clf_params, images.astype(np.float32))
    row = dict(
        arm=arm, steps=setup.step, params=count_params(setup.state.params),
        final_loss=float(np.mean([r["loss"] for r in logged[-3:]])),
        steps_per_s=float(np.median([r["steps_per_sec"] for r in logged[1:]] or [0.0])),
        class_accuracy=float(np.mean(predicted == labels)),
        per_class_accuracy=[float(np.mean(predicted[labels == k] == k))
                            for k in range(setup.task.num_classes)],
        feature_fd=feature_frechet_distance(batched(features, images), test_features),
        num_samples=int(len(labels)), train_s=train_s, sample_s=sample_s)
    rows.append(row)
    print(f"{arm}: class accuracy {row['class_accuracy']:.3f}, feature FD "
          f"{row['feature_fd']:.2f} ({row['num_samples']} samples; trained {train_s:.0f} s, "
          f"sampled {sample_s:.0f} s)", flush=True)

  print(f"\nCAN vs adaLN on {describe(args.setting, first, setup)}; {first.training.steps} "
        f"steps x batch {first.training.batch_size}; {first.sample.method} "
        f"{first.sample.num_steps} steps, guidance {first.sample.guidance_scale}; "
        f"jax {jax.__version__} [{jax.default_backend()}]")
  print(f"{'arm':<8}{'params':>10}{'final loss':>12}{'steps/s':>9}{'class acc':>11}"
        f"{'feature FD':>12}")
  for r in rows:
    print(f"{r['arm']:<8}{r['params']:>10,}{r['final_loss']:>12.4f}{r['steps_per_s']:>9.2f}"
          f"{r['class_accuracy']:>11.3f}{r['feature_fd']:>12.2f}")
  print(f"{'real train digits (1000) vs test':<50}{floor:>12.2f}")
  print(f"classifier accuracy on real test digits: {real_acc:.4f}")
  out = args.json or os.path.join(args.workdir, "results.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(dict(setting=args.setting, arms=rows, real_train_vs_test_fd=floor,
                   classifier_test_accuracy=real_acc, overrides=args.overrides,
                   jax=jax.__version__,
                   device=jax.devices()[0].device_kind), f, indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
