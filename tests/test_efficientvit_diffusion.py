"""The DC-AE paper's diffusion checkpoints (efficientvit DCAE_Diffusion_HF) end to end.

Fixtures are official-layout directories (config.json + model.safetensors with autoencoder.*
in efficientvit's DC-AE layout and diffusion_model.* from the torch twins in
tests/torch_efficientvit_diffusion.py), tiny and random. References written here follow
efficientvit's sampling code: DPM_Solver(predict_x0=True).sample(method="fast", order 3,
time_uniform, eps=1/N, T=1) in torch float32 for UViT, guided-diffusion's respaced
p_sample_loop (float64 coefficients, the doubled-batch CFG of forward_with_cfg) for DiT.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import torch_efficientvit_diffusion as twin  # noqa: E402  pylint: disable=g-import-not-at-top
from test_dcae import narrow, randomize_norms, to_original  # noqa: E402

from jaxgen.convert import efficientvit_diffusion as convert  # noqa: E402
from jaxgen.diffusion import dpm_solver  # noqa: E402
from jaxgen.diffusion.samplers import sampling_timesteps  # noqa: E402
from jaxgen.errors import ConfigError, WeightsError  # noqa: E402
from jaxgen.models.dcae import dcae_config  # noqa: E402
from jaxgen.pipelines import load_pipeline, pipeline_class  # noqa: E402
from jaxgen.pipelines.dcae_diffusion import DCAEDiffusionPipeline, uvit_betas  # noqa: E402

NUM_CLASSES = 10
RESOLUTION = 64  # f32 autoencoder: 2x2 latents
SCALING = 0.3189


@pytest.fixture(autouse=True, scope="module")
def _torch_one_thread():
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def autoencoder():
  """A narrowed f32c32 DC-AE: (diffusers module, its AutoencoderDC config, efficientvit state)."""
  config = narrow(dcae_config("f32c32-in-1.0"))
  torch.manual_seed(0)
  ref = randomize_norms(diffusers.AutoencoderDC(**config))
  state = to_original({k: v.numpy() for k, v in ref.state_dict().items()})
  return ref, config, state


def make_checkpoint(path, kind, autoencoder, seed=0, resolution=RESOLUTION, **fields):
  """A DCAE_Diffusion_HF directory with a tiny random backbone; returns (path, torch model)."""
  ae, ae_config, ae_state = autoencoder
  f = 2 ** (len(ae_config["encoder_block_out_channels"]) - 1)
  fields = dict(dict(depth=2, hidden_size=32, num_heads=4, num_classes=NUM_CLASSES,
                     in_channels=ae_config["latent_channels"]), **fields)
  torch.manual_seed(seed)
  cls = twin.UViT if kind == "uvit" else twin.DiT
  model = cls(input_size=resolution // f, **fields).eval()
  name = ("dc-ae-f32c32-in-1.0-uvit-s-in-512px" if kind == "uvit"
          else "dc-ae-f32c32-in-1.0-dit-xl-in-512px")
  # Registered name + EvaluatorConfig overrides (efficientvit itself reads model_name only).
  config = {"model_name": name, "autoencoder_config": ae_config, "resolution": resolution,
            kind: {k: v for k, v in fields.items()}}
  twin.save_checkpoint(str(path), config, model, ae_state)
  del ae
  return str(path), model


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(x):
  return x.detach().numpy().transpose(0, 2, 3, 1)


def rel_err(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


# -- config.json ----------------------------------------------------------------------------------


def test_config_recognition_and_registry():
  for name in ("dc-ae-f32c32-in-1.0-uvit-h-in-512px", "dc-ae-f64c128-in-1.0-uvit-2b-in-512px-"
               "train2000k", "dc-ae-f32c32-in-1.0-dit-xl-in-512px-trainbs1024",
               "dc-ae-f32c32-in-1.0-usit-h-in-512px"):
    assert convert.is_dcae_diffusion_config({"model_name": name})
  assert not convert.is_dcae_diffusion_config({"model_name": "dc-ae-f32c32-in-1.0"})  # DCAE_HF
  assert not convert.is_dcae_diffusion_config({"_class_name": "AutoencoderDC"})
  assert DCAEDiffusionPipeline.accepts_config({"model_name": "dc-ae-f32c32-in-1.0-uvit-s-in-512px"})

  r = convert.resolve_config({"model_name": "dc-ae-f64c128-in-1.0-uvit-h-in-512px"})
  assert (r["autoencoder"], r["scaling_factor"], r["model"]) == ("dc-ae-f64c128-in-1.0", 0.2889,
                                                                  "uvit")
  assert {k: r["uvit"][k] for k in ("depth", "hidden_size", "num_heads", "patch_size",
                                    "in_channels", "num_inference_steps")} == dict(
      depth=28, hidden_size=1152, num_heads=16, patch_size=1, in_channels=128,
      num_inference_steps=30)
  r = convert.resolve_config({"model_name": "dc-ae-f32c32-in-1.0-dit-xl-in-512px"})
  assert r["dit"]["learn_sigma"] and r["dit"]["in_channels"] == 32
  assert r["scaling_factor"] == SCALING
  assert convert.resolve_config({"model_name": "dc-ae-f32c32-in-1.0-usit-2b-in-512px"})["uvit"][
      "eval_scheduler"] == "ODE_dopri5"
  with pytest.raises(WeightsError, match="not a DC-AE diffusion model"):
    convert.resolve_config({"model_name": "dc-ae-f32c32-in-1.0-uvit-xxl"})
  with pytest.raises(WeightsError, match="fields"):
    convert.resolve_config({"model_name": "dc-ae-f32c32-in-1.0-uvit-s-in-512px",
                            "uvit": {"hidden": 3}})


# efficientvit's README "Params (M)" of the published backbones.
@pytest.mark.parametrize("name,millions", [
    ("dc-ae-f32c32-in-1.0-uvit-s-in-512px", 44.79),
    ("dc-ae-f32c32-in-1.0-dit-xl-in-512px", 674.89),
    ("dc-ae-f64c128-in-1.0-uvit-h-in-512px", 500.87),
    ("dc-ae-f32c32-in-1.0-uvit-2b-in-512px", 1580.40),
])
def test_published_recipes_param_counts(name, millions):
  recipe = convert.resolve_config({"model_name": name})
  kind = recipe["model"]
  f = 64 if "f64" in name else 32
  module = convert.uvit_module(recipe[kind]) if kind == "uvit" else convert.dit_module(
      recipe[kind])
  x = jax.ShapeDtypeStruct((1, 512 // f, 512 // f, recipe[kind]["in_channels"]), jnp.float32)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x,
                          jax.ShapeDtypeStruct((1,), jnp.float32),
                          jax.ShapeDtypeStruct((1,), jnp.int32))
  count = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(shapes))
  assert round(count / 1e6, 2) == millions, count


# -- the backbones against the torch twins ------------------------------------------------------


@pytest.mark.parametrize("kind,fields", [
    ("uvit", {}),
    ("uvit", dict(patch_size=2, mlp_time_embed=True, qkv_bias=True, depth=4)),
    ("dit", {}),
    ("dit", dict(patch_size=2, depth=1)),
])
def test_denoiser_matches_torch(kind, fields):
  side = 4
  fields = dict(dict(depth=2, hidden_size=32, num_heads=4, num_classes=NUM_CLASSES,
                     in_channels=4), **fields)
  torch.manual_seed(0)
  model = (twin.UViT if kind == "uvit" else twin.DiT)(input_size=side, **fields).eval()
  name = {"uvit": "dc-ae-f32c32-in-1.0-uvit-s-in-512px",
          "dit": "dc-ae-f32c32-in-1.0-dit-xl-in-512px"}[kind]
  recipe = convert.resolve_config({"model_name": name, kind: fields})
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  backbone, variables = (convert.convert_uvit if kind == "uvit" else convert.convert_dit)(
      recipe[kind], state, side)
  rng = np.random.RandomState(1)
  x = rng.randn(3, side, side, 4).astype(np.float32)
  y = np.array([0, 3, NUM_CLASSES], np.int32)  # the last is the null label
  t = (np.array([1.0, 517.3, 1000.0], np.float32) if kind == "uvit"
       else np.array([0, 431, 999], np.float32))
  with torch.no_grad():
    want = nhwc(model.forward_without_cfg(nchw(x), torch.from_numpy(t), torch.from_numpy(y)))
  got = backbone.apply(variables, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y))
  assert got.shape == want.shape == (3, side, side, 4 * (2 if kind == "dit" else 1))
  err = rel_err(got, want)
  print(f"{kind} {fields} denoiser rel err {err:.2e}")
  assert err < 1e-4, err


def test_conversion_errors_name_tensors(autoencoder, tmp_path):
  path, model = make_checkpoint(tmp_path / "ok", "uvit", autoencoder)
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  state = load_file(f"{path}/model.safetensors")
  state["diffusion_model.extra.weight"] = np.zeros(3, np.float32)
  del state["diffusion_model.mid_block.attn.proj.bias"]
  save_file(state, f"{path}/model.safetensors")
  with pytest.raises(WeightsError) as e:
    convert.from_directory(path)
  msg = str(e.value)
  assert "model.safetensors" in msg and "diffusion_model.*" in msg
  assert "mid_block/attn/to_out/bias" in msg and "extra.weight" in msg
  del model


# -- samplers against torch re-implementations of efficientvit's loops -------------------------


def _interp(x, xp, fp):
  """dpm_solver's interpolate_fn for one channel: linear, extended past both ends."""
  i = torch.clamp(torch.searchsorted(xp, x) - 1, 0, xp.shape[0] - 2)
  return fp[i] + (x - xp[i]) * (fp[i + 1] - fp[i]) / (xp[i + 1] - xp[i])


