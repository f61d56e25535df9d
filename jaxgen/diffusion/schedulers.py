"""diffusers' schedulers in JAX, driven by a `scheduler_config.json` dict (diffusers 0.42.1).

For published pipelines: `from_config(config)` builds the class named by `config["_class_name"]`
(or by `name`: an alias of `ALIASES` or a class name, as diffusers'
`OtherScheduler.from_config(config)`), `plan(num_inference_steps)` precomputes every table
diffusers' `set_timesteps` and `step` compute, and `step` applies one update. The whole loop is
one `lax.scan` (`denoise`), jit-compatible with a traced step index.

Classes: DDIMScheduler, DDPMScheduler, PNDMScheduler (PLMS with or without the PRK warm-up),
DPMSolverMultistepScheduler (dpmsolver++ / dpmsolver / sde-dpmsolver++ / sde-dpmsolver, orders
1-3, midpoint / heun), DPMSolverSinglestepScheduler (diffusers' blocks of orders 1-3),
UniPCMultistepScheduler (bh1 / bh2 predictor-corrector, any order, x0 or noise prediction),
EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler and
KDPM2DiscreteScheduler (two evaluations per step but the last: 2n - 1 timesteps, repeated or
interleaved as diffusers' set_timesteps lists them) and LMSDiscreteScheduler (linear
multistep, its integrated coefficients precomputed).

Conventions matched (diffusers' own, not jaxgen's training convention):
* Tables as diffusers builds them: betas in float32 (torch's float32 `linspace`, reproduced
  bit for bit by `torch_linspace_f32`; squaredcos_cap_v2 from `schedules.cosine_betas`, the same
  float64 maths), `alphas_cumprod` accumulated in float64 and rounded to float32 (torch's CPU
  cumprod), sigma tables with diffusers' numpy code. Timesteps equal `scheduler.timesteps`
  after `set_timesteps` (int32 here; float32 for the k-diffusion types: Euler, Heun, LMS,
  KDPM2); per-step scalars are float32 numpy ops in diffusers' order, so a loop matches
  diffusers' to float32 rounding (~1e-6; noise-prediction solvers such as UniPC with
  predict_x0=false amplify it, as in diffusers' own float32 vs float64 loops).
* The step counter is the evaluation index, as diffusers' `step_index` from the first
  timestep; a schedule that counter cannot run (first timestep repeated: diffusers fails
  mid-loop) is a ConfigError at `plan`. `plan` changes no state, except that
  DPMSolverSinglestepScheduler switches `lower_order_final` on in its config, as diffusers'
  set_timesteps registers it.
* Config semantics of diffusers' ConfigMixin: a class takes the keys of its `__init__`, except
  those listed in `_use_default_values`; its defaults fill the rest; other keys are kept in
  `config` (diffusers registers them too) but unused. `Scheduler.config` mirrors diffusers'
  `scheduler.config`, so `from_config(s.config, name)` == `Other.from_config(s.config)`.
* Arrays: any layout, batch first; the only channel-wise operation, splitting a learned
  variance (DDPM "learned"/"learned_range", DPM-Solver's `variance_type`), uses the LAST axis
  (jaxgen's NHWC; diffusers splits axis 1 of NCHW).
* Noise: a stochastic step (DDPM, Euler ancestral, DDIM with eta > 0, SDE DPM-Solver) draws
  `jax.random.normal(rng, sample.shape, float32)` from the key it is given, or with one key per
  row (a (B,) batch of keys) row b's noise from key b; `denoise` passes `fold_in(rng, i)` at
  evaluation i. Same distribution as diffusers, not torch's stream.
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


def _alpha_bar_betas(alpha_bar: Callable[[float], float], num_steps: int,
                     max_beta: float = 0.999) -> np.ndarray:
  """diffusers' `betas_for_alpha_bar`: python-float maths, rounded to float32 at the end."""
  return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                   for i in range(num_steps)], F32)


def _laplace_alpha_bar(t: float) -> float:
  """alpha_transform_type="laplace" (DDPM's beta_schedule "laplace")."""
  lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
  snr = math.exp(lmb)
  return math.sqrt(snr / (1 + snr))


def _exp_alpha_bar(t: float) -> float:
  """alpha_transform_type="exp" (Heun's beta_schedule "exp")."""
  return math.exp(t * -12.0)


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
  import scipy.stats  # pylint: disable=g-import-not-at-top  (on use: a slow import)
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


def _check_sigma_spacing(c: Mapping[str, Any]):
  """At most one of the karras / exponential / beta sigma spacings."""
  if sum(bool(c[k]) for k in ("use_beta_sigmas", "use_exponential_sigmas",
                              "use_karras_sigmas")) > 1:
    raise ConfigError("Only one of use_beta_sigmas, use_exponential_sigmas, "
                      "use_karras_sigmas can be set.")


def _check_sigma_options(c: Mapping[str, Any]):
  """DPM-Solver / UniPC / Euler: one final sigma rule, at most one sigma spacing."""
  if c["final_sigmas_type"] not in ("zero", "sigma_min"):
    raise ConfigError(f"final_sigmas_type must be 'zero' or 'sigma_min', got "
                      f"{c['final_sigmas_type']!r}.")
  _check_sigma_spacing(c)


