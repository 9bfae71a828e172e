"""Samplers: ancestral DDPM (respaced, as Karlo/UnCLIPScheduler), DDIM, DDIM inversion, CFG.

Every sampler takes the model as a function `model_fn(x_t, t) -> output` with x_t (B, …, C)
and t an int32 array of shape (B,) holding the ORIGINAL (unrespaced) timestep; the output
has C channels, or 2C when the model learns its variance ([prediction; v], last axis).
Each sampler's whole loop is one `jax.lax.scan`, so `jax.jit(lambda x: ddpm_sample(f, x, …))`
compiles the complete chain once; `model_fn` is a closed-over Python callable and
`timesteps` must be a concrete array (use `respace`).

Timesteps are DESCENDING. Step i goes from t_i to t_prev_i:
  ddpm_sample:  t_prev_i = t_{i+1}, and t_last − 1 on the last step (UnCLIPPipeline's rule;
                −1, i.e. the clean data, when the list ends at 0 as every `respace` spec does).
  ddim_sample:  t_prev_i = t_{i+1}, and −1 (ᾱ = 1, the clean data) after the last step
                (DDIMScheduler with set_alpha_to_one=True).

Randomness: with `key`, step i draws its noise from `jax.random.fold_in(key, i)`; `noise`
of shape (len(timesteps), *x_T.shape) supplies the per-step noise instead (for parity
tests against other implementations).

The x̂_0 post-processing order is: denoised_fn → dynamic thresholding → clip to ±clip_range.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.diffusion import gaussian as g
from unclip_jax.diffusion.schedule import Schedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def dynamic_thresholding(x0: jax.Array, ratio: float, max_value: float | None = None) -> jax.Array:
    """Imagen's dynamic thresholding (Saharia et al. 2022, §2.3), per sample.

    s = max(1, quantile_ratio(|x̂_0|)) over all non-batch elements (linear interpolation, as
    torch.quantile), optionally capped at `max_value`; returns clip(x̂_0, −s, s)/s.
    x0: (B, …). Computed in float32.
    """
    dtype = x0.dtype
    x = x0.astype(jnp.float32)
    flat = jnp.abs(x.reshape(x.shape[0], -1))
    s = jnp.quantile(flat, ratio, axis=1)
    s = jnp.maximum(s, 1.0)
    if max_value is not None:
        s = jnp.minimum(s, max_value)
    s = g.broadcast_to_rank(s, x.ndim)
    return (jnp.clip(x, -s, s) / s).astype(dtype)


def process_x0(x0: jax.Array, *, clip_range: float | None = None, dynamic_threshold: float | None = None,
               dynamic_threshold_max: float | None = None,
               denoised_fn: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """denoised_fn(x̂_0) → dynamic thresholding at percentile `dynamic_threshold` → clip ±clip_range."""
    if denoised_fn is not None:
        x0 = denoised_fn(x0)
    if dynamic_threshold is not None:
        x0 = dynamic_thresholding(x0, dynamic_threshold, dynamic_threshold_max)
    if clip_range is not None:
        x0 = jnp.clip(x0, -clip_range, clip_range)
    return x0


def ddpm_step(schedule: Schedule, model_output: jax.Array, t: jax.Array, t_prev: jax.Array, x_t: jax.Array,
              noise: jax.Array | None, *, prediction_type: str = "epsilon", variance_type: str = "fixed_small_log",
              clip_range: float | None = None, dynamic_threshold: float | None = None,
              dynamic_threshold_max: float | None = None,
              denoised_fn: Callable[[jax.Array], jax.Array] | None = None, beta_rule: str = "unclip",
              return_x0: bool = False):
    """One ancestral step x_t → x_prev ~ N(μ̃(x̂_0, x_t), σ²), as diffusers' UnCLIPScheduler.step.

    Args:
      model_output: (B, …, C) or (B, …, 2C) for 'learned_range' ([prediction; v]).
      t, t_prev: scalar or (B,) ints; t_prev may skip steps (β = 1 − ᾱ_t/ᾱ_prev, or β_t from
        the table when t_prev = t − 1); t_prev < 0 means ᾱ_prev = 1.
      x_t: (B, …, C).
      noise: (B, …, C) standard normal z (x_prev = μ̃ + σ·z); None returns the mean μ̃. Never
        added when t == 0 (the last step returns μ̃, as diffusers).
      prediction_type: 'epsilon' | 'sample' | 'v_prediction'.
      variance_type: 'fixed_small' | 'fixed_small_log' | 'fixed_large' | 'learned_range'.
      clip_range, dynamic_threshold, dynamic_threshold_max, denoised_fn: x̂_0 processing (module doc).
      beta_rule: 'unclip' (UnCLIPScheduler) or 'ddpm' (DDPMScheduler) float32 arithmetic.
      return_x0: also return the processed x̂_0.
    Returns:
      x_prev (B, …, C), or (x_prev, x̂_0) with return_x0.
    """
    g.check_prediction_type(prediction_type)
    out = model_output.astype(x_t.dtype)
    pred, v = g.split_model_output(out, x_t.shape[-1], variance_type)
    x0, _ = g.predict_x0_eps(schedule, pred, x_t, t, prediction_type)
    x0 = process_x0(x0, clip_range=clip_range, dynamic_threshold=dynamic_threshold,
                    dynamic_threshold_max=dynamic_threshold_max, denoised_fn=denoised_fn)
    mean, _, _ = g.q_posterior_mean_variance(schedule, x0, x_t, t, t_prev, beta_rule=beta_rule)
    t = jnp.asarray(t, jnp.int32)
    if noise is None:
        x_prev = mean
    else:
        std = g.broadcast_to_rank(g.p_std(schedule, t, t_prev, variance_type, v, beta_rule=beta_rule), x_t.ndim)
        x_prev = jnp.where(g.broadcast_to_rank(t > 0, x_t.ndim), mean + std * noise, mean)
    x_prev = x_prev.astype(x_t.dtype)
    return (x_prev, x0) if return_x0 else x_prev


def ddim_step(schedule: Schedule, model_output: jax.Array, t: jax.Array, t_prev: jax.Array, x_t: jax.Array,
              noise: jax.Array | None = None, *, eta: float | jax.Array = 0.0, prediction_type: str = "epsilon",
              clip_range: float | None = None, dynamic_threshold: float | None = None,
              dynamic_threshold_max: float | None = None,
              denoised_fn: Callable[[jax.Array], jax.Array] | None = None,
              use_clipped_model_output: bool = False, return_x0: bool = False):
    """One DDIM step (Song et al. 2021, eq. 12), as diffusers' DDIMScheduler.step:

      σ = η·√((1 − ᾱ_p)/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_p))
      x_p = √ᾱ_p·x̂_0 + √(1 − ᾱ_p − σ²)·ε̂ + σ·z

    Args:
      model_output: (B, …, C), or (B, …, 2C) whose variance half is ignored.
      t, t_prev: scalar or (B,) ints; t_prev < 0 means ᾱ_p = 1.
      noise: z, needed when η ≠ 0 (a Python 0.0 skips it, as diffusers).
      use_clipped_model_output: recompute ε̂ from the processed x̂_0 (improved-diffusion's DDIM
        does; diffusers' default does not).
    Returns:
      x_prev, or (x_prev, x̂_0) with return_x0.
    """
    g.check_prediction_type(prediction_type)
    out = model_output.astype(x_t.dtype)
    pred, _ = g.split_model_output(out, x_t.shape[-1], "fixed_small")
    x0, eps = g.predict_x0_eps(schedule, pred, x_t, t, prediction_type)
    x0 = process_x0(x0, clip_range=clip_range, dynamic_threshold=dynamic_threshold,
                    dynamic_threshold_max=dynamic_threshold_max, denoised_fn=denoised_fn)
    if use_clipped_model_output:
        eps = g.eps_from_x0(schedule, x_t, t, x0)
    ab_t = g.broadcast_to_rank(g.alpha_bar(schedule, t), x_t.ndim)
    ab_p = g.broadcast_to_rank(g.alpha_bar(schedule, t_prev), x_t.ndim)
    variance = ((1.0 - ab_p) / (1.0 - ab_t)) * (1.0 - ab_t / ab_p)
    std = eta * variance ** 0.5
    direction = jnp.maximum(1.0 - ab_p - std ** 2, 0.0) ** 0.5 * eps
    x_prev = ab_p ** 0.5 * x0 + direction
    stochastic = not (isinstance(eta, (int, float)) and eta == 0)
    if stochastic:
        if noise is None:
            raise ValueError("ddim_step with eta != 0 needs `noise`")
        x_prev = x_prev + std * noise
    x_prev = x_prev.astype(x_t.dtype)
    return (x_prev, x0) if return_x0 else x_prev


def _concrete_timesteps(timesteps, schedule: Schedule) -> np.ndarray:
    try:
        ts = np.asarray(timesteps)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        raise TypeError("timesteps must be a concrete array (e.g. from `respace`), not a traced value; "
                        "close over it instead of passing it as a jit argument") from None
    if ts.ndim != 1 or ts.size == 0 or not np.issubdtype(ts.dtype, np.integer):
        raise ValueError(f"timesteps must be a non-empty 1-D int array, got {ts.dtype} {ts.shape}")
    if np.any(np.diff(ts) >= 0):
        raise ValueError("timesteps must be strictly descending (as returned by `respace`)")
    if ts[0] >= schedule.num_timesteps or ts[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {schedule.num_timesteps}), "
                         f"got [{int(ts[-1])}, {int(ts[0])}]")
    return ts.astype(np.int32)


def _check_noise(noise, key, n: int, x: jax.Array, what: str) -> None:
    if noise is None:
        if key is None:
            raise ValueError(f"{what} needs a PRNG `key` or explicit per-step `noise`")
        return
    expected = (n,) + tuple(x.shape)
    if tuple(noise.shape) != expected:
        raise ValueError(f"noise must have shape (len(timesteps), *x_T.shape) = {expected}, got {tuple(noise.shape)}")


def _step_noise(key, i, z, x):
    if z is not None:
        return z.astype(x.dtype)
    return jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)


def _batch_t(t: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.full((x.shape[0],), t, jnp.int32)


def ddpm_sample(model_fn: ModelFn, x_T: jax.Array, timesteps, schedule: Schedule, key: jax.Array | None = None, *,
                prediction_type: str = "epsilon", variance_type: str = "fixed_small_log",
                clip_range: float | None = None, dynamic_threshold: float | None = None,
                dynamic_threshold_max: float | None = None,
                denoised_fn: Callable[[jax.Array], jax.Array] | None = None, noise: jax.Array | None = None,
                beta_rule: str = "unclip") -> jax.Array:
    """Ancestral sampling over respaced `timesteps` (descending; see module doc) in one scan.

    Args:
      model_fn: f(x_t (B, …, C), t (B,) int32) -> (B, …, C) or (B, …, 2C).
      x_T: (B, …, C) initial noise (σ = 1).
      timesteps: concrete descending ints, e.g. `respace(25)`.
      key: PRNG key for the per-step noise (fold_in(key, i) at step i), or
      noise: (len(timesteps), B, …, C) per-step noise (step i uses noise[i]).
      Other arguments as `ddpm_step`.
    Returns:
      x_0 (B, …, C).
    """
    g.check_prediction_type(prediction_type)
    g.check_variance_type(variance_type)
    ts = _concrete_timesteps(timesteps, schedule)
    prev = np.append(ts[1:], ts[-1] - 1).astype(np.int32)
    _check_noise(noise, key, len(ts), x_T, "ddpm_sample")

    def body(x, inputs):
        i, t, t_prev, z = inputs
        out = model_fn(x, _batch_t(t, x))
        x = ddpm_step(schedule, out, t, t_prev, x, _step_noise(key, i, z, x), prediction_type=prediction_type,
                      variance_type=variance_type, clip_range=clip_range, dynamic_threshold=dynamic_threshold,
                      dynamic_threshold_max=dynamic_threshold_max, denoised_fn=denoised_fn, beta_rule=beta_rule)
        return x, None

    x, _ = jax.lax.scan(body, x_T, (jnp.arange(len(ts), dtype=jnp.int32), jnp.asarray(ts), jnp.asarray(prev), noise))
    return x


def ddim_sample(model_fn: ModelFn, x_T: jax.Array, timesteps, schedule: Schedule, key: jax.Array | None = None, *,
                eta: float | jax.Array = 0.0, prediction_type: str = "epsilon", clip_range: float | None = None,
                dynamic_threshold: float | None = None, dynamic_threshold_max: float | None = None,
                denoised_fn: Callable[[jax.Array], jax.Array] | None = None, noise: jax.Array | None = None,
                use_clipped_model_output: bool = False) -> jax.Array:
    """DDIM sampling over descending `timesteps` (last step goes to ᾱ = 1) in one scan.

    η = 0 (a Python 0 or 0.0) is deterministic and needs neither key nor noise; otherwise
    as `ddpm_sample`. Other arguments as `ddim_step`. Returns x_0 (B, …, C).
    """
    g.check_prediction_type(prediction_type)
    ts = _concrete_timesteps(timesteps, schedule)
    prev = np.append(ts[1:], -1).astype(np.int32)
    stochastic = not (isinstance(eta, (int, float)) and eta == 0)
    if stochastic:
        _check_noise(noise, key, len(ts), x_T, "ddim_sample with eta != 0")
    else:
        noise = None

    def body(x, inputs):
        i, t, t_prev, z = inputs
        out = model_fn(x, _batch_t(t, x))
        z = _step_noise(key, i, z, x) if stochastic else None
        x = ddim_step(schedule, out, t, t_prev, x, z, eta=eta, prediction_type=prediction_type,
                      clip_range=clip_range, dynamic_threshold=dynamic_threshold,
                      dynamic_threshold_max=dynamic_threshold_max, denoised_fn=denoised_fn,
                      use_clipped_model_output=use_clipped_model_output)
        return x, None

    x, _ = jax.lax.scan(body, x_T, (jnp.arange(len(ts), dtype=jnp.int32), jnp.asarray(ts), jnp.asarray(prev), noise))
    return x


def ddim_invert(model_fn: ModelFn, x_0: jax.Array, timesteps, schedule: Schedule, *,
                prediction_type: str = "epsilon", fixed_point_iters: int = 0) -> jax.Array:
    """Deterministic DDIM run forward in t: x_0 → x_T with x_T at noise level timesteps[0].

    Visits the levels of `ddim_sample(…, timesteps, eta=0)` in reverse: clean (ᾱ = 1) →
    t_{n−1} → … → t_0. Step a → b (a < b) evaluates the model at (x_a, b) — the timestep of
    the state the matching sampling step starts from (as diffusers' DDIMInverseScheduler) —
    takes its ε̂ (converted with ᾱ_b for 'sample'/'v_prediction' outputs), and moves along
    the DDIM ODE:  x̂_0 = (x_a − √(1 − ᾱ_a)·ε̂)/√ᾱ_a,  x_b = √ᾱ_b·x̂_0 + √(1 − ᾱ_b)·ε̂.

    The sampling step b → a uses ε̂(x_b) instead of ε̂(x_a); the mismatch vanishes as the
    steps shrink (first order in the step size). `fixed_point_iters` > 0 re-evaluates ε̂ at
    the current guess of x_b that many times per step (one extra model call each), which
    converges to the exact inverse of the η = 0 sampling step, so that
    `ddim_sample(f, ddim_invert(f, x0, ts, s, fixed_point_iters=k), ts, s)` ≈ x0 closely.
    The iteration contracts by ≈ |∂ε̂/∂x|·|√(1 − ᾱ_b) − √(ᾱ_b/ᾱ_a)·√(1 − ᾱ_a)| per pass:
    fast for most steps, but ≈ 1 for a step into the cosine schedule's t = 999 (ᾱ ≈ 2e-9),
    where it barely helps (that step then keeps its first-order error).
    x_0: (B, …, C); returns x_T with the same shape.
    """
    g.check_prediction_type(prediction_type)
    if fixed_point_iters < 0:
        raise ValueError(f"fixed_point_iters must be >= 0, got {fixed_point_iters}")
    ts = _concrete_timesteps(timesteps, schedule)
    dst = ts[::-1].astype(np.int32)
    src = np.concatenate([[-1], dst[:-1]]).astype(np.int32)

    def eps_at(x, b):
        out = model_fn(x, _batch_t(b, x)).astype(x.dtype)
        pred, _ = g.split_model_output(out, x.shape[-1], "fixed_small")
        return g.predict_x0_eps(schedule, pred, x, b, prediction_type)[1]

    def body(x_a, inputs):
        a, b = inputs
        ab_a, ab_b = g.alpha_bar(schedule, a), g.alpha_bar(schedule, b)

        def forward(eps):
            x0 = (x_a - (1.0 - ab_a) ** 0.5 * eps) / ab_a ** 0.5
            return (ab_b ** 0.5 * x0 + (1.0 - ab_b) ** 0.5 * eps).astype(x_a.dtype)

        x_b = forward(eps_at(x_a, b))
        if fixed_point_iters:
            x_b = jax.lax.fori_loop(0, fixed_point_iters, lambda _, x: forward(eps_at(x, b)), x_b)
        return x_b, None

    x, _ = jax.lax.scan(body, x_0, (jnp.asarray(src), jnp.asarray(dst)))
    return x


def classifier_free_guidance(model_fn: ModelFn, scale: float | jax.Array, *,
                             guided_channels: int | None = None) -> ModelFn:
    """Wraps a model for classifier-free guidance (Ho & Salimans 2022) in ONE model call.

    The returned f(x, t) runs `model_fn` on the doubled batch [x; x] (t doubled likewise),
    splits the output in diffusers' order [uncond; cond] and returns
      uncond + scale·(cond − uncond)   on the first `guided_channels` channels (all if None),
    with the remaining channels (a learned variance v) taken from the cond half.
    `model_fn` must close over conditioning arrays already concatenated [uncond; cond]
    (batch 2B). x: (B, …, C); t: (B,) or scalar; scale: scalar or per-example (B,).
    Returns (B, …, C_out).
    """
    def guided(x: jax.Array, t: jax.Array) -> jax.Array:
        t = jnp.asarray(t)
        t2 = jnp.concatenate([t, t], axis=0) if t.ndim else t
        out = model_fn(jnp.concatenate([x, x], axis=0), t2)
        uncond, cond = jnp.split(out, 2, axis=0)
        c = out.shape[-1] if guided_channels is None else guided_channels
        s = g.broadcast_to_rank(jnp.asarray(scale, out.dtype), out.ndim)
        guided_part = uncond[..., :c] + s * (cond[..., :c] - uncond[..., :c])
        if c == out.shape[-1]:
            return guided_part
        return jnp.concatenate([guided_part, cond[..., c:]], axis=-1)

    return guided
