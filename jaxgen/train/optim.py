"""Optimizers from `config.optimizer`: AdamW with one-cycle (or cosine / constant) LR and clipping."""

import ml_collections
import optax

from jaxgen.errors import ConfigError


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """`opt.schedule`: one_cycle (warm up to lr, cosine down), cosine (warmup + decay), constant."""
  if opt.schedule == "one_cycle":
    return optax.cosine_onecycle_schedule(
        transition_steps=max(total_steps, 1), peak_value=opt.lr, pct_start=opt.warmup_frac,
        div_factor=opt.get("div_factor", 25.0), final_div_factor=opt.get("final_div_factor", 1e3))
  warmup = int(opt.warmup_frac * total_steps)
  if opt.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, opt.lr, max(warmup, 1), max(total_steps, 2))
  if opt.schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, opt.lr, max(warmup, 1)), optax.constant_schedule(opt.lr)],
        [max(warmup, 1)])
  raise ConfigError(f"optimizer.schedule {opt.schedule!r} unknown; use one_cycle, cosine or "
                    "constant")


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int):
  """Returns (optax transformation, lr schedule). Clipping is by global norm before AdamW."""
  if opt.name != "adamw":
    raise ConfigError(f"optimizer.name {opt.name!r} unknown; use adamw")
  schedule = learning_rate_schedule(opt, total_steps)
  chain = []
  if opt.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(opt.grad_clip))
  chain.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.get("eps", 1e-8),
                           weight_decay=opt.weight_decay))
  return optax.chain(*chain), schedule
