"""Diffusion core against closed forms: schedules, q(x_t|x_0), the loss, samplers and guidance.

Speed: XLA compiles take ~1 s each on this CPU, so most checks jit one function and feed it both
schedules (same shapes, one compile), and use "rbg" keys (threefry bit generation compiles slowly
on CPU; the code under test is key-impl agnostic, and the jit test uses default keys).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.diffusion import (cosine_alpha_bar, cosine_betas, diffusion_loss, eps_to_x0, guided,
                              linear_betas, make_schedule, q_sample, sample, sampling_timesteps,
                              v_to_eps, v_to_x0, velocity, x0_to_eps)
from jaxgen.errors import ConfigError

METHODS = ("ddpm", "ddim", "dpmpp_2m")
SCHEDULES = {"linear": make_schedule("linear", 1000), "cosine": make_schedule("cosine", 1000)}
LINEAR = SCHEDULES["linear"]


def key(seed):
  return jax.random.key(seed, impl="rbg")


def _ab(schedule, t, ndim=4):
  return schedule.alphas_cumprod[t].reshape((-1,) + (1,) * (ndim - 1))


def point_oracle(schedule, c, prediction="eps"):
  """Exact eps (or v) for data concentrated at x0 = c: eps = (x_t - sqrt(ab) c) / sqrt(1 - ab)."""
  def fn(x, t, cond):
    ab = _ab(schedule, t)
    eps = (x - jnp.sqrt(ab) * c) / jnp.sqrt(1 - ab)
    return eps if prediction == "eps" else jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * c
  return fn


def gaussian_oracle(schedule, mu, sd):
  """Exact E[eps | x_t] for x0 ~ N(mu, sd^2): sqrt(1-ab) (x_t - sqrt(ab) mu) / (ab sd^2 + 1-ab)."""
  def fn(x, t, cond):
    ab = _ab(schedule, t)
    return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * mu) / (ab * sd ** 2 + 1 - ab)
  return fn


# ---------------------------------------------------------------------------------- schedules


def test_linear_betas_endpoints_and_length():
  b = linear_betas(1000)
  assert b.shape == (1000,) and b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
  np.testing.assert_allclose(np.diff(b), (0.02 - 1e-4) / 999, rtol=1e-9)
  assert LINEAR.num_steps == 1000 and LINEAR.betas.dtype == jnp.float32
  np.testing.assert_allclose(LINEAR.alphas_cumprod, np.cumprod(1 - b), rtol=1e-5)


def test_cosine_alpha_bar_is_cos_squared():
  T, s_ = 1000, 0.008
  b = cosine_betas(T)
  ab = np.cumprod(1 - b)
  u = np.arange(1, T + 1) / T
  closed = np.cos((u + s_) / (1 + s_) * math.pi / 2) ** 2 / np.cos(s_ / (1 + s_) * math.pi / 2) ** 2
  clipped = b >= 0.999
  assert clipped[-1] and clipped.sum() == 1  # only the singular last beta is clipped
  assert b.max() <= 0.999
  np.testing.assert_allclose(ab[:-1], closed[:-1], rtol=1e-9)
  np.testing.assert_allclose(cosine_alpha_bar(u), closed, rtol=1e-12)
  np.testing.assert_allclose(SCHEDULES["cosine"].alphas_cumprod[:-1], closed[:-1], rtol=2e-5,
                             atol=1e-9)


def test_unknown_schedule_lists_known_names():
  with pytest.raises(ConfigError, match="cosine.*linear"):
    make_schedule("sigmoid")


def test_betas_match_diffusers():
  diffusers = pytest.importorskip("diffusers")
  sd = {"beta_start": 0.00085, "beta_end": 0.012}
  for ref_name, name, kw in [("linear", "linear", {}), ("scaled_linear", "scaled_linear", sd),
                             ("squaredcos_cap_v2", "cosine", {})]:
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=ref_name, **kw)
    mine = make_schedule(name, 1000, **kw)
    np.testing.assert_allclose(mine.betas, ref.betas.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(mine.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-5,
                               atol=1e-7)


def test_q_sample_exact_and_moments():
  t = np.array([0, 10, 500, 999])
  x0 = np.full((4, 64, 64, 2), 0.7, np.float32)
  noise = np.random.default_rng(0).standard_normal(x0.shape).astype(np.float32)
  q = jax.jit(q_sample)
  for schedule in SCHEDULES.values():
    ab = np.asarray(schedule.alphas_cumprod)[t][:, None, None, None]
    np.testing.assert_allclose(q(schedule, x0, t, 0 * noise),
                               np.broadcast_to(np.sqrt(ab) * 0.7, x0.shape), rtol=1e-6)
    np.testing.assert_allclose(q(schedule, 0 * x0, t, noise), np.sqrt(1 - ab) * noise, rtol=1e-6)
    x_t = np.asarray(q(schedule, x0, t, noise)).reshape(4, -1)
    n = x_t.shape[1]
    mean, var = np.sqrt(ab.ravel()) * 0.7, 1 - ab.ravel()
    assert np.all(np.abs(x_t.mean(1) - mean) < 5 * np.sqrt(var / n))
    assert np.all(np.abs(x_t.var(1) / var - 1) < 5 * np.sqrt(2 / n))


def test_prediction_conversions_are_inverse():
  rng = np.random.default_rng(1)
  x0 = rng.uniform(-1, 1, (6, 4, 4, 3)).astype(np.float32)
  eps = rng.standard_normal(x0.shape).astype(np.float32)
  t = np.concatenate([[0, 999], rng.integers(0, 1000, 4)])

  @jax.jit
  def convert(schedule):
    x_t = q_sample(schedule, x0, t, eps)
    v = velocity(schedule, x0, t, eps)
    return (x_t, v, x0_to_eps(schedule, x_t, t, x0), v_to_eps(schedule, x_t, t, v),
            v_to_x0(schedule, x_t, t, v), eps_to_x0(schedule, x_t, t, eps))

  for schedule in SCHEDULES.values():
    x_t, v, eps_x0, eps_v, x0_v, x0_eps = map(np.asarray, convert(schedule))
    ab = np.asarray(schedule.alphas_cumprod, np.float64)[t][:, None, None, None]
    np.testing.assert_allclose(x_t, np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps, atol=1e-6)
    np.testing.assert_allclose(v, np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0, atol=1e-6)
    np.testing.assert_allclose(eps_x0[1:], eps[1:], atol=1e-5)
    np.testing.assert_allclose(eps_x0[:1], eps[:1], atol=5e-4)  # t = 0: divides by ~0.01
    np.testing.assert_allclose(eps_v, eps, atol=1e-5)
    np.testing.assert_allclose(x0_v, x0, atol=1e-5)
    # eps -> x0 divides by sqrt(ab): rounding of x_t is amplified 1/sqrt(ab) (160x at t = T-1
    # for linear, 2e4x for cosine).
    np.testing.assert_allclose(x0_eps[2:], x0[2:], atol=1e-4)
    np.testing.assert_allclose(x0_eps[1], x0[1], atol=float(2e-7 / np.sqrt(ab[1, 0, 0, 0])))


# ---------------------------------------------------------------------------------- loss


def _jit_loss(model_fn, **kw):
  """model_fn(schedule) -> model; jitted over (x0, cond, rng, schedule)."""
  return jax.jit(lambda x0, cond, rng, schedule: diffusion_loss(model_fn(schedule), x0, cond, rng,
                                                                schedule, **kw))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_loss_is_zero_for_the_oracle(prediction):
  c = np.linspace(-0.9, 0.9, 4 * 4 * 3, dtype=np.float32).reshape(4, 4, 3)
  x0 = np.broadcast_to(c, (16, 4, 4, 3))

  @jax.jit
  def losses(rng, schedule):
    oracle = point_oracle(schedule, c, prediction)
    # learn_sigma: a doubled output whose second (variance) half is garbage; only the first counts.
    doubled = lambda x, t, y: jnp.concatenate([oracle(x, t, y), 1e3 + x], -1)
    return [diffusion_loss(fn, x0, None, rng, schedule, prediction=prediction)
            for fn in (oracle, doubled)]

  for schedule in SCHEDULES.values():
    for loss, aux in losses(key(2), schedule):
      assert float(loss) < 1e-8
      assert aux["loss_per_sample"].shape == (16,) and aux["t"].dtype == jnp.int32


def test_loss_of_zero_model_is_noise_energy():
  x0 = np.zeros((64, 16, 16, 4), np.float32)
  loss, aux = _jit_loss(lambda s: lambda x, t, y: jnp.zeros_like(x))(x0, None, key(3), LINEAR)
  assert abs(float(loss) - 1.0) < 5 * math.sqrt(2 / x0.size)  # E||eps||^2 per element = 1
  t = np.asarray(aux["t"])
  assert t.min() >= 0 and t.max() < 1000 and len(np.unique(t)) > 50


def test_bad_output_channels_and_prediction_raise():
  x0 = jnp.zeros((2, 4, 4, 3))
  trace = lambda fn, cond=None, **kw: jax.eval_shape(  # raises at trace time, no compile
      lambda: diffusion_loss(fn, x0, cond, key(0), LINEAR, **kw))
  with pytest.raises(ConfigError, match="channels"):
    trace(lambda x, t, y: x[..., :2])
  with pytest.raises(ConfigError, match="prediction"):
    trace(lambda x, t, y: x, prediction="x0")
  with pytest.raises(ConfigError, match="null_label"):
    trace(lambda x, t, y: x, jnp.zeros(2, jnp.int32), label_dropout=0.1)


def test_label_dropout_rate_and_null_label():
  n, p, null = 20000, 0.15, 10
  echo = lambda s: lambda x, t, y: jnp.broadcast_to(y.astype(jnp.float32)[:, None, None, None],
                                                    x.shape)
  labels = np.arange(n, dtype=np.int32) % 10
  x0 = np.zeros((n, 1, 1, 1), np.float32)
  _, aux = _jit_loss(echo, label_dropout=p, null_label=null)(x0, labels, key(4), LINEAR)
  dropped = np.asarray(aux["label_dropped"])
  assert abs(dropped.mean() - p) < 5 * math.sqrt(p * (1 - p) / n)
  # The model echoes the label it saw: loss_per_sample = (y_seen - eps)^2. Same rng -> same eps,
  # so compare with runs on all-kept and all-null labels.
  plain = _jit_loss(echo)
  keep = np.asarray(plain(x0, labels, key(4), LINEAR)[1]["loss_per_sample"])
  nulls = np.asarray(plain(x0, np.full_like(labels, null), key(4), LINEAR)[1]["loss_per_sample"])
  per = np.asarray(aux["loss_per_sample"])
  np.testing.assert_allclose(per[dropped], nulls[dropped])
  np.testing.assert_allclose(per[~dropped], keep[~dropped])
  assert np.all(keep != nulls)


def test_loss_jit_and_grad():
  def loss(w, rng):
    return diffusion_loss(lambda x, t, y: w * x, jnp.ones((8, 4, 4, 2)), None, rng, LINEAR)[0]
  g = jax.jit(jax.grad(loss))(jnp.float32(0.5), key(5))
  assert np.isfinite(float(g)) and float(g) != 0.0


# ---------------------------------------------------------------------------------- samplers


def _sampler(make_model, shape, **kw):
  """Jitted rng, schedule -> samples, the model built from the (traced) schedule."""
  return jax.jit(lambda rng, schedule: sample(make_model(schedule), rng, shape, None, schedule,
                                              **kw))


@pytest.mark.parametrize("method,num_steps,eta,prediction", [
    ("ddim", 10, 0.0, "eps"), ("dpmpp_2m", 10, 0.0, "eps"), ("ddpm", 20, 0.0, "eps"),
    ("ddim", 10, 1.0, "v"), ("dpmpp_2m", 7, 0.0, "v")])
def test_samplers_recover_point_data(method, num_steps, eta, prediction):
  c = np.linspace(-0.9, 0.9, 4 * 4 * 2, dtype=np.float32).reshape(4, 4, 2)
  run = _sampler(lambda s: point_oracle(s, c, prediction), (8, 4, 4, 2), method=method,
                 num_steps=num_steps, eta=eta, prediction=prediction)
  for schedule in SCHEDULES.values():
    np.testing.assert_allclose(run(key(6), schedule), np.broadcast_to(c, (8, 4, 4, 2)), atol=1e-4)


def _gaussian_chain(schedule, ts, mu, sd, method):
  """Closed-form mean/std of the discrete DDIM(eta=0)/DDPM chain on N(mu, sd^2) data.

  With the exact eps, y = x - sqrt(ab) mu maps linearly: x0_hat = mu + sqrt(ab) sd^2 y / v,
  v = ab sd^2 + 1 - ab, so each step multiplies y by a scalar (plus DDPM's posterior noise, or
  noise of variance beta for "ddpm_beta", before the final step).
  """
  ab = np.asarray(schedule.alphas_cumprod, np.float64)[ts]
  ab_n = np.append(ab[1:], 1.0)
  m, var = -np.sqrt(ab[0]) * mu, 1.0  # y_T = x_T - sqrt(ab_T) mu, x_T ~ N(0, 1)
  for a2, an2 in zip(ab, ab_n):
    v = a2 * sd ** 2 + 1 - a2
    k = np.sqrt(a2) * sd ** 2 / v  # d x0_hat / d y
    if method == "ddim":
      r, noise = np.sqrt(an2) * k + np.sqrt(1 - an2) * np.sqrt(1 - a2) / v, 0.0
    else:
      beta = 1 - a2 / an2
      c1, c2 = np.sqrt(an2) * beta / (1 - a2), np.sqrt(1 - beta) * (1 - an2) / (1 - a2)
      r, noise = c1 * k + c2, beta * (1 - an2) / (1 - a2)
      if method == "ddpm_beta":
        noise = beta if an2 < 1 else 0.0
    m, var = r * m, r ** 2 * var + noise
  return mu + m, math.sqrt(var)


@pytest.mark.parametrize("method,num_steps", [("ddim", 10), ("ddpm", 20)])
def test_gaussian_data_matches_discrete_closed_form(method, num_steps):
  mu, sd = 0.3, 0.5
  run = _sampler(lambda s: gaussian_oracle(s, mu, sd), (4096, 4, 4, 1), method=method,
                 num_steps=num_steps, clip_x0=False)
  ts = sampling_timesteps(1000, num_steps)
  for schedule in SCHEDULES.values():
    x = np.asarray(run(key(7), schedule), np.float64).ravel()
    mean, std = _gaussian_chain(schedule, ts, mu, sd, method)
    assert std < 0.95 * sd  # few steps: visibly off the data distribution ...
    assert abs(x.mean() - mean) < 5 * std / math.sqrt(x.size), (x.mean(), mean)
    assert abs(x.std() / std - 1) < 5 / math.sqrt(2 * x.size), (x.std(), std)  # ... but exact


# rtol: discretisation bias measured on this N(0.3, 0.5^2) toy, worst of linear/cosine (linear):
# first-order jumps shrink the spread: DDIM-100 0.964 sd, DDPM-250 0.966 sd, DPM++(2M)-30 0.983 sd.
@pytest.mark.parametrize("method,num_steps,rtol", [("dpmpp_2m", 30, 0.025), ("ddim", 100, 0.045),
                                                   ("ddpm", 250, 0.045)])
def test_gaussian_data_moments(method, num_steps, rtol):
  mu, sd = 0.3, 0.5
  run = _sampler(lambda s: gaussian_oracle(s, mu, sd), (4096, 2, 2, 1), method=method,
                 num_steps=num_steps, clip_x0=False)
  for schedule in SCHEDULES.values():
    x = np.asarray(run(key(8), schedule))
    assert abs(x.mean() - mu) < 5 * sd / math.sqrt(x.size)
    assert abs(x.std() / sd - 1) < rtol + 5 / math.sqrt(2 * x.size), x.std()


def test_dpmpp_2m_matches_diffusers():
  diffusers = pytest.importorskip("diffusers")
  torch = pytest.importorskip("torch")
  model = gaussian_oracle(LINEAR, 0.3, 0.5)
  shape, rng, n = (64, 2, 2, 1), key(9), 10
  ours = sample(model, rng, shape, None, LINEAR, method="dpmpp_2m", num_steps=n, clip_x0=False,
                spacing="trailing")
  ref = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                              algorithm_type="dpmsolver++", solver_order=2)
  ref.set_timesteps(timesteps=list(sampling_timesteps(1000, n, "trailing")))
  x = torch.from_numpy(np.asarray(jax.random.normal(jax.random.split(rng)[0], shape), np.float64))
  for t in ref.timesteps:
    eps = model(jnp.asarray(x.numpy(), jnp.float32), jnp.full((shape[0],), int(t)), None)
    x = ref.step(torch.from_numpy(np.asarray(eps, np.float64)), t, x).prev_sample
  np.testing.assert_allclose(ours, x.numpy(), atol=1e-4)


def test_sampling_timesteps():
  np.testing.assert_array_equal(sampling_timesteps(1000, 5), [999, 749, 500, 250, 0])
  np.testing.assert_array_equal(sampling_timesteps(10, None), np.arange(9, -1, -1))
  np.testing.assert_array_equal(sampling_timesteps(1000, 4, "trailing"), [999, 749, 499, 249])
  assert len(set(sampling_timesteps(1000, 999))) == 999
  with pytest.raises(ConfigError):
    sampling_timesteps(1000, 1001)
  with pytest.raises(ConfigError):
    sampling_timesteps(1000, 5, "karras")
  with pytest.raises(ConfigError, match="ddim"):
    sample(lambda x, t, y: x, key(0), (1, 2, 2, 1), None, LINEAR, method="euler")


def test_model_sees_the_step_grid():
  seen = []

  def model_fn(x, t, y):
    jax.debug.callback(lambda tt: seen.append(np.asarray(tt)), t, ordered=True)
    return jnp.zeros_like(x)

  sample(model_fn, key(0), (2, 2, 2, 1), None, LINEAR, method="ddim", num_steps=7)
  jax.effects_barrier()
  np.testing.assert_array_equal([s[0] for s in seen], sampling_timesteps(1000, 7))
  assert all(s.shape == (2,) and s.dtype == np.int32 and len(set(s)) == 1 for s in seen)


@pytest.mark.parametrize("method", METHODS)
def test_jit_deterministic_and_rng_dependent(method):
  model = gaussian_oracle(LINEAR, 0.0, 0.5)
  run = jax.jit(lambda rng, sch: sample(model, rng, (4, 3, 3, 2), None, sch, method=method,
                                        num_steps=8, eta=0.5))
  # One method with the default (threefry) keys, the others with rbg keys.
  make_key = jax.random.key if method == "ddim" else key
  a = run(make_key(10), LINEAR)
  np.testing.assert_allclose(a, run(make_key(10), LINEAR), rtol=0, atol=0)
  assert not np.allclose(a, run(make_key(11), LINEAR))


def test_learned_variance():
  """v = +1 selects variance beta, v = -1 the posterior variance: check both chains exactly."""
  mu, sd, n = 0.3, 0.5, 12
  base = gaussian_oracle(LINEAR, mu, sd)
  run = jax.jit(lambda v: sample(
      lambda x, t, y: jnp.concatenate([base(x, t, y), jnp.full_like(x, v)], -1), key(12),
      (4096, 4, 4, 1), None, LINEAR, method="ddpm", num_steps=n, learned_variance=True,
      clip_x0=False))
  ts = sampling_timesteps(1000, n)
  for v, chain in [(1.0, "ddpm_beta"), (-1.0, "ddpm")]:
    x = np.asarray(run(v), np.float64).ravel()
    mean, std = _gaussian_chain(LINEAR, ts, mu, sd, chain)
    assert abs(x.mean() - mean) < 5 * std / math.sqrt(x.size), (x.mean(), mean)
    assert abs(x.std() / std - 1) < 5 / math.sqrt(2 * x.size), (v, x.std(), std)
  stds = [_gaussian_chain(LINEAR, ts, mu, sd, c)[1] for c in ("ddpm_beta", "ddpm")]
  assert stds[0] > 1.1 * stds[1]  # the two variances are distinguishable
  with pytest.raises(ConfigError, match="learn_sigma"):
    jax.eval_shape(lambda: sample(base, key(12), (2, 2, 2, 1), None, LINEAR, method="ddpm",
                                  learned_variance=True))


# ---------------------------------------------------------------------------------- guidance


def _cond_model(x, t, y):
  """eps depends on the label so guidance has something to mix."""
  return 0.1 * x + 0.01 * y.astype(jnp.float32)[:, None, None, None] + 1e-4 * t[:, None, None, None]


def test_guidance_one_equals_conditional():
  y, null = jnp.array([1, 2, 3]), jnp.array([10, 10, 10])
  assert guided(_cond_model, 1.0, null) is _cond_model  # w = 1: the conditional model itself
  kw = dict(method="ddim", num_steps=6, clip_x0=False)
  plain = sample(_cond_model, key(13), (3, 2, 2, 1), y, LINEAR, **kw)
  # The 2B path (traced scale) with w = 1 gives the same numbers.
  g1 = jax.jit(lambda w: sample(_cond_model, key(13), (3, 2, 2, 1), y, LINEAR,
                                guidance_scale=w, uncond=null, **kw))(1.0)
  np.testing.assert_allclose(g1, plain, atol=1e-5)


def test_guidance_single_2b_call_per_step_and_mixing():
  calls = []

  def model_fn(x, t, y):
    jax.debug.callback(lambda b: calls.append(int(b)), x.shape[0], ordered=True)
    return _cond_model(x, t, y)

  y, null, w = jnp.array([1, 2, 3]), jnp.array([10]), 4.0  # uncond of batch 1 is broadcast
  sample(model_fn, key(14), (3, 2, 2, 1), y, LINEAR, method="dpmpp_2m", num_steps=5,
         guidance_scale=w, uncond=null)
  jax.effects_barrier()
  assert calls == [6] * 5

  x, t = jnp.ones((3, 2, 2, 1)), jnp.array([5, 5, 5])
  mixed = guided(_cond_model, w, null)(x, t, y)
  e_c, e_u = _cond_model(x, t, y), _cond_model(x, t, jnp.full((3,), 10))
  np.testing.assert_allclose(mixed, e_u + w * (e_c - e_u), atol=1e-6)


def test_guidance_pytree_condition_and_learn_sigma():
  def model_fn(x, t, cond):
    e = 0.1 * x + cond["emb"].mean(axis=(1, 2))[:, None, None, None]
    return jnp.concatenate([e, x + cond["scale"][:, None, None, None]], -1)  # variance half

  cond = {"emb": jnp.ones((2, 3, 4)), "scale": jnp.array([1.0, 2.0])}
  uncond = {"emb": jnp.zeros((1, 3, 4)), "scale": jnp.zeros((1,))}
  x, t = jnp.zeros((2, 2, 2, 1)), jnp.zeros((2,), jnp.int32)
  out = guided(model_fn, 3.0, uncond)(x, t, cond)
  np.testing.assert_allclose(out[..., 0], 3.0)  # 0 + 3 (1 - 0)
  np.testing.assert_allclose(out[..., 1], np.broadcast_to([[[1.0]], [[2.0]]], (2, 2, 2)))
