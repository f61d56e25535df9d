"""Two-stage latent diffusion from one command: train the autoencoder, cache its latents, train
the backbone on them.

A latent-diffusion config whose `autoencoder.dir` is empty and whose `autoencoder.train` holds
the sections of an autoencoder run (autoencoder, optimizer, training, checkpoint, sample,
eval: the "autoencoder" task's config, jaxgen/tasks/autoencoder.py) runs three stages, each
in a directory of the run's workdir:

  1. WORKDIR/autoencoder  `autoencoder.model` trained by task "autoencoder" on the run's data,
                          with the run's seed and mesh and autoencoder.train's sections; a
                          training workdir like any other (it resumes after a kill).
  2. WORKDIR/latents      (or data.latent_cache when set) its unscaled latents of the train
                          split (jaxgen/data/latent_cache.py); when autoencoder.scaling_factor
                          is 0 the factor is measured there, 1 / std of the latents, the rule
                          DC-AE's published factors follow.
  3. WORKDIR              the backbone on the cached latents (task "latent_diffusion"), with
                          autoencoder.dir = WORKDIR/autoencoder and the factor filled in; its
                          checkpoints record that resolved config.

A rerun skips what is done: stage 1 when its newest checkpoint is at its last step, stage 2
when the cache is complete (meta.json written last), and stage 3 resumes or finds itself done.
`--mode=sample` / `--mode=eval` resolve the same directories and factor (`resolve`) and need
stages 1-2 done; `prepare` runs stages 1-2 alone (benchmarks/can_ablation.py shares one
autoencoder and cache among several backbones). Any other config passes through unchanged
(`train` is then `loop.train`, `resolve` returns it as it is).
"""

import os
from typing import Optional

import ml_collections

from jaxgen.errors import CheckpointError, ConfigError

AUTOENCODER_DIR = "autoencoder"
LATENTS_DIR = "latents"
# The sections of the autoencoder run that autoencoder.train gives; the rest is the run's.
STAGE1_SECTIONS = ("autoencoder", "optimizer", "training", "checkpoint", "sample", "eval")
SHARED_SECTIONS = ("seed", "data", "mesh")


def is_two_stage(config: ml_collections.ConfigDict) -> bool:
  """A latent-diffusion config that trains its own autoencoder (no autoencoder.dir)."""
  a = config.get("autoencoder")
  return (config.get("task") == "latent_diffusion" and a is not None and not a.get("dir")
          and bool(a.get("train")))


def autoencoder_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Stage 1's config: task "autoencoder", model autoencoder.model, the run's seed, data and
  mesh, and the sections of autoencoder.train."""
  train = config.autoencoder.train
  missing = [s for s in STAGE1_SECTIONS if s not in train]
  if missing:
    raise ConfigError(f"autoencoder.train is missing the sections {missing} of the "
                      f"autoencoder's run (it needs {list(STAGE1_SECTIONS)})")
  c = ml_collections.ConfigDict({k: config[k] for k in SHARED_SECTIONS})
  c.task = "autoencoder"
  c.model = config.autoencoder.model
  for section in STAGE1_SECTIONS:
    c[section] = train[section]
  c = ml_collections.ConfigDict(c.to_dict())  # A copy: nothing shared with `config`.
  c.data.latent_cache = ""  # The autoencoder trains on images.
  c.lock()
  return c


def stage_dirs(config: ml_collections.ConfigDict, workdir: str):
  """(autoencoder workdir, latent cache directory) of a two-stage run in `workdir`."""
  cache = config.data.get("latent_cache") or os.path.join(workdir, LATENTS_DIR)
  return os.path.abspath(os.path.join(workdir, AUTOENCODER_DIR)), os.path.abspath(cache)


def _autoencoder_step(ae_dir: str) -> Optional[int]:
  from jaxgen.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  directory = os.path.join(ae_dir, "checkpoints")
  if not os.path.isdir(directory):
    return None
  ckpt = Checkpointer(directory, async_save=False)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def _with_autoencoder(config, ae_dir: str, cache: str,
                      scaling_factor: Optional[float] = None) -> ml_collections.ConfigDict:
  """`config` reading its frozen autoencoder from ae_dir and its latents from `cache`."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.autoencoder.dir = ae_dir
  c.data.latent_cache = cache
  if scaling_factor is not None:
    c.autoencoder.scaling_factor = scaling_factor
  c.lock()
  return c


