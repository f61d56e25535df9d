"""jaxgen.diffusion.schedulers against diffusers' own schedulers (the references), float32.

(a) plans: timesteps, init_noise_sigma and sigma tables equal diffusers' after set_timesteps,
    over classes x spacings x steps_offset x step counts (cheap: no compilation);
(b) full loops: diffusers' step loop vs `denoise` under jax.jit, with a deterministic fake
    model (the exact denoiser of a fixed data point plus a tanh perturbation, so trajectories
    stay O(1)); stochastic steps get the very noise `denoise` draws (diffusers' randn_tensor
    patched), so they are compared exactly too;
(c) config semantics: defaults, from_config name swapping, _use_default_values, loading.
Each loop is one XLA compile (~0.5 s); the configs below mix features to keep their number low.
"""

import inspect
import math

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers import (scheduling_ddpm, scheduling_dpmsolver_multistep,
                                  scheduling_dpmsolver_singlestep,
                                  scheduling_euler_ancestral_discrete)

from jaxgen.diffusion import schedulers as S
from jaxgen.errors import ConfigError

# diffusers' own deprecation notices (dpmsolver / sde-dpmsolver, numpy on torch tensors).
pytestmark = [pytest.mark.filterwarnings("ignore:.*deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must:DeprecationWarning")]

SHAPE = (2, 4, 8, 8)
RS = np.random.RandomState(0)
DATA = RS.uniform(-0.8, 0.8, SHAPE).astype(np.float32)
X_INIT = RS.randn(*SHAPE).astype(np.float32)
KEY = jax.random.key(0, impl="rbg")   # threefry compiles slowly on CPU (test_diffusion.py)

# Published configs (Stable Diffusion v1-5, DiT-XL-2-256, SDXL base) as their json files hold.
SD_PNDM = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
           "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
           "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
           "trained_betas": None, "clip_sample": False}
DIT_DDIM = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.12.0.dev0",
            "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
            "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon",
            "set_alpha_to_one": True, "steps_offset": 0, "trained_betas": None}
SDXL_EULER = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0",
              "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
              "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
              "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
              "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
              "trained_betas": None, "use_karras_sigmas": False}
SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def reference(class_name, config):
  return getattr(diffusers, class_name).from_config(config)


def assert_timesteps_equal(plan, ref, what=""):
  """Integer timesteps exactly; the Euler types' float ones to float32 rounding (their sigmas
  come from torch's float32 sqrt, which is not correctly rounded)."""
  got, want = np.asarray(plan.timesteps), ref.timesteps.numpy()
  if want.dtype.kind == "f":
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=what)
  else:
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want, err_msg=what)


def noises(n):
  """The noise `denoise` draws at evaluation i (the scheduler contract)."""
  return [torch.from_numpy(np.array(jax.random.normal(jax.random.fold_in(KEY, i), SHAPE,
                                                      jnp.float32))) for i in range(n)]


def fake_models(alphas_cumprod, prediction, last_axis_channels=False, variance=None):
  """(torch_fn, jax_fn): the same fake model: exact denoiser of x0 = DATA, perturbed.

  alpha-bar is interpolated at (possibly fractional) t; Euler inputs are already scaled to
  the variance-preserving x_t. `variance` adds a variance half ("learned" / "learned_range").
  """
  grid = np.arange(len(alphas_cumprod), dtype=np.float32)

  def fn(x, ab, data, tanh, sqrt, cat):
    eps = (x - sqrt(ab) * data) / sqrt(1 - ab) + 0.1 * tanh(x)
    if prediction == "sample":
      out = data + 0.1 * tanh(x)
    elif prediction == "v_prediction":
      out = sqrt(ab) * eps - sqrt(1 - ab) * data
    elif prediction == "flow_prediction":
      out = eps - data
    else:
      out = eps
    if variance == "learned":
      return cat([out, 0.01 + 0.005 * (tanh(x) + 1)])
    if variance == "learned_range":
      return cat([out, 0.9 * tanh(x)])
    return out

  def torch_fn(x, t):
    ab = torch.tensor(np.float32(np.interp(float(t), grid, alphas_cumprod)))
    return fn(x, ab, torch.from_numpy(DATA), torch.tanh, torch.sqrt,
              lambda xs: torch.cat(xs, 1))

  data_j = jnp.asarray(DATA.transpose(0, 2, 3, 1) if last_axis_channels else DATA)

  def jax_fn(x, t):
    ab = jnp.interp(t.astype(jnp.float32), jnp.asarray(grid), jnp.asarray(alphas_cumprod))
    return fn(x, ab, data_j, jnp.tanh, jnp.sqrt, lambda xs: jnp.concatenate(xs, -1))

  return torch_fn, jax_fn


