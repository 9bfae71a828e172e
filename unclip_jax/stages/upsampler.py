"""The unCLIP upsampler stages (paper §2.1): 64→256 and 256→1024, or any cascade step.

Model: a :class:`~unclip_jax.models.unet.UNet` without attention or text whose input is
[x_t, upsampled low-res image] (6 channels); the low-res image is upsampled with
antialiased bicubic resampling (:func:`unclip_jax.data.augment.resize`, = diffusers'
``F.interpolate(..., mode="bicubic", align_corners=False, antialias=True)``). Parameters
are the UNet's tree (what :func:`unclip_jax.convert.unet.convert_super_res` returns).

Training (:func:`loss_fn`): the target is a random crop of ``augment.crop_fraction`` (a
quarter) of the target size, with the same window of the upsampled conditioning; the
UNet is fully convolutional and runs at full size at inference. The conditioning is
corrupted on the host (:func:`preprocess`): downsampled to ``model.low_res_size``, then
``augment.kind`` 'blur' (Gaussian, kernel 3, σ 0.6: the first stage), 'bsr' (a BSR-style
degradation: the second stage) or 'none'. Optional noise augmentation
(``augment.noise_aug_max_level`` > 0, Imagen-style): the upsampled conditioning is noised to
a random level s ≤ max (q(x_s | x_0) of the training schedule) and s is given to the model
(``UNet.aug_level_embedding``: its own embedding added to the time embedding); sampling
uses ``sample.aug_level``.

Sampling (:func:`sample_upsampler`): Karlo/diffusers run the first n−1 steps with
``super_res_first`` and the last step with ``super_res_last``; both parameter sets are
arguments (pass the same tree twice for a model trained here).

Batch: ``image`` (B, S, S, 3) and ``low_res`` (B, s, s, 3), both in [−1, 1].
"""

from __future__ import annotations

import functools
import json
import zlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax import diffusion
from unclip_jax.data import augment
from unclip_jax.models.unet import UNet, unet_from_config
from unclip_jax.stages.decoder import _plain, _stack, images_to_float, matmul_flops

# Karlo's super-res diffusion (UnCLIPScheduler fixed_small_log, ε, clip ±1), for configs without one.
KARLO_SR_DIFFUSION = dict(schedule="cosine", num_timesteps=1000, prediction_type="epsilon",
                          variance_type="fixed_small_log", vlb_weight=1.0, clip_range=1.0)
DEFAULT_AUGMENT = dict(kind="blur", blur_kernel=3, blur_sigma=0.6, crop_fraction=0.25, noise_aug_max_level=0)
DEFAULT_SAMPLE = dict(steps=7, sampler="ddpm", eta=0.0, aug_level=0)


