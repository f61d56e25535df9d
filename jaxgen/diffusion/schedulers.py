"""diffusers' schedulers in JAX, driven by a `scheduler_config.json` dict (diffusers 0.42.1).

For published pipelines: `from_config(config)` builds the class named by `config["_class_name"]`
(or by `name`: an alias of `ALIASES` or a class name, as diffusers'
`OtherScheduler.from_config(config)`), `plan(num_inference_steps)` precomputes every table
diffusers' `set_timesteps` and `step` compute, and `step` applies one update. The whole loop is
one `lax.scan` (`denoise`), jit-compatible with a traced step index.

Classes: DDIMScheduler, DDPMScheduler, PNDMScheduler (PLMS with or without the PRK warm-up),
DPMSolverMultistepScheduler (dpmsolver++ / dpmsolver / sde-dpmsolver++ / sde-dpmsolver, orders
1-3, midpoint / heun), EulerDiscreteScheduler and EulerAncestralDiscreteScheduler.

Conventions matched (diffusers' own, not jaxgen's training convention):
* Tables as diffusers builds them: betas in float32 (torch's float32 `linspace`, reproduced
  bit for bit by `torch_linspace_f32`; squaredcos_cap_v2 from `schedules.cosine_betas`, the same
  float64 maths), `alphas_cumprod` accumulated in float64 and rounded to float32 (torch's CPU
  cumprod), sigma tables with diffusers' numpy code. Timesteps equal `scheduler.timesteps`
  after `set_timesteps` (int32 here; float32 for the Euler types); per-step scalars are float32
  numpy ops in diffusers' order, so a loop matches diffusers' to float32 rounding (~1e-6).
* Config semantics of diffusers' ConfigMixin: a class takes the keys of its `__init__`, except
  those listed in `_use_default_values`; its defaults fill the rest; other keys are kept in
  `config` (diffusers registers them too) but unused. `Scheduler.config` mirrors diffusers'
  `scheduler.config`, so `from_config(s.config, name)` == `Other.from_config(s.config)`.
* Arrays: any layout, batch first; the only channel-wise operation, splitting a learned
  variance (DDPM "learned"/"learned_range", DPM-Solver's `variance_type`), uses the LAST axis
  (jaxgen's NHWC; diffusers splits axis 1 of NCHW).
* Noise: a stochastic step (DDPM, Euler ancestral, DDIM with eta > 0, SDE DPM-Solver) draws
  `jax.random.normal(rng, sample.shape, float32)` from the key it is given; `denoise` passes
  `fold_in(rng, i)` at evaluation i. Same distribution as diffusers, not torch's stream.
* The caller scales the initial noise by `plan.init_noise_sigma` (diffusers' prepare_latents).

Relation to `jaxgen.diffusion.samplers`: that module is jaxgen's own DDPM / DDIM / DPM++(2M)
for models trained here (its own timestep grid and clipping options, `Schedule` tables in
float64-derived float32, a final jump to clean data); this one reproduces diffusers' scheduler
configs exactly, quirks included (DDIM's previous timestep t - T // n whatever the spacing,
PNDM's repeated timestep), for pipelines that ship a `scheduler_config.json`.
"""

import functools
import json
import math
import os
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxgen.diffusion.schedules import cosine_betas
from jaxgen.errors import ConfigError

F32 = np.float32
SPACINGS = ("linspace", "leading", "trailing")


# ----------------------------------------------------------------------------- tables (numpy)

def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """`torch.linspace(start, end, steps, dtype=torch.float32)` on CPU, bit for bit.

  torch fills the first half as start + step * i and the second as end - step * (steps-1-i),
  in float32 with a fused multiply-add (emulated in float64, where the float32 product is
  exact). numpy's float64 linspace rounded to float32 differs in ~1/3 of the entries by 1 ulp.
  """
  start32, end32 = F32(start), F32(end)
  if steps == 1:
    return np.array([start32], F32)
  step = F32((end32 - start32) / F32(steps - 1))
  idx = np.arange(steps, dtype=np.float64)
  low = np.float64(start32) + np.float64(step) * idx
  high = np.float64(end32) - np.float64(step) * (steps - 1 - idx)
  return np.where(idx < steps // 2, low, high).astype(F32)


def _laplace_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
  """diffusers' `betas_for_alpha_bar(alpha_transform_type="laplace")` (DDPM only)."""
  def alpha_bar(t):
    lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
    snr = math.exp(lmb)
    return math.sqrt(snr / (1 + snr))
  return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                   for i in range(num_steps)], F32)


