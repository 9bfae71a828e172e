"""The upsampler stage: corrupted conditioning, crops, noise augmentation, loss, sampling hook."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from test_decoder_stage import random_params
from unclip_jax import diffusion
from unclip_jax.config import load_config
from unclip_jax.data import augment
from unclip_jax.stages import upsampler as up

NOISE_AUG = ["augment.noise_aug_max_level=200", "model.unet.aug_level_embedding=True", "sample.aug_level=50"]


def test_preprocess_makes_blurred_low_res():
    config = load_config("configs/upsampler.py:tiny")
    source = up.make_source(config, "train")
    examples = [source[i] for i in range(3)]
    batch = up.preprocess(examples, config)
    assert batch["image"].shape == (3, 64, 64, 3) and batch["low_res"].shape == (3, 16, 16, 3)
    image = np.stack([e["image"] for e in examples]).astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(batch["low_res"], augment.gaussian_blur(augment.resize(image, 16)), atol=1e-5)
    bsr = up.preprocess(examples, load_config("configs/upsampler.py:tiny", ["augment.kind=bsr"]))
    assert bsr["low_res"].shape == (3, 16, 16, 3)
    assert np.abs(bsr["low_res"] - batch["low_res"]).mean() > 1e-3
    np.testing.assert_array_equal(bsr["low_res"], up.preprocess(examples, load_config(
        "configs/upsampler.py:tiny", ["augment.kind=bsr"]))["low_res"])        # deterministic


def test_config_checks_fail_early():
    with pytest.raises(ValueError, match="aug_level_embedding"):
        up.upsampler_spec(load_config("configs/upsampler.py:tiny", ["augment.noise_aug_max_level=100"]))
    with pytest.raises(ValueError, match="augment.kind"):
        up.upsampler_spec(load_config("configs/upsampler.py:tiny", ["augment.kind=jpeg"]))
    for variant in ("karlo_256", "paper_256", "paper_1024"):
        spec = up.upsampler_spec(load_config(f"configs/upsampler.py:{variant}"))
        assert spec["image_size"] // spec["low_res_size"] == 4
    assert up.upsampler_spec(load_config("configs/upsampler.py:paper_1024"))["diffusion"]["schedule"] == "linear"


def test_noise_augment_levels():
    schedule = diffusion.Schedule.create("cosine", 1000)
    cond = jnp.ones((4096, 2, 2, 3)) * 0.5
    noised, level = up.noise_augment(jax.random.key(0), cond, schedule, 200)
    level = np.asarray(level)
    assert level.min() >= 0 and level.max() <= 200 and abs(level.mean() - 100) < 5
    noised = np.asarray(noised)
    assert np.abs(noised[level == 0] - 0.5).max() < 0.05                    # level 0: nearly clean
    ab = np.asarray(schedule.alphas_cumprod)[level][:, None, None, None]
    z = (noised - np.sqrt(ab) * 0.5) / np.sqrt(1 - ab)                      # q(c_s | c) residuals
    assert abs(z.std() - 1) < 0.03 and abs(z.mean()) < 0.03


def test_registered_stage_loss_sample_and_flops():
    """Loss on quarter-size crops with noise augmentation: finite loss and gradients, and the
    crop really is a quarter (the model sees 16×16 inputs); sample_grid runs the sampler."""
    from unclip_jax.train.stage import get_stage
    config = load_config("configs/upsampler.py:tiny", NOISE_AUG)
    stage = get_stage("upsampler")
    source = stage.make_source(config, "train", 0, 1)
    batch = stage.preprocess([source[i] for i in range(4)], config)
    params = random_params(lambda k: stage.init_params(k, config))
    seen = []
    unet = up.build_unet(up.upsampler_spec(config))
    original = type(unet).__call__

    def spy(self, x, t, **kw):
        seen.append((x.shape, "aug_level" in kw and kw["aug_level"] is not None))
        return original(self, x, t, **kw)

    type(unet).__call__ = spy
    try:
        fn = jax.jit(jax.value_and_grad(lambda p: stage.loss_fn(p, batch, jax.random.key(1), config, train=True),
                                        has_aux=True))
        (loss, metrics), g = fn(params)
    finally:
        type(unet).__call__ = original
    assert seen and seen[0] == ((4, 16, 16, 6), True)
    assert np.isfinite(float(loss)) and float(metrics["mse"]) > 0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))
    assert float(jnp.abs(g["aug_embedding"]["linear_1"]["kernel"]).max()) > 0

    grid = stage.sample_grid(params, load_config("configs/upsampler.py:tiny", NOISE_AUG + ["sample.steps=2",
                                                                                          "sample.num=2"]),
                             jax.random.key(0))
    assert grid.shape == (2, 64, 128, 3) and grid.dtype == np.uint8
    assert stage.flops_per_example(config) > 1e7
