"""unclip_jax: DALL-E 2 (unCLIP) in JAX/Flax.

Sub-packages: ``models`` (CLIP, prior, UNets), ``diffusion`` (schedules, losses,
samplers), ``data``, ``train``, ``convert``. Importing has no side effects.
"""

__version__ = "0.1.0"
