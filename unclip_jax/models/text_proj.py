"""CLIP conditioning of the unCLIP decoder (paper §2.1; = diffusers ``UnCLIPTextProjModel``).

From the CLIP image embedding z_i (B, D), the CLIP text embedding z_t (B, D) and the
per-token text encodings (B, L, D) with their mask (B, L), it makes

- the additive embedding  e = embedding_proj(z_t) + clip_image_embeddings_project_to_time_embeddings(z_i),
  (B, time_embed_dim), added to the UNet's timestep embedding;
- the context  [4 CLIP tokens; LayerNorm(encoder_hidden_states_proj(text))], (B, 4 + L, Dc),
  where CLIP token k is ``clip_extra_context_tokens_proj(z_i)[:, k::4]`` (a strided split,
  as Karlo's NCL reshape and diffusers' ``reshape(B, -1, 4).permute(0, 2, 1)``);
- the context mask [True × 4; text mask], (B, 4 + L).

``learned_classifier_free_guidance_embeddings`` is the learned null image embedding that
replaces z_i for classifier-free guidance (unconditional half at sampling, dropped
embeddings in training).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn


class TextProj(nn.Module):
    """See the module docstring. Attributes as diffusers' config:
    ``clip_embeddings_dim`` D, ``time_embed_dim``, ``cross_attention_dim`` Dc,
    ``clip_extra_context_tokens`` (4)."""
    clip_embeddings_dim: int = 768
    time_embed_dim: int = 1280
    cross_attention_dim: int = 1536
    clip_extra_context_tokens: int = 4
    dtype: Any = "float32"

    def setup(self):
        dtype = jnp.dtype(self.dtype)
        self.learned_classifier_free_guidance_embeddings = self.param(
            "learned_classifier_free_guidance_embeddings", nn.initializers.zeros,
            (self.clip_embeddings_dim,))
        self.embedding_proj = nn.Dense(self.time_embed_dim, dtype=dtype)
        self.clip_image_embeddings_project_to_time_embeddings = nn.Dense(self.time_embed_dim, dtype=dtype)
        self.clip_extra_context_tokens_proj = nn.Dense(
            self.clip_extra_context_tokens * self.cross_attention_dim, dtype=dtype)
        self.encoder_hidden_states_proj = nn.Dense(self.cross_attention_dim, dtype=dtype)
        self.text_encoder_hidden_states_norm = nn.LayerNorm(epsilon=1e-5, dtype=dtype,
                                                            use_fast_variance=False)

    def null_image_embedding(self, batch: int) -> jax.Array:
        """The learned null image embedding broadcast to (batch, D)."""
        emb = self.learned_classifier_free_guidance_embeddings
        return jnp.broadcast_to(emb[None], (batch, emb.shape[0]))

    def __call__(self, image_embed: jax.Array, text_embed: jax.Array, text_hidden: jax.Array,
                 text_mask: jax.Array, drop_image: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Projects the CLIP conditioning.

        Args:
          image_embed: (B, D) CLIP image embeddings z_i.
          text_embed: (B, D) CLIP text embeddings z_t.
          text_hidden: (B, L, D) per-token text encodings.
          text_mask: (B, L) bool, True = real token.
          drop_image: optional (B,) bool; True replaces z_i by the learned null embedding.
        Returns:
          context (B, 4 + L, Dc), context_mask (B, 4 + L) bool, added_emb (B, time_embed_dim).
        """
        batch = image_embed.shape[0]
        if text_embed.shape[0] != batch or text_hidden.shape[0] != batch or text_mask.shape[0] != batch:
            raise ValueError("image_embed, text_embed, text_hidden and text_mask need one batch size, got "
                             f"{image_embed.shape}, {text_embed.shape}, {text_hidden.shape}, {text_mask.shape}")
        if text_mask.shape != text_hidden.shape[:2]:
            raise ValueError(f"text_mask {text_mask.shape} does not match text_hidden {text_hidden.shape}")
        if drop_image is not None:
            null = self.null_image_embedding(batch).astype(image_embed.dtype)
            image_embed = jnp.where(drop_image[:, None], null, image_embed)

        added_emb = (self.embedding_proj(text_embed)
                     + self.clip_image_embeddings_project_to_time_embeddings(image_embed))

        n = self.clip_extra_context_tokens
        tokens = self.clip_extra_context_tokens_proj(image_embed)            # (B, n·Dc)
        tokens = tokens.reshape(batch, -1, n).transpose(0, 2, 1)             # token k = [:, k::n]
        text = self.text_encoder_hidden_states_norm(self.encoder_hidden_states_proj(text_hidden))
        context = jnp.concatenate([tokens, text.astype(tokens.dtype)], axis=1)
        context_mask = jnp.concatenate([jnp.ones((batch, n), bool), text_mask.astype(bool)], axis=1)
        return context, context_mask, added_emb
