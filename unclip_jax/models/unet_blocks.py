"""Building blocks of the ADM / GLIDE / unCLIP UNet (NHWC), one module per job.

Every block mirrors one diffusers module, with the same parameter names, so that the
importer (:mod:`unclip_jax.convert.unet`) is a name table:

==========================  ===============================================
ours                        diffusers
==========================  ===============================================
:func:`timestep_embedding`  ``Timesteps`` (``get_timestep_embedding``)
:class:`TimeEmbedding`      ``TimestepEmbedding`` (linear_1, SiLU, linear_2)
:class:`ResBlock`           ``ResnetBlock2D`` (also its ``up=True``/``down=True`` forms)
:class:`AttentionBlock`     ``Attention`` + ``AttnAddedKVProcessor``
:class:`Downsample`         ``Downsample2D(use_conv=True)`` (``resblock_updown=False`` only)
:class:`Upsample`           ``Upsample2D(use_conv=True)`` (``resblock_updown=False`` only)
==========================  ===============================================

Conventions: images (B, H, W, C); the time embedding ``emb`` (B, E); text context
(B, Lc, Dc) with a boolean key mask (B, Lc), True = attend. Parameters are fp32; ``dtype``
is the compute dtype (bf16 on accelerators); normalisation statistics are fp32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from unclip_jax.models.attention import dot_product_attention
from unclip_jax.models.remat import remat_policy

Dtype = Any


def timestep_embedding(t: jax.Array, dim: int, *, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps.

    Frequencies ω_k = max_period^(−k / (dim/2 − freq_shift)), k < dim/2; the result is
    [cos(tω), sin(tω)] when ``flip_sin_to_cos`` (guided-diffusion's order, = diffusers
    ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``), else [sin, cos].

    Args:
      t: (B,) or scalar timesteps.
    Returns:
      (B, dim) float32.
    """
    t = jnp.atleast_1d(jnp.asarray(t, jnp.float32))
    half = dim // 2
    # float32 like the reference: -log(max_period) * k / (half - shift), then exp.
    exponent = (-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)) / (half - freq_shift)
    args = t[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimeEmbedding(nn.Module):
    """MLP on a sinusoidal embedding: linear_1 → SiLU → linear_2, (B, Din) → (B, features)."""
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(x))


class GroupNorm(nn.Module):
    """GroupNorm over the last (channel) axis of (B, ..., C), as ``torch.nn.GroupNorm``.

    Parameters ``scale`` and ``bias`` (C,), as flax's ``nn.GroupNorm`` (checkpoints and the
    converters are unchanged). Statistics in float32, from per-channel sums over the middle
    axes that are then added up per group: every reduction keeps the channel axis minor.
    flax's form, a (B, HW, G, C/G) reshape reduced over axes 1 and 3, ran 2-6x slower on
    XLA:CPU at the tiny cascade's shapes (the same float32 arithmetic otherwise).
    ``fast_variance`` takes E[x²] − E[x]² from one read of x instead of two passes (the
    two-pass default is what torch computes); its cancellation error is far below bf16's
    rounding unless |mean| ≫ std. Returns ``dtype``.
    """
    num_groups: int = 32
    epsilon: float = 1e-5
    fast_variance: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels, groups = x.shape[-1], self.num_groups
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels do not split into {groups} groups")
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        per_group = channels // groups
        middle = tuple(range(1, x.ndim - 1))
        count = math.prod(x.shape[1:-1]) * per_group
        spread = lambda stat: stat.reshape((stat.shape[0],) + (1,) * len(middle) + (channels,))

        def group_mean(channel_sums):  # (B, C) sums per channel → (B, C) its group's mean
            sums = channel_sums.reshape(-1, groups, per_group).sum(axis=-1) / count
            return jnp.repeat(sums, per_group, axis=-1)

        x = x.astype(jnp.float32)
        mean = group_mean(x.sum(axis=middle))
        if self.fast_variance:
            var = jnp.maximum(group_mean((x * x).sum(axis=middle)) - mean * mean, 0.0)
        else:
            centered = x - spread(mean)
            var = group_mean((centered * centered).sum(axis=middle))
        factor = jax.lax.rsqrt(var + self.epsilon) * scale
        return ((x - spread(mean)) * spread(factor) + bias).astype(self.dtype)


def group_norm(num_groups: int, eps: float, dtype: Dtype, name: str, fast_variance: bool = False) -> GroupNorm:
    return GroupNorm(num_groups=num_groups, epsilon=eps, dtype=dtype, fast_variance=fast_variance, name=name)