@pytest.fixture
def patched_noise(monkeypatch):
  """diffusers' randn_tensor returns `holder["noise"]` (set per step by the loop)."""
  holder = {}
  for module in (scheduling_ddpm, scheduling_dpmsolver_multistep,
                 scheduling_dpmsolver_singlestep, scheduling_euler_ancestral_discrete):
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: holder["noise"].clone())
  return holder


def diffusers_loop(ref, n, model, holder=None, eta=0.0, use_clipped=False, lms_order=4):
  """diffusers' pipeline loop; with `holder`, step i draws the noise `denoise` draws."""
  ref.set_timesteps(n)
  eps_noise = noises(len(ref.timesteps)) if holder is not None else None
  x = torch.from_numpy(X_INIT) * ref.init_noise_sigma
  for i, t in enumerate(ref.timesteps):
    if holder is not None:
      holder["noise"] = eps_noise[i]
    out = model(ref.scale_model_input(x, t), t)
    kwargs = {}
    if isinstance(ref, diffusers.DDIMScheduler):
      kwargs = {"eta": eta, "use_clipped_model_output": use_clipped}
      if eta > 0:
        kwargs["variance_noise"] = eps_noise[i]
    if isinstance(ref, diffusers.LMSDiscreteScheduler):
      kwargs = {"order": lms_order}
    x = ref.step(out, t, x, **kwargs).prev_sample
  return x.numpy()


JIT_DENOISE = jax.jit(S.denoise, static_argnums=(0, 2))

