"""Noise schedules and the closed forms of the forward process q(x_t | x_0).

Discrete-time variance-preserving diffusion with T steps indexed t = 0..T-1:

  x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps,   ab_t = prod_{s <= t} (1 - beta_s).

Prediction-type conversions (all exact inverses of each other, for fixed x_t):

  eps -> x0:  x0  = (x_t - sqrt(1 - ab) eps) / sqrt(ab)
  x0 -> eps:  eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)
  v:          v   = sqrt(ab) eps - sqrt(1 - ab) x0          (Salimans & Ho 2022)
  v -> eps:   eps = sqrt(ab) v + sqrt(1 - ab) x_t
  v -> x0:    x0  = sqrt(ab) x_t - sqrt(1 - ab) v

Betas are built in float64 (numpy) and stored as float32 jax arrays inside `Schedule`, a pytree
that can be passed through `jax.jit` as an ordinary argument.
"""

import math
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxgen.errors import ConfigError


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
  """DDPM's linear schedule (also DiT's): `num_steps` betas evenly spaced in [start, end].

  DiT/guided-diffusion rescale start/end by 1000 / num_steps; pass scaled values for T != 1000.
  """
  _check_steps(num_steps)
  return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)


def scaled_linear_betas(num_steps: int, beta_start: float = 0.00085,
                        beta_end: float = 0.012) -> np.ndarray:
  """Latent diffusion / Stable Diffusion schedule: linear in sqrt(beta), then squared."""
  _check_steps(num_steps)
  return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=np.float64) ** 2


def cosine_alpha_bar(u: np.ndarray, s: float = 0.008) -> np.ndarray:
  """Nichol & Dhariwal's continuous alpha-bar at u = t / T in [0, 1]: f(u) / f(0)."""
  f = lambda x: np.cos((x + s) / (1 + s) * math.pi / 2) ** 2
  return f(np.asarray(u, np.float64)) / f(0.0)


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Improved-DDPM cosine schedule: beta_t = min(1 - abar((t+1)/T) / abar(t/T), max_beta).

  Without clipping, alphas_cumprod[t] == cosine_alpha_bar((t + 1) / T) exactly; `max_beta` only
  bites at the last steps, where abar -> 0 (it prevents a singular beta = 1 at t = T-1).
  """
  _check_steps(num_steps)
  u = np.arange(num_steps + 1, dtype=np.float64) / num_steps
  ab = cosine_alpha_bar(u, s)
  return np.minimum(1.0 - ab[1:] / ab[:-1], max_beta)


_BETAS: Dict[str, Callable[..., np.ndarray]] = {
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
    "cosine": cosine_betas,
}


def _check_steps(num_steps: int):
  if int(num_steps) < 1:
    raise ConfigError(f"a noise schedule needs num_steps >= 1, got {num_steps}.")


@struct.dataclass
class Schedule:
  """A discrete noise schedule: float32 `betas` and `alphas_cumprod`, both of length T.

  A pytree (jit-safe); `num_steps` comes from the array shape so it stays static under tracing.
  """
  betas: jax.Array
  alphas_cumprod: jax.Array

  @property
  def num_steps(self) -> int:
    return self.betas.shape[0]

  @property
  def alphas(self) -> jax.Array:
    return 1.0 - self.betas

  @property
  def sqrt_alphas_cumprod(self) -> jax.Array:
    return jnp.sqrt(self.alphas_cumprod)

  @property
  def sqrt_one_minus_alphas_cumprod(self) -> jax.Array:
    return jnp.sqrt(1.0 - self.alphas_cumprod)

  @property
  def alphas_cumprod_prev(self) -> jax.Array:
    """alpha-bar at t-1 (1.0 before the first step)."""
    return jnp.concatenate([jnp.ones((1,), self.alphas_cumprod.dtype), self.alphas_cumprod[:-1]])

  @property
  def posterior_variance(self) -> jax.Array:
    """Var q(x_{t-1} | x_t, x_0) = beta_t (1 - ab_{t-1}) / (1 - ab_t) (0 at t = 0)."""
    return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

  @property
  def snr(self) -> jax.Array:
    """Signal-to-noise ratio ab / (1 - ab)."""
    return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

  @classmethod
  def from_betas(cls, betas) -> "Schedule":
    betas = np.asarray(betas, np.float64)
    if betas.ndim != 1 or np.any(betas <= 0) or np.any(betas >= 1):
      raise ConfigError("betas must be a 1-D array with every value in (0, 1).")
    alphas_cumprod = np.cumprod(1.0 - betas)
    return cls(betas=jnp.asarray(betas, jnp.float32),
               alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32))


def make_schedule(name: str, num_steps: int = 1000, **kwargs) -> Schedule:
  """Builds a `Schedule` by name: "linear" | "scaled_linear" | "cosine" (kwargs go to the betas)."""
  if name not in _BETAS:
    raise ConfigError(f"unknown noise schedule {name!r}; known: {sorted(_BETAS)}. "
                      "Fix the config's schedule name.")
  return Schedule.from_betas(_BETAS[name](num_steps, **kwargs))


def _bcast(values: jax.Array, ndim: int) -> jax.Array:
  """(B,) -> (B, 1, ..., 1) so per-sample coefficients broadcast over NHWC."""
  return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def _coeffs(schedule: Schedule, t: jax.Array, ndim: int):
  """(sqrt(ab_t), sqrt(1 - ab_t)) gathered at integer t, shaped to broadcast against x."""
  ab = schedule.alphas_cumprod[jnp.asarray(t, jnp.int32)]
  return _bcast(jnp.sqrt(ab), ndim), _bcast(jnp.sqrt(1.0 - ab), ndim)


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """Draws x_t ~ q(x_t | x_0) = N(sqrt(ab_t) x0, (1 - ab_t) I) given the noise; t int (B,)."""
  a, s = _coeffs(schedule, t, x0.ndim)
  return a * x0 + s * noise


def eps_to_x0(schedule: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  a, s = _coeffs(schedule, t, x_t.ndim)
  return (x_t - s * eps) / a


def x0_to_eps(schedule: Schedule, x_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
  a, s = _coeffs(schedule, t, x_t.ndim)
  return (x_t - a * x0) / s


def velocity(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """The v-prediction target v = sqrt(ab) eps - sqrt(1 - ab) x0."""
  a, s = _coeffs(schedule, t, x0.ndim)
  return a * noise - s * x0


def v_to_eps(schedule: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
  a, s = _coeffs(schedule, t, x_t.ndim)
  return a * v + s * x_t


def v_to_x0(schedule: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
  a, s = _coeffs(schedule, t, x_t.ndim)
  return a * x_t - s * v
