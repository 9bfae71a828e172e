"""CLIP image preprocessing against transformers' CLIPImageProcessor (PIL backend)."""

import jax
import numpy as np
import pytest

import transformers
from PIL import Image  # noqa: E402

from unclip_jax.clip_preprocess import (OPENAI_CLIP_STD, preprocess_images,  # noqa: E402
                                        preprocess_images_jax, resized_shape)

SIZES = [(300, 200), (180, 400), (224, 224), (100, 150), (513, 512), (64, 64)]


def _processor(**kwargs):
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as cls
    except ImportError:  # transformers 4.x: CLIPImageProcessor is the PIL one
        cls = transformers.CLIPImageProcessor
    return cls(**kwargs)


def _reference(images, **kwargs):
    return _processor(**kwargs)(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)


def test_numpy_path_equals_clip_image_processor():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]
    images.append(Image.fromarray(rng.integers(0, 256, (90, 130), dtype=np.uint8), "L"))  # grey
    rgba = rng.integers(0, 256, (120, 80, 4), dtype=np.uint8)
    images.append(Image.fromarray(rgba, "RGBA"))  # transparency composited onto white
    images.append(rgba)
    got = preprocess_images(images)
    want = _reference(images)
    assert got.shape == (len(images), 224, 224, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_numpy_path_336_crop():
    img = np.random.default_rng(1).integers(0, 256, (400, 500, 3), dtype=np.uint8)
    want = _reference([img], size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    np.testing.assert_allclose(preprocess_images([img], size=336), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(300, 200), (180, 400), (64, 64)])  # down, down, up
def test_jax_path_is_within_a_few_8bit_steps(shape):
    img = np.random.default_rng(2).integers(0, 256, (2, *shape, 3), dtype=np.uint8)  # noise: the worst case
    want = _reference(list(img))
    model_range = img.astype(np.float32) / 127.5 - 1.0
    got = np.asarray(jax.jit(preprocess_images_jax)(model_range))
    steps = np.abs(got - want) * np.asarray(OPENAI_CLIP_STD) * 255  # in 8-bit levels
    assert steps.max() <= 2.01, steps.max()
    assert (steps > 0.01).mean() < 0.01, (steps > 0.01).mean()
    # Without quantisation (differentiable) it stays close on average.
    loose = np.asarray(jax.jit(preprocess_images_jax, static_argnames="quantize")(model_range, quantize=False))
    assert np.abs(loose - want).mean() < 0.01


def test_resized_shape_rule():
    assert resized_shape(300, 200, 224) == (336, 224)
    assert resized_shape(180, 400, 224) == (224, 497)  # int(224 * 400 / 180) = 497
    assert resized_shape(224, 224, 224) == (224, 224)
    with pytest.raises(TypeError, match="uint8"):
        preprocess_images([np.zeros((10, 10, 3), np.float32)])
