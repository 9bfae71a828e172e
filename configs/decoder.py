"""The unCLIP decoder: P(x | z_i, y) at 64×64 (paper §2.1; Karlo's decoder).

Variants (``--config=configs/decoder.py:VARIANT``):

- ``tiny``: a 32px UNet (32/64 channels, one resblock per level) on the captioned-shapes
  images with synthetic attribute embeddings in place of CLIP (``clip.kind=attributes``):
  no checkpoint needed, a CPU smoke run:
  ``python train.py --config=configs/decoder.py:tiny --workdir=/tmp/dec``.
- ``shapes``: a small 64px decoder on captioned shapes, CLIP encodings computed on the fly
  (``clip.kind=model``; set ``clip.path``/``clip.tokenizer``, e.g. a CLIP trained with
  ``configs/clip.py:shapes``; ``model.text_proj.clip_embeddings_dim`` = its embedding dim).
- ``karlo``: Karlo's decoder (diffusers ``UNet2DConditionModel``: 320 channels × (1, 2, 3, 4),
  3 resblocks, attention at 32/16/8 px with 64-channel heads, context 1536, scale-shift
  norm, ≈0.9B parameters with text_proj) on images + CLIP ViT-L/14 encodings. To fine-tune
  the released weights, import them with ``python -m unclip_jax.convert.unet decoder
  --unet karlo/decoder --text-proj karlo/text_proj --out DIR``.
- ``paper``: the paper's Table 3 decoder size (512 channels × (1, 2, 3, 4), 3 resblocks,
  64-channel heads at 32/16/8 px, dropout 0.1, batch 2048, lr 1.2e-4, 800k steps); the
  context width (GLIDE's 2048-wide text encoder) is the projected CLIP token width here.

The full-size variants read img2dataset tar shards: set ``data.path`` and ``data.eval_path``
(the sample grid every ``train.sample_every`` steps reads its 'test' split; the trainer
opens it before the first step), or ``train.sample_every=0``.

Sections: ``model`` (``unet``: ``unclip_jax.models.unet.UNet`` fields; ``text_proj``:
``TextProj`` fields; ``image_size``; ``dtype``/``remat``/``attention_impl``), ``diffusion``
(schedule, learned-range hybrid loss), ``guidance`` (conditioning dropout for CFG),
``sample`` (sampler defaults for ``sample_grid``), ``clip`` (where the CLIP conditioning
comes from), ``data`` (``unclip_jax.data.default_data_config``), and the trainer's
``train``/``optim``/``mesh``.
"""

import ml_collections

_VARIANTS = ("tiny", "shapes", "karlo", "paper")


def _unet(base, mult, blocks, attention_levels, head, context, dropout=0.0):
    return ml_collections.ConfigDict(dict(
        in_channels=3, out_channels=6, base_channels=base, channel_mult=tuple(mult),
        num_res_blocks=blocks, attention_levels=tuple(attention_levels), mid_attention=True,
        head_channels=head, context_dim=context, added_embedding=True, aug_level_embedding=False,
        scale_shift_norm=True, resblock_updown=True, dropout=dropout, num_groups=32, norm_eps=1e-5,
        time_embed_dim=4 * base, flip_sin_to_cos=True, freq_shift=0.0))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = arg or "tiny"
    if arg not in _VARIANTS:
        raise ValueError(f"unknown configs/decoder.py variant {arg!r}; known: {', '.join(_VARIANTS)}")
    from unclip_jax.data import default_data_config
    from unclip_jax.train.stage import base_config
    small = arg in ("tiny", "shapes")
    c = base_config()
    c.stage = "decoder"

    m = c.model
    m.dtype = "float32" if small else "bfloat16"
    m.remat = not small
    m.remat_policy = "full"   # 'convs' keeps convolution and Dense outputs: less recompute, more memory
    m.attention_impl = "xla" if small else "auto"
    m.image_size = 32 if arg == "tiny" else 64
    clip_dim = {"tiny": 32, "shapes": 32, "karlo": 768, "paper": 768}[arg]
    if arg == "tiny":
        m.unet = _unet(32, (1, 2), 1, (1,), 8, 64)
    elif arg == "shapes":
        m.unet = _unet(64, (1, 2, 3), 2, (1, 2), 32, 128)
    elif arg == "karlo":
        m.unet = _unet(320, (1, 2, 3, 4), 3, (1, 2, 3), 64, 1536)
    else:
        m.unet = _unet(512, (1, 2, 3, 4), 3, (1, 2, 3), 64, 2048, dropout=0.1)
    # The projections' widths follow the UNet's (references: overriding one moves both).
    m.text_proj = ml_collections.ConfigDict(dict(
        clip_embeddings_dim=clip_dim, time_embed_dim=m.unet.get_ref("time_embed_dim"),
        cross_attention_dim=m.unet.get_ref("context_dim"), clip_extra_context_tokens=4))

    d = c.diffusion = ml_collections.ConfigDict()
    d.schedule = "cosine"
    d.num_timesteps = 1000
    d.prediction_type = "epsilon"
    d.variance_type = "learned_range"   # 6 output channels: [ε, v]; hybrid loss
    d.vlb_weight = 1.0                  # × L_vlb·T/1000 (improved DDPM's λ = 0.001)
    d.min_snr_gamma = ml_collections.config_dict.placeholder(float)  # None: plain MSE (Karlo)
    d.clip_range = 1.0                  # x̂_0 clip while sampling

    g = c.guidance = ml_collections.ConfigDict()
    g.p_drop_image = 0.1    # paper §2.1 (§5.1 says 5%)
    g.p_drop_text = 0.5
    g.null_text = "auto"    # 'auto': "" encodings when available, else zeros | 'zero' | 'batch'

    s = c.sample = ml_collections.ConfigDict()
    s.steps = 25
    s.guidance_scale = 8.0 if arg == "karlo" else 3.0
    s.best_of_n = 1         # pipeline default: images decoded per prompt, best by CLIP kept
    s.num = 8               # images in a sample grid
    s.split = "test"

    cl = c.clip = ml_collections.ConfigDict()
    # 'model': encode images + captions with a CLIP checkpoint on the fly (path, tokenizer);
    # 'precomputed': examples carry image_embed/text_embed/text_hidden/text_mask;
    # 'attributes': synthetic embeddings from captioned-shapes attributes (no CLIP).
    cl.kind = "attributes" if arg == "tiny" else "model"
    cl.path = ""
    cl.tokenizer = ""
    cl.text_len = 77        # tokens per caption ('attributes': 8)
    if arg == "tiny":
        cl.text_len = 8

    c.data = default_data_config("shapes" if small else "tar")
    c.data.image_size = m.image_size
    if arg == "tiny":
        c.data.num_examples = 4096
        c.data.num_eval_examples = 64

    t = c.train
    t.batch_size = {"tiny": 16, "shapes": 128, "karlo": 2048, "paper": 2048}[arg]
    t.steps = {"tiny": 200, "shapes": 50_000, "karlo": 800_000, "paper": 800_000}[arg]
    t.log_every = 10 if small else 100
    t.ckpt_every = 100 if small else 5000
    t.sample_every = 100 if small else 10_000

    o = c.optim
    o.lr = 1e-3 if arg == "tiny" else (3e-4 if arg == "shapes" else 1.2e-4)
    o.warmup = 10 if small else 10_000
    o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8
    o.weight_decay = 0.0
    o.clip_norm = 1.0
    o.ema_decay = 0.999 if small else 0.9999
    return c
