"""Gaussian diffusion math: forward process, posterior, parameterisation conversions, variances.

Notation (Ho et al. 2020, Nichol & Dhariwal 2021): ᾱ_t = ∏_{s≤t}(1 − β_s), ᾱ_{−1} = 1.
  forward      q(x_t | x_0) = N(√ᾱ_t·x_0, (1 − ᾱ_t)·I)
  posterior    q(x_p | x_t, x_0) = N(μ̃, β̃·I) for an earlier timestep p < t (p = t − 1 in
               the unrespaced chain; any earlier listed timestep when respaced, with p = −1
               meaning "the clean data"), where, with β = 1 − ᾱ_t/ᾱ_p and α = 1 − β,
                 μ̃ = √ᾱ_p·β/(1 − ᾱ_t)·x_0 + √α·(1 − ᾱ_p)/(1 − ᾱ_t)·x_t
                 β̃ = (1 − ᾱ_p)/(1 − ᾱ_t)·β
  v            v = √ᾱ_t·ε − √(1 − ᾱ_t)·x_0 (Salimans & Ho 2022)

Shapes: x arrays are (B, …, C) with the channel/feature axis last. Timesteps `t`, `t_prev`
are int arrays of shape (B,) or scalars; per-timestep coefficients are broadcast over the
trailing axes of x. Everything is float32 and jit-able; the schedule is a pytree argument.

Argument order is uniform: (schedule, <array>, t, <array>), e.g. q_sample(s, x0, t, noise),
x0_from_eps(s, x_t, t, eps), v_from_x0_eps(s, x0, t, eps).

`beta_rule` chooses how the β of a step t → p is computed, to match the two diffusers
schedulers bit for bit (they differ only in float32 rounding):
  'unclip' (default; UnCLIPScheduler and Karlo): β = β_t from the table when p = t − 1,
           else 1 − ᾱ_t/ᾱ_p;  α = α_t from the table or 1 − β.
  'ddpm'   (DDPMScheduler): always α = ᾱ_t/ᾱ_p, β = 1 − α.

Variance types (of the reverse step p_θ(x_p | x_t)):
  'fixed_small'      σ² = β̃ (clamped to ≥ 1e-20)
  'fixed_small_log'  the same σ², with σ = exp(½·log σ²) (diffusers' arithmetic)
  'fixed_large'      σ² = β
  'learned_range'    log σ² = f·log β + (1 − f)·log β̃, f = (v + 1)/2, v in [−1, 1] from the
                     model's extra C output channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unclip_jax.diffusion.schedule import Schedule

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned_range")
BETA_RULES = ("unclip", "ddpm")

_MIN_VARIANCE = 1e-20


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def check_variance_type(variance_type: str) -> None:
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")


def _check_beta_rule(beta_rule: str) -> None:
    if beta_rule not in BETA_RULES:
        raise ValueError(f"beta_rule must be one of {BETA_RULES}, got {beta_rule!r}")


def broadcast_to_rank(coef: jax.Array, ndim: int) -> jax.Array:
    """Appends singleton axes so a per-timestep coefficient of shape t.shape broadcasts
    against an x of rank `ndim` whose leading axes are t's ((B,) → (B, 1, …, 1))."""
    coef = jnp.asarray(coef)
    return coef.reshape(coef.shape + (1,) * (ndim - coef.ndim))


def _table(table: jax.Array, t: jax.Array) -> jax.Array:
    return table[jnp.clip(t, 0, table.shape[0] - 1)]


def alpha_bar(schedule: Schedule, t: jax.Array | int) -> jax.Array:
    """ᾱ_t for int t of any shape, float32, with ᾱ_t = 1 for t < 0 (the clean data)."""
    t = jnp.asarray(t, jnp.int32)
    return jnp.where(t >= 0, _table(schedule.alphas_cumprod, t), jnp.float32(1.0))


