"""Train state and the one jit-compiled train step every model uses."""

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from jaxgen.errors import ConfigError


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


REMAT_POLICIES = {
    "none": None,
    # Save matmul / conv outputs, recompute the elementwise ops (norms, activations) between
    # them in the backward pass, where XLA fuses the recomputation into its consumers.
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Save nothing: the whole forward is recomputed in the backward pass.
    "full": jax.checkpoint_policies.nothing_saveable,
}


def remat_loss(loss_fn: Callable, policy: str) -> Callable:
  """`loss_fn` under `jax.checkpoint` with a named policy ("none" returns it unchanged)."""
  if policy not in REMAT_POLICIES:
    raise ConfigError(f"training.remat {policy!r} unknown; use one of {sorted(REMAT_POLICIES)}")
  if policy == "none":
    return loss_fn
  return jax.checkpoint(loss_fn, policy=REMAT_POLICIES[policy])


def microbatches(batch, k: int):
  """(B, ...) leaves -> (k, B/k, ...): microbatch i holds rows i, i+k, i+2k, ...

  Interleaving keeps every microbatch spread evenly over the devices that hold the batch
  (device d holds a contiguous block of B/n rows; k must divide B/n).
  """
  return jax.tree.map(
      lambda x: x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, ema_decay: float,
                    lr_schedule: Callable, *, grad_accum_steps: int = 1, remat: str = "none",
                    micro_sharding: Optional[Any] = None, grad_shardings: Optional[Any] = None):
  """Builds `step(state, batch, rng) -> (state, metrics)`.

  `loss_fn(params, model_state, batch, rng) -> (loss, (metrics, new_model_state))`.
  The per-step rng is `fold_in(rng, step)`, so a resumed run draws the same noise as an
  uninterrupted one. A non-finite loss or gradient leaves the state untouched and reports
  `finite = 0`; the loop stops at the next check and keeps the last good checkpoint.

  `grad_accum_steps` k > 1 splits the batch into k microbatches (`microbatches`) and averages
  their gradients in a `lax.scan` before one optimizer update: the update equals that of the
  whole batch for a loss that is a mean over examples, at 1/k of the activation memory.
  Microbatch i uses `fold_in(step_rng, i)`. Model state (e.g. BatchNorm statistics) is threaded
  through the microbatches in order. `micro_sharding` (for the (k, B/k, ...) batch) and
  `grad_shardings` (the params' layout) pin the scan's layouts so that FSDP gradients are
  accumulated sharded. `remat` names a `REMAT_POLICIES` entry applied to the whole loss.
  """
  grad_fn = jax.value_and_grad(remat_loss(loss_fn, remat), has_aux=True)
  k = int(grad_accum_steps)
  if k < 1:
    raise ConfigError(f"training.grad_accum_steps must be >= 1, got {k}")
  constrain = lambda tree, s: tree if s is None else jax.lax.with_sharding_constraint(tree, s)

  def accumulated(params, model_state, batch, rng):
    micro = constrain(microbatches(batch, k), micro_sharding)

    def body(carry, inputs):
      grads, model_state = carry
      mb, i = inputs
      (loss, (metrics, model_state)), g = grad_fn(params, model_state, mb,
                                                  jax.random.fold_in(rng, i))
      grads = constrain(jax.tree.map(jnp.add, grads, g), grad_shardings)
      return (grads, model_state), (loss, metrics)

    zeros = constrain(jax.tree.map(jnp.zeros_like, params), grad_shardings)
    (grads, model_state), (losses, metrics) = jax.lax.scan(
        body, (zeros, model_state), (micro, jnp.arange(k)))
    grads = jax.tree.map(lambda g: g / k, grads)
    metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
    return (jnp.mean(losses), (metrics, model_state)), grads

  def step_fn(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    if k == 1:
      (loss, (metrics, model_state)), grads = grad_fn(state.params, state.model_state, batch,
                                                      rng)
    else:
      (loss, (metrics, model_state)), grads = accumulated(state.params, state.model_state,
                                                          batch, rng)
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