def _respaced_sigmas(c: Mapping[str, Any], in_sigmas: np.ndarray, n: int,
                     karras_range: bool = True) -> Optional[np.ndarray]:
  """The karras / exponential / beta sigmas the config asks for over `in_sigmas`' range
  (descending), else None. The range comes from the config's sigma_min / sigma_max where set
  (diffusers reads them with hasattr: a class's own keys or ones carried along); LMS's karras
  conversion ignores them (`karras_range=False`)."""
  smin, smax = c.get("sigma_min"), c.get("sigma_max")
  if c["use_karras_sigmas"]:
    return _karras_sigmas(in_sigmas, n, *((smin, smax) if karras_range else (None, None)))
  if c["use_exponential_sigmas"]:
    return _exponential_sigmas(in_sigmas, n, smin, smax)
  if c["use_beta_sigmas"]:
    return _beta_sigmas(in_sigmas, n, smin, smax)
  return None


def _check_first_timestep(timesteps: np.ndarray, class_name: str):
  """The step-index schedulers (DPM-Solver, UniPC, the k-diffusion ones) start their counter
  at the second match of the first timestep (for img2img's partial schedules); a schedule
  whose first timestep repeats then runs past its end in diffusers (IndexError / assertion)."""
  if np.count_nonzero(np.asarray(timesteps) == timesteps[0]) > 1:
    raise ConfigError(f"{class_name}: the first timestep {timesteps[0]} repeats in "
                      f"{np.asarray(timesteps).tolist()[:8]}..., which diffusers' step counter "
                      "cannot run (it fails too): use fewer steps or another sigma spacing.")


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
    if self.RESCALE_SETS_LAST_ALPHA and self._own("rescale_betas_zero_snr"):
      self.alphas_cumprod[-1] = F32(2.0 ** -24)

  def __repr__(self):
    return f"{self.class_name}({', '.join(f'{k}={self.config[k]!r}' for k in self.DEFAULTS)})"

  # -- config
  def _own(self, key: str) -> Any:
    """A key of this class's `__init__` (None for another class's key carried along: a PNDM
    built from a DDIM config with rescale_betas_zero_snr does not rescale, as in diffusers)."""
    return self.config[key] if key in self.DEFAULTS else None

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
    if self._own("timestep_spacing") is not None and c["timestep_spacing"] not in SPACINGS:
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
      betas = _alpha_bar_betas(_laplace_alpha_bar, n)
    elif c["beta_schedule"] == "exp":
      betas = _alpha_bar_betas(_exp_alpha_bar, n)
    else:  # sigmoid (DDPM)
      x = torch_linspace_f32(-6, 6, n)
      betas = (F32(1) / (F32(1) + np.exp(-x))) * F32(c["beta_end"] - c["beta_start"]) + F32(
          c["beta_start"])
    if self._own("rescale_betas_zero_snr"):
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
    rng = jnp.asarray(rng)
    typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    if rng.ndim == (1 if typed else 2):  # One key per row.
      return jax.vmap(lambda k: jax.random.normal(k, sample.shape[1:], jnp.float32))(rng)
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

def _solver_timesteps(spacing: str, last: int, T: int, n: int, offset: int) -> np.ndarray:
  """DPM-Solver / UniPC timesteps (int64, descending): n + 1 grid points less the last one;
  `last` is T less the timesteps cut by lambda_min_clipped."""
  if spacing == "linspace":
    return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
  if spacing == "leading":
    ratio = last // (n + 1)
    return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + offset
  return np.arange(last, 0, -(T / n)).round().copy().astype(np.int64) - 1


def _vp_alpha_sigma(sigma: np.ndarray, flow: bool) -> Tuple[np.ndarray, np.ndarray]:
  """diffusers' `_sigma_to_alpha_sigma_t` in float32: (1 - s, s) for flow sigmas, else the
  variance-preserving (1 / sqrt(s^2 + 1), s / sqrt(s^2 + 1))."""
  if flow:
    return F32(1) - sigma, sigma
  alpha = F32(1) / np.sqrt(sigma * sigma + F32(1))
  return alpha, sigma * alpha


