"""DPM-Solver (Lu et al. 2022, arXiv 2206.00927) in the form U-ViT and efficientvit's DC-AE UViT
sample with: `DPM_Solver(model_fn, NoiseScheduleVP("discrete", betas), predict_x0=True)
.sample(x, steps, eps=1/N, T=1)` of efficientvit `diffusioncore/models/uvit_sampler/
dpm_solver_pp.py` (baofff/U-ViT's `dpm_solver_pp.py`).

Continuous time t in [1/N, 1] over a discrete schedule of N betas ("discrete" NoiseScheduleVP):
log alpha(t) is the piecewise-linear interpolation (linearly extended past the ends) of
0.5 cumsum(log(1 - beta)) at the knots t_n = n/N, n = 1..N; sigma(t) = sqrt(1 - alpha^2),
lambda(t) = log alpha - log sigma, and lambda is inverted through the same interpolation.
`model_fn(x, t)` predicts the noise at continuous t (a (B,) float32 array); with
`predict_x0=True` the solver works on the data prediction x0 = (x - sigma eps) / alpha
("DPM-Solver++"-style updates; thresholding off, as the DC-AE models sample).

Methods (efficientvit's defaults: "fast", order 3, "time_uniform", solver_type "dpm_solver"):
  fast:       a grid of `steps` + 1 times; K = steps // order + 1 single steps of order 3 (or
              2), ending with a 2nd- and 1st-order step so the orders sum to `steps`; the
              intermediate points of each step are the grid points it skips, so every model
              evaluation lands on the grid (r1, r2 = their lambda fractions of the step).
  singlestep: steps // order steps of the given order on a grid of that many intervals, with
              the default intermediate fractions r1 = 1/2 (order 2) or 1/3, 2/3 (order 3).
(efficientvit's "multistep" path refers to an undefined variable and never runs there; its
"adaptive" one has a data-dependent step count: neither is offered.)

The whole schedule is known before sampling, so every coefficient is computed here in float64
and each model evaluation (NFE) becomes one row of a table; the sampler is one `lax.scan` over
the rows whose body calls the model once: x_in = cx x + c0 n0 + c1 n1 (x the state at the
start of the current step, n0 and n1 its earlier predictions), n = prediction at x_in, and at
the last evaluation of a step x <- ax x + a0 n0 + a1 n1 + a2 n. Jittable with every argument
but `model_fn`'s arrays static.
"""

import dataclasses
from typing import Callable, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import ConfigError

METHODS = ("fast", "singlestep")
SKIP_TYPES = ("time_uniform", "logSNR", "t2")
SOLVER_TYPES = ("dpm_solver", "taylor")

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def _interp(x, xp, fp):
  """Piecewise-linear interpolation through (xp, fp), xp increasing, linearly extended beyond
  both ends (dpm_solver's `interpolate_fn`; np.interp would clamp)."""
  x = np.asarray(x, np.float64)
  i = np.clip(np.searchsorted(xp, x) - 1, 0, len(xp) - 2)
  x0, x1, f0, f1 = xp[i], xp[i + 1], fp[i], fp[i + 1]
  return f0 + (x - x0) * (f1 - f0) / (x1 - x0)


@dataclasses.dataclass(frozen=True)
class DiscreteVPSchedule:
  """NoiseScheduleVP("discrete", betas): continuous-time marginals of a discrete schedule."""
  betas: np.ndarray

  @property
  def total_n(self) -> int:
    return len(self.betas)

  @property
  def _knots(self) -> Tuple[np.ndarray, np.ndarray]:
    n = self.total_n
    t = np.linspace(1.0 / n, 1.0, n)
    log_alpha = 0.5 * np.cumsum(np.log1p(-np.asarray(self.betas, np.float64)))
    return t, log_alpha

  def log_alpha(self, t):
    knots_t, knots_log_alpha = self._knots
    return _interp(t, knots_t, knots_log_alpha)

  def alpha(self, t):
    return np.exp(self.log_alpha(t))

  def sigma(self, t):
    return np.sqrt(-np.expm1(2.0 * self.log_alpha(t)))

  def lam(self, t):
    log_alpha = self.log_alpha(t)
    return log_alpha - 0.5 * np.log(-np.expm1(2.0 * log_alpha))

  def inverse_lambda(self, lam):
    knots_t, knots_log_alpha = self._knots
    log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * np.asarray(lam, np.float64))
    return _interp(log_alpha, knots_log_alpha[::-1], knots_t[::-1])


def time_steps(schedule: DiscreteVPSchedule, skip_type: str, t_start: float, t_end: float,
               n: int) -> np.ndarray:
  """The n + 1 times from t_start down to t_end (dpm_solver's `get_time_steps`)."""
  if skip_type == "time_uniform":
    return np.linspace(t_start, t_end, n + 1)
  if skip_type == "logSNR":
    return schedule.inverse_lambda(np.linspace(schedule.lam(t_start), schedule.lam(t_end), n + 1))
  if skip_type == "t2":
    return np.linspace(t_start ** 0.5, t_end ** 0.5, n + 1) ** 2
  raise ConfigError(f"unknown DPM-Solver skip_type {skip_type!r}; known: {list(SKIP_TYPES)}.")