def upsampler_spec(config) -> dict:
    """Normalises a stage config (``configs/upsampler.py``) or an imported checkpoint's config
    (``{'unet', 'sample_size'}``, 4× Karlo defaults) into ``{'unet', 'image_size',
    'low_res_size', 'diffusion', 'augment', 'sample'}``."""
    cfg = _plain(config)
    if "model" in cfg:
        model = cfg["model"]
        unet = dict(model["unet"])
        for key in ("dtype", "remat", "remat_policy", "attention_impl"):
            if key in model:
                unet[key] = model[key]
        size, low = int(model["image_size"]), int(model["low_res_size"])
    else:
        unet = dict(cfg["unet"])
        size = int(cfg.get("sample_size") or cfg["image_size"])
        low = int(cfg.get("low_res_size") or size // 4)
    spec = {"unet": unet, "image_size": size, "low_res_size": low,
            "diffusion": {**KARLO_SR_DIFFUSION, **cfg.get("diffusion", {})},
            "augment": {**DEFAULT_AUGMENT, **cfg.get("augment", {})},
            "sample": {**DEFAULT_SAMPLE, **cfg.get("sample", {})}}
    check_spec(spec)
    return spec


def check_spec(spec: Mapping[str, Any]) -> None:
    """Fails early on settings that cannot work together."""
    unet, aug = spec["unet"], spec["augment"]
    out = unet.get("out_channels", 3)
    if unet.get("in_channels") != 2 * (out // 2 if spec["diffusion"]["variance_type"] == "learned_range" else out):
        raise ValueError(f"an upsampler UNet takes [x_t, low-res] = 2× the image channels; got in_channels "
                         f"{unet.get('in_channels')} with out_channels {out}")
    if unet.get("context_dim") is not None or unet.get("added_embedding"):
        raise ValueError("upsamplers are unconditional: set unet.context_dim=None, added_embedding=False")
    if aug["kind"] not in ("blur", "bsr", "none"):
        raise ValueError(f"augment.kind must be 'blur', 'bsr' or 'none', got {aug['kind']!r}")
    if not 0 < float(aug["crop_fraction"]) <= 1:
        raise ValueError(f"augment.crop_fraction must be in (0, 1], got {aug['crop_fraction']}")
    if (int(aug["noise_aug_max_level"]) > 0) != bool(unet.get("aug_level_embedding", False)):
        raise ValueError("augment.noise_aug_max_level > 0 needs unet.aug_level_embedding=True, and vice versa")
    if spec["sample"]["sampler"] not in ("ddpm", "ddim"):
        raise ValueError(f"sample.sampler must be 'ddpm' or 'ddim', got {spec['sample']['sampler']!r}")
    if spec["image_size"] % spec["low_res_size"]:
        raise ValueError(f"image_size {spec['image_size']} is not a multiple of low_res_size {spec['low_res_size']}")


def build_unet(spec: Mapping[str, Any]) -> UNet:
    return unet_from_config(spec["unet"])


def init_params(key: jax.Array, config):
    """Random UNet parameters (float32); pure in ``key``."""
    return _init_from_spec(key, upsampler_spec(config))


def _init_from_spec(key, spec):
    unet = build_unet(spec)
    size = 2 ** (len(unet.channel_mult) - 1)
    kwargs = {"aug_level": jnp.zeros((1,))} if unet.aug_level_embedding else {}
    return unet.init(key, jnp.zeros((1, size, size, unet.in_channels)), jnp.zeros((1,)), **kwargs)["params"]


# ---------------------------------------------------------------- conditioning corruption (host)

def degrade(images: np.ndarray, spec: Mapping[str, Any], *, seed: int = 0) -> np.ndarray:
    """High-res images (B, S, S, 3) in [−1, 1] → corrupted low-res conditioning (B, s, s, 3).

    'blur'/'none': antialiased bicubic downsampling to s, then a Gaussian blur (kernel
    ``blur_kernel``, σ ``blur_sigma``) for 'blur'. 'bsr': :func:`augment.bsr_degrade` with a
    per-image generator seeded by (seed, a CRC of the image) — deterministic, so runs resume
    exactly (the trainer's ``preprocess`` gets no step or key).
    """
    aug = spec["augment"]
    low = int(spec["low_res_size"])
    images = np.asarray(images, np.float32)
    if aug["kind"] == "bsr":
        out = []
        for im in images:
            rng = np.random.default_rng([int(seed), zlib.crc32(np.ascontiguousarray(im).tobytes())])
            out.append(augment.bsr_degrade(im, low, rng))
        return np.stack(out)
    small = augment.resize(images, low)
    if aug["kind"] == "blur":
        small = augment.gaussian_blur(small, kernel_size=int(aug["blur_kernel"]), sigma=float(aug["blur_sigma"]))
    return small.astype(np.float32)


def preprocess(examples, config) -> dict[str, np.ndarray]:
    """Raw examples (``image`` uint8 (S, S, 3)) → ``{'image', 'low_res'}`` (module doc)."""
    spec = upsampler_spec(config)
    batch = _stack(examples)
    image = images_to_float(batch["image"])
    size = spec["image_size"]
    if image.shape[1:3] != (size, size):
        image = np.clip(augment.resize(image, size), -1.0, 1.0)
    seed = int(_plain(config).get("train", {}).get("seed", 0))
    low_res = batch["low_res"] if "low_res" in batch else degrade(image, spec, seed=seed)
    return {"image": image, "low_res": images_to_float(low_res)}


# ---------------------------------------------------------------- loss

def noise_augment(key: jax.Array, cond: jax.Array, schedule: diffusion.Schedule, max_level: int
                  ) -> tuple[jax.Array, jax.Array]:
    """Noises the conditioning to a random level s ~ U{0 … max_level} per example:
    q(c_s | c) of ``schedule``. Returns (noised (B, …), s (B,) int32)."""
    k_level, k_noise = jax.random.split(key)
    level = jax.random.randint(k_level, (cond.shape[0],), 0, int(max_level) + 1, dtype=jnp.int32)
    return diffusion.q_sample(schedule, cond, level, jax.random.normal(k_noise, cond.shape, cond.dtype)), level


def loss_fn(params, batch: Mapping[str, Any], key: jax.Array, config, *, train: bool):
    """Diffusion loss on random crops of [target, upsampled conditioning] (module doc).

    Returns (mean loss, metrics {'mse', 'vb'}).
    """
    spec = upsampler_spec(config)
    unet = build_unet(spec)
    diff, aug = spec["diffusion"], spec["augment"]
    image = jnp.asarray(batch["image"], jnp.float32)
    size = image.shape[1]
    up = augment.resize(jnp.asarray(batch["low_res"], jnp.float32), (size, image.shape[2]))
    k_crop, k_aug, k_loss, k_dropout = jax.random.split(key, 4)
    crop = int(round(size * float(aug["crop_fraction"])))
    if crop < size:
        image, up = augment.random_crops(k_crop, [image, up], crop)
    schedule = diffusion.Schedule.create(diff["schedule"], diff["num_timesteps"])
    kwargs = {}
    if int(aug["noise_aug_max_level"]) > 0:
        up, kwargs["aug_level"] = noise_augment(k_aug, up, schedule, int(aug["noise_aug_max_level"]))

    def model_fn(x_t, t):
        return unet.apply({"params": params}, jnp.concatenate([x_t, up], axis=-1), t, train=train,
                          rngs={"dropout": k_dropout}, **kwargs)

    loss, aux = diffusion.diffusion_loss(model_fn, schedule, image, k_loss, prediction_type=diff["prediction_type"],
                                         variance_type=diff["variance_type"], vlb_weight=diff["vlb_weight"])
    return loss.mean(), {"mse": aux["mse"].mean(), "vb": aux["vb"].mean()}


# ---------------------------------------------------------------- sampling

@functools.lru_cache(maxsize=16)
def _sampler(spec_json: str, steps: int, out_hw: tuple[int, int], has_init: bool, has_noise: bool):
    spec = json.loads(spec_json)
    unet = build_unet(spec)
    diff, smp = spec["diffusion"], spec["sample"]
    # Concrete arrays even when first called inside an outer jit: this cache outlives that
    # trace, and tracers kept in it would leak into the next one.
    with jax.ensure_compile_time_eval():
        schedule = diffusion.Schedule.create(diff["schedule"], diff["num_timesteps"])
    ts = diffusion.respace(steps, diff["num_timesteps"])
    final_prev = ts[-1] - 1 if smp["sampler"] == "ddpm" else -1
    prev = np.append(ts[1:], final_prev).astype(np.int32)
    channels = unet.out_channels // 2 if diff["variance_type"] == "learned_range" else unet.out_channels
    step_kw = dict(prediction_type=diff["prediction_type"], clip_range=diff.get("clip_range", 1.0))

    def step(x, out, t, t_prev, z):
        if smp["sampler"] == "ddim":
            return diffusion.ddim_step(schedule, out, t, t_prev, x, z, eta=float(smp["eta"]), **step_kw)
        return diffusion.ddpm_step(schedule, out, t, t_prev, x, z, variance_type=diff["variance_type"], **step_kw)

    @jax.jit
    def run(params_first, params_last, low_res, key, aug_level, init_latents, noise):
        b = low_res.shape[0]
        k_init, k_aug, k_steps = jax.random.split(key, 3)
        up = augment.resize(low_res, out_hw)
        kwargs = {}
        if unet.aug_level_embedding:
            level = jnp.full((b,), aug_level, jnp.int32)
            up = diffusion.q_sample(schedule, up, level, jax.random.normal(k_aug, up.shape))
            kwargs["aug_level"] = level
        x = init_latents if has_init else jax.random.normal(k_init, (b,) + out_hw + (channels,))

        def model(params, x, t):
            return unet.apply({"params": params}, jnp.concatenate([x, up], axis=-1), jnp.full((b,), t), **kwargs)

        def step_noise(i):
            return noise[i] if has_noise else jax.random.normal(jax.random.fold_in(k_steps, i), x.shape)

        def body(x, inputs):   # the first n−1 steps, with params_first
            i, t, t_prev = inputs
            return step(x, model(params_first, x, t), t, t_prev, step_noise(i)), None

        n = len(ts)
        if n > 1:
            x, _ = jax.lax.scan(body, x, (jnp.arange(n - 1), jnp.asarray(ts[:-1]), jnp.asarray(prev[:-1])))
        x = step(x, model(params_last, x, int(ts[-1])), int(ts[-1]), int(prev[-1]), step_noise(n - 1))
        return x

    return run


def sample_upsampler(params_first, params_last, config, low_res, key, *, steps: int = 7, init_latents=None,
                     noise=None, out_size: int | tuple[int, int] | None = None, aug_level: int | None = None
                     ) -> jax.Array:
    """Super-resolves ``low_res`` as diffusers' UnCLIPPipeline super-res loop.

    One jitted function whose first n−1 steps (over ``respace(steps)``, 999 … 0) are a
    ``lax.scan`` with ``params_first``; the final step uses ``params_last`` (Karlo's
    last-step swap; pass the same tree twice for one model). Each step: UNet on
    [x_t, bicubic-upsampled low_res] and an UnCLIPScheduler step ('ddpm', fixed_small_log,
    x̂_0 clipped to ±1) or a DDIM step (``sample.sampler='ddim'``, the paper's upsampler
    sampler). No guidance.

    Args:
      params_first, params_last: UNet parameter trees.
      config: stage config or an imported checkpoint's config (:func:`upsampler_spec`).
      low_res: (B, h, w, 3) in [−1, 1] (e.g. the decoder's output).
      key: PRNG key (x_T, per-step noise, conditioning noise augmentation).
      init_latents: (B, H, W, 3) x_T; noise: (steps, B, H, W, 3) per-step noise.
      out_size: output side(s); default low_res size × image_size/low_res_size of the config.
      aug_level: noise-augmentation level of the conditioning (models with
        ``aug_level_embedding``); default ``sample.aug_level``.
    Returns:
      (B, H, W, 3) images (not clipped: Karlo's pipeline clamps only when converting).
    """
    spec = upsampler_spec(config)
    low_res = jnp.asarray(low_res, jnp.float32)
    if low_res.ndim != 4 or low_res.shape[-1] != 3:
        raise ValueError(f"low_res must be (B, h, w, 3), got {low_res.shape}")
    if out_size is None:
        factor = spec["image_size"] // spec["low_res_size"]
        out_hw = (low_res.shape[1] * factor, low_res.shape[2] * factor)
    else:
        out_hw = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
    if params_last is None:
        params_last = params_first
    if init_latents is not None and tuple(init_latents.shape) != (low_res.shape[0],) + tuple(out_hw) + (3,):
        raise ValueError(f"init_latents must be {(low_res.shape[0],) + tuple(out_hw) + (3,)}, "
                         f"got {tuple(init_latents.shape)}")
    level = spec["sample"]["aug_level"] if aug_level is None else aug_level
    run = _sampler(json.dumps(spec, sort_keys=True), int(steps), tuple(int(v) for v in out_hw),
                   init_latents is not None, noise is not None)
    return run(params_first, params_last, low_res, key, jnp.int32(level),
               None if init_latents is None else jnp.asarray(init_latents, jnp.float32),
               None if noise is None else jnp.asarray(noise, jnp.float32))


# ---------------------------------------------------------------- trainer hooks

def make_source(config, split: str = "train", process_index: int = 0, process_count: int = 1):
    """The examples of ``config.data`` (``unclip_jax.data.make_source``) for ``split``."""
    from unclip_jax.data import make_source as data_source
    return data_source(config.data, split=split, process_index=process_index, process_count=process_count,
                       seed=int(config.train.seed))


def sample_grid(params, config, key) -> np.ndarray:
    """For the first ``sample.num`` examples of ``sample.split``: [bicubic upsampling of the
    corrupted low-res input | the upsampler's sample] side by side, uint8 (N, S, 2S, 3)."""
    s = config.sample
    from unclip_jax.data import first_examples
    batch = preprocess(first_examples(make_source(config, s.split), int(s.num)), config)
    out = sample_upsampler(params, params, config, batch["low_res"], key, steps=int(s.steps))
    up = augment.resize(jnp.asarray(batch["low_res"]), out.shape[1:3])
    grid = jnp.concatenate([up, out], axis=2)
    return np.asarray(jnp.round((jnp.clip(grid, -1, 1) + 1.0) * 127.5).astype(jnp.uint8))


@functools.lru_cache(maxsize=8)
def _forward_flops(spec_json: str, crop: int) -> float:
    spec = json.loads(spec_json)
    unet = build_unet(spec)
    params = jax.eval_shape(lambda k: _init_from_spec(k, spec), jax.random.key(0))
    kwargs = {"aug_level": jnp.zeros((1,))} if unet.aug_level_embedding else {}
    x = jax.ShapeDtypeStruct((1, crop, crop, unet.in_channels), jnp.float32)
    return matmul_flops(lambda p, x: unet.apply({"params": p}, x, jnp.zeros((1,)), **kwargs), params, x)


def flops_per_example(config) -> float:
    """Training FLOPs per example ≈ 3 × the UNet forward's matmul/conv FLOPs at the crop size."""
    spec = upsampler_spec(config)
    crop = int(round(spec["image_size"] * float(spec["augment"]["crop_fraction"])))
    return 3.0 * _forward_flops(json.dumps(spec, sort_keys=True), crop)


def _register():
    from unclip_jax.train.stage import FunctionStage, register_stage
    stage = FunctionStage(init_params=init_params, loss_fn=loss_fn, make_source=make_source,
                          preprocess=preprocess, flops_per_example=flops_per_example,
                          sample_grid=sample_grid)
    register_stage("upsampler", stage)
    return stage


try:  # registering needs the trainer package; the functions above do not
    UPSAMPLER_STAGE = _register()
except ImportError:  # pragma: no cover - a partial install without unclip_jax.train
    UPSAMPLER_STAGE = None
