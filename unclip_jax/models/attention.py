"""The one attention function every model calls.

All attention in the project goes through :func:`dot_product_attention`, so the
backend choice lives in one place: XLA everywhere by default (CPU, GPU, TPU), cuDNN
flash attention on NVIDIA GPUs when asked for and when the inputs allow it, and Pallas
splash attention on TPUs when asked for (``unclip_jax.models.splash``).

Masks come either as an additive ``bias`` or, in the form every backend can take, as a
boolean ``key_mask`` plus ``is_causal``; splash attention takes only the latter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from unclip_jax.compute_options import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS
from unclip_jax.compute_options import AttentionImplementation as Implementation

# Additive bias that the PyTorch references (diffusers, Karlo) use for masked keys.
# Using the same finite value (not -inf) keeps fully masked rows and parity exact.
MASK_BIAS = -10000.0


def mask_to_bias(mask: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Boolean key mask (B, Lk), True = attend, to an additive bias (B, 1, 1, Lk)."""
    return jnp.where(mask, 0.0, MASK_BIAS).astype(dtype)[:, None, None, :]


def key_mask_to_bias(key_mask: jax.Array, is_causal: bool, q_len: int) -> jax.Array:
    """(B, Lk) key mask (and causality) as diffusers adds them: (B, 1, Lq, Lk) or (B, 1, 1, Lk).

    Both masks add ``MASK_BIAS`` (float32), so a key that is padded *and* in the future
    gets twice that, as in diffusers' prior.
    """
    bias = mask_to_bias(key_mask.astype(bool))
    if is_causal:
        future = jnp.triu(jnp.ones((q_len, key_mask.shape[1]), bool), k=1)
        bias = bias + jnp.where(future, MASK_BIAS, 0.0)[None, None]
    return bias


def _cudnn_ok(q: jax.Array) -> bool:
    # cuDNN's fused attention takes bf16/fp16 with head sizes up to 128 (multiples of 8);
    # an additive bias is supported (seen on an H200 with the decoder's text-mask bias).
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


