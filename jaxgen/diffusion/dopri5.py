"""Adaptive Dormand-Prince 5(4) ODE integration as torchdiffeq's `odeint(method="dopri5")`.

efficientvit's USiT models (the DC-AE UViT trained as a SiT velocity model) sample with
`torchdiffeq.odeint(drift, x, linspace(0, 1, 250), method="dopri5", atol=1e-6, rtol=1e-3)`
and keep the last point (`diffusioncore/models/sit_sampler/integrators.py`). This follows
torchdiffeq `_impl/rk_common.py` (RKAdaptiveStepsizeODESolver), `misc.py` and `interp.py`:

* first step: Hairer-Norsett-Wanner II.4 (`_select_initial_step`, two evaluations, order 4);
* each step: the Dormand-Prince-Shampine tableau (6 new evaluations, the last one at t1 also
  the next step's first, "FSAL"); stages with c = 1 evaluate at the float just below t1
  (torchdiffeq's Perturb.PREV);
* error ratio: RMS over the state of err / (atol + rtol max(|y0|, |y1|)); accept when <= 1;
  next step dt min(10, max(0.9 ratio^(-1/5), 0.2 if rejected else 1)), 10 dt when ratio = 0;
* the value at t_end is the 4th-order interpolant (DPS mid-point coefficients) of the step that
  reaches or passes it (steps are not clipped to t_end; output times do not change the steps).

Two deliberate differences. Time is float32 here (torchdiffeq keeps t and dt in float64, but
evaluates stages in the state's float32 too): step times then differ by float32 rounding, which
can flip an accept/reject decision that sits at ratio ~ 1 and so change the result by up to
about rtol. And every sample is integrated on its own (error norm and step sizes per sample),
where torchdiffeq's norm spans the whole batch: a sample then does not depend on the others in
its batch (with batch size 1 the two agree).

`solve` is a `lax.while_loop` of steps whose body evaluates the model in a `lax.scan` over the
six stages, so the model is traced once; jittable.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# Dormand-Prince-Shampine (torchdiffeq dopri5.py): stage nodes, stage weights (row i gives the
# weights of k_0..k_i for stage i + 1), the error weights and the mid-point interpolation weights.
ALPHA = np.array([1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0])
BETA = np.zeros((6, 7))
for _i, _row in enumerate([[1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
                           [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
                           [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
                           [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]]):
  BETA[_i, :len(_row)] = _row
C_ERROR = np.array([35 / 384 - 1951 / 21600, 0, 500 / 1113 - 22642 / 50085,
                    125 / 192 - 451 / 720, -2187 / 6784 - -12231 / 42400, 11 / 84 - 649 / 6300,
                    -1.0 / 60.0])
C_MID = np.array([6025192743 / 30085553152 / 2, 0, 51252292925 / 65400821598 / 2,
                  -2691868925 / 45128329728 / 2, 187940372067 / 1594534317056 / 2,
                  -1776094331 / 19743644256 / 2, 11237099 / 235043384 / 2])
ORDER = 5
SAFETY, IFACTOR, DFACTOR = 0.9, 10.0, 0.2

DriftFn = Callable[[jax.Array, jax.Array], jax.Array]


def solve(drift: DriftFn, y0: jax.Array, t_start: float = 0.0, t_end: float = 1.0, *,
          rtol: float = 1e-3, atol: float = 1e-6, max_steps: int = 10_000) -> jax.Array:
  """y(t_end) of dy/dt = drift(t, y) from y(t_start) = y0 (float32, batch-first).

  `drift(t, y)` takes t of shape (B,) (each sample at its own time) and y (B, ...). At most
  `max_steps` step attempts (accepted or not) per call; a sample that needs more returns the
  state it reached.
  """
  y0 = jnp.asarray(y0, jnp.float32)
  b = y0.shape[0]
  axes = tuple(range(1, y0.ndim))
  expand = lambda v: v.reshape((b,) + (1,) * (y0.ndim - 1))
  rms = lambda v: jnp.sqrt(jnp.mean(jnp.square(v), axis=axes))
  t0 = jnp.full((b,), t_start, jnp.float32)
  t_final = jnp.float32(t_end)

  # Initial step (torchdiffeq _select_initial_step with order ORDER - 1).
  f0 = drift(t0, y0).astype(jnp.float32)
  scale = atol + jnp.abs(y0) * rtol
  d0, d1 = rms(y0 / scale), rms(f0 / scale)
  h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), jnp.float32(1e-6), 0.01 * d0 / d1)
  f1 = drift(t0 + h0, y0 + expand(h0) * f0).astype(jnp.float32)
  d2 = rms((f1 - f0) / scale) / h0
  h1 = jnp.where((d1 <= 1e-15) & (d2 <= 1e-15), jnp.maximum(1e-6, h0 * 1e-3),
                 (0.01 / jnp.maximum(d1, d2)) ** (1.0 / ORDER))
  dt0 = jnp.minimum(100.0 * h0, h1)

  alpha = jnp.asarray(ALPHA, jnp.float32)
  beta = jnp.asarray(BETA, jnp.float32)
  c_error = jnp.asarray(C_ERROR, jnp.float32)
  c_mid = jnp.asarray(C_MID, jnp.float32)
  combine = lambda w, k: jnp.tensordot(w, k, axes=1)  # sum_j w_j k_j over the stage axis

  def step(state):
    y, f, t, dt, done, out, n = state
    dt = jnp.where(jnp.isfinite(dt), jnp.maximum(dt, 0.0), 0.0)
    t1 = t + dt
    k = jnp.zeros((7,) + y.shape, jnp.float32).at[0].set(f)

    def stage(k, i):
      ti = jnp.where(alpha[i] == 1.0, jnp.nextafter(t1, jnp.float32(-jnp.inf)),
                     t + alpha[i] * dt)
      yi = y + expand(dt) * combine(beta[i], k)
      return k.at[i + 1].set(drift(ti, yi).astype(jnp.float32)), yi

    k, ys = jax.lax.scan(stage, k, jnp.arange(6))
    y1 = ys[-1]  # the last stage's weights are the solution's (FSAL)
    err = expand(dt) * combine(c_error, k)
    ratio = rms(err / (atol + rtol * jnp.maximum(jnp.abs(y), jnp.abs(y1))))
    accept = (ratio <= 1.0) | (dt <= 0.0)

    # The step that reaches t_end: its interpolant at t_end (torchdiffeq interp.py).
    y_mid = y + expand(dt) * combine(c_mid, k)
    k0, k6 = k[0], k[6]
    dtx = expand(dt)
    a = 2 * dtx * (k6 - k0) - 8 * (y1 + y) + 16 * y_mid
    bq = dtx * (5 * k0 - 3 * k6) + 18 * y + 14 * y1 - 32 * y_mid
    c = dtx * (k6 - 4 * k0) - 11 * y - 5 * y1 + 16 * y_mid
    x = expand((t_final - t) / (t1 - t))
    value = y + x * (dtx * k0) + x * x * c + x ** 3 * bq + x ** 4 * a
    finishing = accept & (t1 >= t_final) & ~done
    out = jnp.where(expand(finishing), value, out)

    # Next step size (torchdiffeq _optimal_step_size).
    factor = jnp.minimum(IFACTOR, jnp.maximum(
        SAFETY / ratio ** (1.0 / ORDER), jnp.where(ratio < 1.0, 1.0, DFACTOR)))
    dt_next = jnp.where(ratio == 0.0, dt * IFACTOR, dt * factor)
    live = ~done
    keep = expand(accept & live)
    return (jnp.where(keep, y1, y), jnp.where(keep, k6, f), jnp.where(accept & live, t1, t),
            jnp.where(live, dt_next, dt), done | finishing, out, n + 1)

  def running(state):
    return jnp.any(~state[4]) & (state[6] < max_steps)

  init = (y0, f0, t0, dt0, jnp.zeros((b,), bool), y0, jnp.int32(0))
  y, _, _, _, done, out, _ = jax.lax.while_loop(running, step, init)
  return jnp.where(expand(done), out, y)