# (class, config, num_inference_steps, plan kwargs): each mixes several features.
LOOPS = [
    ("DDIMScheduler", {**SD_PNDM}, 7, {}),
    ("DDIMScheduler", {}, 25, {}),
    ("DDIMScheduler", {"timestep_spacing": "trailing", "prediction_type": "v_prediction",
                       "rescale_betas_zero_snr": True}, 7, {}),
    ("DDIMScheduler", {"timestep_spacing": "linspace", "prediction_type": "sample",
                       "thresholding": True, "dynamic_thresholding_ratio": 0.9,
                       "sample_max_value": 1.5}, 25, {}),
    ("DDIMScheduler", {"beta_schedule": "squaredcos_cap_v2", "steps_offset": 1,
                       "clip_sample_range": 0.9}, 10,
     {"eta": 0.7, "use_clipped_model_output": True}),
    ("DDIMScheduler", {"num_train_timesteps": 100,
                       "trained_betas": list(np.linspace(1e-3, 0.05, 100) ** 1.5)}, 9, {}),
    ("DDPMScheduler", {}, 10, {}),
    ("DDPMScheduler", {"variance_type": "fixed_small_log", "prediction_type": "v_prediction",
                       "timestep_spacing": "trailing", "clip_sample": False, **SD_BETAS}, 7, {}),
    ("DDPMScheduler", {"variance_type": "fixed_large", "prediction_type": "sample",
                       "timestep_spacing": "linspace", "thresholding": True}, 7, {}),
    ("DDPMScheduler", {"beta_schedule": "sigmoid", "num_train_timesteps": 40,
                       "steps_offset": 1}, 40 // 3, {}),
    ("DDPMScheduler", {"beta_schedule": "laplace", "num_train_timesteps": 30,
                       "clip_sample": False}, 30, {}),
    ("PNDMScheduler", {**SD_PNDM}, 7, {}),
    ("PNDMScheduler", {**SD_PNDM}, 25, {}),
    ("PNDMScheduler", {}, 7, {}),
    ("PNDMScheduler", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"},
     4, {}),
    ("PNDMScheduler", {"beta_schedule": "squaredcos_cap_v2", "steps_offset": 1,
                       "set_alpha_to_one": True}, 25, {}),
    ("PNDMScheduler", {"skip_prk_steps": True, "timestep_spacing": "linspace"}, 2, {}),
    ("DPMSolverMultistepScheduler", {}, 7, {}),
    ("DPMSolverMultistepScheduler", {**SD_BETAS, "steps_offset": 1,
                                     "timestep_spacing": "leading"}, 25, {}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "final_sigmas_type": "sigma_min",
                                     "lower_order_final": False}, 25, {}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "solver_type": "heun",
                                     "timestep_spacing": "trailing"}, 7, {}),
    ("DPMSolverMultistepScheduler", {"solver_order": 1, "prediction_type": "sample",
                                     "thresholding": True}, 7, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "solver_type": "heun",
                                     "final_sigmas_type": "sigma_min",
                                     "prediction_type": "v_prediction"}, 25, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "solver_order": 3,
                                     "final_sigmas_type": "sigma_min",
                                     "prediction_type": "sample", "thresholding": True,
                                     "sample_max_value": 2.0}, 10, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, 10, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3,
                                     "solver_type": "heun", **SD_BETAS}, 25, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver", "solver_type": "heun",
                                     "final_sigmas_type": "sigma_min"}, 8, {}),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, **SD_BETAS}, 25, {}),
    ("DPMSolverMultistepScheduler", {"euler_at_final": True, "lower_order_final": False,
                                     "final_sigmas_type": "sigma_min",
                                     "solver_type": "heun"}, 20, {}),
    ("DPMSolverMultistepScheduler", {"lambda_min_clipped": -5.1, "use_lu_lambdas": True,
                                     **SD_BETAS}, 10, {}),
    ("DPMSolverMultistepScheduler", {"use_exponential_sigmas": True,
                                     "rescale_betas_zero_snr": True,
                                     "prediction_type": "v_prediction"}, 10, {}),
    ("DPMSolverMultistepScheduler", {"use_beta_sigmas": True, **SD_BETAS}, 9, {}),
    ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": 3.0,
                                     "prediction_type": "flow_prediction"}, 10, {}),
    ("EulerDiscreteScheduler", {**SDXL_EULER}, 7, {}),
    ("EulerDiscreteScheduler", {}, 25, {}),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "timestep_spacing": "trailing",
                                "prediction_type": "v_prediction", **SD_BETAS}, 10, {}),
    ("EulerDiscreteScheduler", {"interpolation_type": "log_linear",
                                "prediction_type": "sample"}, 7, {}),
    ("EulerDiscreteScheduler", {"use_exponential_sigmas": True,
                                "final_sigmas_type": "sigma_min", "sigma_min": 0.05}, 10, {}),
    ("EulerDiscreteScheduler", {"timestep_type": "continuous",
                                "prediction_type": "v_prediction", "use_beta_sigmas": True},
     8, {}),
    ("EulerAncestralDiscreteScheduler", {**SDXL_EULER}, 7, {}),
    ("EulerAncestralDiscreteScheduler", {"prediction_type": "v_prediction",
                                         "rescale_betas_zero_snr": True,
                                         "timestep_spacing": "trailing"}, 25, {}),
    ("UniPCMultistepScheduler", {}, 7, {}),
    ("UniPCMultistepScheduler", {"solver_order": 3, "timestep_spacing": "leading",
                                 "steps_offset": 1, **SD_BETAS}, 25, {}),
    ("UniPCMultistepScheduler", {"solver_order": 1, "timestep_spacing": "trailing",
                                 "prediction_type": "v_prediction",
                                 "rescale_betas_zero_snr": True}, 7, {}),
    ("UniPCMultistepScheduler", {"solver_type": "bh1", "final_sigmas_type": "sigma_min",
                                 "solver_order": 3, "lower_order_final": False,
                                 **SD_BETAS}, 10, {}),
    # Noise prediction (predict_x0=False) amplifies float32 rounding: with the default betas'
    # large sigma_max, diffusers' own float32 and float64 loops differ by ~1e-5 x scale.
    ("UniPCMultistepScheduler", {"predict_x0": False, "final_sigmas_type": "sigma_min",
                                 "prediction_type": "sample", "use_exponential_sigmas": True,
                                 **SD_BETAS}, 10, {}),
    ("UniPCMultistepScheduler", {"disable_corrector": [0, 3], "use_karras_sigmas": True,
                                 "prediction_type": "sample", "thresholding": True}, 10, {}),
    ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": 3.0,
                                 "shift_terminal": 0.1, "solver_order": 3,
                                 "prediction_type": "flow_prediction"}, 10, {}),
    ("DPMSolverSinglestepScheduler", {}, 7, {}),
    ("DPMSolverSinglestepScheduler", {"solver_order": 3, "solver_type": "heun", **SD_BETAS},
     25, {}),
    ("DPMSolverSinglestepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3,
                                      "use_karras_sigmas": True}, 10, {}),
    ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver", "lower_order_final": False,
                                      "final_sigmas_type": "sigma_min",
                                      "prediction_type": "v_prediction"}, 10, {}),
    ("HeunDiscreteScheduler", {}, 7, {}),
    ("HeunDiscreteScheduler", {"use_karras_sigmas": True, "prediction_type": "v_prediction",
                               "timestep_spacing": "trailing"}, 10, {}),
    ("HeunDiscreteScheduler", {"prediction_type": "sample", "clip_sample": True,
                               "beta_schedule": "exp", "timestep_spacing": "leading",
                               "steps_offset": 1}, 6, {}),
    ("LMSDiscreteScheduler", {}, 7, {}),
    ("LMSDiscreteScheduler", {"use_karras_sigmas": True, "prediction_type": "v_prediction",
                              **SD_BETAS}, 25, {}),
    ("LMSDiscreteScheduler", {"prediction_type": "sample", "timestep_spacing": "leading",
                              "steps_offset": 1}, 10, {"order": 2}),
    ("KDPM2DiscreteScheduler", {}, 7, {}),
    ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True, "prediction_type": "v_prediction",
                                "timestep_spacing": "trailing"}, 10, {}),
]