class RefNoiseScheduleVP:
  """NoiseScheduleVP(schedule="discrete", betas=float32 tensor), torch float32."""

  def __init__(self, betas):
    betas = torch.tensor(betas, dtype=torch.float64).float()
    self.total_N = len(betas)
    self.log_alpha_discrete = 0.5 * torch.log(1 - betas).cumsum(dim=0)
    self.t_discrete = torch.linspace(1.0 / self.total_N, 1.0, self.total_N)

  def marginal_log_mean_coeff(self, t):
    return _interp(t, self.t_discrete, self.log_alpha_discrete)

  def marginal_alpha(self, t):
    return torch.exp(self.marginal_log_mean_coeff(t))

  def marginal_std(self, t):
    return torch.sqrt(1.0 - torch.exp(2.0 * self.marginal_log_mean_coeff(t)))

  def marginal_lambda(self, t):
    m = self.marginal_log_mean_coeff(t)
    return m - 0.5 * torch.log(1.0 - torch.exp(2.0 * m))

  def inverse_lambda(self, lamb):
    log_alpha = -0.5 * torch.logaddexp(torch.zeros(()), -2.0 * lamb)
    return _interp(log_alpha, torch.flip(self.log_alpha_discrete, [0]),
                   torch.flip(self.t_discrete, [0]))


