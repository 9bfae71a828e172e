"""The decoder of the shapes recipe: P(x | z_i, caption) at 32 px.

    python train.py --config=configs/shapes_decoder.py --workdir=W/decoder \
        --config.clip.path=W/clip_model --config.clip.tokenizer=W/tokenizer

``configs/decoder.py:shapes`` at 32 px and sized for a 2-core CPU: a UNet with 32/64/96
channels (32/16/8 px), attention at 16 and 8 px, conditioned on the shapes CLIP (width 64;
32 for ``tiny``) computed on the fly, learned-range variance with the hybrid loss,
classifier-free guidance dropout (image 10 %, text 50 %). Variants: ``default`` (the
recipe) and ``tiny`` (tests). The shipped decoder is this config's 4800 steps plus four
fine-tuning legs (``train.init_from``, lr 3e-4, fresh images; 2000 steps, then 3500 and
2400 with ``data.two_object_fraction=0.8``, the last onto the fine-tuned CLIP, then 1200
with only two-object images): README,
"How the shipped model was trained".
"""

import os

import ml_collections

from unclip_jax.config import load_config

_VARIANTS = ("default", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = arg or "default"
    if arg not in _VARIANTS:
        raise ValueError(f"unknown configs/shapes_decoder.py variant {arg!r}; known: {', '.join(_VARIANTS)}")
    tiny = arg == "tiny"
    c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "decoder.py:shapes"))
    m = c.model
    m.image_size = 32
    u = m.unet
    if tiny:
        u.base_channels, u.channel_mult, u.num_res_blocks = 32, (1,), 1   # one level: fast compile
        u.attention_levels, u.head_channels, u.context_dim = (), 16, 32  # text through mid attention
    else:
        u.base_channels, u.channel_mult, u.num_res_blocks = 32, (1, 2, 3), 1
        u.attention_levels, u.head_channels, u.context_dim = (1, 2), 32, 64
    u.time_embed_dim = 4 * u.base_channels
    m.text_proj.clip_embeddings_dim = 32 if tiny else 64   # = the shapes CLIP's projection_dim
    m.text_proj.time_embed_dim = u.time_embed_dim
    m.text_proj.cross_attention_dim = u.context_dim

    # Min-SNR-5 weighting (Hang et al. 2023) shifts the MSE towards the noisy timesteps, where
    # layout, colour and shape are decided: the conditioning is what a short CPU run lacks.
    c.diffusion.min_snr_gamma = 5.0

    # 50 steps and guidance 3 (exported as the pipeline's defaults): on 200 prompts, one image
    # each, 50 steps scored 84.3 / 65.1 / 90.0 / 81.1 % (colour / shape / size / position) with
    # guidance 3 and 85.8 / 61.9 / 90.7 / 81.5 % with guidance 2 (docs/shapes_recipe_history.md).
    c.sample.steps = 5 if tiny else 50
    c.sample.guidance_scale = 3.0
    # Four images per prompt, CLIP keeps the closest (pipeline setting decoder_best_of_n): on
    # 200 prompts shape went 65.1 → 72.2 %, all attributes right 49.0 → 55.5 % (docs/shapes_recipe_history.md).
    c.sample.best_of_n = 1 if tiny else 4
    c.sample.num = 4 if tiny else 8

    c.data.image_size = 32
    c.data.num_examples = 200_000
    c.data.num_eval_examples = 256

    t = c.train
    t.batch_size = 8 if tiny else 32
    t.steps = 4 if tiny else 4800
    t.log_every = 2 if tiny else 50
    t.ckpt_every = 0 if tiny else 500
    t.sample_every = 0  # sample grids compile the sampler: minutes on a CPU

    o = c.optim
    o.lr = 1e-3
    o.warmup = 1 if tiny else 100
    o.ema_decay = 0.0 if tiny else 0.995
    return c