@pytest.mark.parametrize("class_name,config,steps,kwargs", LOOPS,
                         ids=[f"{c[0][:-9]}-{i}" for i, c in enumerate(LOOPS)])
def test_denoise_matches_diffusers_loop(class_name, config, steps, kwargs, patched_noise):
  ref = reference(class_name, config)
  ours = S.from_config(config, class_name)
  plan = ours.plan(steps, **kwargs)
  stochastic = ours.needs_rng(plan)
  torch_fn, jax_fn = fake_models(ref.alphas_cumprod.numpy(), ref.config.prediction_type)
  want = diffusers_loop(ref, steps, torch_fn, patched_noise if stochastic else None,
                        kwargs.get("eta", 0.0), kwargs.get("use_clipped_model_output", False),
                        kwargs.get("order", 4))
  assert_timesteps_equal(plan, ref)
  got = np.asarray(JIT_DENOISE(ours, plan, jax_fn, jnp.asarray(X_INIT) * plan.init_noise_sigma,
                               KEY if stochastic else None))
  assert np.all(np.isfinite(want))
  scale = max(1.0, float(np.abs(want).max()))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_ddpm_learned_variance_on_last_axis(variance_type, patched_noise):
  """diffusers splits the variance half off NCHW axis 1; jaxgen's NHWC splits the last axis."""
  config = {"variance_type": variance_type, "clip_sample": False}
  ref = reference("DDPMScheduler", config)
  ours = S.from_config(config, "DDPMScheduler")
  torch_fn, _ = fake_models(ref.alphas_cumprod.numpy(), "epsilon", variance=variance_type)
  _, jax_fn = fake_models(ref.alphas_cumprod.numpy(), "epsilon", last_axis_channels=True,
                          variance=variance_type)
  x_nhwc = jnp.asarray(X_INIT.transpose(0, 2, 3, 1))
  ref.set_timesteps(6)
  x = torch.from_numpy(X_INIT)
  for i, t in enumerate(ref.timesteps):
    noise = np.array(jax.random.normal(jax.random.fold_in(KEY, i), x_nhwc.shape))
    patched_noise["noise"] = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())
    x = ref.step(torch_fn(x, t), t, x).prev_sample
  want = x.numpy().transpose(0, 2, 3, 1)
  got = np.asarray(JIT_DENOISE(ours, ours.plan(6), jax_fn, x_nhwc, KEY))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, np.abs(want).max()))


