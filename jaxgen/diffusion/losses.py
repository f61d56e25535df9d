"""The denoising training loss (simple MSE of Ho et al. 2020), with label dropout for CFG.

Every random draw attached to an example (its timestep, noise and label dropout) comes from that
example's own key, `fold_in(key, row)` (`example_keys`), not from one draw of the whole batch's
shape: an example's draws depend only on the step's key and its row in the global batch (the
same example at any process count, jaxgen/data/pipeline.py), so they are the same on any mesh
and any number of processes, and each device derives its rows' draws locally.
"""

from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from jaxgen.diffusion.schedules import Schedule, q_sample, velocity
from jaxgen.errors import ConfigError

PREDICTIONS = ("eps", "v")

ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def split_prediction(out: jax.Array, channels: int) -> Tuple[jax.Array, Optional[jax.Array]]:
  """Splits a model output into (prediction, variance half or None).

  learn_sigma models (DiT) return 2x the input channels: the first half is the eps/v prediction,
  the second the variance interpolation value of improved DDPM.
  """
  if out.shape[-1] == channels:
    return out, None
  if out.shape[-1] == 2 * channels:
    return out[..., :channels], out[..., channels:]
  raise ConfigError(f"the model returned {out.shape[-1]} channels for a {channels}-channel input; "
                    f"expected {channels} or {2 * channels} (learn_sigma). Fix the model's "
                    "in/out channels.")


def check_prediction(prediction: str):
  if prediction not in PREDICTIONS:
    raise ConfigError(f"unknown prediction type {prediction!r}; known: {list(PREDICTIONS)}.")


def example_keys(rng: jax.Array, n: int) -> jax.Array:
  """The keys of rows 0..n-1 of a batch: `fold_in(rng, row)` (computed in the jitted step, so
  a batch-sharded step derives each device's keys locally)."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(n, dtype=jnp.uint32))


def drop_labels(rng: jax.Array, cond: jax.Array, p: float,
                null_label) -> Tuple[jax.Array, jax.Array]:
  """Replaces each batch entry of `cond` by `null_label` with probability p; returns (cond, mask).

  Entry i's coin is drawn from `example_keys(rng, B)[i]`.

  `cond` is normally (B,) int labels and `null_label` the extra class index (num_classes); any
  array condition works with a `null_label` broadcastable to one entry (e.g. a null text embedding).
  """
  dropped = jax.vmap(lambda k: jax.random.bernoulli(k, p))(example_keys(rng, cond.shape[0]))
  mask = dropped.reshape(dropped.shape + (1,) * (cond.ndim - 1))
  return jnp.where(mask, jnp.asarray(null_label, cond.dtype), cond), dropped


def diffusion_loss(model_fn: ModelFn, x0: jax.Array, cond: Any, rng: jax.Array, schedule: Schedule,
                   *, prediction: str = "eps", label_dropout: float = 0.0,
                   null_label=None, min_snr_gamma: float = 0.0
                   ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Mean-squared error of the eps (or v) prediction at a uniformly drawn timestep.

  Args:
    model_fn: `model_fn(x_t, t, cond) -> out` (NHWC; t int32 (B,)). With 2x the input channels
      (learn_sigma) only the first half is trained here: the variance half gets no gradient from
      this loss (no VLB term), so sample such models with fixed variances unless the variance
      half was trained elsewhere (e.g. converted DiT weights).
    x0: clean data, NHWC.
    cond: the condition passed to model_fn (normally (B,) int labels, may be None).
    rng: PRNG key; split into timestep, noise and label-dropout keys, each folded with the row
      index (`example_keys`) for that row's draws.
    schedule: the noise schedule; t ~ uniform{0, ..., T-1}.
    prediction: "eps" (target = noise) or "v" (target = sqrt(ab) eps - sqrt(1-ab) x0).
    label_dropout: probability of replacing each label by `null_label` (classifier-free guidance
      training). A Python float (static).
    null_label: the "no condition" value (num_classes for label-conditioned models).
    min_snr_gamma: if > 0, Min-SNR-gamma weighting (Hang et al. 2023): each sample's loss is
      scaled so the effective x0-space weight is min(SNR, gamma); it stops the many easy low-noise
      steps from dominating and converges several times faster. 0 = plain MSE.

  Returns:
    (loss, aux): scalar float32 mean MSE, and a dict of jit-friendly arrays: "loss_per_sample"
    (B,), "t" (B,) int32 and "label_dropped" (B,) bool.
  """
  check_prediction(prediction)
  t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
  batch = x0.shape[0]
  x0 = x0.astype(jnp.float32)
  t = jax.vmap(lambda k: jax.random.randint(k, (), 0, schedule.num_steps, dtype=jnp.int32))(
      example_keys(t_rng, batch))
  noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))(
      example_keys(noise_rng, batch))
  x_t = q_sample(schedule, x0, t, noise)

  dropped = jnp.zeros((batch,), bool)
  if label_dropout > 0.0:
    if null_label is None:
      raise ConfigError("label_dropout > 0 needs a null_label (num_classes for class-conditional "
                        "models); set it or set label_dropout to 0.")
    cond, dropped = drop_labels(drop_rng, cond, label_dropout, null_label)

  out, _ = split_prediction(model_fn(x_t, t, cond), x0.shape[-1])
  target = noise if prediction == "eps" else velocity(schedule, x0, t, noise)
  sq = jnp.square(out.astype(jnp.float32) - target)
  per_sample = jnp.mean(sq.reshape(batch, -1), axis=1)
  if min_snr_gamma > 0:
    snr = schedule.snr[t]
    clipped = jnp.minimum(snr, min_snr_gamma)
    # eps-MSE = SNR * x0-MSE and v-MSE = (SNR + 1) * x0-MSE, so divide by that factor.
    per_sample = per_sample * clipped / (snr if prediction == "eps" else snr + 1.0)
  return jnp.mean(per_sample), {"loss_per_sample": per_sample, "t": t, "label_dropped": dropped}