def ref_dpm_solver(model_fn, x, ns, steps, order=3, method="fast", skip_type="time_uniform",
                   predict_x0=True, solver_type="dpm_solver"):
  """DPM_Solver(model_fn, ns, predict_x0).sample(x, steps, eps=1/N, T=1, ...)."""
  t_0, t_T = 1.0 / ns.total_N, 1.0

  def data_fn(x, t):
    noise = model_fn(x, t)
    if not predict_x0:
      return noise
    return (x - ns.marginal_std(t)[:, None, None, None] * noise) / ns.marginal_alpha(t)[
        :, None, None, None]

  def grid(n):
    if skip_type == "logSNR":
      lam = torch.linspace(ns.marginal_lambda(torch.tensor(t_T)).item(),
                           ns.marginal_lambda(torch.tensor(t_0)).item(), n + 1)
      return ns.inverse_lambda(lam)
    return torch.linspace(t_T, t_0, n + 1)

  def update(x, s, t, p, r1=None, r2=None):
    e = lambda v: v[:, None, None, None]
    lam_s, lam_t = ns.marginal_lambda(s), ns.marginal_lambda(t)
    h = lam_t - lam_s
    la = ns.marginal_log_mean_coeff
    sg = ns.marginal_std
    n_s = data_fn(x, s)
    if predict_x0:
      def first(u, frac):  # x_u from x at s along the first-order path with n_s
        return e(sg(u) / sg(s)) * x - e(torch.exp(la(u)) * torch.expm1(-frac * h)) * n_s
    else:
      def first(u, frac):
        return e(torch.exp(la(u) - la(s))) * x - e(sg(u) * torch.expm1(frac * h)) * n_s
    if p == 1:
      return first(t, 1.0)
    if p == 2:
      r1 = 0.5 if r1 is None else r1
      s1 = ns.inverse_lambda(lam_s + r1 * h)
      n_s1 = data_fn(first(s1, r1), s1)
      if predict_x0:
        phi_1 = torch.expm1(-h)
        corr = (-(0.5 / r1) * e(torch.exp(la(t)) * phi_1) if solver_type == "dpm_solver"
                else (1.0 / r1) * e(torch.exp(la(t)) * (phi_1 / h + 1.0)))
      else:
        phi_1 = torch.expm1(h)
        corr = (-(0.5 / r1) * e(sg(t) * phi_1) if solver_type == "dpm_solver"
                else -(1.0 / r1) * e(sg(t) * (phi_1 / h - 1.0)))
      return first(t, 1.0) + corr * (n_s1 - n_s)
    r1 = 1.0 / 3.0 if r1 is None else r1
    r2 = 2.0 / 3.0 if r2 is None else r2
    s1, s2 = ns.inverse_lambda(lam_s + r1 * h), ns.inverse_lambda(lam_s + r2 * h)
    n_s1 = data_fn(first(s1, r1), s1)
    if predict_x0:
      phi_22 = torch.expm1(-r2 * h) / (r2 * h) + 1.0
      x_s2 = first(s2, r2) + (r2 / r1) * e(torch.exp(la(s2)) * phi_22) * (n_s1 - n_s)
      phi_2 = torch.expm1(-h) / h + 1.0
      scale, sign = torch.exp(la(t)), 1.0
    else:
      phi_22 = torch.expm1(r2 * h) / (r2 * h) - 1.0
      x_s2 = first(s2, r2) - (r2 / r1) * e(sg(s2) * phi_22) * (n_s1 - n_s)
      phi_2 = torch.expm1(h) / h - 1.0
      scale, sign = sg(t), -1.0
    n_s2 = data_fn(x_s2, s2)
    if solver_type == "dpm_solver":
      return first(t, 1.0) + sign * (1.0 / r2) * e(scale * phi_2) * (n_s2 - n_s)
    phi_3 = phi_2 / h - 0.5
    d1_0, d1_1 = (n_s1 - n_s) / r1, (n_s2 - n_s) / r2
    d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
    d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
    return first(t, 1.0) + sign * e(scale * phi_2) * d1 - e(scale * phi_3) * d2

  b = x.shape[0]
  if method == "fast":
    k = steps // order + 1
    if order == 3:
      orders = [3] * (k - 2) + [2, 1] if steps % 3 == 0 else [3] * (k - 1) + [steps % 3]
    else:
      orders = [2] * (steps // 2) + [1] * (steps % 2)
    ts = grid(steps)
    i = 0
    for p in orders:
      lam = ns.marginal_lambda
      h = lam(ts[i + p]) - lam(ts[i])
      r1 = None if p <= 1 else (lam(ts[i + 1]) - lam(ts[i])) / h
      r2 = None if p <= 2 else (lam(ts[i + 2]) - lam(ts[i])) / h
      x = update(x, torch.ones(b) * ts[i], torch.ones(b) * ts[i + p], p, r1, r2)
      i += p
    return x
  ts = grid(steps // order)
  for i in range(steps // order):
    x = update(x, torch.ones(b) * ts[i], torch.ones(b) * ts[i + 1], order)
  return x


@pytest.mark.parametrize("steps,order,method,skip_type,predict_x0,solver_type", [
    (30, 3, "fast", "time_uniform", True, "dpm_solver"),   # efficientvit's UViT setting
    (8, 3, "fast", "logSNR", False, "taylor"),
    (7, 2, "fast", "time_uniform", True, "taylor"),
    (6, 3, "singlestep", "time_uniform", False, "dpm_solver"),
    (4, 2, "singlestep", "logSNR", True, "dpm_solver"),
])
def test_dpm_solver_matches_reference(steps, order, method, skip_type, predict_x0, solver_type):
  """A nonlinear toy noise model; all orders, both predictions, both solver types."""
  rng = np.random.RandomState(0)
  x = rng.randn(2, 3, 3, 2).astype(np.float32)
  w = rng.randn(2, 2).astype(np.float32) * 0.5

  def toy(x, t):  # noise prediction, x NHWC
    return np.tanh(x @ w) * (0.5 + t[:, None, None, None] ** 2) + 0.1 * x

  table = dpm_solver.plan(uvit_betas(), steps, order=order, method=method, skip_type=skip_type,
                          predict_x0=predict_x0, solver_type=solver_type)
  assert len(table.t) == (steps if method == "fast" else steps // order * order)
  got = jax.jit(lambda x: dpm_solver.sample(
      lambda x, t: jnp.tanh(x @ w) * (0.5 + t[:, None, None, None] ** 2) + 0.1 * x, x, table,
      predict_x0=predict_x0))(jnp.asarray(x))
  ns = RefNoiseScheduleVP(uvit_betas())
  want = ref_dpm_solver(lambda x, t: torch.from_numpy(toy(x.numpy(), t.numpy())),
                        torch.from_numpy(x), ns, steps, order, method, skip_type, predict_x0,
                        solver_type).numpy()
  err = float(np.abs(np.asarray(got) - want).max())
  print(f"dpm-solver {method} {order} {skip_type} {predict_x0} {solver_type}: {err:.2e}")
  assert err < 1e-4 * max(1.0, float(np.abs(want).max())), err


def space_timesteps(num_timesteps, count):
  """guided-diffusion's space_timesteps(T, str(count)): one section."""
  stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
  cur, out = 0.0, []
  for _ in range(count):
    out.append(round(cur))
    cur += stride
  return sorted(set(out))


def ref_gaussian_diffusion(model, x, labels, noises, steps, scale):
  """efficientvit DiT.generate: respaced p_sample_loop (learned range, clip_denoised=False);
  CFG on a doubled batch exactly as forward_with_cfg. x NCHW float32 numpy; noises[k] is the
  fresh noise of loop iteration k (the first half of the doubled batch)."""
  betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
  ab_full = np.cumprod(1.0 - betas)
  use = space_timesteps(1000, steps)
  new_betas, last = [], 1.0
  for i, a in enumerate(ab_full):
    if i in use:
      new_betas.append(1 - a / last)
      last = a
  betas = np.array(new_betas)
  ab = np.cumprod(1.0 - betas)
  ab_prev = np.append(1.0, ab[:-1])
  post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
  post_log_var = np.log(np.append(post_var[1], post_var[1:]))
  coef1 = betas * np.sqrt(ab_prev) / (1.0 - ab)
  coef2 = (1.0 - ab_prev) * np.sqrt(1.0 - betas) / (1.0 - ab)
  f = lambda a, i: torch.tensor(a[i], dtype=torch.float64).float()
  c = x.shape[1]
  cfg = scale != 1.0
  img = torch.from_numpy(x)
  y = torch.from_numpy(labels).long()
  if cfg:
    img = torch.cat([img, img])
    y = torch.cat([y, torch.full_like(y, NUM_CLASSES)])
  for k, i in enumerate(reversed(range(len(use)))):
    t = torch.full((img.shape[0],), use[i], dtype=torch.float32)
    with torch.no_grad():
      if cfg:
        half = img[: len(img) // 2]
        out = model.forward_without_cfg(torch.cat([half, half]), t, y)
        eps, rest = out[:, :c], out[:, c:]
        cond, uncond = torch.split(eps, len(eps) // 2)
        half_eps = uncond + scale * (cond - uncond)
        out = torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)
      else:
        out = model.forward_without_cfg(img, t, y)
    eps, var = out[:, :c], out[:, c:]
    x0 = f(np.sqrt(1.0 / ab), i) * img - f(np.sqrt(1.0 / ab - 1), i) * eps
    mean = f(coef1, i) * x0 + f(coef2, i) * img
    frac = (var + 1) / 2
    log_var = frac * f(np.log(betas), i) + (1 - frac) * f(post_log_var, i)
    noise = torch.from_numpy(np.asarray(noises[k]).transpose(0, 3, 1, 2).copy())
    if cfg:
      noise = torch.cat([noise, torch.randn_like(noise)])
    img = mean + (1.0 if i != 0 else 0.0) * torch.exp(0.5 * log_var) * noise
  return img[: x.shape[0]].numpy()


class GaussianToy:
  """The exact noise predictor of data N(mu_y, s2 I) (mu_null = 0), NCHW, with a varying
  learned-range variance half: a sampler test whose latents stay O(1)."""
  s2 = 0.25

  def __init__(self, channels):
    self.mu = torch.linspace(-1.0, 1.0, NUM_CLASSES + 1)[:, None] * torch.linspace(
        0.5, 1.0, channels)[None]
    self.mu[NUM_CLASSES] = 0.0
    self.ab = torch.from_numpy(np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))).float()

  def forward_without_cfg(self, x, t, y):
    ab = self.ab[t.long()][:, None, None, None]
    mu = self.mu[y.long()][:, :, None, None]
    eps = torch.sqrt(1 - ab) * (x - torch.sqrt(ab) * mu) / (ab * self.s2 + 1 - ab)
    return torch.cat([eps, 0.5 * torch.tanh(x)], dim=1)


@pytest.mark.parametrize("steps,scale", [(250, 1.0), (25, 3.0)])
def test_respaced_ddpm_matches_guided_diffusion(steps, scale):
  from jaxgen.diffusion import samplers  # pylint: disable=g-import-not-at-top
  from jaxgen.pipelines.dcae_diffusion import dit_schedule  # pylint: disable=g-import-not-at-top
  toy = GaussianToy(3)
  rng = np.random.RandomState(0)
  shape = (2, 4, 4, 3)
  x = rng.randn(*shape).astype(np.float32)
  noises = rng.randn(steps, *shape).astype(np.float32)
  labels = np.array([0, 7], np.int32)

  def model_fn(x, t, y):
    out = toy.forward_without_cfg(nchw(x), torch.from_numpy(np.array(t)),
                                  torch.from_numpy(np.array(y)))
    return out.numpy().transpose(0, 2, 3, 1)

  jax_model = lambda x, t, y: jax.pure_callback(
      model_fn, jax.ShapeDtypeStruct(x.shape[:-1] + (6,), jnp.float32), x, t, y)
  got = samplers.sample(
      jax_model, None, shape, jnp.asarray(labels), dit_schedule(), method="ddpm",
      num_steps=steps, guidance_scale=scale, uncond=None if scale == 1.0 else jnp.full(
          (2,), NUM_CLASSES), clip_x0=False, learned_variance=True, spacing="guided_diffusion",
      x_init=jnp.asarray(x), step_noise=lambda i: jnp.asarray(noises)[i])
  want = ref_gaussian_diffusion(toy, x.transpose(0, 3, 1, 2), labels, noises, steps, scale)
  err = float(np.abs(np.asarray(got) - want.transpose(0, 2, 3, 1)).max())
  print(f"ddpm {steps} steps cfg {scale}: max err {err:.2e} (of {np.abs(want).max():.2f})")
  assert np.abs(want).max() < 10 and err < 1e-4, err


def decode_reference(ae, latents_nchw):
  with torch.no_grad():
    images = ae.decode(torch.from_numpy(latents_nchw) / SCALING).sample
  return np.clip(nhwc(images * 0.5 + 0.5), 0.0, 1.0)


def test_guided_diffusion_spacing():
  for n in (1, 7, 21, 25, 50, 250, 999, 1000):
    np.testing.assert_array_equal(sampling_timesteps(1000, n, "guided_diffusion")[::-1],
                                  space_timesteps(1000, n))
  assert 499 in sampling_timesteps(1000, 21, "guided_diffusion")
  assert 500 in sampling_timesteps(1000, 21)


def test_uvit_pipeline_matches_efficientvit_sampling(autoencoder, tmp_path):
  path, model = make_checkpoint(tmp_path, "uvit", autoencoder, seed=2)
  assert pipeline_class(path) is DCAEDiffusionPipeline
  pipe = load_pipeline(path)
  assert (pipe.default_steps, pipe.default_guidance, pipe.num_classes) == (30, 6.0, NUM_CLASSES)
  labels = np.array([1, 7], np.int32)
  latents = pipe.noise(3, len(labels))
  steps = 7  # orders 3, 3, 1
  ns = RefNoiseScheduleVP(uvit_betas())
  y, y_null = torch.from_numpy(labels).long(), torch.full((2,), NUM_CLASSES)

  for scale in (4.0, 1.0):
    def model_fn(x, t_continuous, scale=scale):  # efficientvit UViT.generate's model_fn
      t = t_continuous * ns.total_N
      with torch.no_grad():
        if scale == 1.0:
          return model.forward_without_cfg(x, t, y)
        cond = model.forward_without_cfg(x, t, y)
        uncond = model.forward_without_cfg(x, t, y_null)
        return cond + (scale - 1) * (cond - uncond)

    got = pipe(labels, num_inference_steps=steps, guidance_scale=scale, latents=latents,
               output_type="latent")
    want = ref_dpm_solver(model_fn, nchw(latents), ns, steps).numpy()
    if scale != 1.0:  # to images
      images = np.asarray(jax.jit(pipe.decode)(pipe.variables, got))
      img_err = float(np.abs(images - decode_reference(autoencoder[0], want)).max())
      print(f"uvit cfg {scale}: images max err {img_err:.2e} "
            f"({np.mean((images > 0) & (images < 1)):.0%} unclipped)")
      assert images.shape == (2, RESOLUTION, RESOLUTION, 3)
      assert img_err <= 2e-3, img_err
    err = float(np.abs(got - want.transpose(0, 2, 3, 1)).max())
    print(f"uvit cfg {scale}: latents max err {err:.2e} (of {np.abs(want).max():.1f})")
    # Random backbones are poor denoisers: the latents grow large (tens), hence relative.
    assert err < 1e-4 * float(np.abs(want).max()), err
  with pytest.raises(ConfigError, match="dpm_solver"):
    pipe.sample_latents(pipe.variables, jnp.asarray(latents), jnp.asarray(labels), 1.0, 3,
                        "euler")
  with pytest.raises(ConfigError, match="outside"):
    pipe([NUM_CLASSES], num_inference_steps=2)
  assert math.isclose(pipe.scaling_factor, SCALING)
  y01 = np.random.RandomState(0).uniform(-0.1, 1.1, (2, 8, 8, 3)).astype(np.float32)
  x = torch.from_numpy(np.clip(y01, 0, 1) * 2 - 1)  # efficientvit's [-1, 1] decoder output
  np.testing.assert_array_equal(pipe.to_uint8(np.clip(y01, 0, 1)),
                                torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8).numpy())
  # One backbone evaluation in the checkpoint's units (t = 1000 x continuous time).
  with torch.no_grad():
    want = nhwc(model.forward_without_cfg(nchw(latents), torch.full((2,), 250.0), y))
  assert rel_err(pipe.denoiser(latents, jnp.full((2,), 250.0), labels), want) < 1e-4


def test_dit_pipeline_matches_efficientvit_sampling(autoencoder, tmp_path):
  path, model = make_checkpoint(tmp_path, "dit", autoencoder, seed=3)
  pipe = load_pipeline(path)
  assert (pipe.default_steps, pipe.default_guidance) == (250, 6.0)
  labels = np.array([2, 9], np.int32)
  latents = jnp.asarray(pipe.noise(5, len(labels)))
  steps = 10
  draw = jax.jit(pipe.step_noise(latents))
  noises = [np.asarray(draw(jnp.int32(k))) for k in range(steps)]
  # Per-image step noise: image 0's does not depend on what else is in the batch.
  np.testing.assert_array_equal(np.asarray(pipe.step_noise(latents[:1])(jnp.int32(3))),
                                noises[3][:1])
  for scale in (4.0, 1.0):
    run = jax.jit(lambda v, z, y, scale=scale: pipe.sample_latents(v, z, y, scale, steps, None))
    got = np.asarray(run(pipe.variables, latents, jnp.asarray(labels)))
    want = ref_gaussian_diffusion(model, np.asarray(nchw(latents)), labels, noises, steps, scale)
    err = float(np.abs(got - want.transpose(0, 2, 3, 1)).max())
    print(f"dit cfg {scale}: latents max err {err:.2e} (of {np.abs(want).max():.1f})")
    assert err < 1e-4 * float(np.abs(want).max()), err
    if scale != 1.0:
      images = np.asarray(jax.jit(pipe.decode)(pipe.variables, got))
      img_err = float(np.abs(images - decode_reference(autoencoder[0], want)).max())
      print(f"dit cfg {scale}: images max err {img_err:.2e} "
            f"({np.mean((images > 0) & (images < 1)):.0%} unclipped)")
      assert img_err <= 2e-3, img_err


def ref_dopri5(func, y0, t_end=1.0, rtol=1e-3, atol=1e-6):
  """torchdiffeq odeint(func, y0, linspace(0, t_end, n), method="dopri5")[-1] for one sample:
  float64 time, the state's float32 for everything else (rk_common / misc / interp)."""
  tab_alpha = torch.tensor([1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0])
  tab_beta = [torch.tensor(r, dtype=torch.float64).float() for r in (
      [1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
      [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
      [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
      [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84])]
  c_err = torch.tensor([35 / 384 - 1951 / 21600, 0, 500 / 1113 - 22642 / 50085,
                        125 / 192 - 451 / 720, -2187 / 6784 - -12231 / 42400,
                        11 / 84 - 649 / 6300, -1.0 / 60.0], dtype=torch.float64).float()
  mid = torch.tensor([6025192743 / 30085553152 / 2, 0, 51252292925 / 65400821598 / 2,
                      -2691868925 / 45128329728 / 2, 187940372067 / 1594534317056 / 2,
                      -1776094331 / 19743644256 / 2, 11237099 / 235043384 / 2],
                     dtype=torch.float64).float()
  rms = lambda v: v.abs().pow(2).mean().sqrt()
  rtol64, atol64 = torch.tensor(rtol, dtype=torch.float64), torch.tensor(atol, dtype=torch.float64)
  f = lambda t, y: func(torch.as_tensor(t).float(), y)
  t0 = torch.tensor(0.0, dtype=torch.float64)
  y = y0
  f0 = f(t0, y)
  scale = atol + y.abs() * rtol
  d0, d1 = rms(y / scale), rms(f0 / scale)
  h0 = torch.tensor(1e-6) if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
  f1 = f(t0 + h0, y + h0 * f0)
  d2 = rms((f1 - f0) / scale) / h0
  h1 = (torch.max(torch.tensor(1e-6), h0 * 1e-3) if d1 <= 1e-15 and d2 <= 1e-15
        else (0.01 / max(d1, d2)) ** (1.0 / 5))
  dt = torch.min(100 * h0, h1).double()
  fk = f0
  for _ in range(10000):
    t1 = t0 + dt
    t0f, dtf, t1f = t0.float(), dt.float(), t1.float()
    k = [fk]
    for a, b in zip(tab_alpha, tab_beta):
      ti = torch.nextafter(t1f, t1f - 1) if a == 1.0 else t0f + a * dtf
      yi = y + sum(kj * (bj * dtf) for kj, bj in zip(k, b))
      k.append(f(ti, yi))
    y1 = yi
    err = sum(kj * (cj * dtf) for kj, cj in zip(k, c_err))
    ratio = rms(err / (atol64 + rtol64 * torch.max(y.abs(), y1.abs()))).double()
    accept = ratio <= 1
    if accept:
      if t1 >= t_end:
        dt32 = dt.float()
        y_mid = y + sum(kj * (dt32 * mj) for kj, mj in zip(k, mid))
        a4 = 2 * dt32 * (k[6] - k[0]) - 8 * (y1 + y) + 16 * y_mid
        b3 = dt32 * (5 * k[0] - 3 * k[6]) + 18 * y + 14 * y1 - 32 * y_mid
        c2 = dt32 * (k[6] - 4 * k[0]) - 11 * y - 5 * y1 + 16 * y_mid
        x = ((t_end - t0) / (t1 - t0)).float()
        return y + x * dt32 * k[0] + x * x * c2 + x ** 3 * b3 + x ** 4 * a4
      y, fk, t0 = y1, k[6], t1
    if ratio == 0:
      dt = dt * 10.0
    else:
      dfactor = 1.0 if ratio < 1 else 0.2
      dt = dt * torch.clamp(0.9 / ratio ** (1.0 / 5), min=dfactor, max=10.0)
  raise AssertionError("too many steps")


def test_dopri5_matches_torchdiffeq_algorithm():
  """The exact velocity of the linear path to N(mu, s2 I) data (SiT's ICPlan), per sample."""
  from jaxgen.diffusion import dopri5  # pylint: disable=g-import-not-at-top
  mu, s2 = 0.7, 0.09

  def velocity(t, x):  # E[x1 - x0 | x_t], x_t = t x1 + (1 - t) x0
    t = t.reshape((-1,) + (1,) * (x.ndim - 1))
    return mu + (t * s2 - (1 - t)) / (t * t * s2 + (1 - t) ** 2) * (x - t * mu)

  x = np.random.RandomState(0).randn(3, 2, 2, 2).astype(np.float32)
  x[2] *= 3.0  # a sample with its own step sizes
  got = np.asarray(jax.jit(lambda x: dopri5.solve(velocity, x))(jnp.asarray(x)))
  for i in range(3):
    want = ref_dopri5(lambda t, y: velocity(t.reshape(1), y), torch.from_numpy(x[i:i + 1]))
    err = float(np.abs(got[i:i + 1] - want.numpy()).max())
    print(f"dopri5 sample {i}: err {err:.2e}")
    assert err < 1e-5, err
  # The flow's exact map is x1 = mu + s x0; rtol 1e-3 steps reach it to ~1e-2 (as scipy's
  # RK45 does at the same tolerances).
  np.testing.assert_allclose(got, mu + np.sqrt(s2) * x, atol=2e-2)


def test_usit_pipeline_matches_efficientvit_sampling(autoencoder, tmp_path):
  path, model = make_checkpoint(tmp_path, "uvit", autoencoder, seed=4)
  config = json.load(open(f"{path}/config.json"))
  config["model_name"] = "dc-ae-f32c32-in-1.0-usit-h-in-512px"
  json.dump(config, open(f"{path}/config.json", "w"))
  pipe = load_pipeline(path)
  assert pipe.sampler == "ODE_dopri5" and pipe.default_steps == 250
  labels = np.array([4, 0], np.int32)
  latents = pipe.noise(7, len(labels))
  y_null = torch.full((1,), NUM_CLASSES)
  for scale in (4.0, 1.0):
    run = jax.jit(lambda v, z, y, scale=scale: pipe.sample_latents(v, z, y, scale, 250, None))
    got = np.asarray(run(pipe.variables, jnp.asarray(latents), jnp.asarray(labels)))
    for i in range(len(labels)):
      y = torch.tensor([labels[i]])

      def drift(t, x, y=y, scale=scale):  # efficientvit forward_with(out)_cfg, t in [0, 1]
        t = t.reshape(1)
        with torch.no_grad():
          if scale == 1.0:
            return model.forward_without_cfg(x, t, y)
          out = model.forward_without_cfg(torch.cat([x, x]), torch.cat([t, t]),
                                          torch.cat([y, y_null]))
          return out[1:] + scale * (out[:1] - out[1:])

      want = ref_dopri5(drift, nchw(latents[i:i + 1])).numpy().transpose(0, 2, 3, 1)
      err = float(np.abs(got[i:i + 1] - want).max())
      print(f"usit cfg {scale} image {i}: err {err:.2e} (of {np.abs(want).max():.2f})")
      assert err < 1e-4 * max(1.0, float(np.abs(want).max())), err