# ----------------------------------------------------------------------------- (a) plans

PLAN_VARIANTS = {
    "DDIMScheduler": [{}, {"set_alpha_to_one": False, **SD_BETAS}],
    "DDPMScheduler": [{}],
    "PNDMScheduler": [{"skip_prk_steps": True}, {"skip_prk_steps": False}],
    "DPMSolverMultistepScheduler": [{}, {"use_karras_sigmas": True, **SD_BETAS},
                                    {"final_sigmas_type": "sigma_min"},
                                    {"use_karras_sigmas": True,
                                     "beta_schedule": "squaredcos_cap_v2"}],
    "EulerDiscreteScheduler": [{}, {"use_karras_sigmas": True, **SD_BETAS},
                               {"final_sigmas_type": "sigma_min", **SD_BETAS}],
    "EulerAncestralDiscreteScheduler": [{**SD_BETAS}],
    "UniPCMultistepScheduler": [{}, {"use_karras_sigmas": True, **SD_BETAS},
                                {"final_sigmas_type": "sigma_min", "use_beta_sigmas": True},
                                {"use_flow_sigmas": True, "flow_shift": 3.0,
                                 "final_sigmas_type": "sigma_min"}],
    # no timestep_spacing / steps_offset keys: the loop's values are carried along, unused
    "DPMSolverSinglestepScheduler": [{"use_karras_sigmas": True, **SD_BETAS}],
    "HeunDiscreteScheduler": [{}, {"use_karras_sigmas": True, **SD_BETAS}],
    "LMSDiscreteScheduler": [{"use_exponential_sigmas": True}],
    "KDPM2DiscreteScheduler": [{}, {"use_karras_sigmas": True, **SD_BETAS}],
}
SINGLE_SPACING = {"DPMSolverSinglestepScheduler"}   # linspace timesteps whatever the config
# Fewer counts for the classes whose plans (or diffusers' set_timesteps) loop over the steps.
FEW_STEPS = {"UniPCMultistepScheduler", "DPMSolverSinglestepScheduler", "HeunDiscreteScheduler",
             "LMSDiscreteScheduler", "KDPM2DiscreteScheduler"}


def assert_plan_sigmas(class_name, plan, ref, what):
  """The sigma each evaluation uses equals diffusers' table (the k-diffusion types' to float32
  rounding: torch's float32 log / exp in KDPM2's midpoints)."""
  n, tables = plan.n_evals, plan.tables
  if class_name in ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                    "UniPCMultistepScheduler"):
    want = ref.sigmas[:n]
    got = tables["sigmas"]
  elif class_name == "KDPM2DiscreteScheduler":
    first = np.arange(n) % 2 == 0
    want = np.where(first, ref.sigmas[:n].numpy(), ref.sigmas_interpol[:n].numpy())
    got = tables["sigma"]
  elif class_name.startswith("Euler"):
    np.testing.assert_allclose(np.asarray(tables["sigma_next"]), ref.sigmas[1:n + 1],
                               rtol=1e-6, err_msg=what)
    want, got = ref.sigmas[:n], tables["sigma"]
  elif class_name in ("HeunDiscreteScheduler", "LMSDiscreteScheduler"):
    want, got = ref.sigmas[:n], tables["sigma"]
  else:
    return
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, err_msg=what)