def _steps(schedule, steps, order, method, skip_type, t_start, t_end):
  """[(order, s, t, r1, r2)] of the single steps the method takes."""
  if method == "fast":
    if order not in (2, 3):
      raise ConfigError(f"DPM-Solver-fast needs order 2 or 3, got {order}.")
    if order == 3:
      k = steps // 3 + 1
      orders = [3] * (k - 2) + [2, 1] if steps % 3 == 0 else [3] * (k - 1) + [steps % 3]
    else:
      orders = [2] * (steps // 2) + [1] * (steps % 2)
    grid = time_steps(schedule, skip_type, t_start, t_end, steps)
    lam = schedule.lam(grid)
    out, i = [], 0
    for p in orders:
      h = lam[i + p] - lam[i]
      r1 = (lam[i + 1] - lam[i]) / h if p >= 2 else None
      r2 = (lam[i + 2] - lam[i]) / h if p >= 3 else None
      out.append((p, grid[i], grid[i + p], r1, r2))
      i += p
    return out
  if method == "singlestep":
    if order not in (1, 2, 3):
      raise ConfigError(f"DPM-Solver order must be 1, 2 or 3, got {order}.")
    n = steps // order
    if n < 1:
      raise ConfigError(f"singlestep DPM-Solver-{order} needs steps >= {order}, got {steps}.")
    grid = time_steps(schedule, skip_type, t_start, t_end, n)
    return [(order, grid[i], grid[i + 1], None, None) for i in range(n)]
  raise ConfigError(f"unknown DPM-Solver method {method!r}; known: {list(METHODS)}.")


@dataclasses.dataclass(frozen=True)
class Plan:
  """One row per model evaluation (see the module docstring); float64 numpy columns."""
  t: np.ndarray        # continuous time of the evaluation
  alpha: np.ndarray    # alpha(t), sigma(t): the x0 conversion of predict_x0
  sigma: np.ndarray
  inputs: np.ndarray   # (NFE, 3): cx, c0, c1
  slot: np.ndarray     # 0 / 1: which stored prediction this evaluation is; 2: not stored
  last: np.ndarray     # bool: the step's final evaluation, after which x is updated
  update: np.ndarray   # (NFE, 4): ax, a0, a1, a2 (a2 multiplies this evaluation's prediction)


def plan(betas, steps: int, *, order: int = 3, method: str = "fast",
         skip_type: str = "time_uniform", t_start: float = 1.0, t_end=None,
         predict_x0: bool = True, solver_type: str = "dpm_solver") -> Plan:
  """The evaluation table of `DPM_Solver(...).sample(x, steps, eps=t_end, T=t_start, order,
  skip_type, method, solver_type)`; t_end defaults to 1/N (what U-ViT passes)."""
  if solver_type not in SOLVER_TYPES:
    raise ConfigError(f"unknown DPM-Solver solver_type {solver_type!r}; known: "
                      f"{list(SOLVER_TYPES)}.")
  if int(steps) < 1:
    raise ConfigError(f"DPM-Solver needs steps >= 1, got {steps}.")
  schedule = DiscreteVPSchedule(np.asarray(betas, np.float64))
  t_end = 1.0 / schedule.total_n if t_end is None else float(t_end)
  rows = []  # (t, cx, c0, c1, slot, last, ax, a0, a1, a2)
  for p, s, t, r1, r2 in _steps(schedule, int(steps), order, method, skip_type, t_start, t_end):
    if p == 2:
      r1 = 0.5 if r1 is None else r1
    if p == 3:
      r1, r2 = (1.0 / 3.0 if r1 is None else r1), (2.0 / 3.0 if r2 is None else r2)
    rows.extend(_step_rows(schedule, p, s, t, r1, r2, predict_x0, solver_type))
  cols = list(zip(*rows))
  ts = np.asarray(cols[0])
  return Plan(t=ts, alpha=schedule.alpha(ts), sigma=schedule.sigma(ts),
              inputs=np.stack(cols[1:4], axis=1), slot=np.asarray(cols[4], np.int32),
              last=np.asarray(cols[5], bool), update=np.stack(cols[6:10], axis=1))


def _step_rows(ns: DiscreteVPSchedule, order, s, t, r1, r2, predict_x0, solver_type):
  """Rows of one single step of `dpm_solver_update` (first / second / third update).

  Predictions n0, n1, n2 at s, s1, s2. Coefficient vectors below are over (n0, n1, n2).
  """
  lam_s, lam_t = ns.lam(s), ns.lam(t)
  h = lam_t - lam_s
  times = [s]
  if order >= 2:
    times.append(ns.inverse_lambda(lam_s + r1 * h))
  if order == 3:
    times.append(ns.inverse_lambda(lam_s + r2 * h))
  log_a = {k: ns.log_alpha(v) for k, v in zip(("s", "s1", "s2"), times)}
  sig = {k: ns.sigma(v) for k, v in zip(("s", "s1", "s2"), times)}
  log_a["t"], sig["t"] = ns.log_alpha(t), ns.sigma(t)
  alpha = {k: np.exp(v) for k, v in log_a.items()}
  zero = np.zeros(3)
  e = np.eye(3)

  if predict_x0:
    # x_u = (sigma_u / sigma_s) x - alpha_u expm1(-r h) n0 + ...
    x_coef = lambda u: sig[u] / sig["s"]
    lead = lambda u, frac: -alpha[u] * np.expm1(-frac * h)
    phi_1 = np.expm1(-h)
    phi_2 = phi_1 / h + 1.0
    phi_3 = phi_2 / h - 0.5
    scale_t = alpha["t"]
    sign = 1.0   # x0 prediction: the higher-order terms enter with +phi_2, -phi_3
  else:
    x_coef = lambda u: np.exp(log_a[u] - log_a["s"])
    lead = lambda u, frac: -sig[u] * np.expm1(frac * h)
    phi_1 = np.expm1(h)
    phi_2 = phi_1 / h - 1.0
    phi_3 = phi_2 / h - 0.5
    scale_t = sig["t"]
    sign = -1.0  # noise prediction: -phi_2, -phi_3

  inputs = [(1.0, zero)]  # (coefficient of x, coefficients over n0, n1, n2) per evaluation
  if order >= 2:
    inputs.append((x_coef("s1"), lead("s1", r1) * e[0]))
  if order == 3:
    if predict_x0:
      phi_22 = np.expm1(-r2 * h) / (r2 * h) + 1.0
      corr = (r2 / r1) * alpha["s2"] * phi_22
    else:
      phi_22 = np.expm1(r2 * h) / (r2 * h) - 1.0
      corr = -(r2 / r1) * sig["s2"] * phi_22
    inputs.append((x_coef("s2"), lead("s2", r2) * e[0] + corr * (e[1] - e[0])))

  final = lead("t", 1.0) * e[0]  # first-order part
  if order == 2:
    diff = (e[1] - e[0])
    if solver_type == "dpm_solver":
      final = final + (0.5 / r1) * lead("t", 1.0) * diff
    else:
      final = final + sign * (1.0 / r1) * scale_t * phi_2 * diff
  elif order == 3:
    if solver_type == "dpm_solver":
      final = final + sign * (1.0 / r2) * scale_t * phi_2 * (e[2] - e[0])
    else:
      d1_0, d1_1 = (e[1] - e[0]) / r1, (e[2] - e[0]) / r2
      d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
      d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
      final = final + sign * scale_t * phi_2 * d1 - scale_t * phi_3 * d2
  x_final = x_coef("t")

  rows = []
  for k, (u, (cx, cn)) in enumerate(zip(times, inputs)):
    last = k == order - 1
    if last:
      # The current evaluation is n_k; earlier ones are stored in slots 0 and 1.
      update = (x_final, final[0] if k > 0 else 0.0, final[1] if k > 1 else 0.0, final[k])
    else:
      update = (1.0, 0.0, 0.0, 0.0)
    rows.append((u, cx, cn[0], cn[1], k if k < 2 else 2, last) + tuple(update))
  return rows


def sample(model_fn: ModelFn, x: jax.Array, table: Plan, *, predict_x0: bool = True) -> jax.Array:
  """Runs the evaluations of `table` (from `plan`, built with the same predict_x0) from x at
  t_start; returns x at t_end (float32). `model_fn(x, t)` predicts noise, t (B,) float32."""
  batch = x.shape[0]
  x = jnp.asarray(x, jnp.float32)
  f32 = lambda a: jnp.asarray(np.asarray(a), jnp.float32)
  xs = (f32(table.t), f32(table.alpha), f32(table.sigma), f32(table.inputs),
        jnp.asarray(table.slot), jnp.asarray(table.last), f32(table.update))

  def body(carry, row):
    x, n0, n1 = carry
    t, alpha, sigma, c, slot, last, a = row
    x_in = c[0] * x + c[1] * n0 + c[2] * n1
    n = model_fn(x_in, jnp.full((batch,), t, jnp.float32)).astype(jnp.float32)
    if predict_x0:
      n = (x_in - sigma * n) / alpha
    x = jnp.where(last, a[0] * x + a[1] * n0 + a[2] * n1 + a[3] * n, x)
    n0 = jnp.where(slot == 0, n, n0)
    n1 = jnp.where(slot == 1, n, n1)
    return (x, n0, n1), None

  zeros = jnp.zeros_like(x)
  (x, _, _), _ = jax.lax.scan(body, (x, zeros, zeros), xs)
  return x
