"""The diffusion prior network [P §2.2]: a causal decoder-only Transformer f_θ(z_i^(t), t, y) -> z_i.

The token sequence (length ``L = num_text_tokens + 4``), in order:

1. the projected per-token text encodings (``num_text_tokens``, 77 for CLIP),
2. the projected CLIP text embedding z_t,
3. the timestep embedding,
4. the projected noised image embedding z_i^(t),
5. a learned final token (diffusers' ``prd_embedding``),

plus learned absolute positional embeddings. A causal mask (``-10000`` above the diagonal,
as diffusers) is added to the text-padding bias (``-10000`` on padded text tokens; the 4
extra tokens are never masked). After the blocks and a final LayerNorm the last token is
projected to the predicted clean image embedding (x0-prediction).

Numerically this is diffusers' ``PriorTransformer`` with its default options (the Karlo
prior: 32 heads × 64, 20 layers, CLIP dim 768, ``additional_embeddings`` 4), always called
with an attention mask (the way ``UnCLIPPipeline`` calls it; diffusers drops the causal mask
when no mask is given, we never do):

- timestep features: sinusoidal of width ``inner_dim`` in [cos, sin] order
  (``Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)``), then linear–SiLU–linear;
- pre-LN blocks: ``x += attn(LN(x))``; ``x += W2·gelu(W1·LN(x))`` with the exact (erf) GELU,
  LayerNorm eps 1e-5, biases everywhere, attention scale 1/√head_dim.

The network works in whatever space it is trained in; the embedding normalisation
(Karlo's clip_mean/clip_std, the paper's ×17.2, or l2·√d) lives in
``unclip_jax.stages.prior`` and its statistics are kept out of the parameters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models.attention import dot_product_attention
from unclip_jax.models.remat import remat_policy

# Tokens appended after the text encodings: z_t, time, z_i^(t), final query.
NUM_EXTRA_TOKENS = 4


def timestep_features(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal timestep features (B,) -> (B, dim), [cos, sin] order, frequency shift 0.

    Frequencies are ``max_period^(-k / (dim/2))`` for k < dim/2 (diffusers'
    ``get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)``);
    an odd ``dim`` gets one zero column at the end. Always float32.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def sequence_key_mask(text_mask: jax.Array, num_extra: int = NUM_EXTRA_TOKENS) -> jax.Array:
    """(B, L_text) text mask -> (B, L_text + num_extra) key mask: the extra tokens are never masked.

    With ``is_causal`` the attention function turns it into diffusers' additive bias
    (padded text keys and future keys each get ``MASK_BIAS``; finite, so rows whose keys
    are all masked stay defined, as in diffusers).
    """
    return jnp.pad(text_mask.astype(bool), ((0, 0), (0, num_extra)), constant_values=True)


class SelfAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections (diffusers ``Attention``)."""
    num_heads: int
    head_dim: int
    dropout: float = 0.0
    dtype: Any = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array, *, deterministic: bool) -> jax.Array:
        """x (B, L, W), key_mask (B, L) bool (attention is also causal) -> (B, L, W)."""
        b, length, width = x.shape
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=jnp.float32, name=name)
        inner = self.num_heads * self.head_dim
        heads = lambda y: y.reshape(b, length, self.num_heads, self.head_dim)
        q = heads(dense(inner, "to_q")(x))
        k = heads(dense(inner, "to_k")(x))
        v = heads(dense(inner, "to_v")(x))
        out = dot_product_attention(q, k, v, key_mask=key_mask, is_causal=True,
                                    implementation=self.attention_impl)
        out = dense(width, "to_out")(out.reshape(b, length, inner))
        return nn.Dropout(self.dropout)(out, deterministic=deterministic)


class PriorBlock(nn.Module):
    """Pre-LN Transformer block (diffusers ``BasicTransformerBlock``, norm1/attn1/norm3/ff)."""
    num_heads: int
    head_dim: int
    mlp_ratio: int = 4
    dropout: float = 0.0
    norm_eps: float = 1e-5
    dtype: Any = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array, deterministic: bool = True) -> jax.Array:
        width = x.shape[-1]
        norm = lambda name: nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype,
                                         param_dtype=jnp.float32, name=name)
        h = norm("norm1")(x)
        x = x + SelfAttention(self.num_heads, self.head_dim, self.dropout, self.dtype,
                              self.attention_impl, name="attn")(h, key_mask, deterministic=deterministic)
        h = norm("norm2")(x)
        h = nn.Dense(width * self.mlp_ratio, dtype=self.dtype, param_dtype=jnp.float32, name="fc1")(h)
        h = nn.gelu(h, approximate=False)  # diffusers activation_fn="gelu" is the exact GELU
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = nn.Dense(width, dtype=self.dtype, param_dtype=jnp.float32, name="fc2")(h)
        return x + h