@pytest.mark.parametrize("class_name", sorted(PLAN_VARIANTS))
def test_plan_matches_set_timesteps(class_name):
  checked = 0
  if class_name in SINGLE_SPACING:
    grids = [("linspace", 1)]
  elif class_name in FEW_STEPS:   # steps_offset acts on leading only
    grids = [("linspace", 1), ("leading", 0), ("leading", 1), ("trailing", 0)]
  else:
    grids = [(spacing, offset) for spacing in S.SPACINGS for offset in (0, 1)]
  for variant in PLAN_VARIANTS[class_name]:
    for spacing, offset in grids:
      config = {**variant, "timestep_spacing": spacing, "steps_offset": offset}
      ref = reference(class_name, config)
      ours = S.from_config(config, class_name)
      for steps in ((1, 2, 3, 7, 25, 50) if class_name in FEW_STEPS else
                    (1, 4, 7, 25, 50, 333, 1000)):
        if class_name == "PNDMScheduler" and not config["skip_prk_steps"] and steps < 4:
          with pytest.raises(ConfigError, match="num_inference_steps"):
            ours.plan(steps)
          continue
        ref.set_timesteps(steps)
        what = f"{class_name} {config} steps={steps}"
        if ref.timesteps.max() >= 1000 and not torch.is_floating_point(ref.timesteps):
          # t = 1000 (steps_offset 1): diffusers fails at its first step, jaxgen at plan.
          with pytest.raises(ConfigError, match="outside"):
            ours.plan(steps)
          continue
        if class_name not in ("PNDMScheduler", "DDIMScheduler", "DDPMScheduler") and (
            int((ref.timesteps == ref.timesteps[0]).sum()) > 1):
          # diffusers' step counter starts at the repeat and runs past the end.
          with pytest.raises(ConfigError, match="repeats"):
            ours.plan(steps)
          continue
        plan = ours.plan(steps)
        assert_timesteps_equal(plan, ref, what)
        assert math.isclose(plan.init_noise_sigma, float(ref.init_noise_sigma),
                            rel_tol=1e-6), what
        assert_plan_sigmas(class_name, plan, ref, what)
        checked += 1
  assert checked > 5


def test_tables_match_diffusers_init():
  """Betas and alphas_cumprod bit for bit (torch's float32 linspace, float64 cumprod)."""
  for config in ({}, SD_BETAS, {"beta_schedule": "squaredcos_cap_v2"},
                 {"num_train_timesteps": 37, "beta_start": 0.1, "beta_end": 0.3}):
    ref = reference("DDIMScheduler", config)
    ours = S.from_config(config, "DDIMScheduler")
    np.testing.assert_array_equal(ours.betas, ref.betas.numpy(), err_msg=str(config))
    np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())
  # The zero-terminal-SNR rescale runs in float32 through torch's cumprod and sqrt, whose
  # rounding varies between runs of the same torch build (its CPU kernels' vectorisation and
  # threading): betas = 1 - ab_t / ab_t-1 amplify that to ~1e-4 relative. Float32 closeness.
  ref = reference("DDIMScheduler", {"rescale_betas_zero_snr": True, **SD_BETAS})
  ours = S.from_config({"rescale_betas_zero_snr": True, **SD_BETAS}, "DDIMScheduler")
  np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-4,
                             atol=1e-12)
  np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=5e-4, atol=1e-6)
  for schedule in ("sigmoid", "laplace"):
    ref = reference("DDPMScheduler", {"beta_schedule": schedule})
    ours = S.from_config({"beta_schedule": schedule}, "DDPMScheduler")
    np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=1e-6)
  ref = reference("DPMSolverMultistepScheduler", {"rescale_betas_zero_snr": True})
  ours = S.from_config({"rescale_betas_zero_snr": True}, "dpm")
  assert ours.alphas_cumprod[-1] == ref.alphas_cumprod[-1].item() == 2.0 ** -24
  # The rescale's float32 rounding varies between torch runs (above).
  np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-4)


# ----------------------------------------------------------------------------- (c) config

