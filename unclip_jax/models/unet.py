"""The ADM / GLIDE UNet of the unCLIP decoder and upsamplers (NHWC).

One module, :class:`UNet`, covers both diffusers models that Karlo uses:

- the 64px decoder, diffusers ``UNet2DConditionModel`` with down blocks
  [ResnetDownsampleBlock2D, SimpleCrossAttnDownBlock2D×3], up blocks
  [SimpleCrossAttnUpBlock2D×3, ResnetUpsampleBlock2D], mid block
  ``UNetMidBlock2DSimpleCrossAttn``, ``class_embed_type="identity"`` (an extra embedding,
  the projected CLIP embeddings, added to the time embedding) and scale-shift norm:
  ``UNet(attention_levels=(1, 2, 3), mid_attention=True, context_dim=…,
  added_embedding=True, scale_shift_norm=True)``;
- the super-resolution models, diffusers ``UNet2DModel`` with ResnetDownsampleBlock2D /
  ResnetUpsampleBlock2D only and ``add_attention=False``:
  ``UNet(attention_levels=(), mid_attention=False, context_dim=None)``.

Structure (L = len(channel_mult), C_i = base_channels·channel_mult[i], N = num_res_blocks)::

    emb = time_embedding(timestep_embedding(t)) [+ added_emb] [+ aug_embedding(level)]
    h = conv_in(x)                                                  skips: [h]
    down_blocks_i:  N × (resnets_j → attentions_j if i in attention_levels)   +N skips
                    downsamplers_0 (ResBlock down, or stride-2 conv) if i < L−1  +1 skip
    mid_block:      resnets_0 → attentions_0 (if mid_attention) → resnets_1
    up_blocks_k (level i = L−1−k): N+1 × (concat skip → resnets_j → attentions_j)
                    upsamplers_0 (ResBlock up, or nearest+conv) if k < L−1
    out = conv_out(SiLU(conv_norm_out(h)))

Parameter names equal diffusers' (``down_blocks_1/attentions_0/to_q`` ↔
``down_blocks.1.attentions.0.to_q``). Residuals are not rescaled (diffusers
``output_scale_factor`` 1, Karlo's ADM). H and W must be divisible by 2^(L−1).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import flax.linen as nn

from unclip_jax.models.unet_blocks import (BlockSettings, DownBlock, MidBlock, TimeEmbedding, UpBlock,
                                           group_norm, timestep_embedding)

Dtype = Any


class UNet(nn.Module):
    """Diffusion UNet ε_θ(x_t, t, …) → (B, H, W, out_channels).

    Attributes:
      in_channels: input channels (3 for the decoder; 6 = [x_t, upsampled low-res] for
        an upsampler). Only used to check inputs.
      out_channels: 6 = [ε, v] for a learned-range variance, 3 for fixed variance.
      base_channels, channel_mult: level i has base_channels·channel_mult[i] channels.
      num_res_blocks: residual blocks per level on the way down (N+1 on the way up).
      attention_levels: levels (0 = full resolution) with attention after each resblock.
      mid_attention: attention between the two middle resblocks.
      head_channels: channels per attention head.
      context_dim: width of the text context (extra keys/values); None = no text.
      added_embedding: the call takes ``added_emb`` (B, time_embed_dim), added to the
        time embedding (diffusers ``class_embed_type="identity"``).
      aug_level_embedding: the call takes ``aug_level`` (B,), the noise-augmentation
        timestep of the conditioning image, embedded like t by its own MLP
        (``aug_embedding``) and added to the time embedding.
      scale_shift_norm: FiLM the second GroupNorm of each resblock with the embedding.
      resblock_updown: resample with ResBlocks (ADM/Karlo) instead of (strided) convs.
      dropout: dropout rate inside resblocks (active when ``train=True``).
      num_groups, norm_eps: GroupNorm groups and epsilon.
      norm_fast_variance: GroupNorm variance as E[x²] − E[x]² from one pass over x (a
        speed option for bf16 inference; False = torch's two-pass variance, for parity).
      time_embed_dim: width of the embedding; 4·base_channels when None.
      flip_sin_to_cos, freq_shift: sinusoid layout (see :func:`timestep_embedding`).
      dtype: compute dtype ("float32" or "bfloat16"); parameters stay float32.
      remat: rematerialise each resblock / attention block in the backward pass.
      remat_policy: what a rematerialised block keeps (``unclip_jax.models.remat``):
        "full" (nothing), "dots" (Dense outputs) or "convs" (convolution and Dense
        outputs: the backward pass recomputes only norms, activations and attention).
      attention_impl: "xla", "cudnn", "splash" or "auto", passed to ``dot_product_attention``.
    """
    in_channels: int = 3
    out_channels: int = 6
    base_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: int = 3
    attention_levels: tuple[int, ...] = (1, 2, 3)
    mid_attention: bool = True
    head_channels: int = 64
    context_dim: int | None = 1536
    added_embedding: bool = True
    aug_level_embedding: bool = False
    scale_shift_norm: bool = True
    resblock_updown: bool = True
    dropout: float = 0.0
    num_groups: int = 32
    norm_eps: float = 1e-5
    norm_fast_variance: bool = False
    time_embed_dim: int | None = None
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    dtype: Any = "float32"
    remat: bool = False
    remat_policy: str = "full"
    attention_impl: str = "xla"

    @property
    def embed_dim(self) -> int:
        return self.time_embed_dim or 4 * self.base_channels

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def _check_inputs(self, x, added_emb, context, aug_level):
        levels = len(self.channel_mult)
        factor = 2 ** (levels - 1)
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"UNet expects (B, H, W, {self.in_channels}) inputs, got {x.shape}")
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"image size {x.shape[1:3]} must be divisible by {factor} "
                             f"(2^(levels-1) for {levels} levels)")
        if bad := [i for i in self.attention_levels if not 0 <= i < levels]:
            raise ValueError(f"attention_levels {bad} outside 0..{levels - 1}")
        if self.added_embedding and added_emb is None:
            raise ValueError("this UNet adds an embedding to the time embedding: pass added_emb")
        if not self.added_embedding and added_emb is not None:
            raise ValueError("added_emb given but the UNet was built with added_embedding=False")
        if self.context_dim is not None and (self.attention_levels or self.mid_attention) and context is None:
            raise ValueError("this UNet attends to a text context: pass context (B, L, context_dim)")
        if self.aug_level_embedding and aug_level is None:
            raise ValueError("this UNet embeds a noise-augmentation level: pass aug_level")

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, *, added_emb: jax.Array | None = None,
                 context: jax.Array | None = None, context_mask: jax.Array | None = None,
                 aug_level: jax.Array | None = None, train: bool = False) -> jax.Array:
        """Predicts the model output at (x_t, t).

        Args:
          x: (B, H, W, in_channels) noisy image (and, for upsamplers, the low-res image).
          t: scalar or (B,) timesteps (original, un-respaced indices; may be fractional).
          added_emb: (B, time_embed_dim), added to the time embedding.
          context: (B, Lc, context_dim) text context; context_mask (B, Lc) bool.
          aug_level: (B,) noise-augmentation timesteps of the conditioning image.
          train: enables dropout (needs a 'dropout' rng).
        Returns:
          (B, H, W, out_channels) float32.
        """
        self._check_inputs(x, added_emb, context, aug_level)
        dtype = self.compute_dtype
        batch = x.shape[0]
        chans = [self.base_channels * m for m in self.channel_mult]
        levels = len(chans)

        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
        sinusoid = timestep_embedding(t, self.base_channels, flip_sin_to_cos=self.flip_sin_to_cos,
                                      freq_shift=self.freq_shift)
        emb = TimeEmbedding(self.embed_dim, dtype=dtype, name="time_embedding")(sinusoid)
        if self.added_embedding:
            emb = emb + added_emb.astype(emb.dtype)
        if self.aug_level_embedding:
            level = jnp.broadcast_to(jnp.asarray(aug_level, jnp.float32), (batch,))
            aug = timestep_embedding(level, self.base_channels, flip_sin_to_cos=self.flip_sin_to_cos,
                                     freq_shift=self.freq_shift)
            emb = emb + TimeEmbedding(self.embed_dim, dtype=dtype, name="aug_embedding")(aug)
        if context is not None:
            context = context.astype(dtype)

        settings = BlockSettings(
            scale_shift_norm=self.scale_shift_norm, dropout=self.dropout, deterministic=not train,
            num_groups=self.num_groups, eps=self.norm_eps, fast_variance=self.norm_fast_variance,
            head_channels=self.head_channels,
            context_dim=self.context_dim, attention_impl=self.attention_impl, remat=self.remat,
            remat_policy=self.remat_policy, dtype=dtype)

        h = nn.Conv(chans[0], (3, 3), padding=1, dtype=dtype, name="conv_in")(x.astype(dtype))
        skips = [h]
        for i, ch in enumerate(chans):
            h, new = DownBlock(ch, self.num_res_blocks, i in self.attention_levels, i < levels - 1,
                               self.resblock_updown, settings, name=f"down_blocks_{i}")(
                                   h, emb, context, context_mask)
            skips += new
        h = MidBlock(chans[-1], self.mid_attention, settings, name="mid_block")(h, emb, context, context_mask)
        for k in range(levels):
            i = levels - 1 - k
            h, skips = UpBlock(chans[i], self.num_res_blocks + 1, i in self.attention_levels, k < levels - 1,
                               self.resblock_updown, settings, name=f"up_blocks_{k}")(
                                   h, skips, emb, context, context_mask)

        h = nn.silu(group_norm(self.num_groups, self.norm_eps, dtype, "conv_norm_out", self.norm_fast_variance)(h))
        h = nn.Conv(self.out_channels, (3, 3), padding=1, dtype=dtype, name="conv_out")(h)
        return h.astype(jnp.float32)


_NON_CONFIG_FIELDS = ("parent", "name")


def unet_config(model: UNet) -> dict:
    """The UNet's attributes as a JSON-ready dict (tuples as lists, dtype as a string)."""
    out = {}
    for f in dataclasses.fields(model):
        if f.name in _NON_CONFIG_FIELDS:
            continue
        value = getattr(model, f.name)
        if isinstance(value, tuple):
            value = list(value)
        elif f.name == "dtype" and not isinstance(value, str):
            value = jnp.dtype(value).name
        out[f.name] = value
    return out


def unet_from_config(config: Mapping[str, Any], **overrides) -> UNet:
    """Builds a :class:`UNet` from a dict (e.g. ``config.json`` or an ml_collections node).

    Lists become tuples; ``overrides`` (e.g. ``dtype="bfloat16"``, ``remat=True``) win.
    Raises ValueError naming unknown keys.
    """
    known = {f.name for f in dataclasses.fields(UNet)} - set(_NON_CONFIG_FIELDS)
    values = dict(config)
    values.update(overrides)
    if unknown := sorted(set(values) - known):
        raise ValueError(f"unknown UNet config key(s) {unknown}; known: {sorted(known)}")
    for key in ("channel_mult", "attention_levels"):
        if key in values:
            values[key] = tuple(int(v) for v in values[key])
    return UNet(**values)