def _cumprod_f32(alphas: np.ndarray) -> np.ndarray:
  """torch's CPU cumprod of float32: accumulated in float64, each entry rounded to float32."""
  return np.cumprod(alphas.astype(np.float64)).astype(F32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Lin et al. 2023 Algorithm 1 in diffusers' float32 order: sqrt(abar) shifted to end at 0."""
  alphas_bar_sqrt = np.sqrt(_cumprod_f32(F32(1) - betas))
  first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
  alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
  alphas_bar = alphas_bar_sqrt * alphas_bar_sqrt
  alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
  return F32(1) - alphas


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
  """diffusers' `_sigma_to_t`: the fractional train timestep of each sigma (log-linear interp)."""
  log_sigma = np.log(np.maximum(sigma, 1e-10))
  dists = log_sigma - log_sigmas[:, np.newaxis]
  low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
  high_idx = low_idx + 1
  low, high = log_sigmas[low_idx], log_sigmas[high_idx]
  w = np.clip((low - log_sigma) / (low - high), 0, 1)
  return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def _sigma_range(in_sigmas, sigma_min, sigma_max) -> Tuple[float, float]:
  lo = sigma_min if sigma_min is not None else in_sigmas[-1].item()
  hi = sigma_max if sigma_max is not None else in_sigmas[0].item()
  return lo, hi


def _karras_sigmas(in_sigmas, n, sigma_min=None, sigma_max=None) -> np.ndarray:
  """Karras et al. 2022 rho = 7 sigmas between the range of `in_sigmas` (descending)."""
  lo, hi = _sigma_range(in_sigmas, sigma_min, sigma_max)
  rho = 7.0
  ramp = np.linspace(0, 1, n)
  min_inv_rho, max_inv_rho = lo ** (1 / rho), hi ** (1 / rho)
  return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _exponential_sigmas(in_sigmas, n, sigma_min=None, sigma_max=None) -> np.ndarray:
  lo, hi = _sigma_range(in_sigmas, sigma_min, sigma_max)
  return np.exp(np.linspace(math.log(hi), math.log(lo), n))


def _beta_sigmas(in_sigmas, n, sigma_min=None, sigma_max=None, alpha=0.6, beta=0.6):
  """Lee et al. 2024 beta-distributed sigmas (scipy, which jax already depends on)."""
  import scipy.stats  # pylint: disable=g-import-not-at-top
  lo, hi = _sigma_range(in_sigmas, sigma_min, sigma_max)
  return np.array([lo + (scipy.stats.beta.ppf(u, alpha, beta) * (hi - lo))
                   for u in 1 - np.linspace(0, 1, n)])


def _gather(table: np.ndarray, idx, what: str) -> np.ndarray:
  """table[idx] with torch's indexing (negative wraps), out of range -> ConfigError."""
  idx = np.asarray(idx, np.int64)
  if np.any(idx >= len(table)) or np.any(idx < -len(table)):
    raise ConfigError(f"{what}: timestep {int(idx.max())} is outside the {len(table)} train "
                      "timesteps (diffusers raises an IndexError here). Lower steps_offset or "
                      "num_inference_steps.")
  return table[idx]


def _threshold(x0: jax.Array, ratio: float, max_value: float) -> jax.Array:
  """Imagen's dynamic thresholding (diffusers' `_threshold_sample`), per batch entry."""
  flat = x0.reshape(x0.shape[0], -1)
  s = jnp.quantile(jnp.abs(flat), ratio, axis=1)
  s = jnp.clip(s, 1.0, max_value)[:, None]
  return (jnp.clip(flat, -s, s) / s).reshape(x0.shape)


# ----------------------------------------------------------------------------- plan / base

@struct.dataclass
class Plan:
  """What `set_timesteps` fixes: the model-time values and the per-evaluation scalar tables.

  A pytree (pass it to jitted functions as an argument). `timesteps` has one entry per model
  evaluation (PNDM repeats one, so len may differ from num_inference_steps); `tables` maps a
  name to a float32 (or int32) array indexed by the evaluation index i.
  """
  timesteps: jax.Array
  tables: Dict[str, jax.Array]
  init_noise_sigma: float = struct.field(pytree_node=False, default=1.0)
  num_inference_steps: int = struct.field(pytree_node=False, default=0)
  eta: float = struct.field(pytree_node=False, default=0.0)
  use_clipped_model_output: bool = struct.field(pytree_node=False, default=False)

  @property
  def n_evals(self) -> int:
    return self.timesteps.shape[0]


def _make_plan(timesteps: np.ndarray, tables: Mapping[str, np.ndarray], **static) -> Plan:
  def to_jnp(a):
    a = np.asarray(a)
    return jnp.asarray(a, jnp.int32 if a.dtype.kind in "iub" else jnp.float32)
  return Plan(timesteps=to_jnp(timesteps), tables={k: to_jnp(v) for k, v in tables.items()},
              **static)


class Scheduler:
  """One diffusers scheduler class: its config, `plan` (set_timesteps) and `step`.

  `config` mirrors diffusers' `scheduler.config`: every `__init__` key (defaults filled),
  `_use_default_values` (the keys that took defaults; only when any did) and the source
  config's other keys, unused (`_class_name` renamed to this class). Construct through
  `from_config`.
  """
  class_name: ClassVar[str] = ""
  DEFAULTS: ClassVar[Dict[str, Any]] = {}
  PREDICTION_TYPES: ClassVar[Tuple[str, ...]] = ("epsilon", "sample", "v_prediction")
  BETA_SCHEDULES: ClassVar[Tuple[str, ...]] = ("linear", "scaled_linear", "squaredcos_cap_v2")
  RESCALE_SETS_LAST_ALPHA: ClassVar[bool] = False   # alphas_cumprod[-1] = 2**-24 after rescale

  def __init__(self, init_values: Optional[Mapping[str, Any]] = None,
               hidden: Optional[Mapping[str, Any]] = None):
    init_values = dict(init_values or {})
    unknown = sorted(set(init_values) - set(self.DEFAULTS))
    if unknown:
      raise ConfigError(f"{self.class_name} has no config keys {unknown}; known: "
                        f"{sorted(self.DEFAULTS)}. Use from_config to ignore unknown keys.")
    values = {k: init_values.get(k, v) for k, v in self.DEFAULTS.items()}
    config = dict(values)
    defaulted = [k for k in self.DEFAULTS if k not in init_values]
    if defaulted:
      config["_use_default_values"] = defaulted
    hidden = {k: v for k, v in (hidden or {}).items() if k not in values}
    if "_class_name" in hidden:   # diffusers renames a source config's class, adds none
      hidden["_class_name"] = self.class_name
    config.update(hidden)
    self.config = config
    self._post_init()
    self._validate()
    self.betas = self._betas()
    self.alphas_cumprod = _cumprod_f32(F32(1) - self.betas)
    if self.RESCALE_SETS_LAST_ALPHA and self.config.get("rescale_betas_zero_snr"):
      self.alphas_cumprod[-1] = F32(2.0 ** -24)

  def __repr__(self):
    return f"{self.class_name}({', '.join(f'{k}={self.config[k]!r}' for k in self.DEFAULTS)})"

  # -- config
  def _post_init(self):
    """Config rewrites diffusers' __init__ does with register_to_config (none by default)."""

  def _validate(self):
    c = self.config
    if c.get("trained_betas") is None and c["beta_schedule"] not in self.BETA_SCHEDULES:
      raise ConfigError(f"{self.class_name}: beta_schedule {c['beta_schedule']!r} is not "
                        f"implemented; known: {list(self.BETA_SCHEDULES)} (or trained_betas).")
    if c["prediction_type"] not in self.PREDICTION_TYPES:
      raise ConfigError(f"{self.class_name}: prediction_type {c['prediction_type']!r} is not "
                        f"supported; known: {list(self.PREDICTION_TYPES)}.")
    if c["timestep_spacing"] not in SPACINGS:
      raise ConfigError(f"{self.class_name}: timestep_spacing {c['timestep_spacing']!r} is not "
                        f"supported; known: {list(SPACINGS)}.")
    if int(c["num_train_timesteps"]) < 1:
      raise ConfigError(f"num_train_timesteps must be >= 1, got {c['num_train_timesteps']}.")

  def _betas(self) -> np.ndarray:
    c = self.config
    n = int(c["num_train_timesteps"])
    if c.get("trained_betas") is not None:
      betas = np.asarray(c["trained_betas"], F32).reshape(-1)
    elif c["beta_schedule"] == "linear":
      betas = torch_linspace_f32(c["beta_start"], c["beta_end"], n)
    elif c["beta_schedule"] == "scaled_linear":
      betas = torch_linspace_f32(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, n) ** 2
    elif c["beta_schedule"] == "squaredcos_cap_v2":
      betas = cosine_betas(n).astype(F32)
    elif c["beta_schedule"] == "laplace":
      betas = _laplace_betas(n)
    else:  # sigmoid (DDPM)
      x = torch_linspace_f32(-6, 6, n)
      betas = (F32(1) / (F32(1) + np.exp(-x))) * F32(c["beta_end"] - c["beta_start"]) + F32(
          c["beta_start"])
    if c.get("rescale_betas_zero_snr"):
      betas = _rescale_zero_terminal_snr(betas)
    return betas.astype(F32)

  @property
  def num_train_timesteps(self) -> int:
    return int(self.config["num_train_timesteps"])

  # -- the stepping interface
  def plan(self, num_inference_steps: int, eta: float = 0.0) -> Plan:
    """The timesteps and tables of `set_timesteps(num_inference_steps)`.

    `eta` is DDIM's step argument (ignored by the other classes, as diffusers' pipelines pass
    it only to schedulers whose step takes it).
    """
    raise NotImplementedError

  def _check_steps(self, num_inference_steps, limit: bool = False) -> int:
    n = int(num_inference_steps)
    if n < 1:
      raise ConfigError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
    if limit and n > self.num_train_timesteps:
      raise ConfigError(f"num_inference_steps={n} cannot exceed num_train_timesteps="
                        f"{self.num_train_timesteps} for {self.class_name}.")
    return n

  def needs_rng(self, plan: Plan) -> bool:
    """Whether `step` draws noise (then it needs a key)."""
    del plan
    return False

  def init_state(self, plan: Plan, sample: jax.Array) -> Dict[str, jax.Array]:
    """The multistep history carried between steps (empty for one-step methods)."""
    del plan, sample
    return {}

  def scale_model_input(self, plan: Plan, i, sample: jax.Array) -> jax.Array:
    """The model's input at evaluation i (identity except for the Euler types)."""
    del plan, i
    return sample

  def step(self, plan: Plan, i, model_output: jax.Array, sample: jax.Array,
           state: Dict[str, jax.Array], rng: Optional[jax.Array] = None
           ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """One update at evaluation i (an int or a traced int32): (prev_sample, new state)."""
    raise NotImplementedError

  def _noise(self, rng, sample):
    if rng is None:
      raise ConfigError(f"{self.class_name} with this config draws noise at every step: pass "
                        "an rng key to step / denoise.")
    return jax.random.normal(rng, sample.shape, jnp.float32)

  def _x0_clip(self, x0):
    """DDIM/DDPM: dynamic thresholding, else clipping to +-clip_sample_range."""
    c = self.config
    if c["thresholding"]:
      return _threshold(x0, c["dynamic_thresholding_ratio"], c["sample_max_value"])
    if c["clip_sample"]:
      return jnp.clip(x0, -c["clip_sample_range"], c["clip_sample_range"])
    return x0


def _integer_timesteps(spacing, T, n, offset) -> np.ndarray:
  """DDIM / DDPM timesteps (int64, descending)."""
  if spacing == "linspace":
    return np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
  if spacing == "leading":
    ratio = T // n
    return (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64) + offset
  ratio = T / n
  return np.round(np.arange(T, 0, -ratio)).astype(np.int64) - 1


def _as_f32(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


# ----------------------------------------------------------------------------- DDIM

_COMMON = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "linear", "trained_betas": None,
}


class DDIMScheduler(Scheduler):
  """Song et al. 2021; eta > 0 adds noise (std eta * sigma_t) from the step's key."""
  class_name = "DDIMScheduler"
  DEFAULTS = {
      **_COMMON, "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0,
      "prediction_type": "epsilon", "thresholding": False, "dynamic_thresholding_ratio": 0.995,
      "clip_sample_range": 1.0, "sample_max_value": 1.0, "timestep_spacing": "leading",
      "rescale_betas_zero_snr": False,
  }

  def plan(self, num_inference_steps: int, eta: float = 0.0,
           use_clipped_model_output: bool = False) -> Plan:
    c, T = self.config, self.num_train_timesteps
    n = self._check_steps(num_inference_steps, limit=True)
    ts = _integer_timesteps(c["timestep_spacing"], T, n, c["steps_offset"])
    ac = self.alphas_cumprod
    final = F32(1.0) if c["set_alpha_to_one"] else ac[0]
    # diffusers steps to t - T // n whatever the spacing.
    prev = ts - T // n
    a_t = _gather(ac, ts, self.class_name)
    a_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final).astype(F32)
    b_t, b_prev = F32(1) - a_t, F32(1) - a_prev
    variance = (b_prev / b_t) * (F32(1) - a_t / a_prev)
    std = F32(eta) * np.sqrt(variance)
    tables = {"sqrt_alpha": np.sqrt(a_t), "sqrt_beta": np.sqrt(b_t),
              "sqrt_alpha_prev": np.sqrt(a_prev),
              "direction": np.sqrt(F32(1) - a_prev - std * std), "std": std}
    return _make_plan(ts, tables, num_inference_steps=n, eta=float(eta),
                      use_clipped_model_output=bool(use_clipped_model_output))

  def needs_rng(self, plan):
    return plan.eta > 0

  def step(self, plan, i, model_output, sample, state, rng=None):
    tb = {k: v[i] for k, v in plan.tables.items()}
    mo, x = _as_f32((model_output, sample))
    sa, sb = tb["sqrt_alpha"], tb["sqrt_beta"]
    pred = self.config["prediction_type"]
    if pred == "epsilon":
      x0, eps = (x - sb * mo) / sa, mo
    elif pred == "sample":
      x0 = mo
      eps = (x - sa * x0) / sb
    else:
      x0, eps = sa * x - sb * mo, sa * mo + sb * x
    x0 = self._x0_clip(x0)
    if plan.use_clipped_model_output:
      eps = (x - sa * x0) / sb
    prev = tb["sqrt_alpha_prev"] * x0 + tb["direction"] * eps
    if plan.eta > 0:
      prev = prev + tb["std"] * self._noise(rng, x)
    return prev.astype(sample.dtype), state


# ----------------------------------------------------------------------------- DDPM

class DDPMScheduler(Scheduler):
  """Ho et al. 2020 ancestral sampling on a respaced grid; noise at every step with t > 0."""
  class_name = "DDPMScheduler"
  DEFAULTS = {
      **_COMMON, "variance_type": "fixed_small", "clip_sample": True,
      "prediction_type": "epsilon", "thresholding": False, "dynamic_thresholding_ratio": 0.995,
      "clip_sample_range": 1.0, "sample_max_value": 1.0, "timestep_spacing": "leading",
      "steps_offset": 0, "rescale_betas_zero_snr": False,
  }
  BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "sigmoid")
  VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log",
                    "learned", "learned_range")

  def _validate(self):
    super()._validate()
    if self.config["variance_type"] not in self.VARIANCE_TYPES:
      raise ConfigError(f"DDPMScheduler: unknown variance_type {self.config['variance_type']!r}"
                        f"; known: {list(self.VARIANCE_TYPES)}.")

  def plan(self, num_inference_steps: int, eta: float = 0.0) -> Plan:
    del eta
    c, T = self.config, self.num_train_timesteps
    n = self._check_steps(num_inference_steps, limit=True)
    ts = _integer_timesteps(c["timestep_spacing"], T, n, c["steps_offset"])
    ac = self.alphas_cumprod
    # previous_timestep: the next entry of the schedule (its first match), -1 after the last.
    first = {int(t): k for k, t in reversed(list(enumerate(ts)))}
    prev = np.array([ts[first[int(t)] + 1] if first[int(t)] + 1 < len(ts) else -1 for t in ts],
                    np.int64)
    a_t = _gather(ac, ts, self.class_name)
    a_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], F32(1)).astype(F32)
    b_t, b_prev = F32(1) - a_t, F32(1) - a_prev
    cur_alpha = a_t / a_prev
    cur_beta = F32(1) - cur_alpha
    variance = np.maximum((F32(1) - a_prev) / (F32(1) - a_t) * cur_beta, F32(1e-20))
    vt = c["variance_type"]
    with np.errstate(invalid="ignore", divide="ignore"):
      if vt == "fixed_small":
        noise_scale = np.sqrt(variance)
      elif vt == "fixed_small_log":
        noise_scale = np.exp(F32(0.5) * np.log(variance))
      elif vt == "fixed_large":
        noise_scale = np.sqrt(cur_beta)
      elif vt == "fixed_large_log":
        noise_scale = np.sqrt(np.log(cur_beta))   # NaN, as diffusers' sqrt of a log variance
      else:
        noise_scale = np.zeros_like(variance)
      min_log, max_log = np.log(variance), np.log(cur_beta)
    tables = {"sqrt_alpha": np.sqrt(a_t), "sqrt_beta": np.sqrt(b_t),
              "x0_coeff": (np.sqrt(a_prev) * cur_beta) / b_t,
              "sample_coeff": np.sqrt(cur_alpha) * b_prev / b_t,
              "noisy": (ts > 0).astype(np.int32), "noise_scale": noise_scale,
              "min_log": min_log, "max_log": max_log}
    return _make_plan(ts, tables, num_inference_steps=n)

  def needs_rng(self, plan):
    return True

  def step(self, plan, i, model_output, sample, state, rng=None):
    tb = {k: v[i] for k, v in plan.tables.items()}
    vt = self.config["variance_type"]
    mo, x = _as_f32((model_output, sample))
    predicted_variance = None
    if vt in ("learned", "learned_range"):
      if mo.shape[-1] != 2 * x.shape[-1]:
        raise ConfigError(f"DDPMScheduler variance_type={vt!r} needs the model's variance "
                          f"half: model_output has {mo.shape[-1]} channels (last axis) for a "
                          f"{x.shape[-1]}-channel sample, expected {2 * x.shape[-1]}.")
      mo, predicted_variance = mo[..., :x.shape[-1]], mo[..., x.shape[-1]:]
    sa, sb = tb["sqrt_alpha"], tb["sqrt_beta"]
    pred = self.config["prediction_type"]
    if pred == "epsilon":
      x0 = (x - sb * mo) / sa
    elif pred == "sample":
      x0 = mo
    else:
      x0 = sa * x - sb * mo
    x0 = self._x0_clip(x0)
    prev = tb["x0_coeff"] * x0 + tb["sample_coeff"] * x
    noise = self._noise(rng, x)
    if vt == "learned":
      term = predicted_variance ** 0.5 * noise
    elif vt == "learned_range":
      frac = (predicted_variance + 1) / 2
      term = jnp.exp(0.5 * (frac * tb["max_log"] + (1 - frac) * tb["min_log"])) * noise
    else:
      term = tb["noise_scale"] * noise
    prev = jnp.where(tb["noisy"] > 0, prev + term, prev)
    return prev.astype(sample.dtype), state


