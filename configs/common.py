"""Defaults shared by the config files (not a runnable config itself).

Each runnable config starts from `base_config()` and changes what differs.
"""

import ml_collections

from jaxgen import distributed
from jaxgen import sharding


def model_section(fields: dict) -> ml_collections.ConfigDict:
  """A diffusion config's `model` section: the model's name and fields, plus `init_from`.

  init_from: "" trains from random init; a diffusers pipeline or model directory, or one
  written by `python -m jaxgen.convert`, starts a fresh run from those weights
  (jaxgen/train/init_from.py).
  """
  return ml_collections.ConfigDict(dict(fields, init_from=fields.get("init_from", "")))


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "diffusion"
  c.model = model_section({"name": "unet"})
  c.data = ml_collections.ConfigDict(dict(
      source="mnist5k", tfds_name="", tfds_data_dir="", image_size=28, random_flip=False,
      num_classes=10))
  c.diffusion = ml_collections.ConfigDict(dict(
      schedule="cosine", num_steps=1000, prediction="eps", label_dropout=0.1,
      min_snr_gamma=0.0))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", lr=2e-3, b1=0.9, b2=0.99, weight_decay=0.01, schedule="one_cycle",
      warmup_frac=0.15, grad_clip=1.0, ema_decay=0.999))
  # compute_dtype: "bfloat16" computes the model in bf16 (params, Adam, EMA stay fp32).
  # grad_accum_steps: microbatches per update (batch_size stays the global batch per update).
  # remat: "none" | "dots" | "dots_no_batch" | "full" (jax.checkpoint policy on the loss).
  c.training = ml_collections.ConfigDict(dict(
      batch_size=128, steps=1000, log_every=50, sample_every=0, compute_dtype="float32",
      grad_accum_steps=1, remat="none"))
  # Orbax: a step is renamed into place only when complete; save_on_preemption: SIGTERM saves.
  c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, async_save=True,
                                                save_on_preemption=True))
  c.sample = ml_collections.ConfigDict(dict(
      method="ddim", num_steps=50, eta=0.0, guidance_scale=2.0, num_per_class=10,
      batch_size=256))
  # `--mode=eval` (jaxgen/metrics/evaluate.py): metrics is a comma-separated list ("" = the
  # task's defaults, e.g. class_accuracy,fd_digits,pr_digits; fid,is / rfid when
  # inception_weights points at pytorch-fid's pt_inception-2015-12-05-6726825d.pth).
  # The digit classifier and reference statistics are cached in cache_dir ("" = DIR/eval).
  c.eval = ml_collections.ConfigDict(dict(
      num_samples=1000, classifier_epochs=8, metrics="", inception_weights="",
      reference_stats="", reference_split="train", reference_samples=10000, cache_dir="",
      is_splits=10, pr_k=3, kid_subsets=100, kid_subset_size=1000, alexnet_size=224))
  # Axis sizes (one may be -1: the rest); num_devices 0 = all devices, N = the first N.
  # rules: logical axis name -> mesh axes (for modules that annotate their parameters);
  # other parameters with >= min_shard_size elements are split over `tensor` and `fsdp` by
  # shape (jaxgen/sharding.py).
  # distributed / coordinator_address / num_processes / process_id and the coordination
  # service's init / heartbeat / shutdown timeouts (*_timeout_s): jaxgen/distributed.py.
  c.mesh = ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, tensor=1, num_devices=0, rules=sharding.DEFAULT_RULES,
      min_shard_size=sharding.DEFAULT_MIN_SHARD_SIZE, distributed="auto",
      coordinator_address="", num_processes=0, process_id=-1,
      **{key: seconds for key, (_, seconds) in distributed.TIMEOUTS.items()}))
  return c


def ablation_arm(arg, arms: dict) -> str:
  """The arm a CAN-vs-adaLN config's preset names: "can" for no preset and for "smoke"."""
  arm = "can" if arg in (None, "smoke") else arg
  if arm not in arms:
    raise ValueError(f"unknown preset {arg!r}; presets: smoke, {', '.join(arms)}")
  return arm


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config to a seconds-long CPU run of the same pipeline."""
  c.training.update(batch_size=16, steps=4, log_every=2, sample_every=0)
  c.checkpoint.update(every=2, async_save=False)
  c.sample.update(num_steps=4, num_per_class=2, batch_size=32)
  c.eval.update(num_samples=20, classifier_epochs=1, reference_samples=200, alexnet_size=64)
  return c