def step_alpha_beta(schedule: Schedule, t: jax.Array, t_prev: jax.Array, *,
                    beta_rule: str = "unclip") -> tuple[jax.Array, jax.Array]:
    """(α, β) of the (possibly respaced) step t → t_prev: β = 1 − ᾱ_t/ᾱ_prev (see module doc)."""
    _check_beta_rule(beta_rule)
    t = jnp.asarray(t, jnp.int32)
    t_prev = jnp.asarray(t_prev, jnp.int32)
    ab_t, ab_p = alpha_bar(schedule, t), alpha_bar(schedule, t_prev)
    if beta_rule == "ddpm":
        alpha = ab_t / ab_p
        return alpha, 1.0 - alpha
    beta_skip = 1.0 - ab_t / ab_p
    unit = t_prev == t - 1
    beta = jnp.where(unit, _table(schedule.betas, t), beta_skip)
    alpha = jnp.where(unit, _table(schedule.alphas, t), 1.0 - beta_skip)
    return alpha, beta


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε ~ q(x_t | x_0). x0, noise (B, …); t (B,) or scalar."""
    ab = broadcast_to_rank(alpha_bar(schedule, t), x0.ndim)
    return ab ** 0.5 * x0 + (1.0 - ab) ** 0.5 * noise


def q_mean_variance(schedule: Schedule, x0: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(mean √ᾱ_t·x_0, variance 1 − ᾱ_t, log variance) of q(x_t | x_0); the last two (B, 1, …)."""
    ab = broadcast_to_rank(alpha_bar(schedule, t), x0.ndim)
    var = 1.0 - ab
    return ab ** 0.5 * x0, var, jnp.log(var)