# ----------------------------------------------------------------------------- PNDM

# PNDM step kinds (the branch of diffusers' step_prk / step_plms taken at each evaluation).
(_PRK_FIRST, _PRK_MID, _PRK_LAST, _PLMS_FIRST, _PLMS_SECOND, _PLMS_2, _PLMS_3,
 _PLMS_4) = range(8)


class PNDMScheduler(Scheduler):
  """Liu et al. 2022 pseudo numerical methods: 12 Runge-Kutta (PRK) warm-up evaluations, then
  linear multistep (PLMS); skip_prk_steps (Stable Diffusion) starts PLMS with a 2-step
  Heun-like warm-up that evaluates one timestep twice."""
  class_name = "PNDMScheduler"
  DEFAULTS = {
      **_COMMON, "skip_prk_steps": False, "set_alpha_to_one": False,
      "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 0,
  }
  PREDICTION_TYPES = ("epsilon", "v_prediction")

  def plan(self, num_inference_steps: int, eta: float = 0.0) -> Plan:
    del eta
    c, T = self.config, self.num_train_timesteps
    n = self._check_steps(num_inference_steps)
    spacing = c["timestep_spacing"]
    if spacing == "linspace":
      base = np.linspace(0, T - 1, n).round().astype(np.int64)
    elif spacing == "leading":
      base = (np.arange(0, n) * (T // n)).round() + c["steps_offset"]
    else:
      base = np.round(np.arange(T, 0, -T / n))[::-1].astype(np.int64) - 1
    if c["skip_prk_steps"]:
      prk = np.array([], np.int64)
      plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
    else:
      if len(base) < 4:
        raise ConfigError("PNDMScheduler with skip_prk_steps=False needs num_inference_steps "
                          f">= 4 (its Runge-Kutta warm-up uses 4 timesteps), got {n}.")
      prk = np.array(base[-4:]).repeat(2) + np.tile(np.array([0, T // n // 2]), 4)
      prk = prk[:-1].repeat(2)[1:-1][::-1].copy()
      plms = base[:-3][::-1].copy()
    ts = np.concatenate([prk, plms]).astype(np.int64)

    # Replay diffusers' step counters to fix each evaluation's branch and alpha indices.
    ratio = T // n
    kinds, t_alpha, t_prev = [], [], []
    n_ets = 0
    for counter, t in enumerate(ts):
      t = int(t)
      if counter < len(prk):
        t_prev.append(t - (0 if counter % 2 else ratio // 2))
        t_alpha.append(int(prk[counter // 4 * 4]))
        kinds.append((_PRK_FIRST, _PRK_MID, _PRK_MID, _PRK_LAST)[counter % 4])
        n_ets += counter % 4 == 0
        continue
      if counter == 1:   # the second evaluation of the warm-up: t repeated, no new history
        t_prev.append(t)
        t_alpha.append(t + ratio)
        if n_ets != 1:
          raise AssertionError("PNDM: unexpected history at the second PLMS evaluation")
        kinds.append(_PLMS_SECOND)
        continue
      t_prev.append(t - ratio)
      t_alpha.append(t)
      n_ets = min(n_ets, 3) + 1
      kinds.append(_PLMS_FIRST if n_ets == 1 else (_PLMS_2, _PLMS_3, _PLMS_4)[n_ets - 2])
    ac = self.alphas_cumprod
    final = F32(1.0) if c["set_alpha_to_one"] else ac[0]
    t_prev = np.array(t_prev, np.int64)
    a_t = _gather(ac, t_alpha, self.class_name)
    a_prev = np.where(t_prev >= 0, ac[np.clip(t_prev, 0, None)], final).astype(F32)
    b_t, b_prev = F32(1) - a_t, F32(1) - a_prev
    tables = {"kind": np.array(kinds, np.int32), "sqrt_alpha": np.sqrt(a_t),
              "sqrt_beta": np.sqrt(b_t), "sample_coeff": np.sqrt(a_prev / a_t),
              "alpha_diff": a_prev - a_t,
              "denom": a_t * np.sqrt(b_prev) + np.sqrt(a_t * b_t * a_prev)}
    return _make_plan(ts, tables, num_inference_steps=n)

  def init_state(self, plan, sample):
    z = jnp.zeros(sample.shape, jnp.float32)
    return {"ets": jnp.zeros((4,) + sample.shape, jnp.float32), "cur_sample": z,
            "cur_model_output": z}

  def step(self, plan, i, model_output, sample, state, rng=None):
    tb = {k: v[i] for k, v in plan.tables.items()}
    mo, x = _as_f32((model_output, sample))
    v_pred = self.config["prediction_type"] == "v_prediction"

    def prev_sample(s, m):   # diffusers' _get_prev_sample (formula (9) of the paper)
      if v_pred:
        m = tb["sqrt_alpha"] * m + tb["sqrt_beta"] * s
      return tb["sample_coeff"] * s - tb["alpha_diff"] * m / tb["denom"]

    # Every branch's candidate in diffusers' own arithmetic, then one select by the evaluation's
    # kind: elementwise work is cheap, and XLA compiles this faster than an 8-way lax.switch.
    kind = tb["kind"]
    ets, cur_sample, cur_mo = state["ets"], state["cur_sample"], state["cur_model_output"]
    pushes = (kind == _PRK_FIRST) | (kind == _PLMS_FIRST) | (kind >= _PLMS_2)
    ets = jnp.where(pushes, jnp.concatenate([ets[1:], mo[None]], 0), ets)
    e1, e2, e3, e4 = ets[3], ets[2], ets[1], ets[0]

    def is_(*kinds):
      return functools.reduce(jnp.logical_or, [kind == k for k in kinds])

    m = jnp.where(is_(_PRK_LAST), cur_mo + 1 / 6 * mo, mo)
    m = jnp.where(is_(_PLMS_SECOND), (mo + e1) / 2, m)
    m = jnp.where(is_(_PLMS_2), (3 * e1 - e2) / 2, m)
    m = jnp.where(is_(_PLMS_3), (23 * e1 - 16 * e2 + 5 * e3) / 12, m)
    m = jnp.where(is_(_PLMS_4), (1 / 24) * (55 * e1 - 59 * e2 + 37 * e3 - 9 * e4), m)
    # PRK evaluations 2-4 and the PLMS warm-up's second one restart from the stored sample.
    s = jnp.where(is_(_PRK_MID, _PRK_LAST, _PLMS_SECOND), cur_sample, x)
    new_cur_mo = jnp.where(is_(_PRK_FIRST), 1 / 6 * mo, cur_mo)
    new_cur_mo = jnp.where(is_(_PRK_MID), cur_mo + 1 / 3 * mo, new_cur_mo)
    new_cur_mo = jnp.where(is_(_PRK_LAST), jnp.zeros_like(mo), new_cur_mo)
    state = {"ets": ets, "cur_sample": jnp.where(is_(_PRK_FIRST, _PLMS_FIRST), x, cur_sample),
             "cur_model_output": new_cur_mo}
    prev = prev_sample(s, m)
    return prev.astype(sample.dtype), state


# ----------------------------------------------------------------------------- DPM-Solver

class DPMSolverMultistepScheduler(Scheduler):
  """Lu et al. 2022 DPM-Solver / DPM-Solver++ multistep (orders 1-3) and their SDE variants.

  Every update is x' = c_x x + c0 D0 + c1 D1 + c2 D2 (+ c_noise z) with diffusers' D terms
  (D1 = D1_0 + k1 (D1_0 - D1_1), D1_i = (m_i - m_{i+1}) / r_i, D2 = k2 (D1_0 - D1_1)); the
  plan holds the coefficients of the order diffusers uses at each step (zeros for the others),
  so the traced step has no branches and the rounding is diffusers'.
  """
  class_name = "DPMSolverMultistepScheduler"
  DEFAULTS = {
      **_COMMON, "solver_order": 2, "prediction_type": "epsilon", "thresholding": False,
      "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0,
      "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True,
      "euler_at_final": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
      "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False,
      "flow_shift": 1.0, "final_sigmas_type": "zero", "lambda_min_clipped": -float("inf"),
      "variance_type": None, "timestep_spacing": "linspace", "steps_offset": 0,
      "rescale_betas_zero_snr": False, "use_dynamic_shifting": False,
      "time_shift_type": "exponential",
  }
  PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
  ALGORITHMS = ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++")
  RESCALE_SETS_LAST_ALPHA = True

  def _post_init(self):
    # diffusers checks final_sigmas_type against the algorithm as given, then registers
    # DEIS-style names as their DPM-Solver equivalents.
    c = self.config
    if c["algorithm_type"] not in self.ALGORITHMS + ("deis",):
      raise ConfigError(f"DPMSolverMultistepScheduler: algorithm_type {c['algorithm_type']!r} "
                        f"is not implemented; known: {list(self.ALGORITHMS)}.")
    if c["algorithm_type"] not in ("dpmsolver++", "sde-dpmsolver++") and (
        c["final_sigmas_type"] == "zero"):
      raise ConfigError(f"final_sigmas_type 'zero' is not supported for algorithm_type "
                        f"{c['algorithm_type']!r}: set final_sigmas_type='sigma_min'.")
    if c["algorithm_type"] == "deis":
      c["algorithm_type"] = "dpmsolver++"
    if c["solver_type"] in ("logrho", "bh1", "bh2"):
      c["solver_type"] = "midpoint"

  def _validate(self):
    super()._validate()
    c = self.config
    if c["solver_type"] not in ("midpoint", "heun"):
      raise ConfigError(f"DPMSolverMultistepScheduler: solver_type {c['solver_type']!r} is not "
                        "implemented; known: ['midpoint', 'heun'].")
    if int(c["solver_order"]) not in (1, 2, 3):
      raise ConfigError(f"DPMSolverMultistepScheduler: solver_order must be 1, 2 or 3, got "
                        f"{c['solver_order']}.")
    if c["final_sigmas_type"] not in ("zero", "sigma_min"):
      raise ConfigError(f"final_sigmas_type must be 'zero' or 'sigma_min', got "
                        f"{c['final_sigmas_type']!r}.")
    if "++" not in c["algorithm_type"] and c["prediction_type"] == "flow_prediction":
      raise ConfigError("prediction_type 'flow_prediction' needs algorithm_type dpmsolver++ or "
                        "sde-dpmsolver++.")
    if sum(bool(c[k]) for k in ("use_beta_sigmas", "use_exponential_sigmas",
                                "use_karras_sigmas")) > 1:
      raise ConfigError("Only one of use_beta_sigmas, use_exponential_sigmas, "
                        "use_karras_sigmas can be set.")
    if c["use_dynamic_shifting"]:
      raise ConfigError("use_dynamic_shifting needs a per-call `mu` (flow models); not "
                        "supported here: set use_dynamic_shifting=false.")

  def _sigmas_and_timesteps(self, n: int) -> Tuple[np.ndarray, np.ndarray]:
    c, T = self.config, self.num_train_timesteps
    ac = self.alphas_cumprod
    with np.errstate(divide="ignore"):
      lambda_t = np.log(np.sqrt(ac)) - np.log(np.sqrt(F32(1) - ac))
    clipped_idx = int(np.searchsorted(lambda_t[::-1], F32(c["lambda_min_clipped"])))
    last = T - clipped_idx
    spacing = c["timestep_spacing"]
    if spacing == "linspace":
      ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif spacing == "leading":
      ratio = last // (n + 1)
      ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
      ts += c["steps_offset"]
    else:
      ts = np.arange(last, 0, -(T / n)).round().copy().astype(np.int64) - 1
    sigmas = np.sqrt((F32(1) - ac) / ac)
    log_sigmas = np.log(sigmas)
    smin, smax = c.get("sigma_min"), c.get("sigma_max")   # hidden keys, as diffusers' hasattr
    rounded = c["beta_schedule"] != "squaredcos_cap_v2"
    if c["use_karras_sigmas"]:
      sigmas = _karras_sigmas(np.flip(sigmas).copy(), n, smin, smax)
      ts = _sigma_to_t(sigmas, log_sigmas)
      ts = ts.round() if rounded else ts
    elif c["use_lu_lambdas"]:
      lambdas = np.flip(log_sigmas.copy())
      lmin, lmax = lambdas[-1].item(), lambdas[0].item()
      sigmas = np.exp(lmax + np.linspace(0, 1, n) * (lmin - lmax))
      ts = _sigma_to_t(sigmas, log_sigmas)
      ts = ts.round() if rounded else ts
    elif c["use_exponential_sigmas"]:
      sigmas = _exponential_sigmas(np.flip(sigmas).copy(), n, smin, smax)
      ts = _sigma_to_t(sigmas, log_sigmas)
    elif c["use_beta_sigmas"]:
      sigmas = _beta_sigmas(np.flip(sigmas).copy(), n, smin, smax)
      ts = _sigma_to_t(sigmas, log_sigmas)
    elif c["use_flow_sigmas"]:
      alphas = np.linspace(1, 1 / T, n + 1)
      s = 1.0 - alphas
      shift = c["flow_shift"]
      sigmas = np.flip(shift * s / (1 + (shift - 1) * s))[:-1].copy()
      ts = (sigmas * T).copy()
    else:
      sigmas = np.interp(ts, np.arange(0, len(sigmas)), sigmas)
    if c["final_sigmas_type"] == "sigma_min":
      last_sigma = np.sqrt((F32(1) - ac[0]) / ac[0])
    else:
      last_sigma = 0
    sigmas = np.concatenate([sigmas, [last_sigma]]).astype(F32)
    return sigmas, np.asarray(ts).astype(np.int64)

  def _alpha_sigma(self, sigma: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    if self.config["use_flow_sigmas"]:
      return F32(1) - sigma, sigma
    alpha = F32(1) / np.sqrt(sigma * sigma + F32(1))
    return alpha, sigma * alpha

  def _order(self, i: int, n: int) -> int:
    """The solver order diffusers' step uses at step i of n (lower_order_nums = min(i, order))."""
    c = self.config
    order = int(c["solver_order"])
    final = i == n - 1 and (c["euler_at_final"] or (c["lower_order_final"] and n < 15)
                            or c["final_sigmas_type"] == "zero")
    second = i == n - 2 and c["lower_order_final"] and n < 15
    if order == 1 or i < 1 or final:
      return 1
    if order == 2 or i < 2 or second:
      return 2
    return 3

  def _coefficients(self, order: int, i: int, alpha, sigma, lam) -> Dict[str, np.float32]:
    """Step i's update coefficients, each in diffusers' float32 expression order."""
    algo, heun = self.config["algorithm_type"], self.config["solver_type"] == "heun"
    if order == 3 and algo == "sde-dpmsolver":
      raise ConfigError("diffusers has no third-order sde-dpmsolver update: set "
                        "solver_order <= 2 or algorithm_type 'sde-dpmsolver++'.")
    one, two, half = F32(1), F32(2), F32(0.5)
    a_t, s_t, a_s0, s_s0 = alpha[i + 1], sigma[i + 1], alpha[i], sigma[i]
    h = lam[i + 1] - lam[i]
    e_mh, e_h, e_m2h = np.exp(-h), np.exp(h), np.exp(F32(-2.0) * h)
    row = {}
    if algo == "dpmsolver++":
      row["c_x"], row["c0"] = s_t / s_s0, -(a_t * (e_mh - one))
    elif algo == "dpmsolver":
      row["c_x"], row["c0"] = a_t / a_s0, -(s_t * (e_h - one))
    elif algo == "sde-dpmsolver++":
      row["c_x"], row["c0"] = s_t / s_s0 * e_mh, a_t * (one - e_m2h)
      row["c_noise"] = s_t * np.sqrt(one - e_m2h)
    else:
      row["c_x"], row["c0"] = a_t / a_s0, -(two * (s_t * (e_h - one)))
      row["c_noise"] = s_t * np.sqrt(np.exp(two * h) - one)
    if order >= 2:
      r0 = (lam[i] - lam[i - 1]) / h
      row["inv_r0"] = one / r0
    if order == 2:
      if algo == "dpmsolver++":
        row["c1"] = a_t * ((e_mh - one) / h + one) if heun else -(half * (a_t * (e_mh - one)))
      elif algo == "dpmsolver":
        row["c1"] = -(s_t * ((e_h - one) / h - one)) if heun else -(half * (s_t * (e_h - one)))
      elif algo == "sde-dpmsolver++":
        row["c1"] = (a_t * ((one - e_m2h) / (F32(-2.0) * h) + one) if heun
                     else half * (a_t * (one - e_m2h)))
      else:
        row["c1"] = (-(two * (s_t * ((e_h - one) / h - one))) if heun
                     else -(s_t * (e_h - one)))
    if order == 3:   # (solver_type plays no part at third order)
      r1 = (lam[i - 1] - lam[i - 2]) / h
      row.update(inv_r1=one / r1, k1=r0 / (r0 + r1), k2=one / (r0 + r1))
      if algo == "dpmsolver++":
        row["c1"] = a_t * ((e_mh - one) / h + one)
        row["c2"] = -(a_t * ((e_mh - one + h) / (h * h) - half))
      elif algo == "dpmsolver":
        row["c1"] = -(s_t * ((e_h - one) / h - one))
        row["c2"] = -(s_t * ((e_h - one - h) / (h * h) - half))
      else:
        two_h = two * h
        row["c1"] = a_t * ((one - e_m2h) / (F32(-2.0) * h) + one)
        row["c2"] = a_t * ((one - e_m2h - two_h) / (two_h * two_h) - half)
    return row

  def plan(self, num_inference_steps: int, eta: float = 0.0) -> Plan:
    del eta
    n_req = self._check_steps(num_inference_steps)
    sigmas, ts = self._sigmas_and_timesteps(n_req)
    n = len(ts)
    alpha, sigma = self._alpha_sigma(sigmas)
    tables = {k: np.zeros(n, F32)
              for k in ("c_x", "c0", "c1", "c2", "c_noise", "inv_r0", "inv_r1", "k1", "k2")}
    # A zero final sigma makes lambda infinite there: exp(-h) = 0, the exact limit.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
      lam = np.log(alpha) - np.log(sigma)
      for i in range(n):
        for k, v in self._coefficients(self._order(i, n), i, alpha, sigma, lam).items():
          tables[k][i] = v
    tables.update(alpha=alpha[:n], sigma=sigma[:n],
                  sigmas=sigmas[:n])   # the raw sigma: flow_prediction's conversion
    return _make_plan(ts, tables, num_inference_steps=n_req)

  def needs_rng(self, plan):
    return self.config["algorithm_type"].startswith("sde-")

  def init_state(self, plan, sample):
    return {"history": jnp.zeros((2,) + sample.shape, jnp.float32)}

  def _convert(self, tb, mo, x):
    """diffusers' convert_model_output: x0 (dpmsolver++ types) or eps (dpmsolver types)."""
    c = self.config
    a, s = tb["alpha"], tb["sigma"]
    pred = c["prediction_type"]
    if c["variance_type"] in ("learned", "learned_range") and pred == "epsilon":
      mo = mo[..., :3]   # diffusers' fixed 3 (pixel-space models), on the channel axis
    if "++" in c["algorithm_type"]:
      if pred == "epsilon":
        x0 = (x - s * mo) / a
      elif pred == "sample":
        x0 = mo
      elif pred == "v_prediction":
        x0 = a * x - s * mo
      else:
        x0 = x - tb["sigmas"] * mo
      if c["thresholding"]:
        x0 = _threshold(x0, c["dynamic_thresholding_ratio"], c["sample_max_value"])
      return x0
    if pred == "epsilon":
      eps = mo
    elif pred == "sample":
      eps = (x - a * mo) / s
    else:
      eps = a * mo + s * x
    if c["thresholding"]:
      x0 = _threshold((x - s * eps) / a, c["dynamic_thresholding_ratio"], c["sample_max_value"])
      eps = (x - a * x0) / s
    return eps

  def step(self, plan, i, model_output, sample, state, rng=None):
    tb = {k: v[i] for k, v in plan.tables.items()}
    mo, x = _as_f32((model_output, sample))
    m0 = self._convert(tb, mo, x)
    m1, m2 = state["history"][1], state["history"][0]
    d1_0 = tb["inv_r0"] * (m0 - m1)
    d1_1 = tb["inv_r1"] * (m1 - m2)
    d1 = d1_0 + tb["k1"] * (d1_0 - d1_1)
    d2 = tb["k2"] * (d1_0 - d1_1)
    prev = tb["c_x"] * x + tb["c0"] * m0 + tb["c1"] * d1 + tb["c2"] * d2
    if self.needs_rng(plan):
      prev = prev + tb["c_noise"] * self._noise(rng, x)
    state = {"history": jnp.stack([m1, m0])}
    return prev.astype(sample.dtype), state


# ----------------------------------------------------------------------------- Euler

def _euler_timesteps_f32(spacing: str, T: int, n: int, offset: int) -> np.ndarray:
  if spacing == "linspace":
    return np.linspace(0, T - 1, n, dtype=F32)[::-1].copy()
  if spacing == "leading":
    ratio = T // n
    return (np.arange(0, n) * ratio).round()[::-1].copy().astype(F32) + F32(offset)
  return np.arange(T, 0, -(T / n)).round().copy().astype(F32) - F32(1)


class _EulerBase(Scheduler):
  """Shared k-diffusion plumbing: sigma tables, x / sqrt(sigma^2 + 1) model input."""
  RESCALE_SETS_LAST_ALPHA = True

  def _init_noise_sigma(self, sigmas: np.ndarray) -> float:
    max_sigma = sigmas.max()
    if self.config["timestep_spacing"] in ("linspace", "trailing"):
      return float(max_sigma)
    return float(np.sqrt(max_sigma * max_sigma + F32(1)))

  def _tables(self, sigmas: np.ndarray, n: int) -> Dict[str, np.ndarray]:
    s = sigmas[:n]
    return {"sigma": s, "sigma_next": sigmas[1:n + 1], "scale": np.sqrt(s * s + F32(1)),
            "v_out": -s / np.sqrt(s * s + F32(1)), "v_skip": s * s + F32(1)}

  def scale_model_input(self, plan, i, sample):
    return (sample.astype(jnp.float32) / plan.tables["scale"][i]).astype(sample.dtype)

  def _x0(self, tb, mo, x, sigma_hat):
    pred = self.config["prediction_type"]
    if pred in ("original_sample", "sample"):
      return mo
    if pred == "epsilon":
      return x - sigma_hat * mo
    return mo * tb["v_out"] + (x / tb["v_skip"])


class EulerDiscreteScheduler(_EulerBase):
  """Karras et al. 2022 Algorithm 2 with s_churn = 0 (deterministic Euler in sigma)."""
  class_name = "EulerDiscreteScheduler"
  DEFAULTS = {
      **_COMMON, "prediction_type": "epsilon", "interpolation_type": "linear",
      "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
      "sigma_min": None, "sigma_max": None, "timestep_spacing": "linspace",
      "timestep_type": "discrete", "steps_offset": 0, "rescale_betas_zero_snr": False,
      "final_sigmas_type": "zero",
  }
  PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "original_sample")

  def _validate(self):
    super()._validate()
    c = self.config
    if c["interpolation_type"] not in ("linear", "log_linear"):
      raise ConfigError(f"EulerDiscreteScheduler: interpolation_type "
                        f"{c['interpolation_type']!r} is not implemented; known: "
                        "['linear', 'log_linear'].")
    if c["final_sigmas_type"] not in ("zero", "sigma_min"):
      raise ConfigError(f"final_sigmas_type must be 'zero' or 'sigma_min', got "
                        f"{c['final_sigmas_type']!r}.")
    if sum(bool(c[k]) for k in ("use_beta_sigmas", "use_exponential_sigmas",
                                "use_karras_sigmas")) > 1:
      raise ConfigError("Only one of use_beta_sigmas, use_exponential_sigmas, "
                        "use_karras_sigmas can be set.")

  def plan(self, num_inference_steps: int, eta: float = 0.0) -> Plan:
    del eta
    c, T = self.config, self.num_train_timesteps
    n = self._check_steps(num_inference_steps)
    ts = _euler_timesteps_f32(c["timestep_spacing"], T, n, c["steps_offset"])
    ac = self.alphas_cumprod
    sigmas = np.sqrt((F32(1) - ac) / ac)
    log_sigmas = np.log(sigmas)
    if c["interpolation_type"] == "linear":
      sigmas = np.interp(ts, np.arange(0, len(sigmas)), sigmas)
    else:   # torch.linspace(log sigma_max, log sigma_min, n + 1).exp(), all float32
      sigmas = np.exp(torch_linspace_f32(np.log(sigmas[-1]), np.log(sigmas[0]), n + 1))
    smin, smax = c["sigma_min"], c["sigma_max"]
    if c["use_karras_sigmas"]:
      sigmas = _karras_sigmas(sigmas, n, smin, smax)
      ts = _sigma_to_t(sigmas, log_sigmas)
    elif c["use_exponential_sigmas"]:
      sigmas = _exponential_sigmas(sigmas, n, smin, smax)
      ts = _sigma_to_t(sigmas, log_sigmas)
    elif c["use_beta_sigmas"]:
      sigmas = _beta_sigmas(sigmas, n, smin, smax)
      ts = _sigma_to_t(sigmas, log_sigmas)
    last = np.sqrt((F32(1) - ac[0]) / ac[0]) if c["final_sigmas_type"] == "sigma_min" else 0
    sigmas = np.concatenate([sigmas, [last]]).astype(F32)
    if c["timestep_type"] == "continuous" and c["prediction_type"] == "v_prediction":
      ts = F32(0.25) * np.log(sigmas[:-1])
    ts = np.asarray(ts).astype(F32)
    return _make_plan(ts, self._tables(sigmas, len(ts)), num_inference_steps=n,
                      init_noise_sigma=self._init_noise_sigma(sigmas))

  def step(self, plan, i, model_output, sample, state, rng=None):
    tb = {k: v[i] for k, v in plan.tables.items()}
    mo, x = _as_f32((model_output, sample))
    sigma_hat = tb["sigma"] * 1.0   # sigma (gamma + 1) with s_churn = 0
    x0 = self._x0(tb, mo, x, sigma_hat)
    derivative = (x - x0) / sigma_hat
    prev = x + derivative * (tb["sigma_next"] - sigma_hat)
    return prev.astype(sample.dtype), state


class EulerAncestralDiscreteScheduler(_EulerBase):
  """Euler ancestral (k-diffusion `sample_euler_ancestral`, eta = 1): noise at every step."""
  class_name = "EulerAncestralDiscreteScheduler"
  DEFAULTS = {
      **_COMMON, "prediction_type": "epsilon", "timestep_spacing": "linspace",
      "steps_offset": 0, "rescale_betas_zero_snr": False,
  }
  PREDICTION_TYPES = ("epsilon", "v_prediction")

  def plan(self, num_inference_steps: int, eta: float = 0.0) -> Plan:
    del eta
    c, T = self.config, self.num_train_timesteps
    n = self._check_steps(num_inference_steps)
    ts = _euler_timesteps_f32(c["timestep_spacing"], T, n, c["steps_offset"])
    ac = self.alphas_cumprod
    sigmas = np.interp(ts, np.arange(0, len(ac)), np.sqrt((F32(1) - ac) / ac))
    sigmas = np.concatenate([sigmas, [0.0]]).astype(F32)
    tables = self._tables(sigmas, n)
    s_from, s_to = tables["sigma"], tables["sigma_next"]
    sigma_up = np.sqrt(s_to * s_to * (s_from * s_from - s_to * s_to) / (s_from * s_from))
    sigma_down = np.sqrt(s_to * s_to - sigma_up * sigma_up)
    tables.update(sigma_up=sigma_up, dt=sigma_down - s_from)
    return _make_plan(ts, tables, num_inference_steps=n,
                      init_noise_sigma=self._init_noise_sigma(sigmas))

  def needs_rng(self, plan):
    return True

  def step(self, plan, i, model_output, sample, state, rng=None):
    tb = {k: v[i] for k, v in plan.tables.items()}
    mo, x = _as_f32((model_output, sample))
    x0 = self._x0(tb, mo, x, tb["sigma"])
    derivative = (x - x0) / tb["sigma"]
    prev = x + derivative * tb["dt"]
    prev = prev + self._noise(rng, x) * tb["sigma_up"]
    return prev.astype(sample.dtype), state


# ----------------------------------------------------------------------------- registry

SCHEDULERS: Dict[str, type] = {cls.class_name: cls for cls in (
    DDIMScheduler, DDPMScheduler, PNDMScheduler, DPMSolverMultistepScheduler,
    EulerDiscreteScheduler, EulerAncestralDiscreteScheduler)}

ALIASES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "plms": "PNDMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpm_solver": "DPMSolverMultistepScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
}


def resolve_name(name: str) -> str:
  """An alias or class name -> the class name; unknown -> ConfigError listing the known ones."""
  class_name = ALIASES.get(name, name)
  if class_name not in SCHEDULERS:
    raise ConfigError(f"unknown scheduler {name!r}; known classes: {sorted(SCHEDULERS)}, "
                      f"aliases: {sorted(ALIASES)}.")
  return class_name


def from_config(config: Mapping[str, Any], name: Optional[str] = None) -> Scheduler:
  """The scheduler of a `scheduler_config.json` dict, or class/alias `name` built from it.

  As diffusers' `Class.from_config(config)`: the class takes the config's values of its own
  `__init__` keys, except those named in `_use_default_values` (they take the class default,
  as do missing keys); every other key is kept in `scheduler.config` but unused.
  """
  if not isinstance(config, Mapping):
    raise ConfigError(f"a scheduler config must be a dict, got {type(config).__name__}.")
  if name is None:
    if "_class_name" not in config:
      raise ConfigError("the scheduler config has no _class_name: pass a scheduler name "
                        f"(one of {sorted(SCHEDULERS)} or an alias {sorted(ALIASES)}).")
    name = config["_class_name"]
  cls = SCHEDULERS[resolve_name(name)]
  used_defaults = set(config.get("_use_default_values") or ())
  kept = {k: v for k, v in config.items() if k not in used_defaults and k != "_use_default_values"}
  init_values = {k: v for k, v in kept.items() if k in cls.DEFAULTS}
  hidden = {k: v for k, v in kept.items() if k not in cls.DEFAULTS}
  return cls(init_values, hidden)


def load_scheduler(directory: str, name: Optional[str] = None) -> Scheduler:
  """Reads DIRECTORY/scheduler_config.json (or the json file itself) and builds the scheduler."""
  path = directory if os.path.isfile(directory) else os.path.join(directory,
                                                                  "scheduler_config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"{path} not found: pass a diffusers scheduler folder (the pipeline's "
                      "scheduler/ subfolder, holding scheduler_config.json).")
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} is not valid JSON ({e}); fetch the file again.") from None
  return from_config(config, name)


def denoise(scheduler: Scheduler, plan: Plan, model_fn: Callable[[jax.Array, jax.Array],
                                                                 jax.Array],
            latents: jax.Array, rng: Optional[jax.Array] = None) -> jax.Array:
  """diffusers' denoising loop as one `lax.scan` over the plan's evaluations.

  At evaluation i: t = plan.timesteps[i]; out = model_fn(scale_model_input(x), t) with t a
  scalar array (int32, float32 for the Euler types); x = step(out, x) with key fold_in(rng, i).
  `latents` are the initial noisy latents, already multiplied by `plan.init_noise_sigma`.
  """
  if rng is None and scheduler.needs_rng(plan):
    raise ConfigError(f"{scheduler.class_name} with this config is stochastic: pass rng.")

  def body(carry, i):
    x, state = carry
    out = model_fn(scheduler.scale_model_input(plan, i, x), plan.timesteps[i])
    key = None if rng is None else jax.random.fold_in(rng, i)
    x, state = scheduler.step(plan, i, out, x, state, key)
    return (x, state), None

  (x, _), _ = jax.lax.scan(body, (latents, scheduler.init_state(plan, latents)),
                           jnp.arange(plan.n_evals))
  return x