@pytest.mark.parametrize("class_name", sorted(S.SCHEDULERS))
def test_defaults_are_diffusers_init_defaults(class_name):
  params = inspect.signature(getattr(diffusers, class_name).__init__).parameters
  want = {k: p.default for k, p in params.items() if k != "self"}
  assert S.SCHEDULERS[class_name].DEFAULTS == want


def _config_equal(ours, ref):
  ours, ref = dict(ours), dict(ref)
  assert set(ours.pop("_use_default_values", [])) == set(ref.pop("_use_default_values", []))
  assert ours == ref


@pytest.mark.parametrize("source", [SD_PNDM, DIT_DDIM, SDXL_EULER,
                                    {"_class_name": "DPMSolverMultistepScheduler",
                                     "solver_order": 3, "timestep_spacing": "trailing",
                                     "sigma_min": 0.1, "algorithm_type": "deis",
                                     "final_sigmas_type": "sigma_min",
                                     "_use_default_values": ["timestep_spacing"]}],
                         ids=["sd-pndm", "dit-ddim", "sdxl-euler", "dpm-defaults"])
def test_from_config_swaps_like_diffusers(source):
  base = S.from_config(source)
  base_ref = reference(source["_class_name"], source)
  _config_equal(base.config, base_ref.config)
  for alias, class_name in [("ddim", "DDIMScheduler"), ("dpmpp_2m",
                                                         "DPMSolverMultistepScheduler"),
                            ("pndm", "PNDMScheduler"), ("euler", "EulerDiscreteScheduler"),
                            ("euler_a", "EulerAncestralDiscreteScheduler"),
                            ("DDPMScheduler", "DDPMScheduler"),
                            ("unipc", "UniPCMultistepScheduler"),
                            ("dpm_single", "DPMSolverSinglestepScheduler"),
                            ("heun", "HeunDiscreteScheduler"), ("lms", "LMSDiscreteScheduler"),
                            ("kdpm2", "KDPM2DiscreteScheduler")]:
    ref = reference(class_name, source)
    ours = S.from_config(source, alias)
    assert ours.class_name == class_name
    _config_equal(ours.config, ref.config)
    # Swapping from a scheduler's resolved config, as a pipeline does with scheduler.config.
    _config_equal(S.from_config(base.config, alias).config,
                  reference(class_name, base_ref.config).config)
    ref.set_timesteps(7)
    assert_timesteps_equal(ours.plan(7), ref)


def test_from_config_without_class_name_adds_none():
  ours = S.from_config({"beta_end": 0.03, "skip_prk_steps": True}, "ddim")
  ref = reference("DDIMScheduler", {"beta_end": 0.03, "skip_prk_steps": True})
  _config_equal(ours.config, ref.config)
  assert "_class_name" not in ours.config and ours.config["skip_prk_steps"] is True


def test_unknown_names_and_bad_configs():
  with pytest.raises(ConfigError, match="DDIMScheduler"):
    S.from_config(DIT_DDIM, "KDPM2AncestralDiscreteScheduler")
  with pytest.raises(ConfigError, match="_class_name"):
    S.from_config({"beta_end": 0.02})
  with pytest.raises(ConfigError, match="prediction_type"):
    S.from_config({"prediction_type": "sample"}, "euler_a")
  for algorithm in ("dpmsolver", "deis"):
    with pytest.raises(ConfigError, match="final_sigmas_type"):
      S.from_config({"algorithm_type": algorithm}, "dpm")
  with pytest.raises(ConfigError, match="beta_schedule"):
    S.from_config({"beta_schedule": "cosine"}, "ddim")
  with pytest.raises(ConfigError, match="num_inference_steps"):
    S.from_config({}, "ddim").plan(1001)
  with pytest.raises(ConfigError, match="outside"):   # t = 1000 with steps_offset 1
    S.from_config({"steps_offset": 1}, "ddim").plan(1000)
  euler_a = S.from_config({}, "euler_a")
  with pytest.raises(ConfigError, match="rng"):
    S.denoise(euler_a, euler_a.plan(2), lambda x, t: x, jnp.zeros(SHAPE))


