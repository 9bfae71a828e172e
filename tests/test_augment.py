"""Resizing and the upsamplers' conditioning corruptions (unclip_jax.data.augment)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from unclip_jax.data import augment
from unclip_jax.stages.upsampler import degrade, upsampler_spec


@pytest.mark.parametrize("shape_in,shape_out", [((64, 64), (256, 256)), ((256, 256), (64, 64)),
                                                ((17, 23), (40, 9)), ((32, 48), (32, 48))])
@pytest.mark.parametrize("method,antialias", [("bicubic", True), ("bilinear", True), ("bicubic", False)])
def test_resize_matches_torch_interpolate(shape_in, shape_out, method, antialias):
    x = np.random.default_rng(0).uniform(-1, 1, (2,) + shape_in + (3,)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=shape_out, mode=method,
                                          align_corners=False, antialias=antialias).numpy().transpose(0, 2, 3, 1)
    ours_np = augment.resize(x, shape_out, method=method, antialias=antialias)
    ours_jax = jax.jit(lambda a: augment.resize(a, shape_out, method=method, antialias=antialias))(x)
    assert isinstance(ours_np, np.ndarray) and ours_np.shape == ref.shape
    np.testing.assert_allclose(ours_np, ref, atol=5e-6)
    np.testing.assert_allclose(np.asarray(ours_jax), ref, atol=5e-6)


def test_resize_matrix_rows_sum_to_one():
    for n_in, n_out in ((64, 256), (256, 64), (7, 3)):
        np.testing.assert_allclose(augment.resize_matrix(n_in, n_out).sum(1), 1.0, atol=1e-6)


def _torch_blur(x, sigma=0.6, k=3):
    taps = np.exp(-0.5 * ((np.arange(k) - (k - 1) / 2) / sigma) ** 2)
    taps /= taps.sum()
    kernel = torch.tensor(np.outer(taps, taps), dtype=torch.float32)[None, None].repeat(3, 1, 1, 1)
    t = torch.from_numpy(x.transpose(0, 3, 1, 2))
    t = torch.nn.functional.pad(t, (k // 2,) * 4, mode="reflect")
    return torch.nn.functional.conv2d(t, kernel, groups=3).numpy().transpose(0, 2, 3, 1)


def test_gaussian_blur_is_the_specified_kernel():
    """Kernel 3, σ 0.6, reflect padding: equals a direct 2-D convolution; smooths; keeps
    constants and the mean."""
    x = np.random.default_rng(1).uniform(-1, 1, (2, 16, 20, 3)).astype(np.float32)
    out = augment.gaussian_blur(x)
    np.testing.assert_allclose(out, _torch_blur(x), atol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.jit(augment.gaussian_blur)(jnp.asarray(x))), out, atol=1e-6)
    taps = augment.gaussian_kernel1d(3, 0.6)
    np.testing.assert_allclose(taps, [0.1664, 0.6672, 0.1664], atol=1e-4)   # exp(-1/(2·0.36)) = 0.2494 relative
    assert np.abs(np.diff(out, axis=2)).mean() < 0.75 * np.abs(np.diff(x, axis=2)).mean()
    np.testing.assert_allclose(augment.gaussian_blur(np.full((1, 8, 8, 3), 0.3, np.float32)), 0.3, atol=1e-6)


def test_first_stage_corruption_is_downsample_then_blur():
    spec = upsampler_spec({"unet": {"in_channels": 6, "out_channels": 3}, "sample_size": 64})
    x = np.random.default_rng(2).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    low = degrade(x, spec)
    assert low.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(low, augment.gaussian_blur(augment.resize(x, 16)), atol=1e-6)


def test_random_crops_cut_the_same_window():
    key = jax.random.key(0)
    image = jnp.arange(4 * 32 * 32 * 3, dtype=jnp.float32).reshape(4, 32, 32, 3)
    cond = image * 2 + 1
    a, b = augment.random_crops(key, [image, cond], 8)
    assert a.shape == b.shape == (4, 8, 8, 3)
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a) * 2 + 1)
    # each crop is a contiguous window of its own image, at a per-example offset
    offsets = []
    for i in range(4):
        y, x = divmod(int(a[i, 0, 0, 0]) // 3 - i * 32 * 32, 32)
        np.testing.assert_array_equal(np.asarray(a[i]), np.asarray(image[i, y:y + 8, x:x + 8]))
        offsets.append((y, x))
    assert len(set(offsets)) > 1
    with pytest.raises(ValueError):
        augment.random_crops(key, [image, cond[:, :16]], 8)


def test_anisotropic_kernel_orientation():
    k = augment.anisotropic_gaussian_kernel(21, 4.0, 1.0, 0.0)          # wide along x
    assert abs(k.sum() - 1) < 1e-9 and k[10, 14] > k[14, 10]
    k90 = augment.anisotropic_gaussian_kernel(21, 4.0, 1.0, np.pi / 2)   # rotated: wide along y
    np.testing.assert_allclose(k90, k.T, atol=1e-12)


def test_bsr_degrade():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:128, 0:128] / 128.0
    image = np.stack([np.sin(6 * xx), np.cos(5 * yy), np.sin(4 * (xx + yy))], -1).astype(np.float32) * 0.8
    image[40:80, 40:80] = -0.9                                              # a sharp square
    clean = augment.resize(image, 32)
    a = augment.bsr_degrade(image, 32, np.random.default_rng(7))
    b = augment.bsr_degrade(image, 32, np.random.default_rng(7))
    c = augment.bsr_degrade(image, 32, np.random.default_rng(8))
    assert a.shape == (32, 32, 3) and a.dtype == np.float32
    assert np.all(np.abs(a) <= 1.0)
    np.testing.assert_array_equal(a, b)                                     # deterministic in the rng
    assert np.abs(a - c).mean() > 1e-3                                      # random otherwise
    for out in (a, c):
        err = np.abs(out - clean).mean()
        assert 0.01 < err < 0.5, err                                        # degraded, yet the same picture
        assert np.corrcoef(out.ravel(), clean.ravel())[0, 1] > 0.8
    assert augment.bsr_degrade(image, (16, 24), rng).shape == (16, 24, 3)
    # the JPEG step alone: lossy but close
    jpg = augment._jpeg((image + 1) / 2, 30)
    assert 0.0 < np.abs(jpg - (image + 1) / 2).mean() < 0.05
