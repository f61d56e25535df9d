"""Command line: train, sample from or evaluate a model described by a config file.

  python -m jaxgen.main --config=configs/unet_mnist.py[:preset] --workdir=DIR \
      [--mode=train|sample|eval] [--config.a.b=value ...]

Train resumes from DIR's newest checkpoint by itself; a latent-diffusion config that trains its
own autoencoder first runs all its stages in DIR (jaxgen/tasks/two_stage.py). User errors (bad
config, missing data, corrupt checkpoint, non-finite loss) print one `error:` line and exit
with status 2.
"""

import os
import sys
from typing import List

import jax

from jaxgen.config import load_config
from jaxgen.errors import ConfigError, cli

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
  """Writes the task's samples under DIR/samples (for diffusion: samples.npz and grids)."""
  from jaxgen.train import loop  # pylint: disable=g-import-not-at-top
  setup = loop.build(config, workdir, require_checkpoint=True)
  out = os.path.join(workdir, "samples")
  setup.task.write_samples(setup, out)
  return out


def run_eval(config, workdir: str) -> dict:
  """Runs the task's evaluation (config.eval.metrics; see jaxgen/metrics/evaluate.py) of the
  newest checkpoint; writes DIR/eval/<step>.json and TensorBoard scalars eval/<metric>."""
  from jaxgen.metrics import evaluate  # pylint: disable=g-import-not-at-top
  from jaxgen.train import loop  # pylint: disable=g-import-not-at-top
  setup = loop.build(config, workdir, require_checkpoint=True)
  out = os.path.join(workdir, "eval")
  result = {"step": setup.step, **setup.task.evaluate(setup, out)}
  if jax.process_index() == 0:
    path = os.path.join(out, f"{setup.step}.json")
    evaluate.write_json(path, result)
    scalars = {f"eval/{k}": v for k, v in result.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
    loop.MetricsLog.write_tensorboard(workdir, setup.step, scalars)
    print(f"eval at step {setup.step}: {evaluate.summary_line(result)}; wrote {path}",
          flush=True)
  return result


@cli
def main(argv: List[str]) -> int:
  spec, workdir, mode, overrides = parse_args(argv)
  config = load_config(spec, overrides)
  # A latent-diffusion config without autoencoder.dir may train its own autoencoder first.
  from jaxgen.tasks import two_stage  # pylint: disable=g-import-not-at-top
  if mode == "train":
    two_stage.train(config, workdir)  # loop.train, after the autoencoder stages if any.
  elif mode == "sample":
    run_sample(two_stage.resolve(config, workdir), workdir)
  else:
    run_eval(two_stage.resolve(config, workdir), workdir)


if __name__ == "__main__":
  sys.exit(main())
