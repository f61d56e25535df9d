"""Train state and the one jit-compiled train step every model uses."""

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array           # int32 scalar: number of updates applied.
  params: Any
  ema_params: Any           # Exponential moving average of params, used for sampling.
  opt_state: Any
  model_state: Any          # Non-trainable collections (e.g. BatchNorm statistics); {} if none.


def ema_decay_at(step, decay: float):
  """EMA decay with warm-up (min(decay, (1+s)/(10+s))) so short runs' EMA is not stale."""
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, ema_decay: float,
                    lr_schedule: Callable):
  """Builds `step(state, batch, rng) -> (state, metrics)`.

  `loss_fn(params, model_state, batch, rng) -> (loss, (metrics, new_model_state))`.
  The per-step rng is `fold_in(rng, step)`, so a resumed run draws the same noise as an
  uninterrupted one. A non-finite loss or gradient leaves the state untouched and reports
  `finite = 0`; the loop stops at the next check and keeps the last good checkpoint.
  """

  def step_fn(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    (loss, (metrics, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.model_state, batch, rng)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, ema_decay)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    new = TrainState(state.step + 1, params, ema, opt_state, model_state)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=lr_schedule(state.step),
                   finite=finite.astype(jnp.float32))
    return new, metrics

  return step_fn
