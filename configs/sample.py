"""Sampling settings for ``sample.py`` (Karlo / diffusers defaults, plus the paper's best-of-2).

    python sample.py --checkpoint=DIR --prompt="a red circle" [--config=configs/sample.py:fast]
        [--config.decoder_steps=50 ...]

Variants: ``default`` (prior 25 / decoder 25 / upsampler 7 steps, guidance 4 / 8),
``karlo`` (decoder 50 steps, Karlo's default mode), ``fast`` (few steps: smoke runs).
The shorthand flags of sample.py (``--prior_steps``, ``--decoder_guidance``, ...) override
these values.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.prior_steps = 25
    c.prior_guidance = 4.0
    c.prior_clip_range = 5.0     # diffusers; Karlo clips to ±10
    c.best_of_n = 2              # the paper's trick; 1 reproduces Karlo / diffusers
    c.decoder_steps = 25
    c.decoder_guidance = 8.0
    c.upsampler_steps = 7
    c.decoder_best_of_n = 1      # >1: decode that many per prompt, keep CLIP's favourite
    c.seed = 0
    c.num_images = 1             # per prompt
    c.batch_size = 16            # images per device in one cascade call (sample.py: the rest follow)
    variant = arg or "default"
    if variant == "karlo":
        c.decoder_steps = 50
        c.best_of_n = 1
    elif variant == "fast":
        c.prior_steps, c.decoder_steps, c.upsampler_steps = 5, 5, 3
    elif variant != "default":
        raise ValueError(f"unknown sample config variant {arg!r}; use default, karlo or fast")
    return c