def upsample_nearest(x: jax.Array) -> jax.Array:
    """(B, H, W, C) → (B, 2H, 2W, C), nearest neighbour (= ``F.interpolate(mode='nearest')``)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool_2x2(x: jax.Array) -> jax.Array:
    """(B, H, W, C) → (B, H/2, W/2, C), mean over 2×2 windows (= ``nn.AvgPool2d(2, 2)``)."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class ResBlock(nn.Module):
    """ADM residual block (= diffusers ``ResnetBlock2D``, ``output_scale_factor`` 1).

    h = conv1(resample(SiLU(norm1(x)))); e = time_emb_proj(SiLU(emb));
    scale-shift: h = norm2(h)·(1 + e_scale) + e_shift, else h = norm2(h + e);
    h = conv2(dropout(SiLU(h))); out = skip(resample(x)) + h, where ``skip`` is the
    1×1 ``conv_shortcut`` when the channel count changes. ``up``/``down`` resample both
    paths by nearest ×2 / 2×2 average pooling (the "resblock_updown" of ADM).
    """
    out_channels: int
    scale_shift_norm: bool = False
    up: bool = False
    down: bool = False
    dropout: float = 0.0
    deterministic: bool = True
    num_groups: int = 32
    eps: float = 1e-5
    fast_variance: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        h = nn.silu(group_norm(self.num_groups, self.eps, self.dtype, "norm1", self.fast_variance)(x))
        if self.up:
            x, h = upsample_nearest(x), upsample_nearest(h)
        elif self.down:
            x, h = avg_pool_2x2(x), avg_pool_2x2(h)
        h = nn.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv1")(h)

        n_emb = 2 * self.out_channels if self.scale_shift_norm else self.out_channels
        e = nn.Dense(n_emb, dtype=self.dtype, name="time_emb_proj")(nn.silu(emb))[:, None, None, :]
        norm2 = group_norm(self.num_groups, self.eps, self.dtype, "norm2", self.fast_variance)
        if self.scale_shift_norm:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = norm2(h) * (1 + scale) + shift
        else:
            # The barrier keeps XLA on GPUs from folding "+ e" into conv1's cuDNN call as a
            # "side input", which materialises e broadcast to h's full shape (seen in an H200
            # profile of the super-res UNet); the add then fuses into norm2's reads of h.
            h = norm2(jax.lax.optimization_barrier(h) + e)
        h = nn.silu(h)
        h = nn.Dropout(self.dropout)(h, deterministic=self.deterministic)
        h = nn.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv2")(h)

        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Self-attention over the image tokens with extra keys/values from a text context.

    = diffusers ``Attention(added_kv_proj_dim=…)`` with ``AttnAddedKVProcessor`` (GLIDE's
    ``encoder_kv``): tokens u = group_norm(x) (B, HW, C); q = to_q(u);
    k = [add_k_proj(context); to_k(u)], v = [add_v_proj(context); to_v(u)];
    out = x + to_out_0(softmax(q kᵀ/√d + bias) v). Context keys are masked by
    ``context_mask``; image keys are always visible. Without ``context_dim`` this is plain
    self-attention (no add_k/add_v projections).

    Args (call):
      x: (B, H, W, C), C divisible by ``head_channels``.
      context: (B, Lc, context_dim) or None.
      context_mask: (B, Lc) bool or None (all visible).
    """
    head_channels: int
    context_dim: int | None = None
    num_groups: int = 32
    eps: float = 1e-5
    fast_variance: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None,
                 context_mask: jax.Array | None = None) -> jax.Array:
        b, hgt, wid, c = x.shape
        if c % self.head_channels:
            raise ValueError(f"attention channels {c} not divisible by head_channels {self.head_channels}")
        heads = c // self.head_channels
        u = group_norm(self.num_groups, self.eps, self.dtype, "group_norm",
                       self.fast_variance)(x).reshape(b, hgt * wid, c)

        def proj(name, y):
            return nn.Dense(c, dtype=self.dtype, name=name)(y).reshape(b, y.shape[1], heads, self.head_channels)

        q, k, v = proj("to_q", u), proj("to_k", u), proj("to_v", u)
        key_mask = None
        if self.context_dim is not None:
            if context is None:
                raise ValueError("this attention block was built with context_dim but got no context")
            k = jnp.concatenate([proj("add_k_proj", context), k], axis=1)
            v = jnp.concatenate([proj("add_v_proj", context), v], axis=1)
            if context_mask is not None:
                image_keys = jnp.ones((b, hgt * wid), dtype=bool)
                key_mask = jnp.concatenate([context_mask.astype(bool), image_keys], axis=1)
        out = dot_product_attention(q, k, v, key_mask=key_mask, implementation=self.attention_impl)
        out = nn.Dense(c, dtype=self.dtype, name="to_out_0")(out.reshape(b, hgt * wid, c))
        return x + out.reshape(b, hgt, wid, c)


class Downsample(nn.Module):
    """Stride-2 3×3 convolution (ADM with ``resblock_updown=False``)."""
    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array | None = None) -> jax.Array:
        del emb
        return nn.Conv(self.channels, (3, 3), strides=(2, 2), padding=1, dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
    """Nearest ×2 then a 3×3 convolution (ADM with ``resblock_updown=False``)."""
    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array | None = None) -> jax.Array:
        del emb
        return nn.Conv(self.channels, (3, 3), padding=1, dtype=self.dtype, name="conv")(upsample_nearest(x))


@dataclasses.dataclass(frozen=True)
class BlockSettings:
    """Settings shared by every block of one UNet."""
    scale_shift_norm: bool = False
    dropout: float = 0.0
    deterministic: bool = True
    num_groups: int = 32
    eps: float = 1e-5
    fast_variance: bool = False
    head_channels: int = 64
    context_dim: int | None = None
    attention_impl: str = "xla"
    remat: bool = False
    remat_policy: str = "full"
    dtype: Dtype = jnp.float32

    def resblock(self, channels: int, name: str, **kw) -> nn.Module:
        cls = nn.remat(ResBlock, policy=remat_policy(self.remat_policy)) if self.remat else ResBlock
        return cls(channels, scale_shift_norm=self.scale_shift_norm, dropout=self.dropout,
                   deterministic=self.deterministic, num_groups=self.num_groups, eps=self.eps,
                   fast_variance=self.fast_variance, dtype=self.dtype, name=name, **kw)

    def attention(self, name: str) -> nn.Module:
        cls = nn.remat(AttentionBlock, policy=remat_policy(self.remat_policy)) if self.remat else AttentionBlock
        return cls(self.head_channels, context_dim=self.context_dim, num_groups=self.num_groups,
                   eps=self.eps, fast_variance=self.fast_variance, dtype=self.dtype,
                   attention_impl=self.attention_impl, name=name)


class DownBlock(nn.Module):
    """One resolution level on the way down (= ``ResnetDownsampleBlock2D`` or, with
    attention, ``SimpleCrossAttnDownBlock2D``): ``num_layers`` × (resnets_j [→ attentions_j]),
    then the downsampler. Returns the new h and the skips it contributes (one per layer,
    plus one after downsampling)."""
    channels: int
    num_layers: int
    attention: bool
    downsample: bool
    resblock_updown: bool
    settings: BlockSettings

    @nn.compact
    def __call__(self, h, emb, context=None, context_mask=None):
        s, skips = self.settings, []
        for j in range(self.num_layers):
            h = s.resblock(self.channels, f"resnets_{j}")(h, emb)
            if self.attention:
                h = s.attention(f"attentions_{j}")(h, context, context_mask)
            skips.append(h)
        if self.downsample:
            if self.resblock_updown:
                h = s.resblock(self.channels, "downsamplers_0", down=True)(h, emb)
            else:
                h = Downsample(self.channels, dtype=s.dtype, name="downsamplers_0")(h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """resnets_0 → [attentions_0] → resnets_1 (= ``UNetMidBlock2DSimpleCrossAttn``, or
    ``UNetMidBlock2D`` with ``add_attention=False``)."""
    channels: int
    attention: bool
    settings: BlockSettings

    @nn.compact
    def __call__(self, h, emb, context=None, context_mask=None):
        s = self.settings
        h = s.resblock(self.channels, "resnets_0")(h, emb)
        if self.attention:
            h = s.attention("attentions_0")(h, context, context_mask)
        return s.resblock(self.channels, "resnets_1")(h, emb)


class UpBlock(nn.Module):
    """One level on the way up (= ``ResnetUpsampleBlock2D`` / ``SimpleCrossAttnUpBlock2D``):
    ``num_layers`` × (concat the last skip on channels → resnets_j [→ attentions_j]), then
    the upsampler. ``skips`` is consumed from its end; returns (h, remaining skips)."""
    channels: int
    num_layers: int
    attention: bool
    upsample: bool
    resblock_updown: bool
    settings: BlockSettings

    @nn.compact
    def __call__(self, h, skips: Sequence[jax.Array], emb, context=None, context_mask=None):
        s, skips = self.settings, list(skips)
        for j in range(self.num_layers):
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = s.resblock(self.channels, f"resnets_{j}")(h, emb)
            if self.attention:
                h = s.attention(f"attentions_{j}")(h, context, context_mask)
        if self.upsample:
            if self.resblock_updown:
                h = s.resblock(self.channels, "upsamplers_0", up=True)(h, emb)
            else:
                h = Upsample(self.channels, dtype=s.dtype, name="upsamplers_0")(h)
        return h, skips