def test_new_scheduler_configs():
  """UniPC / DPM singlestep / k-diffusion config semantics diffusers shares or refuses."""
  # diffusers registers DPM-Solver solver types as bh2 (UniPC) and UniPC's as midpoint.
  unipc = S.from_config({"_class_name": "DPMSolverMultistepScheduler", "solver_type": "heun"},
                        "unipc")
  assert unipc.config["solver_type"] == "bh2"
  for config, match in [({"solver_type": "bh3"}, "solver_type"),
                        ({"solver_p": {"_class_name": "DDIMScheduler"}}, "solver_p"),
                        ({"shift_terminal": 0.1}, "use_flow_sigmas"),
                        ({"predict_x0": False, "prediction_type": "flow_prediction"},
                         "predict_x0"),
                        ({"use_karras_sigmas": True, "use_beta_sigmas": True}, "Only one")]:
    with pytest.raises(ConfigError, match=match):
      S.from_config(config, "unipc")
  with pytest.raises(ConfigError, match="thresholding"):
    S.from_config({"algorithm_type": "dpmsolver", "thresholding": True,
                   "final_sigmas_type": "sigma_min"}, "dpm_single")
  with pytest.raises(ConfigError, match="algorithm_type"):
    S.from_config({"algorithm_type": "sde-dpmsolver"}, "dpm_single")
  with pytest.raises(ConfigError, match="prediction_type"):
    S.from_config({"prediction_type": "sample"}, "kdpm2")
  with pytest.raises(ConfigError, match="beta_schedule"):
    S.from_config({"beta_schedule": "exp"}, "lms")
  # The first timestep repeated (beta sigmas over a zero-terminal-SNR schedule): diffusers'
  # step counter starts at the repeat and fails at the end.
  with pytest.raises(ConfigError, match="repeats"):
    S.from_config({"use_beta_sigmas": True, "rescale_betas_zero_snr": True}, "unipc").plan(8)
  # Singlestep's set_timesteps switches lower_order_final on for good, in the config too.
  ours, ref = S.from_config({}, "dpm_single"), reference("DPMSolverSinglestepScheduler", {})
  ours.plan(5)
  ref.set_timesteps(5)
  assert ours.config["lower_order_final"] is ref.config.lower_order_final is True
  # A key of another class carried along does not act (PNDM has no rescale_betas_zero_snr).
  config = {"rescale_betas_zero_snr": True, **SD_BETAS}
  np.testing.assert_array_equal(S.from_config(config, "pndm").alphas_cumprod,
                                reference("PNDMScheduler", config).alphas_cumprod.numpy())


def test_load_scheduler(tmp_path):
  reference("PNDMScheduler", SD_PNDM).save_config(str(tmp_path))
  ours = S.load_scheduler(str(tmp_path))
  assert ours.class_name == "PNDMScheduler" and ours.config["steps_offset"] == 1
  swapped = S.load_scheduler(str(tmp_path / "scheduler_config.json"), "ddim")
  assert swapped.class_name == "DDIMScheduler" and swapped.config["clip_sample"] is False
  with pytest.raises(ConfigError, match="scheduler_config.json"):
    S.load_scheduler(str(tmp_path / "missing"))


def test_step_noise_per_row_keys():
  """A (B,) batch of keys draws row b's noise from key b (what the pipelines pass, so an
  image's noise does not depend on its batch); one key draws the whole sample."""
  sched = S.from_config({"_class_name": "DDPMScheduler"})
  x = jnp.zeros((3, 4, 4, 2))
  keys = jax.random.split(jax.random.PRNGKey(5), 3)
  rows = sched._noise(keys, x)  # pylint: disable=protected-access
  for b in range(3):
    np.testing.assert_array_equal(rows[b], jax.random.normal(keys[b], (4, 4, 2)))
  np.testing.assert_array_equal(sched._noise(keys[0], x),  # pylint: disable=protected-access
                                jax.random.normal(keys[0], x.shape))
  typed = jax.random.split(jax.random.key(5), 3)
  assert sched._noise(typed, x).shape == x.shape  # pylint: disable=protected-access