def _pad_lengths_to_even(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array):
    """Pads odd query/key lengths to even ones, for cuDNN's attention with a bias.

    cuDNN's fused attention differentiates a biased attention only for even lengths
    (the prior's 81 tokens and the decoder's 1024 + 81 keys are odd). An extra key gets
    ``MASK_BIAS`` (it takes no weight); an extra query row is computed and sliced off by
    the caller. ``bias`` is 4-d with full query and key lengths.
    """
    pad_q, pad_k = q.shape[1] % 2, k.shape[1] % 2
    if pad_q:
        q = jnp.pad(q, ((0, 0), (0, 1), (0, 0), (0, 0)))
        bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 1), (0, 0)))
    if pad_k:
        k = jnp.pad(k, ((0, 0), (0, 1), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 1), (0, 0), (0, 0)))
        bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 0), (0, 1)), constant_values=MASK_BIAS)
    return q, k, v, bias


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          bias: jax.Array | None = None, key_mask: jax.Array | None = None,
                          is_causal: bool = False,
                          scale: float | None = None,
                          implementation: Implementation = "xla") -> jax.Array:
    """softmax(q k^T * scale + bias) v over heads.

    Args:
      q: (B, Lq, H, D) queries.
      k, v: (B, Lk, H, D) keys and values.
      bias: additive logits bias broadcastable to (B, H, Lq, Lk), e.g. from
        :func:`mask_to_bias`; masked positions get ``MASK_BIAS``. Not for "splash".
      key_mask: (B, Lk) bool, True = attend. Off splash it becomes an additive bias
        (with the causal mask, if any, added the same way: :func:`key_mask_to_bias`).
      is_causal: mask keys after each query (Lq == Lk).
      scale: logits scale; 1/sqrt(D) by default.
      implementation: "xla" (portable, the default), "cudnn" (flash attention on
        NVIDIA GPUs; bf16/fp16, D <= 128), "splash" (Pallas flash attention on TPUs;
        interpreted on CPU, slower than xla), or "auto" (cudnn where it applies, else xla).
    Returns:
      (B, Lq, H, D) in the dtype of ``q``.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
    if implementation == "auto":
        implementation = "cudnn" if _cudnn_ok(q) else "xla"
    if implementation == "splash":
        if bias is not None:
            raise ValueError("splash attention takes key_mask / is_causal, not an additive bias")
        from unclip_jax.models.splash import splash_attention
        return splash_attention(q, k, v, key_mask=key_mask, is_causal=is_causal, scale=scale)
    if key_mask is not None:
        mask_bias = key_mask_to_bias(key_mask, is_causal, q.shape[1])
        bias = mask_bias if bias is None else bias + mask_bias
        is_causal = False
    if (implementation == "xla" and not is_causal and jax.default_backend() == "cpu"
            and q.shape[1] >= 2 * CPU_QUERY_CHUNK and (bias is None or bias.shape[-2] == 1)):
        return _attend_in_query_chunks(q, k, v, bias, scale)
    if bias is not None:
        bias = bias.astype(q.dtype)
        if implementation == "cudnn":
            # cuDNN wants the bias's query and key lengths in full; its batch and head dims
            # may stay 1. Keeping heads at 1 spares an H-fold (B, H, Lq, Lk) copy in memory.
            bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
            bias = jnp.broadcast_to(bias, bias.shape[:2] + (q.shape[1], k.shape[1]))
            if q.shape[1] % 2 or k.shape[1] % 2:
                attend = functools.partial(jax.nn.dot_product_attention, is_causal=is_causal, scale=scale,
                                           implementation=implementation)
                return _attend_at_even_lengths(attend, q, k, v, bias)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=is_causal,
                                        scale=scale, implementation=implementation)


# On CPU, XLA writes the (B, H, Lq, Lk) logits of a long sequence to memory and reads them
# back in each softmax pass; a block of 64 queries at a time keeps them in cache (the tiny
# cascade of bench/cpu_tiny.py went from 3.86 to 1.89 s per image on the 2-core CPU).
CPU_QUERY_CHUNK = 64


def _attend_in_query_chunks(q, k, v, bias, scale):
    """Softmax attention of one block of ``CPU_QUERY_CHUNK`` queries at a time (``lax.map``).

    Every query row's softmax sees all its keys, as in one call; only the order of the work
    changes. Heads-major batched matmuls in float32, normalised after the value product (one
    pass less over the logits). ``bias`` is None or has query length 1. Odd lengths pad the
    last block.
    """
    b, length, heads, dim = q.shape
    dtype, chunk = q.dtype, CPU_QUERY_CHUNK
    padded = -(-length // chunk) * chunk
    scale = dim ** -0.5 if scale is None else scale
    heads_major = lambda x: x.astype(jnp.float32).transpose(0, 2, 1, 3)  # (B, H, L, D)
    q = jnp.pad(heads_major(q) * scale, ((0, 0), (0, 0), (0, padded - length), (0, 0)))
    k, v = heads_major(k), heads_major(v)
    bias = None if bias is None else bias.astype(jnp.float32)
    blocks = q.reshape(b, heads, padded // chunk, chunk, dim).transpose(2, 0, 1, 3, 4)

    def attend(block):  # (B, H, chunk, D)
        logits = jnp.einsum("bhqd,bhkd->bhqk", block, k)
        if bias is not None:
            logits = logits + bias
        weights = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
        return jnp.einsum("bhqk,bhkd->bhqd", weights, v) / weights.sum(axis=-1, keepdims=True)

    out = jax.lax.map(attend, blocks)  # (n, B, H, chunk, D)
    return out.transpose(1, 0, 3, 2, 4).reshape(b, padded, heads, dim)[:, :length].astype(dtype)


def _attend_at_even_lengths(attend, q, k, v, bias):
    """``attend(q, k, v, bias=bias)`` on odd lengths padded to even ones, then sliced back.

    cuDNN's backward pass needs even lengths; its forward kernel is also faster on them. A
    session-5 H200 profile of sampling with the pad only in the backward pass (a custom VJP)
    showed attention kernel time 60 -> 106 ms at batch 8 against 23 ms saved on the pad and
    slice, so both passes pad. Padding at the end keeps a causal mask right: a real query
    never sees the extra key.
    """
    length = q.shape[1]
    q, k, v, bias = _pad_lengths_to_even(q, k, v, bias)
    return attend(q, k, v, bias=bias)[:, :length]