def _dpm_coefficients(algo: str, heun: bool, order: int, a_t, s_t, a_s, s_s, h
                      ) -> Dict[str, np.float32]:
  """DPM-Solver(++) update coefficients from (alpha_s, sigma_s) to (alpha_t, sigma_t) over the
  log-SNR step h, each in diffusers' float32 expression order.

  x' = c_x x + c0 D0 + c1 D1 + c2 D2 (+ c_noise z), with the caller's D terms (multistep and
  singlestep build them differently). Order 3 is multistep's update and singlestep's "heun"
  one (singlestep's "midpoint" uses c1 alone, on its D1_1).
  """
  one, two, half = F32(1), F32(2), F32(0.5)
  e_mh, e_h, e_m2h = np.exp(-h), np.exp(h), np.exp(F32(-2.0) * h)
  row = {}
  if algo == "dpmsolver++":
    row["c_x"], row["c0"] = s_t / s_s, -(a_t * (e_mh - one))
  elif algo == "dpmsolver":
    row["c_x"], row["c0"] = a_t / a_s, -(s_t * (e_h - one))
  elif algo == "sde-dpmsolver++":
    row["c_x"], row["c0"] = s_t / s_s * e_mh, a_t * (one - e_m2h)
    row["c_noise"] = s_t * np.sqrt(one - e_m2h)
  else:
    row["c_x"], row["c0"] = a_t / a_s, -(two * (s_t * (e_h - one)))
    row["c_noise"] = s_t * np.sqrt(np.exp(two * h) - one)
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
  if order == 3:
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
      raise ConfigError(f"{self.class_name}: algorithm_type {c['algorithm_type']!r} is not "
                        f"implemented; known: {list(self.ALGORITHMS)}.")
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
      raise ConfigError(f"{self.class_name}: solver_type {c['solver_type']!r} is not "
                        "implemented; known: ['midpoint', 'heun'].")
    if int(c["solver_order"]) not in (1, 2, 3):
      raise ConfigError(f"{self.class_name}: solver_order must be 1, 2 or 3, got "
                        f"{c['solver_order']}.")
    _check_sigma_options(c)
    if "++" not in c["algorithm_type"] and c["prediction_type"] == "flow_prediction":
      raise ConfigError("prediction_type 'flow_prediction' needs algorithm_type dpmsolver++ or "
                        "sde-dpmsolver++.")
    if c["use_dynamic_shifting"]:
      raise ConfigError("use_dynamic_shifting needs a per-call `mu` (flow models); not "
                        "supported here: set use_dynamic_shifting=false.")

  def _grid(self) -> Tuple[str, int, bool, bool]:
    """(timestep spacing, steps_offset, use_lu_lambdas, whether karras timesteps are rounded)."""
    c = self.config
    return (c["timestep_spacing"], c["steps_offset"], c["use_lu_lambdas"],
            c["beta_schedule"] != "squaredcos_cap_v2")

  def _sigmas_and_timesteps(self, n: int) -> Tuple[np.ndarray, np.ndarray]:
    c, T = self.config, self.num_train_timesteps
    ac = self.alphas_cumprod
    with np.errstate(divide="ignore"):
      lambda_t = np.log(np.sqrt(ac)) - np.log(np.sqrt(F32(1) - ac))
    clipped_idx = int(np.searchsorted(lambda_t[::-1], F32(c["lambda_min_clipped"])))
    spacing, offset, lu_lambdas, round_karras = self._grid()
    ts = _solver_timesteps(spacing, T - clipped_idx, T, n, offset)
    sigmas = np.sqrt((F32(1) - ac) / ac)
    log_sigmas = np.log(sigmas)
    respaced = _respaced_sigmas(c, np.flip(sigmas).copy(), n)
    if lu_lambdas and not c["use_karras_sigmas"]:   # diffusers: karras, then lu, then the rest
      lambdas = np.flip(log_sigmas.copy())
      lmin, lmax = lambdas[-1].item(), lambdas[0].item()
      sigmas = np.exp(lmax + np.linspace(0, 1, n) * (lmin - lmax))
      ts = _sigma_to_t(sigmas, log_sigmas)
      ts = ts.round() if round_karras else ts
    elif respaced is not None:
      sigmas = respaced
      ts = _sigma_to_t(sigmas, log_sigmas)
      ts = ts.round() if c["use_karras_sigmas"] and round_karras else ts
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
    return _vp_alpha_sigma(sigma, self.config["use_flow_sigmas"])

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
    one = F32(1)
    h = lam[i + 1] - lam[i]
    row = _dpm_coefficients(algo, heun, order, alpha[i + 1], sigma[i + 1], alpha[i], sigma[i], h)
    if order >= 2:
      r0 = (lam[i] - lam[i - 1]) / h
      row["inv_r0"] = one / r0
    if order == 3:   # (solver_type plays no part at third order)
      r1 = (lam[i - 1] - lam[i - 2]) / h
      row.update(inv_r1=one / r1, k1=r0 / (r0 + r1), k2=one / (r0 + r1))
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
    _check_first_timestep(ts, self.class_name)
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


