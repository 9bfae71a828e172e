"""Embedding-space operations of the paper's image manipulations (§3).

All functions work on whole vectors: the angle of a slerp is the angle between the two
embeddings as vectors, not an element-wise arccos (the mistake of diffusers' community
``unclip_text_interpolation.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def slerp(a: jax.Array, b: jax.Array, theta: jax.Array | float, eps: float = 1e-7) -> jax.Array:
    """Spherical interpolation between ``a`` and ``b`` along the last axis.

    slerp(a, b, θ) = [sin((1−θ)Ω)·a + sin(θΩ)·b] / sin Ω,  Ω = arccos(â·b̂).

    Args:
      a, b: (..., D) vectors (norms may differ; they are interpolated as in the paper,
        which scales by the unnormalised endpoints).
      theta: scalar or array broadcastable to (...) in [0, 1].
    Returns:
      (..., D). Falls back to linear interpolation when a and b are (anti)parallel.
    """
    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    theta = jnp.asarray(theta, jnp.float32)[..., None] if jnp.ndim(theta) else jnp.float32(theta)
    cos = jnp.sum(a32 * b32, -1, keepdims=True) / (
        jnp.linalg.norm(a32, axis=-1, keepdims=True) * jnp.linalg.norm(b32, axis=-1, keepdims=True) + eps)
    omega = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    sin_omega = jnp.sin(omega)
    safe = sin_omega > 1e-4
    denom = jnp.where(safe, sin_omega, 1.0)
    spherical = (jnp.sin((1.0 - theta) * omega) * a32 + jnp.sin(theta * omega) * b32) / denom
    linear = (1.0 - theta) * a32 + theta * b32
    return jnp.where(safe, spherical, linear).astype(a.dtype)


def l2_normalize(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    """x / ||x|| over the last axis."""
    return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + eps)


def text_diff_direction(text_embed: jax.Array, base_text_embed: jax.Array) -> jax.Array:
    """The paper's text diff z_d = norm(z_t − z_t0) (§3.3), both (..., D)."""
    return l2_normalize(text_embed - base_text_embed)


def text_diff(image_embed: jax.Array, text_embed: jax.Array, base_text_embed: jax.Array,
              theta: jax.Array | float) -> jax.Array:
    """z_θ = slerp(z_i, z_d, θ), rescaled to the norm of z_i so the decoder sees the usual scale.

    The paper slerps the (unit-norm) CLIP embeddings; our image embeddings keep CLIP's
    norm (as Karlo's decoder consumes them), so the direction is brought to |z_i| first.
    θ in [0, 0.5] is the useful range.
    """
    norm = jnp.linalg.norm(image_embed, axis=-1, keepdims=True)
    return slerp(image_embed, text_diff_direction(text_embed, base_text_embed) * norm, theta)