def _measured_factor(config, cache: str) -> float:
  """autoencoder.scaling_factor, or 1 / std of the cached latents when it is 0."""
  from jaxgen.data import latent_cache  # pylint: disable=g-import-not-at-top
  if config.autoencoder.scaling_factor:
    return float(config.autoencoder.scaling_factor)
  std = float(latent_cache.read_meta(cache)["latent_std"])
  if not std > 0:
    raise ConfigError(f"the latents in {cache} have std {std}; set autoencoder.scaling_factor")
  return 1.0 / std


def resolve(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """The stage-3 config of a two-stage run whose stages 1-2 are done (others: `config`)."""
  if not is_two_stage(config):
    return config
  ae_dir, cache = stage_dirs(config, workdir)
  steps = int(config.autoencoder.train.training.steps)
  step = _autoencoder_step(ae_dir)
  if step is None or step < steps or not os.path.isfile(os.path.join(cache, "meta.json")):
    done = "no checkpoint" if step is None else f"step {step} of {steps}"
    raise CheckpointError(
        f"{workdir} has no trained autoencoder and latent cache yet (autoencoder: {done}); "
        f"train first with --mode=train --workdir={workdir}")
  return _with_autoencoder(config, ae_dir, cache, _measured_factor(config, cache))


def _say(text: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    print(text, flush=True)


def prepare(config: ml_collections.ConfigDict,
            workdir: str) -> Optional[ml_collections.ConfigDict]:
  """Runs stages 1-2 in `workdir` (skipping what is done) and returns the stage-3 config, or
  None when stage 1 was preempted (SIGTERM: it saved a checkpoint; a rerun resumes it)."""
  from jaxgen.data import latent_cache  # pylint: disable=g-import-not-at-top
  from jaxgen.train import loop  # pylint: disable=g-import-not-at-top
  ae_dir, cache = stage_dirs(config, workdir)
  ae_config = autoencoder_config(config)
  steps = int(ae_config.training.steps)
  step = _autoencoder_step(ae_dir)
  if step is not None and step >= steps:
    _say(f"stage 1/3 done: autoencoder trained {step} steps in {ae_dir}")
  else:
    _say(f"stage 1/3: training the autoencoder ({config.autoencoder.model.name}, {steps} "
         f"steps) in {ae_dir}")
    if loop.train(ae_config, ae_dir).preempted:
      return None
  if os.path.isfile(os.path.join(cache, latent_cache.META)):
    _say(f"stage 2/3 done: latent cache {cache}")
  else:
    _say(f"stage 2/3: caching the autoencoder's latents of the train split in {cache}")
    latent_cache.write_cache(_with_autoencoder(config, ae_dir, cache, 1.0),
                             batch_size=int(ae_config.sample.batch_size))
  return _with_autoencoder(config, ae_dir, cache, _measured_factor(config, cache))


def train(config: ml_collections.ConfigDict, workdir: str, stop_at: Optional[int] = None):
  """`loop.train`, after stages 1-2 when the config trains its own autoencoder. Returns the
  Setup of `loop.train`, or None when stage 1 was preempted (nothing after it runs).
  `stop_at` ends stage 3 early, as loop.train's."""
  from jaxgen.train import loop  # pylint: disable=g-import-not-at-top
  if not is_two_stage(config):
    return loop.train(config, workdir, stop_at=stop_at)
  resolved = prepare(config, workdir)
  if resolved is None:
    return None
  _say(f"stage 3/3: {config.model.name} on the latents (scaling factor "
       f"{resolved.autoencoder.scaling_factor:.4f}) in {os.path.abspath(workdir)}")
  return loop.train(resolved, workdir, stop_at=stop_at)