def q_posterior_mean_variance(schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array,
                              t_prev: jax.Array | None = None, *, beta_rule: str = "unclip"
                              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean μ̃, variance β̃ and log max(β̃, 1e-20) of q(x_prev | x_t, x_0).

    Args:
      x0, x_t: (B, …, C).
      t: (B,) or scalar int timesteps.
      t_prev: the earlier timestep (same shape as t); −1 means the clean data (ᾱ_prev = 1,
        β̃ = 0). Respaced steps use β = 1 − ᾱ_t/ᾱ_prev, as UnCLIPScheduler; computed from ᾱ
        in float32 like diffusers. None: the unit step t → t − 1 from the schedule's
        float64-accurate posterior tables (improved-diffusion; what the losses use), whose
        log variance is the clipped one (log β̃_1 at t = 0).
    Returns:
      mean (B, …, C); variance and log variance broadcastable to it ((B, 1, …) or scalar).
    """
    t = jnp.asarray(t, jnp.int32)
    if t_prev is None:
        c1 = broadcast_to_rank(_table(schedule.posterior_mean_coef1, t), x_t.ndim)
        c2 = broadcast_to_rank(_table(schedule.posterior_mean_coef2, t), x_t.ndim)
        var = broadcast_to_rank(_table(schedule.posterior_variance, t), x_t.ndim)
        log_var = broadcast_to_rank(_table(schedule.posterior_log_variance_clipped, t), x_t.ndim)
        return c1 * x0 + c2 * x_t, var, log_var
    t_prev = jnp.asarray(t_prev, jnp.int32)
    ab_t = broadcast_to_rank(alpha_bar(schedule, t), x_t.ndim)
    ab_p = broadcast_to_rank(alpha_bar(schedule, t_prev), x_t.ndim)
    alpha, beta = (broadcast_to_rank(a, x_t.ndim) for a in step_alpha_beta(schedule, t, t_prev, beta_rule=beta_rule))
    one_minus_ab_t, one_minus_ab_p = 1.0 - ab_t, 1.0 - ab_p
    # Operation order as diffusers' schedulers (float32 parity).
    coef_x0 = (ab_p ** 0.5 * beta) / one_minus_ab_t
    coef_xt = alpha ** 0.5 * one_minus_ab_p / one_minus_ab_t
    mean = coef_x0 * x0 + coef_xt * x_t
    variance = one_minus_ab_p / one_minus_ab_t * beta
    return mean, variance, jnp.log(jnp.maximum(variance, _MIN_VARIANCE))


def posterior_variance(schedule: Schedule, t: jax.Array, t_prev: jax.Array | None = None, *,
                       beta_rule: str = "unclip", clip_t0: bool = False) -> jax.Array:
    """β̃ of the step t → t_prev (shape of t). With clip_t0, the final step (t_prev < 0, where
    β̃ = 0) uses β̃ of the unit step 1 → 0 instead — improved-diffusion's
    `posterior_log_variance_clipped`, needed wherever log β̃ enters a loss.
    t_prev None: unit step from the float64-accurate table (see q_posterior_mean_variance)."""
    t = jnp.asarray(t, jnp.int32)
    if t_prev is None:
        if clip_t0:
            return jnp.exp(_table(schedule.posterior_log_variance_clipped, t))
        return _table(schedule.posterior_variance, t)
    t_prev = jnp.asarray(t_prev, jnp.int32)
    ab_t, ab_p = alpha_bar(schedule, t), alpha_bar(schedule, t_prev)
    _, beta = step_alpha_beta(schedule, t, t_prev, beta_rule=beta_rule)
    var = (1.0 - ab_p) / (1.0 - ab_t) * beta
    if clip_t0:
        if schedule.num_timesteps < 2:
            raise ValueError("clip_t0 needs a schedule with at least 2 timesteps")
        one = jnp.ones_like(t)
        var1 = posterior_variance(schedule, one, one - 1, beta_rule=beta_rule)
        var = jnp.where(t_prev < 0, var1, var)
    return var


def x0_from_eps(schedule: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """x̂_0 = (x_t − √(1 − ᾱ_t)·ε)/√ᾱ_t."""
    ab = broadcast_to_rank(alpha_bar(schedule, t), x_t.ndim)
    return (x_t - (1.0 - ab) ** 0.5 * eps) / ab ** 0.5


def eps_from_x0(schedule: Schedule, x_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
    """ε̂ = (x_t − √ᾱ_t·x_0)/√(1 − ᾱ_t) (undefined for t < 0)."""
    ab = broadcast_to_rank(alpha_bar(schedule, t), x_t.ndim)
    return (x_t - ab ** 0.5 * x0) / (1.0 - ab) ** 0.5


def v_from_x0_eps(schedule: Schedule, x0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """v = √ᾱ_t·ε − √(1 − ᾱ_t)·x_0 (the v-prediction target)."""
    ab = broadcast_to_rank(alpha_bar(schedule, t), x0.ndim)
    return ab ** 0.5 * eps - (1.0 - ab) ** 0.5 * x0


def x0_from_v(schedule: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """x̂_0 = √ᾱ_t·x_t − √(1 − ᾱ_t)·v."""
    ab = broadcast_to_rank(alpha_bar(schedule, t), x_t.ndim)
    return ab ** 0.5 * x_t - (1.0 - ab) ** 0.5 * v


def eps_from_v(schedule: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """ε̂ = √ᾱ_t·v + √(1 − ᾱ_t)·x_t."""
    ab = broadcast_to_rank(alpha_bar(schedule, t), x_t.ndim)
    return ab ** 0.5 * v + (1.0 - ab) ** 0.5 * x_t


def split_model_output(model_output: jax.Array, channels: int, variance_type: str
                       ) -> tuple[jax.Array, jax.Array | None]:
    """Splits a model output into (prediction, v).

    A model with learned variance outputs 2C channels on the last axis: [first C = ε/x_0/v
    prediction, last C = v in [−1, 1]]. 'learned_range' requires 2C; the other variance
    types take C channels and ignore (drop) the variance half of a 2C output.
    """
    check_variance_type(variance_type)
    c_out = model_output.shape[-1]
    if c_out == 2 * channels:
        pred, v = model_output[..., :channels], model_output[..., channels:]
        return pred, (v if variance_type == "learned_range" else None)
    if variance_type == "learned_range":
        raise ValueError(
            f"variance_type 'learned_range' needs a model output with 2*C = {2 * channels} channels on "
            f"the last axis, got {c_out}")
    if c_out != channels:
        raise ValueError(f"model output has {c_out} channels on the last axis; expected {channels} "
                         f"(or {2 * channels} with a learned variance)")
    return model_output, None


def predict_x0_eps(schedule: Schedule, prediction: jax.Array, x_t: jax.Array, t: jax.Array,
                   prediction_type: str) -> tuple[jax.Array, jax.Array]:
    """(x̂_0, ε̂) from a C-channel model prediction of type 'epsilon' | 'sample' | 'v_prediction'
    (diffusers' formulas; no clipping)."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return x0_from_eps(schedule, x_t, t, prediction), prediction
    if prediction_type == "sample":
        return prediction, eps_from_x0(schedule, x_t, t, prediction)
    return x0_from_v(schedule, x_t, t, prediction), eps_from_v(schedule, x_t, t, prediction)


def p_variance(schedule: Schedule, t: jax.Array, t_prev: jax.Array | None, variance_type: str,
               v: jax.Array | None = None, *, beta_rule: str = "unclip", clip_t0: bool = False
               ) -> tuple[jax.Array, jax.Array]:
    """(σ², log σ²) of the reverse step p_θ(x_prev | x_t) for a variance type (module doc).

    Args:
      t, t_prev: (B,) or scalar; t_prev None → the unit step t → t − 1 from the
        float64-accurate tables (see q_posterior_mean_variance).
      variance_type: 'fixed_small' | 'fixed_small_log' | 'fixed_large' | 'learned_range'.
      v: (B, …, C) model variance output in [−1, 1]; required for 'learned_range'.
      clip_t0: use β̃ of step 1 → 0 in place of β̃ = 0 at the final step (see
        `posterior_variance`); for losses. Sampling never adds noise at t = 0.
    Returns:
      For fixed types, shape of t (broadcast it with `broadcast_to_rank`); for
      'learned_range', shape of v.
    """
    check_variance_type(variance_type)
    t = jnp.asarray(t, jnp.int32)
    if t_prev is None:
        beta = _table(schedule.betas, t)
    else:
        _, beta = step_alpha_beta(schedule, t, t_prev, beta_rule=beta_rule)
    if variance_type == "fixed_large":
        return beta, jnp.log(beta)
    small = jnp.maximum(posterior_variance(schedule, t, t_prev, beta_rule=beta_rule, clip_t0=clip_t0),
                        _MIN_VARIANCE)
    if variance_type in ("fixed_small", "fixed_small_log"):
        return small, jnp.log(small)
    if v is None:
        raise ValueError("variance_type 'learned_range' needs the model's variance output v")
    min_log = broadcast_to_rank(jnp.log(small), v.ndim)
    max_log = broadcast_to_rank(jnp.log(beta), v.ndim)
    frac = (v + 1.0) / 2.0
    log_var = frac * max_log + (1.0 - frac) * min_log
    return jnp.exp(log_var), log_var


def p_std(schedule: Schedule, t: jax.Array, t_prev: jax.Array | None, variance_type: str,
          v: jax.Array | None = None, *, beta_rule: str = "unclip") -> jax.Array:
    """σ of the reverse step, computed as diffusers does for each variance type (√σ² for
    'fixed_small'/'fixed_large', exp(½·log σ²) for 'fixed_small_log'/'learned_range')."""
    var, log_var = p_variance(schedule, t, t_prev, variance_type, v, beta_rule=beta_rule)
    if variance_type in ("fixed_small", "fixed_large"):
        return var ** 0.5
    return jnp.exp(0.5 * log_var)
