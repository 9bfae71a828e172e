"""The unCLIP upsamplers: a cascade of super-resolution diffusion models (paper §2.1).

Variants (``--config=configs/upsampler.py:VARIANT``):

- ``tiny``: 16→64 on captioned shapes, a small UNet (32/64 channels): a CPU smoke run,
  ``python train.py --config=configs/upsampler.py:tiny --workdir=/tmp/sr``.
- ``karlo_256``: Karlo's 64→256 super-res (diffusers ``UNet2DModel``: 320 channels ×
  (1, 2, 3, 4), 3 resblocks, no attention, default time-embedding shift, ≈0.69B
  parameters), cosine schedule, sampled with 7 ancestral steps (fixed_small_log); the
  released ``super_res_first``/``super_res_last`` import with ``python -m
  unclip_jax.convert.unet super-res --src karlo/super_res_first --out DIR``.
- ``paper_256``: the paper's 64→256 (Table 3: 320 channels, 3 blocks, multipliers 1,2,3,4,
  cosine, dropout 0.1, batch 1024, lr 1.2e-4, 1M steps; DDIM 27 steps).
- ``paper_1024``: the paper's 256→1024 (Table 3: 192 channels, 2 blocks, multipliers
  1,1,2,2,4,4, linear schedule, batch 512, lr 1e-4; DDIM 15 steps; BSR degradation). No
  public unCLIP has this stage.

All train on random crops of a quarter of the target size (``augment.crop_fraction``)
and corrupt the conditioning: Gaussian blur (kernel 3, σ 0.6) for the first stage, BSR
for the second (``augment.kind``). ``augment.noise_aug_max_level`` > 0 (with
``model.unet.aug_level_embedding=True``) adds Imagen-style noise augmentation.

The full-size variants read img2dataset tar shards: set ``data.path`` and ``data.eval_path``
(the sample grid every ``train.sample_every`` steps reads its 'test' split; the trainer
opens it before the first step), or ``train.sample_every=0``.

Sections: ``model`` (``unet``: ``unclip_jax.models.unet.UNet`` fields; ``image_size`` (target),
``low_res_size``; ``dtype``/``remat``/``attention_impl``), ``diffusion``, ``augment``,
``sample``, ``data`` and the trainer's ``train``/``optim``/``mesh``.
"""

import ml_collections

_VARIANTS = ("tiny", "karlo_256", "paper_256", "paper_1024")


def _unet(base, mult, blocks, dropout=0.0):
    return ml_collections.ConfigDict(dict(
        in_channels=6, out_channels=3, base_channels=base, channel_mult=tuple(mult), num_res_blocks=blocks,
        attention_levels=(), mid_attention=False, head_channels=64,
        context_dim=ml_collections.config_dict.placeholder(int), added_embedding=False,
        aug_level_embedding=False, scale_shift_norm=False, resblock_updown=True, dropout=dropout,
        num_groups=32, norm_eps=1e-5, time_embed_dim=4 * base, flip_sin_to_cos=True, freq_shift=0.0))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = arg or "tiny"
    if arg not in _VARIANTS:
        raise ValueError(f"unknown configs/upsampler.py variant {arg!r}; known: {', '.join(_VARIANTS)}")
    from unclip_jax.data import default_data_config
    from unclip_jax.train.stage import base_config
    small = arg == "tiny"
    c = base_config()
    c.stage = "upsampler"

    m = c.model
    m.dtype = "float32" if small else "bfloat16"
    m.remat = not small
    m.remat_policy = "full"   # 'convs' keeps convolution and Dense outputs: less recompute, more memory
    m.attention_impl = "xla"
    m.image_size, m.low_res_size = {"tiny": (64, 16), "karlo_256": (256, 64), "paper_256": (256, 64),
                                    "paper_1024": (1024, 256)}[arg]
    m.unet = {"tiny": _unet(32, (1, 2), 1), "karlo_256": _unet(320, (1, 2, 3, 4), 3),
              "paper_256": _unet(320, (1, 2, 3, 4), 3, dropout=0.1),
              "paper_1024": _unet(192, (1, 1, 2, 2, 4, 4), 2)}[arg]

    d = c.diffusion = ml_collections.ConfigDict()
    d.schedule = "linear" if arg == "paper_1024" else "cosine"
    d.num_timesteps = 1000
    d.prediction_type = "epsilon"
    d.variance_type = "fixed_small_log"   # 3 output channels; plain ε-MSE
    d.vlb_weight = 1.0
    d.clip_range = 1.0

    a = c.augment = ml_collections.ConfigDict()
    a.kind = "bsr" if arg == "paper_1024" else "blur"
    a.blur_kernel = 3
    a.blur_sigma = 0.6
    a.crop_fraction = 0.25
    a.noise_aug_max_level = 0

    s = c.sample = ml_collections.ConfigDict()
    s.sampler = "ddpm" if arg in ("tiny", "karlo_256") else "ddim"
    s.steps = {"tiny": 7, "karlo_256": 7, "paper_256": 27, "paper_1024": 15}[arg]
    s.eta = 0.0
    s.aug_level = 0
    s.num = 4
    s.split = "test"

    c.data = default_data_config("shapes" if small else "tar")
    c.data.image_size = m.image_size
    if small:
        c.data.num_examples = 4096
        c.data.num_eval_examples = 64

    t = c.train
    t.batch_size = {"tiny": 16, "karlo_256": 1024, "paper_256": 1024, "paper_1024": 512}[arg]
    t.steps = {"tiny": 200, "karlo_256": 1_000_000, "paper_256": 1_000_000, "paper_1024": 1_000_000}[arg]
    t.log_every = 10 if small else 100
    t.ckpt_every = 100 if small else 5000
    t.sample_every = 100 if small else 10_000

    o = c.optim
    o.lr = {"tiny": 1e-3, "karlo_256": 1.2e-4, "paper_256": 1.2e-4, "paper_1024": 1e-4}[arg]
    o.warmup = 10 if small else 10_000
    o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8
    o.weight_decay = 0.0
    o.clip_norm = 1.0
    o.ema_decay = 0.999 if small else 0.9999
    return c
