"""Command line: train, sample from or evaluate a model described by a config file.

  python -m jaxgen.main --config=configs/unet_mnist.py[:preset] --workdir=DIR \
      [--mode=train|sample|eval] [--config.a.b=value ...]

Train resumes from DIR's newest checkpoint by itself. User errors (bad config, missing data,
corrupt checkpoint, non-finite loss) print one `error:` line and exit with status 2.
"""

import json
import os
import sys
from typing import List, Optional

import jax
import numpy as np

from jaxgen import visualize
from jaxgen.config import load_config
from jaxgen.errors import ConfigError, JaxgenError

USAGE = ("usage: python -m jaxgen.main --config=FILE[:preset] --workdir=DIR "
         "[--mode=train|sample|eval] [--config.a.b=value ...]")
MODES = ("train", "sample", "eval")


def parse_args(argv: List[str]):
  """Returns (config spec, workdir, mode, overrides)."""
  spec, workdir, mode, overrides = None, None, "train", []
  for arg in argv:
    if arg in ("-h", "--help"):
      print(USAGE + "\n\n" + __doc__)
      sys.exit(0)
    key, sep, value = arg.partition("=")
    if key.startswith("--config.") and sep:
      overrides.append(f"{key[len('--config.'):]}={value}")
    elif key == "--config" and sep:
      spec = value
    elif key == "--workdir" and sep:
      workdir = value
    elif key == "--mode" and sep:
      mode = value
    else:
      raise ConfigError(f"unrecognised argument {arg!r}. {USAGE}")
  if spec is None:
    raise ConfigError(f"--config is required. {USAGE}")
  if mode not in MODES:
    raise ConfigError(f"--mode={mode} is not one of {MODES}")
  if workdir is None:
    workdir = os.path.join("workdirs", os.path.splitext(os.path.basename(spec.split(":")[0]))[0]
                           + ("_" + spec.split(":")[1] if ":" in spec else ""))
  return spec, workdir, mode, overrides


def run_sample(config, workdir: str) -> str:
  """Writes DIR/samples/samples.npz, a per-class grid and one grid per class."""
  from jaxgen.train import loop  # pylint: disable=g-import-not-at-top
  setup = loop.build(config, workdir, require_checkpoint=True)
  labels = loop.class_labels(setup.task.num_classes, config.sample.num_per_class)
  images = visualize.to_uint8(loop.generate(setup, labels, seed=config.seed))
  out = os.path.join(workdir, "samples")
  if jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    np.savez(os.path.join(out, "samples.npz"), images=images, labels=labels)
    visualize.save_class_grid(os.path.join(out, "grid.png"), images, labels,
                              setup.task.num_classes)
    for k in range(setup.task.num_classes):
      visualize.save_png(os.path.join(out, f"class_{k}.png"),
                         visualize.image_grid(images[labels == k], rows=max(
                             1, int(np.sqrt(np.sum(labels == k))))))
  print(f"wrote {len(images)} samples to {out}/samples.npz and {out}/grid.png", flush=True)
  return out


def run_eval(config, workdir: str) -> dict:
  """Class accuracy of generated samples under a classifier jaxgen trains on the real data."""
  from jaxgen.metrics import classifier  # pylint: disable=g-import-not-at-top
  from jaxgen.train import loop  # pylint: disable=g-import-not-at-top
  setup = loop.build(config, workdir, require_checkpoint=True)
  n = setup.task.num_classes
  per_class = -(-config.eval.num_samples // n)
  labels = loop.class_labels(n, per_class)
  model, params, real_accuracy = classifier.cached_classifier(
      config.data, os.path.join(workdir, "eval"), epochs=config.eval.classifier_epochs)
  images = loop.generate(setup, labels, seed=config.seed + 12345)
  predicted = classifier.predict(model, params, images.astype(np.float32))
  result = {
      "step": setup.step,
      "num_samples": int(len(labels)),
      "class_accuracy": float(np.mean(predicted == labels)),
      "per_class_accuracy": [float(np.mean(predicted[labels == k] == k)) for k in range(n)],
      "classifier_real_test_accuracy": real_accuracy,
      "sampler": config.sample.to_dict(),
  }
  if jax.process_index() == 0:
    path = os.path.join(workdir, "eval", f"{setup.step}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump(result, f, indent=1)
    print(f"class accuracy {result['class_accuracy']:.4f} on {len(labels)} samples "
          f"(classifier: {real_accuracy:.4f} on real test digits); wrote {path}", flush=True)
  return result


def main(argv: Optional[List[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    spec, workdir, mode, overrides = parse_args(argv)
    config = load_config(spec, overrides)
    if mode == "train":
      from jaxgen.train import loop  # pylint: disable=g-import-not-at-top
      loop.train(config, workdir)
    elif mode == "sample":
      run_sample(config, workdir)
    else:
      run_eval(config, workdir)
  except JaxgenError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
