"""Noise schedules and timestep respacing.

Notation (Ho et al. 2020; Nichol & Dhariwal 2021): β_t is the forward-process variance of
step t, α_t = 1 − β_t, ᾱ_t = ∏_{s≤t} α_s, for integer t in [0, T). By convention ᾱ_{−1} = 1
(the clean data).

Precision: the tables are float32 and built the way diffusers builds them, so the samplers
reproduce diffusers' schedulers to ~1e-6 in float32: β_t is computed in float64 (python
floats) and rounded to float32; α_t = 1 − β_t is computed in float32, and ᾱ_t = cumprod(α)
is accumulated in float64 and rounded once (what torch.cumprod does on CPU), so the float32
tables equal diffusers' bit for bit. All later arithmetic (1 − ᾱ_t, respaced β) is float32,
like diffusers; near t = 0, where ᾱ_t is within a few float32 ulps of 1, 1 − ᾱ_t then
carries up to ~1e-3 relative rounding error — in both implementations alike.

Public API:
  make_betas(name, num_timesteps=1000) -> np.ndarray (T,) float64
  Schedule.create(name="cosine", num_timesteps=1000) -> Schedule (a pytree; pass into jit)
  respace(spec, num_timesteps=1000) -> np.ndarray int32, DESCENDING timesteps to visit
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.struct
import jax.numpy as jnp
import numpy as np

_COSINE_NAMES = ("cosine", "squaredcos_cap_v2")
_LINEAR_NAMES = ("linear",)


def _cosine_alpha_bar(s: float) -> float:
    """ᾱ(s) = cos²((s + 0.008)/1.008 · π/2), s = t/T in [0, 1] (improved-DDPM eq. 17)."""
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def make_betas(name: str, num_timesteps: int = 1000) -> np.ndarray:
    """β_t for t = 0 … T−1 as float64.

    Args:
      name: 'cosine' (alias 'squaredcos_cap_v2'): β_t = min(1 − ᾱ((t+1)/T)/ᾱ(t/T), 0.999);
        'linear': improved-diffusion's linear schedule scaled to T, β from 1e-4·1000/T to
        0.02·1000/T (for T = 1000, DDPM's 1e-4 … 0.02).
      num_timesteps: T.
    Returns:
      (T,) float64 array.
    """
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    if name in _COSINE_NAMES:
        # Python floats (float64), as diffusers' betas_for_alpha_bar and improved-diffusion.
        return np.array([
            min(1.0 - _cosine_alpha_bar((i + 1) / num_timesteps) / _cosine_alpha_bar(i / num_timesteps), 0.999)
            for i in range(num_timesteps)
        ], dtype=np.float64)
    if name in _LINEAR_NAMES:
        scale = 1000.0 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    raise ValueError(f"unknown beta schedule {name!r}; expected one of {_COSINE_NAMES + _LINEAR_NAMES}")


@flax.struct.dataclass
class Schedule:
    """Float32 tables of a discrete Gaussian diffusion with T steps (a pytree).

    Attributes (all (T,) float32 jnp arrays):
      betas: β_t.
      alphas: α_t = 1 − β_t.
      alphas_cumprod: ᾱ_t.
      sqrt_alphas_cumprod: √ᾱ_t.
      sqrt_one_minus_alphas_cumprod: √(1 − ᾱ_t).
      posterior_variance: β̃_t = β_t·(1 − ᾱ_{t−1})/(1 − ᾱ_t) of the unit step t → t−1.
      posterior_log_variance_clipped: log β̃_t with log β̃_1 at t = 0 (where β̃_0 = 0).
      posterior_mean_coef1, posterior_mean_coef2: μ̃_t = coef1·x_0 + coef2·x_t.
      num_timesteps: T (static: not a pytree leaf, so jit specialises on it).

    The four posterior tables (unit steps only, used by the training losses) are computed in
    float64 from float64 β and rounded once, as improved-diffusion does; they are accurate
    near t = 0, where float32 1 − ᾱ_t is not. The samplers instead derive respaced β, β̃
    and μ̃ coefficients on the fly from ᾱ in float32, the same operations as diffusers.
    """

    betas: jnp.ndarray
    alphas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    posterior_variance: jnp.ndarray
    posterior_log_variance_clipped: jnp.ndarray
    posterior_mean_coef1: jnp.ndarray
    posterior_mean_coef2: jnp.ndarray
    num_timesteps: int = flax.struct.field(pytree_node=False, default=1000)

    @classmethod
    def from_betas(cls, betas: np.ndarray | Sequence[float]) -> "Schedule":
        """Builds the tables from β_t (any float dtype; rounded to float32 first)."""
        betas32 = np.asarray(betas, dtype=np.float64).astype(np.float32)
        if betas32.ndim != 1 or betas32.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas32.shape}")
        if not np.all((betas32 > 0) & (betas32 <= 1)):
            raise ValueError("betas must lie in (0, 1]")
        alphas = (np.float32(1.0) - betas32).astype(np.float32)
        # torch.cumprod on CPU accumulates float32 in float64 and rounds each prefix once.
        alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)

        b64 = np.asarray(betas, dtype=np.float64)
        ac64 = np.cumprod(1.0 - b64)
        ac64_prev = np.append(1.0, ac64[:-1])
        post_var = b64 * (1.0 - ac64_prev) / (1.0 - ac64)
        post_log_clipped = np.log(np.append(post_var[1], post_var[1:]) if b64.size > 1 else np.maximum(post_var, 1e-20))
        f32 = lambda a: jnp.asarray(np.asarray(a, np.float64).astype(np.float32))  # noqa: E731
        return cls(
            betas=jnp.asarray(betas32),
            alphas=jnp.asarray(alphas),
            alphas_cumprod=jnp.asarray(alphas_cumprod),
            sqrt_alphas_cumprod=jnp.asarray(np.sqrt(alphas_cumprod)),
            sqrt_one_minus_alphas_cumprod=jnp.asarray(np.sqrt(np.float32(1.0) - alphas_cumprod)),
            posterior_variance=f32(post_var),
            posterior_log_variance_clipped=f32(post_log_clipped),
            posterior_mean_coef1=f32(b64 * np.sqrt(ac64_prev) / (1.0 - ac64)),
            posterior_mean_coef2=f32((1.0 - ac64_prev) * np.sqrt(1.0 - b64) / (1.0 - ac64)),
            num_timesteps=int(betas32.size),
        )

    @classmethod
    def create(cls, name: str = "cosine", num_timesteps: int = 1000) -> "Schedule":
        """Schedule for a named β schedule (see `make_betas`)."""
        return cls.from_betas(make_betas(name, num_timesteps))


def _space_sections(num_timesteps: int, section_counts: Sequence[int]) -> set[int]:
    """improved-diffusion `space_timesteps`: split [0, T) into equal sections and take
    `count` evenly spaced (rounded, fractional-stride) steps from each."""
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start = 0
    taken: set[int] = set()
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count < 0 or size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} timesteps")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            taken.add(start + round(cur))
            cur += stride
        start += size
    return taken


def respace(spec: int | str | Sequence[int], num_timesteps: int = 1000) -> np.ndarray:
    """The timesteps a respaced sampler visits, DESCENDING, int32.

    Args:
      spec:
        - int n or "n": n steps evenly spread over [0, T−1] and rounded,
          round(i·(T−1)/(n−1)) — diffusers' `UnCLIPScheduler.set_timesteps(n)` and Karlo's
          respacing (n=7 → 999, 832, 666, 500, 333, 166, 0). n = 1 gives [T−1]. (Karlo's
          `space_timesteps(T, "n")` accumulates the fractional stride instead of multiplying;
          it agrees for the n Karlo uses — 7, 25, 50 — but not for every n, e.g. n = 21.
          The section form "n," gives the accumulating variant.)
        - "a,b,c,…": improved-diffusion `space_timesteps` sections (T split into equal
          sections, a steps from the first, b from the second, …).
        - "ddimN": the integer stride s with len(range(0, T, s)) == N (improved-diffusion;
          equals diffusers DDIM `set_timesteps(N)` with 'leading' spacing when T % N == 0).
        - "fast27": GLIDE's upsampler spacing, "10,10,3,2,2" with T−1 replaced by T−3.
        - a sequence of ints: used as given (deduplicated, sorted descending).
      num_timesteps: T of the trained model.
    Returns:
      (n,) int32, strictly descending, all in [0, T).
    """
    T = int(num_timesteps)
    if isinstance(spec, (bool, np.bool_)):
        raise TypeError(f"respacing spec must be an int, a string or a sequence of ints, got {spec!r}")
    if isinstance(spec, str):
        s = spec.strip()
        if s == "fast27":
            steps = _space_sections(T, [10, 10, 3, 2, 2])
            steps.discard(T - 1)
            steps.add(T - 3)
        elif s.startswith("ddim"):
            try:
                n = int(s[len("ddim"):])
            except ValueError:
                raise ValueError(f"bad respacing spec {spec!r}: expected 'ddimN'") from None
            stride = next((i for i in range(1, T) if len(range(0, T, i)) == n), None)
            if stride is None:
                raise ValueError(f"cannot create exactly {n} steps with an integer stride from T={T}")
            steps = set(range(0, T, stride))
        elif "," in s:
            try:
                counts = [int(c) for c in s.split(",") if c.strip()]
            except ValueError:
                raise ValueError(f"bad respacing spec {spec!r}: expected comma-separated ints") from None
            steps = _space_sections(T, counts)
        else:
            try:
                n = int(s)
            except ValueError:
                raise ValueError(
                    f"bad respacing spec {spec!r}: expected n, 'n', 'a,b,…', 'ddimN' or 'fast27'") from None
            return respace(n, T)
    elif isinstance(spec, (int, np.integer)):
        n = int(spec)
        if not 1 <= n <= T:
            raise ValueError(f"number of sampling steps must be in [1, {T}], got {n}")
        if n == 1:
            return np.array([T - 1], dtype=np.int32)
        ratio = (T - 1) / (n - 1)
        return (np.arange(n) * ratio).round()[::-1].astype(np.int32)
    else:
        steps = {int(x) for x in np.asarray(spec).reshape(-1)}
        if not steps:
            raise ValueError("empty timestep list")
    if min(steps) < 0 or max(steps) >= T:
        raise ValueError(f"timesteps must lie in [0, {T}), got range [{min(steps)}, {max(steps)}]")
    return np.array(sorted(steps, reverse=True), dtype=np.int32)