class DPMSolverSinglestepScheduler(DPMSolverMultistepScheduler):
  """Lu et al. 2022 singlestep DPM-Solver / DPM-Solver++ (orders 1-3) and SDE-DPM-Solver++.

  diffusers' order list groups the steps into blocks of orders 1, 2(, 3); a block's order-k
  step restarts from the sample at the block's start and uses the k outputs taken inside it
  (D0 = the block's first output; D1, D2 from the later ones over the block's log-SNR span).
  The plan holds each step's order and coefficients (`_dpm_coefficients`, zeros for unused
  terms); conversions and the sigma grid are the multistep class's (linspace timesteps only).
  """
  class_name = "DPMSolverSinglestepScheduler"
  DEFAULTS = {
      **_COMMON, "solver_order": 2, "prediction_type": "epsilon", "thresholding": False,
      "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0,
      "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": False,
      "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
      "use_flow_sigmas": False, "flow_shift": 1.0, "final_sigmas_type": "zero",
      "lambda_min_clipped": -float("inf"), "variance_type": None,
      "use_dynamic_shifting": False, "time_shift_type": "exponential",
  }
  ALGORITHMS = ("dpmsolver", "dpmsolver++", "sde-dpmsolver++")
  RESCALE_SETS_LAST_ALPHA = False

  def _validate(self):
    super()._validate()
    if self.config["algorithm_type"] == "dpmsolver" and self.config["thresholding"]:
      raise ConfigError("DPMSolverSinglestepScheduler: thresholding with algorithm_type "
                        "'dpmsolver' fails in diffusers (it indexes alpha_t by a timestep it "
                        "is not given): use algorithm_type 'dpmsolver++' or thresholding=false.")

  def _grid(self):
    return "linspace", 0, False, True

  def _order_list(self, n: int) -> list:
    """diffusers' get_order_list(n)."""
    c = self.config
    order = int(c["solver_order"])
    if c["lower_order_final"]:
      if order == 3:
        tail = {0: [1, 2, 1], 1: [1], 2: [1, 2]}[n % 3]
        orders = [1, 2, 3] * (n // 3 - (n % 3 == 0)) + tail
      elif order == 2:
        orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
      else:
        orders = [1] * n
    else:
      orders = {3: [1, 2, 3] * (n // 3), 2: [1, 2] * (n // 2), 1: [1] * n}[order]
    if c["final_sigmas_type"] == "zero":
      orders[-1] = 1
    return orders

  def _step_row(self, order: int, j: int, alpha, sigma, lam) -> Dict[str, np.float32]:
    """Step j's coefficients; its block started at step j - order + 1."""
    algo, heun = self.config["algorithm_type"], self.config["solver_type"] == "heun"
    one = F32(1)
    start = j - order + 1
    h = lam[j + 1] - lam[start]
    row = _dpm_coefficients(algo, heun, order, alpha[j + 1], sigma[j + 1], alpha[start],
                            sigma[start], h)
    if order >= 2:
      r0 = (lam[j] - lam[start]) / h
      row["inv_r0"] = one / r0
    if order == 3:
      r1 = (lam[j - 1] - lam[start]) / h
      row.update(inv_r1=one / r1, r0=r0, r1=r1, r_diff=r0 - r1)
      if not heun:   # midpoint: D1_1 alone
        row["c2"] = F32(0)
    return row

  def plan(self, num_inference_steps: int, eta: float = 0.0) -> Plan:
    del eta
    c = self.config
    n = self._check_steps(num_inference_steps)
    # diffusers' set_timesteps switches lower_order_final on for good (register_to_config)
    # when the steps do not fill whole blocks or the last sigma is zero.
    if not c["lower_order_final"] and (n % int(c["solver_order"]) != 0
                                       or c["final_sigmas_type"] == "zero"):
      c["lower_order_final"] = True
    sigmas, ts = self._sigmas_and_timesteps(n)
    orders = self._order_list(n)
    alpha, sigma = self._alpha_sigma(sigmas)
    keys = ("c_x", "c0", "c1", "c2", "c_noise", "inv_r0", "inv_r1", "r0", "r1", "r_diff")
    tables = {k: np.zeros(len(ts), F32) for k in keys}
    tables["r_diff"][:] = 1   # unused below order 3; 1 keeps the traced quotient finite
    tables["order"] = np.zeros(len(ts), np.int32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
      lam = np.log(alpha) - np.log(sigma)
      for j in range(len(ts)):
        order = min(orders[j], j + 1)   # diffusers lowers it while outputs are missing
        tables["order"][j] = order
        for k, v in self._step_row(order, j, alpha, sigma, lam).items():
          tables[k][j] = v
    tables.update(alpha=alpha[:n], sigma=sigma[:n], sigmas=sigmas[:n])
    _check_first_timestep(ts, self.class_name)
    return _make_plan(ts, tables, num_inference_steps=n)

  def init_state(self, plan, sample):
    return {"history": jnp.zeros((2,) + sample.shape, jnp.float32),
            "sample": jnp.zeros(sample.shape, jnp.float32)}

  def step(self, plan, i, model_output, sample, state, rng=None):
    tb = {k: v[i] for k, v in plan.tables.items()}
    mo, x = _as_f32((model_output, sample))
    m0 = self._convert(tb, mo, x)
    m1, m2 = state["history"][1], state["history"][0]
    order = tb["order"]
    start = jnp.where(order == 1, x, state["sample"])   # the block's first sample
    d0 = jnp.where(order == 1, m0, jnp.where(order == 2, m1, m2))
    d1_1 = tb["inv_r0"] * (m0 - jnp.where(order == 2, m1, m2))   # order 2: D1
    prev = tb["c_x"] * start + tb["c0"] * d0
    if self.config["solver_type"] == "heun":
      d1_0 = tb["inv_r1"] * (m1 - m2)
      d1 = jnp.where(order == 3, (tb["r0"] * d1_0 - tb["r1"] * d1_1) / tb["r_diff"], d1_1)
      d2 = 2.0 * (d1_1 - d1_0) / tb["r_diff"]
      prev = prev + tb["c1"] * d1 + tb["c2"] * d2
    else:
      prev = prev + tb["c1"] * d1_1
    if self.needs_rng(plan):
      prev = prev + tb["c_noise"] * self._noise(rng, x)
    return prev.astype(sample.dtype), {"history": jnp.stack([m1, m0]), "sample": start}


# ----------------------------------------------------------------------------- UniPC

class UniPCMultistepScheduler(Scheduler):
  """Zhao et al. 2023 UniPC: a multistep predictor (UniP) and a corrector (UniC) that, from the
  second step on, redoes the previous update with the new model output (no extra evaluation);
  bh1 / bh2 B(h), any solver order, data (predict_x0) or noise prediction.

  Predictor and corrector over one interval (sigma_i -> sigma_{i+1}) share its coefficients:
  x' = c_x x_i + c_m m_i - c_res (sum_k rho_k D_k [+ rho_t (m_{i+1} - m_i)]), with
  D_k = (m_{i-k} - m_i) / r_k. The plan holds, per step, the predictor's interval (r_k, and rho
  = 0.5 at order 2 or the solve of diffusers' R system) and, shifted by one, the corrector's
  (rho = the full system's solve, 0.5 at order 1); zeros beyond the order. A zero final sigma
  with solver_type bh1, predict_x0=false or lower_order_final=false gives NaN, as in diffusers.
  """
  class_name = "UniPCMultistepScheduler"
  DEFAULTS = {
      **_COMMON, "solver_order": 2, "prediction_type": "epsilon", "thresholding": False,
      "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "predict_x0": True,
      "solver_type": "bh2", "lower_order_final": True, "disable_corrector": [],
      "solver_p": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
      "use_beta_sigmas": False, "use_flow_sigmas": False, "flow_shift": 1.0,
      "timestep_spacing": "linspace", "steps_offset": 0, "final_sigmas_type": "zero",
      "rescale_betas_zero_snr": False, "use_dynamic_shifting": False,
      "time_shift_type": "exponential", "sigma_min": None, "sigma_max": None,
      "shift_terminal": None,
  }
  PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
  RESCALE_SETS_LAST_ALPHA = True

  def _post_init(self):
    c = self.config
    if c["solver_type"] in ("midpoint", "heun", "logrho"):   # registered as bh2, as diffusers
      c["solver_type"] = "bh2"

  def _validate(self):
    super()._validate()
    c = self.config
    if c["solver_type"] not in ("bh1", "bh2"):
      raise ConfigError(f"UniPCMultistepScheduler: solver_type {c['solver_type']!r} is not "
                        "implemented; known: ['bh1', 'bh2'].")
    if int(c["solver_order"]) < 1:
      raise ConfigError(f"UniPCMultistepScheduler: solver_order must be >= 1, got "
                        f"{c['solver_order']}.")
    _check_sigma_options(c)
    if c["solver_p"] is not None:
      raise ConfigError("UniPCMultistepScheduler: solver_p (another scheduler as the "
                        "predictor) is not supported: set solver_p to null.")
    if c["use_dynamic_shifting"]:
      raise ConfigError("use_dynamic_shifting needs a per-call `mu` (diffusers raises without "
                        "one): set use_dynamic_shifting=false.")
    if c["shift_terminal"] is not None and not c["use_flow_sigmas"]:
      raise ConfigError("shift_terminal is only supported with use_flow_sigmas=true.")
    if not c["predict_x0"] and c["prediction_type"] == "flow_prediction":
      raise ConfigError("prediction_type 'flow_prediction' needs predict_x0=true.")

  def _sigmas_and_timesteps(self, n: int) -> Tuple[np.ndarray, np.ndarray]:
    c, T = self.config, self.num_train_timesteps
    ac = self.alphas_cumprod
    ts = _solver_timesteps(c["timestep_spacing"], T, T, n, c["steps_offset"])
    sigmas = np.sqrt((F32(1) - ac) / ac)
    log_sigmas = np.log(sigmas)
    respaced = _respaced_sigmas(c, np.flip(sigmas).copy(), n)
    if respaced is not None:
      sigmas = respaced
      if c["use_karras_sigmas"] and c["use_flow_sigmas"]:
        sigmas = sigmas / (sigmas + 1)
        ts = (sigmas * T).copy()
      else:
        ts = _sigma_to_t(sigmas, log_sigmas)
        ts = ts.round() if c["use_karras_sigmas"] else ts
      sigma_min = sigmas[-1]
    elif c["use_flow_sigmas"]:
      sigmas = np.linspace(1, 1 / T, n + 1)[:-1]
      shift = c["flow_shift"]
      sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
      if c["shift_terminal"]:   # stretch_shift_to_terminal
        one_minus_z = 1 - sigmas
        sigmas = 1 - (one_minus_z / (one_minus_z[-1] / (1 - c["shift_terminal"])))
      if np.fabs(sigmas[0] - 1) < 1e-6:
        sigmas[0] -= 1e-6
      ts = (sigmas * T).copy()
      sigma_min = sigmas[-1]
    else:
      sigmas = np.interp(ts, np.arange(0, len(sigmas)), sigmas)
      sigma_min = np.sqrt((F32(1) - ac[0]) / ac[0])
    last = sigma_min if c["final_sigmas_type"] == "sigma_min" else 0
    return np.concatenate([sigmas, [last]]).astype(F32), np.asarray(ts).astype(np.int64)

  def _interval(self, i: int, order: int, alpha, sigma, lam) -> Dict[str, Any]:
    """Interval i's coefficients at `order`, in diffusers' float32 order (multistep_uni_*)."""
    c = self.config
    one = F32(1)
    a_t, s_t, a_s, s_s = alpha[i + 1], sigma[i + 1], alpha[i], sigma[i]
    h = lam[i + 1] - lam[i]
    rks = np.array([(lam[i - k] - lam[i]) / h for k in range(1, order)] + [one], F32)
    hh = -h if c["predict_x0"] else h
    h_phi_1 = np.expm1(hh)
    h_phi_k = h_phi_1 / hh - one
    b_h = hh if c["solver_type"] == "bh1" else np.expm1(hh)
    r_rows, b = [], []
    factorial_i = 1
    for k in range(1, order + 1):
      r_rows.append(rks ** (k - 1))
      b.append(h_phi_k * factorial_i / b_h)
      factorial_i *= k + 1
      h_phi_k = h_phi_k / hh - F32(1 / factorial_i)
    r_mat, b = np.stack(r_rows).astype(F32), np.array(b, F32)
    try:
      rho_p = (np.array([0.5], F32) if order == 2 else
               np.linalg.solve(r_mat[:-1, :-1], b[:-1]) if order > 2 else np.zeros(0, F32))
      rho_c = np.array([0.5], F32) if order == 1 else np.linalg.solve(r_mat, b)
    except np.linalg.LinAlgError:
      raise ConfigError(f"UniPCMultistepScheduler: repeated sigmas around step {i} make the "
                        "solver's system singular (diffusers' torch.linalg.solve fails too): "
                        "use fewer steps or another sigma spacing.") from None
    out_scale = a_t if c["predict_x0"] else s_t
    return {"c_x": s_t / s_s if c["predict_x0"] else a_t / a_s,
            "c_m": -(out_scale * h_phi_1), "c_res": out_scale * b_h,
            "rk": rks[:-1], "rho_p": rho_p.astype(F32), "rho_c": rho_c.astype(F32)}

  def plan(self, num_inference_steps: int, eta: float = 0.0) -> Plan:
    del eta
    c = self.config
    sigmas, ts = self._sigmas_and_timesteps(self._check_steps(num_inference_steps))
    n = len(ts)
    alpha, sigma = _vp_alpha_sigma(sigmas, c["use_flow_sigmas"])
    K = int(c["solver_order"])
    disabled = set(int(k) for k in c["disable_corrector"])
    pred = {k: np.zeros(n, F32) for k in ("c_x", "c_m", "c_res")}
    pred.update(rk=np.ones((n, K - 1), F32), rho_p=np.zeros((n, K - 1), F32))
    corr = {k: np.zeros(n, F32) for k in ("cc_x", "cc_m", "cc_res", "rho_t")}
    corr.update(c_rk=np.ones((n, K - 1), F32), rho_c=np.zeros((n, K - 1), F32),
                corr=np.zeros(n, np.int32))
    # A zero final sigma makes the last lambda infinite: expm1(-inf) = -1, the exact limit.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
      lam = np.log(alpha) - np.log(sigma)
      for i in range(n):
        order = min(K, n - i if c["lower_order_final"] else K, i + 1)
        row = self._interval(i, order, alpha, sigma, lam)
        for k in ("c_x", "c_m", "c_res"):
          pred[k][i] = row[k]
        pred["rk"][i, :order - 1] = row["rk"]
        pred["rho_p"][i, :order - 1] = row["rho_p"]
        if i + 1 < n:   # the next step's corrector redoes this interval at this order
          for k in ("c_x", "c_m", "c_res"):
            corr["c" + k][i + 1] = row[k]
          corr["c_rk"][i + 1, :order - 1] = row["rk"]
          corr["rho_c"][i + 1, :order - 1] = row["rho_c"][:-1]
          corr["rho_t"][i + 1] = row["rho_c"][-1]
          corr["corr"][i + 1] = i not in disabled
    tables = {**pred, **corr, "alpha": alpha[:n], "sigma": sigma[:n], "sigmas": sigmas[:n]}
    _check_first_timestep(ts, self.class_name)
    return _make_plan(ts, tables, num_inference_steps=n)

  def init_state(self, plan, sample):
    K = int(self.config["solver_order"])
    return {"history": jnp.zeros((K,) + sample.shape, jnp.float32),
            "last_sample": jnp.zeros(sample.shape, jnp.float32)}

  def _convert(self, tb, mo, x):
    """diffusers' convert_model_output: x0 (predict_x0) or the noise."""
    c = self.config
    a, s = tb["alpha"], tb["sigma"]
    pred = c["prediction_type"]
    if c["predict_x0"]:
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
      return mo
    if pred == "sample":
      return (x - a * mo) / s
    return a * mo + s * x

  def step(self, plan, i, model_output, sample, state, rng=None):
    tb = {k: v[i] for k, v in plan.tables.items()}
    mo, x = _as_f32((model_output, sample))
    m = self._convert(tb, mo, x)
    history = state["history"]   # m_{i-K} .. m_{i-1}
    K = history.shape[0]

    def residual(rho, rk, outputs, m_ref):
      res = jnp.zeros_like(m_ref)
      for k in range(1, K):
        res = res + rho[k - 1] * ((outputs[-1 - k] - m_ref) / rk[k - 1])
      return res

    # UniC: x_i again, from x_{i-1} over interval i-1, with m_i (the uncorrected x_i's output).
    m_prev = history[-1]
    res = residual(tb["rho_c"], tb["c_rk"], history, m_prev)
    corrected = (tb["cc_x"] * state["last_sample"] + tb["cc_m"] * m_prev
                 - tb["cc_res"] * (res + tb["rho_t"] * (m - m_prev)))
    x = jnp.where(tb["corr"] > 0, corrected, x)
    # UniP: x_{i+1} from the (corrected) x_i.
    history = jnp.concatenate([history[1:], m[None]])
    res = residual(tb["rho_p"], tb["rk"], history, m)
    prev = tb["c_x"] * x + tb["c_m"] * m - tb["c_res"] * res
    return prev.astype(sample.dtype), {"history": history, "last_sample": x}


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

  @staticmethod
  def _input_tables(s: np.ndarray) -> Dict[str, np.ndarray]:
    """The sigma of each evaluation, its model-input scale and v-prediction factors."""
    return {"sigma": s, "scale": np.sqrt(s * s + F32(1)), "v_out": -s / np.sqrt(s * s + F32(1)),
            "v_skip": s * s + F32(1)}

  def _tables(self, sigmas: np.ndarray, n: int) -> Dict[str, np.ndarray]:
    return {**self._input_tables(sigmas[:n]), "sigma_next": sigmas[1:n + 1]}

  def _k_sigmas(self, n: int, karras_range: bool = True, round_karras: bool = False
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Heun / LMS / KDPM2 set_timesteps: (n sigmas and a final 0 in float32, the n timesteps,
    the train log-sigmas), sigmas interpolated at the timesteps or respaced over their range."""
    c, T = self.config, self.num_train_timesteps
    ts = _euler_timesteps_f32(c["timestep_spacing"], T, n, c["steps_offset"])
    ac = self.alphas_cumprod
    sigmas = np.sqrt((F32(1) - ac) / ac)
    log_sigmas = np.log(sigmas)
    sigmas = np.interp(ts, np.arange(0, len(sigmas)), sigmas)
    respaced = _respaced_sigmas(c, sigmas, n, karras_range)
    if respaced is not None:
      sigmas = respaced
      ts = _sigma_to_t(sigmas, log_sigmas)
      ts = ts.round() if round_karras and c["use_karras_sigmas"] else ts
    return np.concatenate([sigmas, [0.0]]).astype(F32), ts, log_sigmas

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
    _check_sigma_options(c)

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
    respaced = _respaced_sigmas(c, sigmas, n)
    if respaced is not None:
      sigmas = respaced
      ts = _sigma_to_t(sigmas, log_sigmas)
    last = np.sqrt((F32(1) - ac[0]) / ac[0]) if c["final_sigmas_type"] == "sigma_min" else 0
    sigmas = np.concatenate([sigmas, [last]]).astype(F32)
    if c["timestep_type"] == "continuous" and c["prediction_type"] == "v_prediction":
      ts = F32(0.25) * np.log(sigmas[:-1])
    ts = np.asarray(ts).astype(F32)
    _check_first_timestep(ts, self.class_name)
    return _make_plan(ts, self._tables(sigmas, len(ts)), num_inference_steps=n,
                      init_noise_sigma=self._init_noise_sigma(sigmas))

  def step(self, plan, i, model_output, sample, state, rng=None):
    tb = {k: v[i] for k, v in plan.tables.items()}
    mo, x = _as_f32((model_output, sample))
    sigma_hat = tb["sigma"]   # sigma (gamma + 1), gamma = 0 without s_churn
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
    _check_first_timestep(ts, self.class_name)
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


_K_DEFAULTS = {   # Heun's and KDPM2's (Stable Diffusion's betas by default)
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "linear", "trained_betas": None,
}


class HeunDiscreteScheduler(_EulerBase):
  """Karras et al. 2022 Algorithm 1 with s_churn = 0 (Heun's second order in sigma).

  Every step but the last takes two evaluations: an Euler step to the next sigma, then a
  second evaluation there whose derivative is averaged with the first to redo the step. The
  timesteps repeat each one after the first (2n - 1 evaluations); evaluation j's parity picks
  the branch (even: Euler, odd: correction), as diffusers' `state_in_first_order`.
  """
  class_name = "HeunDiscreteScheduler"
  DEFAULTS = {
      **_K_DEFAULTS, "prediction_type": "epsilon", "use_karras_sigmas": False,
      "use_exponential_sigmas": False, "use_beta_sigmas": False, "clip_sample": False,
      "clip_sample_range": 1.0, "timestep_spacing": "linspace", "steps_offset": 0,
  }
  BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "exp")
  PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

  def _validate(self):
    super()._validate()
    _check_sigma_spacing(self.config)

  def plan(self, num_inference_steps: int, eta: float = 0.0) -> Plan:
    del eta
    n = self._check_steps(num_inference_steps)
    sigmas, ts, _ = self._k_sigmas(n)
    sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])   # 2n
    ts = np.concatenate([ts[:1], np.repeat(ts[1:], 2)]).astype(F32)
    first = np.arange(len(ts)) % 2 == 0
    dt = sigmas[1:] - sigmas[:-1]
    tables = {**self._input_tables(sigmas[:-1]), "first": first.astype(np.int32),
              "dt": np.where(first, dt, np.roll(dt, 1))}   # the correction reuses the Euler dt
    _check_first_timestep(ts, self.class_name)
    return _make_plan(ts, tables, num_inference_steps=n,
                      init_noise_sigma=self._init_noise_sigma(sigmas))

  def init_state(self, plan, sample):
    z = jnp.zeros(sample.shape, jnp.float32)
    return {"derivative": z, "sample": z}

  def step(self, plan, i, model_output, sample, state, rng=None):
    tb = {k: v[i] for k, v in plan.tables.items()}
    mo, x = _as_f32((model_output, sample))
    x0 = self._x0(tb, mo, x, tb["sigma"])
    if self.config["clip_sample"]:
      x0 = jnp.clip(x0, -self.config["clip_sample_range"], self.config["clip_sample_range"])
    derivative = (x - x0) / tb["sigma"]
    euler = x + derivative * tb["dt"]
    heun = state["sample"] + ((state["derivative"] + derivative) / 2) * tb["dt"]
    prev = jnp.where(tb["first"] > 0, euler, heun)
    return prev.astype(sample.dtype), {"derivative": derivative, "sample": x}


def _lms_coefficients(sigmas: np.ndarray, n: int, order: int) -> np.ndarray:
  """(n, order) float32: step i's weight of the derivative of step i - k.

  diffusers integrates the Lagrange basis polynomials of sigma_i .. sigma_{i-o+1}
  (o = min(i + 1, order)) over [sigma_i, sigma_{i+1}] with scipy's quad, whose 21-point
  Gauss-Kronrod rule is exact on them (degree < order); a Gauss-Legendre rule of order // 2 + 1
  nodes is exact too, and runs on all steps at once (float64).
  """
  s = sigmas.astype(np.float64)
  nodes, weights = np.polynomial.legendre.leggauss(order // 2 + 1)
  steps = np.arange(n)
  lo, hi = s[steps], s[steps + 1]
  half = (hi - lo) / 2
  tau = half[:, None] * nodes + ((lo + hi) / 2)[:, None]   # (n, nodes)
  out = np.zeros((n, order))
  with np.errstate(divide="ignore", invalid="ignore"):
    for o in range(1, order + 1):
      rows = steps[np.minimum(steps + 1, order) == o]
      for k in range(o):
        basis = np.ones((len(rows), len(nodes)))
        for m in range(o):
          if m != k:
            basis *= ((tau[rows] - s[rows - m, None]) / (s[rows - k, None] - s[rows - m, None]))
        out[rows, k] = half[rows] * (basis @ weights)
  return out.astype(F32)


class LMSDiscreteScheduler(_EulerBase):
  """Linear multistep in sigma (k-diffusion `sample_lms`): x' = x + sum_k c_k d_{i-k} over the
  last `order` derivatives d = (x - x0) / sigma (order 4, diffusers' step default; fewer at
  the start). The plan holds the integrated coefficients (`_lms_coefficients`)."""
  class_name = "LMSDiscreteScheduler"
  DEFAULTS = {
      **_COMMON, "use_karras_sigmas": False, "use_exponential_sigmas": False,
      "use_beta_sigmas": False, "prediction_type": "epsilon", "timestep_spacing": "linspace",
      "steps_offset": 0,
  }

  def _validate(self):
    super()._validate()
    _check_sigma_spacing(self.config)

  def plan(self, num_inference_steps: int, eta: float = 0.0, order: int = 4) -> Plan:
    """`order` is diffusers' `step(..., order=4)` argument."""
    del eta
    n = self._check_steps(num_inference_steps)
    if int(order) < 1:
      raise ConfigError(f"LMSDiscreteScheduler: order must be >= 1, got {order}.")
    sigmas, ts, _ = self._k_sigmas(n, karras_range=False)   # its karras ignores sigma_min/max
    tables = {**self._input_tables(sigmas[:n]), "lms": _lms_coefficients(sigmas, n, int(order))}
    _check_first_timestep(ts, self.class_name)
    return _make_plan(np.asarray(ts).astype(F32), tables, num_inference_steps=n,
                      init_noise_sigma=self._init_noise_sigma(sigmas))

  def init_state(self, plan, sample):
    return {"derivatives": jnp.zeros((plan.tables["lms"].shape[1] - 1,) + sample.shape,
                                     jnp.float32)}   # d_{i-1}, d_{i-2}, ...

  def step(self, plan, i, model_output, sample, state, rng=None):
    tb = {k: v[i] for k, v in plan.tables.items()}
    mo, x = _as_f32((model_output, sample))
    derivative = (x - self._x0(tb, mo, x, tb["sigma"])) / tb["sigma"]
    history = jnp.concatenate([derivative[None], state["derivatives"]])
    update = tb["lms"][0] * derivative
    for k in range(1, history.shape[0]):
      update = update + tb["lms"][k] * history[k]
    prev = x + update
    return prev.astype(sample.dtype), {"derivatives": history[:-1]}


class KDPM2DiscreteScheduler(_EulerBase):
  """Karras et al. 2022's DPM-Solver-2 (k-diffusion `sample_dpm_2`).

  Every step but the last evaluates at sigma_k, takes an Euler step to the geometric midpoint
  of sigma_k and sigma_{k+1}, evaluates there and redoes the whole step from x_k with the
  midpoint's derivative: 2n - 1 evaluations, the midpoints' timesteps interleaved with the
  steps' (diffusers' `sigmas_interpol`, `timesteps_interpol`). The last step is Euler to 0.
  """
  class_name = "KDPM2DiscreteScheduler"
  DEFAULTS = {
      **_K_DEFAULTS, "use_karras_sigmas": False, "use_exponential_sigmas": False,
      "use_beta_sigmas": False, "prediction_type": "epsilon", "timestep_spacing": "linspace",
      "steps_offset": 0,
  }
  PREDICTION_TYPES = ("epsilon", "v_prediction")

  def _validate(self):
    super()._validate()
    _check_sigma_spacing(self.config)

  def plan(self, num_inference_steps: int, eta: float = 0.0) -> Plan:
    del eta
    n = self._check_steps(num_inference_steps)
    sigmas, ts, log_sigmas = self._k_sigmas(n, round_karras=True)
    with np.errstate(divide="ignore", invalid="ignore"):
      # torch's log().lerp(roll(1).log(), 0.5).exp(): end - (end - start) * 0.5; entry k is
      # the midpoint of sigma_k and sigma_{k-1} (entry 0 unused, entry n 0).
      log_s = np.log(sigmas)
      log_prev = np.roll(log_s, 1)
      mids = np.exp(log_prev - (log_prev - log_s) * F32(0.5))
    ts_mid = _sigma_to_t(mids[1:-1], log_sigmas)
    ts_all = np.concatenate([ts[:1], np.stack([ts_mid, ts[1:]], -1).reshape(-1)]).astype(F32)
    k = np.arange(len(ts_all)) // 2
    first = np.arange(len(ts_all)) % 2 == 0
    mid_next = mids[k + 1]
    sigma_in = np.where(first, sigmas[k], mid_next)
    dt = np.where(first, mid_next - sigmas[k], sigmas[k + 1] - sigmas[k])
    tables = {**self._input_tables(sigma_in), "first": first.astype(np.int32), "dt": dt}
    _check_first_timestep(ts_all, self.class_name)
    return _make_plan(ts_all, tables, num_inference_steps=n,
                      init_noise_sigma=self._init_noise_sigma(sigmas))

  def init_state(self, plan, sample):
    return {"sample": jnp.zeros(sample.shape, jnp.float32)}

  def step(self, plan, i, model_output, sample, state, rng=None):
    tb = {k: v[i] for k, v in plan.tables.items()}
    mo, x = _as_f32((model_output, sample))
    derivative = (x - self._x0(tb, mo, x, tb["sigma"])) / tb["sigma"]
    start = jnp.where(tb["first"] > 0, x, state["sample"])
    prev = start + derivative * tb["dt"]
    return prev.astype(sample.dtype), {"sample": start}


# ----------------------------------------------------------------------------- registry

SCHEDULERS: Dict[str, type] = {cls.class_name: cls for cls in (
    DDIMScheduler, DDPMScheduler, PNDMScheduler, DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler, UniPCMultistepScheduler, EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler, HeunDiscreteScheduler, LMSDiscreteScheduler,
    KDPM2DiscreteScheduler)}

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
    "dpm_single": "DPMSolverSinglestepScheduler",
    "dpm_singlestep": "DPMSolverSinglestepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "kdpm2": "KDPM2DiscreteScheduler",
    "dpm2": "KDPM2DiscreteScheduler",
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

