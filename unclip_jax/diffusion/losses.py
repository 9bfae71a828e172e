"""Training losses for Gaussian diffusion models.

`diffusion_loss` draws t ~ U{0, …, T−1} and ε ~ N(0, I), forms x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε,
calls `model_fn(x_t, t)` once and returns a per-example loss:

  L_simple = mean over non-batch axes of (target − prediction)², target = ε | x_0 | v;
  optionally weighted by min-SNR-γ (Hang et al. 2023), SNR_t = ᾱ_t/(1 − ᾱ_t):
    'epsilon': min(SNR, γ)/SNR   'sample': min(SNR, γ)   'v_prediction': min(SNR, γ)/(SNR + 1)
  'learned_range' (improved DDPM, Nichol & Dhariwal 2021, the decoder's "hybrid" loss):
    L = L_simple + vlb_weight·L_vlb·T/1000, where L_vlb is in bits per dimension:
      t > 0: KL(q(x_{t−1}|x_t, x_0) ‖ p_θ(x_{t−1}|x_t))
      t = 0: −log p_θ(x_0|x_1), a discretised Gaussian (8-bit data in [−1, 1])
    and p_θ's mean is computed from stop_gradient(prediction): the VLB only trains v (the
    variance output); the mean is trained by L_simple alone. With T = 1000 this is
    improved-diffusion's RESCALED_MSE (`rescale_learned_sigmas=True`), as Karlo's decoder.

Unit-step posterior quantities come from the schedule's float64-accurate tables (improved-
diffusion's numbers); x̂_0 is not clipped inside the loss (improved-diffusion: clip_denoised=False).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from unclip_jax.diffusion import gaussian as g
from unclip_jax.diffusion.schedule import Schedule


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over all axes but the first: (B, …) → (B,)."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array) -> jax.Array:
    """Elementwise KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) in nats (arguments broadcast)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """Φ(x) ≈ ½·(1 + tanh(√(2/π)·(x + 0.044715·x³))) (the tanh approximation)."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: jax.Array, *, means: jax.Array, log_scales: jax.Array,
                                        num_bins: int = 256) -> jax.Array:
    """Elementwise log-likelihood (nats) of data discretised into `num_bins` levels on [−1, 1]
    under N(means, exp(log_scales)²): log ∫ over the bin of x, bins of width 2/(num_bins − 1);
    the two edge bins extend to ∓∞.

    x: data in [−1, 1] (exactly on the bin centres for 8-bit images); means, log_scales
    broadcast against x. Probabilities are floored at 1e-12 before the log.
    """
    half_bin = 1.0 / (num_bins - 1)
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + half_bin))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - half_bin))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    edge = 1.0 - 0.255 * half_bin  # 0.999 for 256 bins, as improved-diffusion; edge bin centres are ±1
    return jnp.where(x < -edge, log_cdf_plus, jnp.where(x > edge, log_one_minus_cdf_min, log_delta))


def vlb_terms_bpd(schedule: Schedule, prediction: jax.Array, v: jax.Array, x0: jax.Array, x_t: jax.Array,
                  t: jax.Array, *, prediction_type: str) -> jax.Array:
    """Per-example VLB term L_t in bits/dim for a learned-range model (see module doc).

    prediction: (B, …, C) ε/x_0/v prediction (pass it through stop_gradient for the hybrid
    loss); v: (B, …, C) variance output in [−1, 1]; x0, x_t: (B, …, C); t: (B,).
    Returns (B,): the KL for t > 0 and the decoder NLL for t = 0.
    """
    true_mean, _, true_log_var = g.q_posterior_mean_variance(schedule, x0, x_t, t)
    x0_hat, _ = g.predict_x0_eps(schedule, prediction, x_t, t, prediction_type)
    model_mean, _, _ = g.q_posterior_mean_variance(schedule, x0_hat, x_t, t)
    _, model_log_var = g.p_variance(schedule, t, None, "learned_range", v, clip_t0=True)
    kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, means=model_mean, log_scales=0.5 * model_log_var)
                     ) / math.log(2.0)
    return jnp.where(t == 0, nll, kl)


def min_snr_weight(schedule: Schedule, t: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
    """Min-SNR-γ loss weight per example (shape of t) for a prediction type (module doc)."""
    g.check_prediction_type(prediction_type)
    ab = g.alpha_bar(schedule, t)
    snr = ab / (1.0 - ab)
    clipped = jnp.minimum(snr, gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "sample":
        return clipped
    return clipped / (snr + 1.0)


def diffusion_loss(model_fn: Callable[[jax.Array, jax.Array], jax.Array], schedule: Schedule, x0: jax.Array,
                   key: jax.Array | None, *, prediction_type: str = "epsilon", variance_type: str = "fixed_small",
                   vlb_weight: float = 1.0, min_snr_gamma: float | None = None, t: jax.Array | None = None,
                   noise: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-example diffusion training loss (module doc).

    Args:
      model_fn: f(x_t (B, …, C), t (B,) int32) -> (B, …, C), or (B, …, 2C) for 'learned_range'.
      schedule: the training schedule (T steps).
      x0: (B, …, C) clean data (images in [−1, 1] when the VLB term is used).
      key: PRNG key for t and ε (may be None when both are given).
      prediction_type: 'epsilon' | 'sample' | 'v_prediction'.
      variance_type: 'fixed_small' | 'fixed_small_log' | 'fixed_large' (MSE only) or
        'learned_range' (MSE + VLB hybrid).
      vlb_weight: multiplier of the VLB term (1.0 = improved DDPM's λ = 0.001 at T = 1000).
      min_snr_gamma: γ of min-SNR weighting of the MSE term; None disables it.
      t: (B,) int timesteps to use instead of sampling them.
      noise: (B, …, C) ε to use instead of sampling it.
    Returns:
      (loss (B,), aux) with aux = {'mse': (B,) unweighted MSE, 'vb': (B,) VLB bits/dim (zeros
      unless learned_range), 't': (B,), 'weight': (B,) MSE weight}.
    """
    g.check_prediction_type(prediction_type)
    g.check_variance_type(variance_type)
    x0 = x0.astype(jnp.float32)
    batch = x0.shape[0]
    if (t is None or noise is None) and key is None:
        raise ValueError("diffusion_loss needs a PRNG key unless both t and noise are given")
    if key is not None:
        key_t, key_noise = jax.random.split(key)
    if t is None:
        t = jax.random.randint(key_t, (batch,), 0, schedule.num_timesteps, dtype=jnp.int32)
    t = jnp.asarray(t, jnp.int32)
    if t.shape != (batch,):
        raise ValueError(f"t must have shape (B,) = ({batch},), got {t.shape}")
    if noise is None:
        noise = jax.random.normal(key_noise, x0.shape, jnp.float32)
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {noise.shape} != x0 shape {x0.shape}")

    x_t = g.q_sample(schedule, x0, t, noise)
    out = model_fn(x_t, t).astype(jnp.float32)
    prediction, v = g.split_model_output(out, x0.shape[-1], variance_type)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "sample":
        target = x0
    else:
        target = g.v_from_x0_eps(schedule, x0, t, noise)
    mse = mean_flat((target - prediction) ** 2)
    weight = jnp.ones_like(mse) if min_snr_gamma is None else min_snr_weight(schedule, t, min_snr_gamma,
                                                                            prediction_type)
    loss = weight * mse
    if variance_type == "learned_range":
        vb = vlb_terms_bpd(schedule, jax.lax.stop_gradient(prediction), v, x0, x_t, t,
                           prediction_type=prediction_type)
        loss = loss + vlb_weight * vb * (schedule.num_timesteps / 1000.0)
    else:
        vb = jnp.zeros_like(mse)
    return loss, {"mse": mse, "vb": vb, "t": t, "weight": weight}
