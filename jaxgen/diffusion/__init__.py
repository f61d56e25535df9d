"""Diffusion core: noise schedules, the training loss and samplers (pure JAX functions)."""

from jaxgen.diffusion.losses import diffusion_loss, drop_labels, split_prediction
from jaxgen.diffusion.samplers import METHODS, guided, sample, sampling_timesteps
from jaxgen.diffusion.schedules import (Schedule, cosine_alpha_bar, cosine_betas, eps_to_x0,
                                        linear_betas, make_schedule, q_sample, scaled_linear_betas,
                                        v_to_eps, v_to_x0, velocity, x0_to_eps)

__all__ = [
    "METHODS", "Schedule", "cosine_alpha_bar", "cosine_betas", "diffusion_loss", "drop_labels",
    "eps_to_x0", "guided", "linear_betas", "make_schedule", "q_sample", "sample",
    "sampling_timesteps", "scaled_linear_betas", "split_prediction", "v_to_eps", "v_to_x0",
    "velocity", "x0_to_eps",
]
