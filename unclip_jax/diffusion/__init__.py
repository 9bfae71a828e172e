"""Gaussian diffusion core: schedules, forward/posterior math, losses and samplers.

Pure, jit-able functions with no model code: a model enters as a function
`model_fn(x_t, t) -> output` (x_t (B, …, C) channel-last, t (B,) int32 original timesteps;
output (B, …, C), or (B, …, 2C) = [prediction; v] for a learned variance).

  schedule:  make_betas, Schedule, respace
  gaussian:  q_sample, q_posterior_mean_variance, x0_from_eps, eps_from_x0, v_from_x0_eps,
             x0_from_v, eps_from_v, predict_x0_eps, p_variance, p_std, alpha_bar, …
  losses:    diffusion_loss, normal_kl, discretized_gaussian_log_likelihood, min_snr_weight
  samplers:  ddpm_step, ddpm_sample, ddim_step, ddim_sample, ddim_invert,
             classifier_free_guidance, dynamic_thresholding

Karlo's three stages in these terms (all cosine, T = 1000, sampled with `respace(n)`):
  prior     prediction_type='sample',  variance_type='fixed_small_log', x̂_0 clip ±5 (diffusers)
            or denoised_fn=clip ±10 (Karlo); 25 steps.
  decoder   prediction_type='epsilon', variance_type='learned_range' (2C outputs), clip ±1;
            trained with the hybrid loss; 25/50 steps.
  super-res prediction_type='epsilon', variance_type='fixed_small_log', clip ±1; 7 steps.
"""

from unclip_jax.diffusion.gaussian import (
    PREDICTION_TYPES,
    VARIANCE_TYPES,
    alpha_bar,
    broadcast_to_rank,
    eps_from_v,
    eps_from_x0,
    p_std,
    p_variance,
    posterior_variance,
    predict_x0_eps,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
    split_model_output,
    step_alpha_beta,
    v_from_x0_eps,
    x0_from_eps,
    x0_from_v,
)
from unclip_jax.diffusion.losses import (
    approx_standard_normal_cdf,
    diffusion_loss,
    discretized_gaussian_log_likelihood,
    mean_flat,
    min_snr_weight,
    normal_kl,
    vlb_terms_bpd,
)
from unclip_jax.diffusion.samplers import (
    classifier_free_guidance,
    ddim_invert,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    dynamic_thresholding,
    process_x0,
)
from unclip_jax.diffusion.schedule import Schedule, make_betas, respace

__all__ = [
    "PREDICTION_TYPES", "VARIANCE_TYPES", "Schedule", "alpha_bar", "approx_standard_normal_cdf",
    "broadcast_to_rank", "classifier_free_guidance", "ddim_invert", "ddim_sample", "ddim_step", "ddpm_sample",
    "ddpm_step", "diffusion_loss", "discretized_gaussian_log_likelihood", "dynamic_thresholding", "eps_from_v",
    "eps_from_x0", "make_betas", "mean_flat", "min_snr_weight", "normal_kl", "p_std", "p_variance",
    "posterior_variance", "predict_x0_eps", "process_x0", "q_mean_variance", "q_posterior_mean_variance",
    "q_sample", "respace", "split_model_output", "step_alpha_beta", "v_from_x0_eps", "vlb_terms_bpd",
    "x0_from_eps", "x0_from_v",
]
