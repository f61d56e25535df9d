"""Samplers: DDPM ancestral, DDIM and DPM-Solver++(2M), with classifier-free guidance.

All three walk the same descending timestep grid, `sampling_timesteps(T, num_steps)`: by default
`num_steps` integers evenly spaced over [0, T-1] and rounded (DiT's respacing; all T steps when
num_steps == T; `spacing="trailing"` for diffusers' grid), each followed by a jump to the next grid point, and from t = 0 to clean data
(alpha-bar = 1). One model evaluation per grid point; the loop is a `lax.scan`, so `sample` traces
once and is jit-compatible with `method`, `num_steps`, `prediction`, `clip_x0` and `shape` static.

Notation: a = sqrt(ab_t), s = sqrt(1 - ab_t) at the current point; a', s' at the next.
  DDPM:   x' = mean of q(x' | x_t, x0_hat) + posterior std * z   (ab-respaced betas: 1 - ab/ab')
  DDIM:   x' = a' x0_hat + sqrt(1 - ab' - sig^2) eps_hat + sig z,
          sig = eta sqrt((1 - ab') / (1 - ab)) sqrt(1 - ab / ab')
  DPM++:  lambda = log(a / s), h = lambda' - lambda,
          x' = (s' / s) x - a' (exp(-h) - 1) D,  D = x0_hat (first step, the jump into t = 0 and
          the final jump) or (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev with r = h_prev / h
          (Lu et al. 2022, multistep 2M; matches diffusers' DPMSolverMultistepScheduler on the
          same timesteps).
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.diffusion.losses import ModelFn, check_prediction, split_prediction
from jaxgen.diffusion.schedules import Schedule
from jaxgen.errors import ConfigError

METHODS = ("ddpm", "ddim", "dpmpp_2m")
SPACINGS = ("uniform", "trailing", "guided_diffusion")


def sampling_timesteps(num_train_steps: int, num_steps: Optional[int] = None,
                       spacing: str = "uniform") -> np.ndarray:
  """Descending int32 grid of `num_steps` distinct timesteps starting at T-1 (all T when None).

  spacing "uniform": evenly spaced over [0, T-1] and rounded, both ends included (DiT's
  respacing). "trailing": T-1, T-1-T/n, ..., T/n - 1 (diffusers' "trailing"): no evaluation at
  nearly clean t, but the last jump, from t ~ T/n to clean data, is one first-order step, which
  blurs data finer than that noise level (measured on a narrow Gaussian: worse than "uniform").
  "guided_diffusion": guided-diffusion's `space_timesteps(T, str(num_steps))` exactly, as DiT
  and efficientvit's DC-AE DiT sample: the fractional stride (T-1)/(n-1) accumulated in floating
  point and each point rounded half-to-even, so ties can fall a step below "uniform" (n=21 takes
  499 where "uniform" takes 500); a single step is t = 0.
  """
  num_steps = num_train_steps if num_steps is None else int(num_steps)
  if not 1 <= num_steps <= num_train_steps:
    raise ConfigError(f"num_steps must be in [1, {num_train_steps}] (the schedule's length), "
                      f"got {num_steps}.")
  if spacing not in SPACINGS:
    raise ConfigError(f"unknown timestep spacing {spacing!r}; known: {list(SPACINGS)}.")
  if spacing == "trailing":
    ts = np.round(num_train_steps - np.arange(num_steps) * (num_train_steps / num_steps)) - 1
    return ts.astype(np.int32)
  if spacing == "guided_diffusion":
    stride = 1 if num_steps <= 1 else (num_train_steps - 1) / (num_steps - 1)
    position, taken = 0.0, set()
    for _ in range(num_steps):
      taken.add(round(position))  # Python's round, half to even, on the running sum.
      position += stride
    return np.array(sorted(taken, reverse=True), np.int32)
  if num_steps == 1:
    return np.array([num_train_steps - 1], np.int32)
  # Spacing (T-1)/(num_steps-1) >= 1, so the rounded points are distinct.
  return np.round(np.linspace(0, num_train_steps - 1, num_steps)).astype(np.int32)[::-1].copy()


def _concat_batch(cond: Any, uncond: Any) -> Any:
  """Tree-concatenates cond and uncond along the batch axis (uncond leaves may have batch 1)."""
  def cat(c, u):
    c, u = jnp.asarray(c), jnp.asarray(u)
    if u.shape[0] != c.shape[0]:
      u = jnp.broadcast_to(u, (c.shape[0],) + u.shape[1:])
    return jnp.concatenate([c, u.astype(c.dtype)], axis=0)
  return jax.tree.map(cat, cond, uncond)


def guided(model_fn: ModelFn, guidance_scale, uncond: Any) -> ModelFn:
  """Wraps model_fn with classifier-free guidance: out = out_u + w (out_c - out_u).

  The wrapped function evaluates model_fn ONCE per call on a 2B batch: x and t duplicated, the
  condition tree-concatenated [cond; uncond] (any pytree with a leading batch axis; uncond leaves
  of batch 1 are broadcast). w = 1 is the plain conditional model (returned unwrapped, as is the
  case uncond=None). U-ViT's "cond + s (cond - uncond)" is w = 1 + s; DiT's cfg 1.5 is w = 1.5.
  Guidance mixes the eps (or v) prediction, i.e. the first C channels of a learn_sigma output;
  the variance half is taken from the conditional half (as DiT does).
  """
  if uncond is None or (isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0):
    return model_fn

  def fn(x, t, cond):
    batch, channels = x.shape[0], x.shape[-1]
    out = model_fn(jnp.concatenate([x, x], 0), jnp.concatenate([t, t], 0),
                   _concat_batch(cond, uncond))
    out_c, out_u = out[:batch], out[batch:]
    pred_c, var_c = split_prediction(out_c, channels)
    pred_u, _ = split_prediction(out_u, channels)
    pred = pred_u + guidance_scale * (pred_c - pred_u)
    return pred if var_c is None else jnp.concatenate([pred, var_c], axis=-1)

  return fn


def sample(model_fn: ModelFn, rng: jax.Array, shape, cond: Any, schedule: Schedule, *,
           method: str = "ddim", num_steps: Optional[int] = 50, eta: float = 0.0,
           guidance_scale=1.0, uncond: Any = None, prediction: str = "eps",
           clip_x0: bool = True, learned_variance: bool = False,
           spacing: str = "uniform", x_init: Optional[jax.Array] = None,
           step_noise: Optional[Callable[[jax.Array], jax.Array]] = None) -> jax.Array:
  """Draws samples x0 of `shape` (NHWC) by reverse diffusion from x_T ~ N(0, I).

  Args:
    model_fn: `model_fn(x_t, t, cond) -> out`, t an int32 (B,) array of the current timestep.
      Because model_fn sees t, a caller can change the condition by step, e.g. FastComposer's
      delayed subject conditioning: pass both embeddings in `cond` (a pytree) and pick one with
      `jnp.where(t[:, None, None] >= switch_t, text_only, augmented)` inside model_fn.
    rng: PRNG key; the result is a deterministic function of it.
    shape: output shape (B, H, W, C); static.
    cond: condition for model_fn (pytree with leading batch axis, or None).
    schedule: the training noise schedule.
    method: "ddpm" (ancestral, posterior variance), "ddim" (with eta) or "dpmpp_2m"
      (DPM-Solver++(2M), data prediction). Static.
    num_steps: number of model evaluations (grid points); None = all T steps. Static.
    eta: DDIM stochasticity (0 = deterministic ODE, 1 = DDPM-like); DDIM only.
    guidance_scale: classifier-free guidance weight w (see `guided`); used when uncond is given.
    uncond: the null condition (same structure as cond) for guidance.
    prediction: what the model predicts, "eps" or "v". Guidance is applied to it before conversion.
    clip_x0: clip the predicted x0 to [-1, 1] (pixel space); set False for latent diffusion.
    learned_variance: DDPM only: use the variance half of a learn_sigma output (improved-DDPM
      "learned range" between the posterior variance and beta, as DiT samples). Only for models
      whose variance half was trained (not by `diffusion_loss`).
    spacing: the timestep grid (`sampling_timesteps`). Static.
    x_init: the starting noise x_T (`shape`); None draws it from `rng`.
    step_noise: `step_noise(i) -> noise of shape` for grid point i (a traced int32), the fresh
      noise of DDPM / DDIM (eta > 0) steps; None draws it from `rng`. With both given, `rng`
      is unused (may be None).

  Returns:
    float32 samples of `shape`.
  """
  if method not in METHODS:
    raise ConfigError(f"unknown sampler {method!r}; known: {list(METHODS)}.")
  check_prediction(prediction)
  ts = sampling_timesteps(schedule.num_steps, num_steps, spacing)
  n = len(ts)
  model = guided(model_fn, guidance_scale, uncond)
  batch, channels = shape[0], shape[-1]

  ab = schedule.alphas_cumprod.astype(jnp.float32)[ts]
  ab_next = jnp.concatenate([ab[1:], jnp.ones((1,), jnp.float32)])
  a, s = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
  a_next, s_next = jnp.sqrt(ab_next), jnp.sqrt(1.0 - ab_next)

  # DPM++(2M) weights of D = (1 - w_prev) x0_hat + w_prev x0_hat_prev, w_prev = -1/(2r).
  lam = jnp.log(a) - jnp.log(s)
  h = lam[1:] - lam[:-1]                                   # log-SNR steps of the n-1 inner jumps
  w_prev = jnp.concatenate([jnp.zeros((1,)), -h[1:] / (2.0 * h[:-1]), jnp.zeros((1,))])[:n]
  if n > 2 and ts[-1] == 0:
    # The jump into t = 0 is huge in log-SNR (r << 1): a 2nd-order extrapolation there overshoots
    # badly at small num_steps, so it is first order like the final jump (diffusers'
    # lower_order_final plays the same role for its last step).
    w_prev = w_prev.at[n - 2].set(0.0)

  needs_noise = method == "ddpm" or (method == "ddim" and not (isinstance(eta, (int, float))
                                                                and eta == 0))
  if rng is None and (x_init is None or (needs_noise and step_noise is None)):
    raise ConfigError("sample: pass rng, or x_init (and step_noise for a stochastic sampler).")
  init_rng, noise_rng = jax.random.split(rng) if rng is not None else (None, None)
  if x_init is None:
    x_init = jax.random.normal(init_rng, shape, jnp.float32)
  x_init = jnp.asarray(x_init, jnp.float32)
  if step_noise is None:
    step_noise = lambda i: jax.random.normal(jax.random.fold_in(noise_rng, i), shape, jnp.float32)

  def step(carry, inp):
    x, x0_prev = carry
    i, t, ab_i, abn, a_i, s_i, an, sn, wp = inp
    out = model(x, jnp.full((batch,), t, jnp.int32), cond).astype(jnp.float32)
    pred, var_raw = split_prediction(out, channels)
    if prediction == "eps":
      x0 = (x - s_i * pred) / a_i
      eps = pred
    else:
      x0 = a_i * x - s_i * pred
      eps = s_i * x + a_i * pred
    if clip_x0:
      x0 = jnp.clip(x0, -1.0, 1.0)
      eps = (x - a_i * x0) / s_i
    if needs_noise:
      z = jnp.asarray(step_noise(i), jnp.float32)

    if method == "ddim":
      sig = eta * jnp.sqrt((1.0 - abn) / (1.0 - ab_i)) * jnp.sqrt(1.0 - ab_i / abn)
      x_next = an * x0 + jnp.sqrt(jnp.maximum(1.0 - abn - sig ** 2, 0.0)) * eps
      if needs_noise:
        x_next = x_next + sig * z
    elif method == "ddpm":
      beta = 1.0 - ab_i / abn
      mean = (an * beta * x0 + jnp.sqrt(1.0 - beta) * (1.0 - abn) * x) / (1.0 - ab_i)
      post_var = beta * (1.0 - abn) / (1.0 - ab_i)
      if learned_variance:
        if var_raw is None:
          raise ConfigError("learned_variance=True needs a learn_sigma model (2x output channels).")
        frac = (var_raw + 1.0) / 2.0
        log_var = frac * jnp.log(beta) + (1.0 - frac) * jnp.log(jnp.maximum(post_var, 1e-20))
        std = jnp.exp(0.5 * log_var)
      else:
        std = jnp.sqrt(post_var)
      x_next = mean + jnp.where(i == n - 1, 0.0, std) * z  # no noise after the last step
    else:  # dpmpp_2m
      d = (1.0 - wp) * x0 + wp * x0_prev
      exp_neg_h = (a_i * sn) / (s_i * an)                  # exp(-h), finite also at the last step
      x_next = (sn / s_i) * x - an * (exp_neg_h - 1.0) * d
    return (x_next, x0), None

  xs = (jnp.arange(n), jnp.asarray(ts), ab, ab_next, a, s, a_next, s_next, w_prev)
  (x, _), _ = jax.lax.scan(step, (x_init, jnp.zeros(shape, jnp.float32)), xs)
  return x