class PriorTransformer(nn.Module):
    """f_θ(z_i^(t), t, z_t, text encodings) -> predicted clean z_i (x0), all in the prior's space.

    Attributes:
      num_heads, head_dim: attention heads; the width is ``num_heads * head_dim``.
      num_layers: Transformer blocks.
      embed_dim: CLIP embedding width D (z_i, z_t and the per-token encodings).
      num_text_tokens: text context length (77); the sequence is this + 4.
      time_embed_dim: hidden width of the timestep MLP (None: the model width).
      mlp_ratio: feed-forward expansion (4).
      dropout: after the attention output projection and after the GELU (training only).
      dtype: compute dtype (e.g. "bfloat16"); parameters are always float32, the output
        is float32.
      remat: rematerialise each block in the backward pass (saves activation memory).
      remat_policy: what a rematerialised block keeps: "full" (nothing: every op is
        recomputed) or "dots" (the outputs of its weight matmuls: the backward pass
        recomputes only the cheap elementwise ops and attention, for more memory).
      attention_impl: passed to ``dot_product_attention`` ("xla", "cudnn", "splash", "auto").
    """
    num_heads: int = 32
    head_dim: int = 64
    num_layers: int = 20
    embed_dim: int = 768
    num_text_tokens: int = 77
    time_embed_dim: int | None = None
    mlp_ratio: int = 4
    dropout: float = 0.0
    norm_eps: float = 1e-5
    dtype: Any = "float32"
    remat: bool = False
    remat_policy: str = "full"
    attention_impl: str = "xla"

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def seq_len(self) -> int:
        return self.num_text_tokens + NUM_EXTRA_TOKENS

    @nn.compact
    def __call__(self, x_t: jax.Array, t: jax.Array, text_embed: jax.Array,
                 text_hidden: jax.Array, text_mask: jax.Array, *, train: bool = False) -> jax.Array:
        """Predicts the clean image embedding.

        Args:
          x_t: (B, D) noised image embedding z_i^(t) (normalised space).
          t: (B,) or () integer/float timesteps in [0, T).
          text_embed: (B, D) CLIP text embedding z_t.
          text_hidden: (B, num_text_tokens, D) per-token text encodings.
          text_mask: (B, num_text_tokens) bool, True on real tokens.
          train: enables dropout (needs a 'dropout' rng).
        Returns:
          (B, D) float32 prediction of z_i (x0).
        """
        dtype = jnp.dtype(self.dtype)
        b, d = x_t.shape
        if d != self.embed_dim or text_embed.shape != (b, d):
            raise ValueError(f"x_t {x_t.shape} and text_embed {text_embed.shape} must both be "
                             f"(B, {self.embed_dim})")
        if text_hidden.shape != (b, self.num_text_tokens, d) or text_mask.shape != (b, self.num_text_tokens):
            raise ValueError(f"text_hidden {text_hidden.shape} / text_mask {text_mask.shape} must be "
                             f"({b}, {self.num_text_tokens}, {d}) / ({b}, {self.num_text_tokens})")
        width = self.width
        dense = lambda n, name: nn.Dense(n, dtype=dtype, param_dtype=jnp.float32, name=name)

        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        temb = timestep_features(t, width)
        temb = dense(self.time_embed_dim or width, "time_linear_1")(temb)
        temb = dense(width, "time_linear_2")(nn.silu(temb))

        init = nn.initializers.normal(0.02)
        tokens = jnp.concatenate([
            dense(width, "text_hidden_proj")(text_hidden),
            dense(width, "text_embed_proj")(text_embed)[:, None],
            temb[:, None].astype(dtype),
            dense(width, "x_proj")(x_t)[:, None],
            jnp.broadcast_to(self.param("final_embedding", init, (1, 1, width), jnp.float32),
                             (b, 1, width)).astype(dtype),
        ], axis=1)
        pos = self.param("positional_embedding", init, (1, self.seq_len, width), jnp.float32)
        h = tokens + pos.astype(dtype)

        key_mask = sequence_key_mask(text_mask)
        block = (nn.remat(PriorBlock, static_argnums=(3,), policy=remat_policy(self.remat_policy))
                 if self.remat else PriorBlock)
        for i in range(self.num_layers):
            h = block(self.num_heads, self.head_dim, self.mlp_ratio, self.dropout, self.norm_eps,
                      dtype, self.attention_impl, name=f"block_{i}")(h, key_mask, not train)
        h = nn.LayerNorm(epsilon=self.norm_eps, dtype=dtype, param_dtype=jnp.float32,
                         name="norm_out")(h[:, -1])
        return dense(self.embed_dim, "proj_out")(h).astype(jnp.float32)


MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(PriorTransformer)
                     if f.name not in ("parent", "name"))


def prior_from_config(config: Mapping[str, Any], **overrides) -> PriorTransformer:
    """Builds the network from a plain/ConfigDict model config (unknown keys fail).

    ``overrides`` (e.g. ``dtype="bfloat16", remat=True``) replace config values.
    """
    values = {**dict(config), **overrides}
    unknown = sorted(set(values) - set(MODEL_FIELDS))
    if unknown:
        raise ValueError(f"unknown prior model option(s) {unknown}; known: {list(MODEL_FIELDS)}")
    return PriorTransformer(**values)


def init_prior_params(model: PriorTransformer, key: jax.Array) -> dict:
    """Initialises the parameter tree (batch-1 dummy inputs; shapes do not depend on B)."""
    d, n = model.embed_dim, model.num_text_tokens

    @jax.jit  # one compiled program instead of hundreds of eagerly dispatched ops
    def init(key):
        return model.init(key, jnp.zeros((1, d)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, d)),
                          jnp.zeros((1, n, d)), jnp.ones((1, n), bool))["params"]
    return init(key)
