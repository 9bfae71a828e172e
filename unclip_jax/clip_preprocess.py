"""CLIP image preprocessing, equal to transformers' ``CLIPImageProcessor``, for batches.

The pipeline (OpenAI CLIP's, and transformers' defaults for every CLIP checkpoint):

1. convert to RGB (transparency composited onto white);
2. resize so the shorter side is ``size``, the longer ``int(size · long / short)``, bicubic;
3. center crop ``crop_size`` × ``crop_size`` (top = (H − crop) // 2, left = (W − crop) // 2);
4. x / 255, then (x − mean) / std per channel with the OpenAI CLIP mean and std.

Output: (B, crop, crop, 3) float32, NHWC — the input of ``CLIPVisionModel``.

Two implementations:

- :func:`preprocess_images` (numpy + PIL, host side): any sizes and aspects per image,
  uint8 arrays or PIL images. It uses PIL's bicubic resize exactly as transformers does, so
  it equals ``CLIPImageProcessor`` to float32 rounding (the test checks 1e-6).
- :func:`preprocess_images_jax` (on device, jit-able): one batch of equally sized images
  in the models' [-1, 1] range (e.g. decoder samples). It imitates PIL: separable bicubic
  (``jax.image.resize``, antialiased, Keys a = −0.5 as PIL), width pass then height pass,
  each rounded and clipped to 8 bits. PIL's fixed-point weights still flip a rounding now
  and then: the test requires every value within 2/255 of ``CLIPImageProcessor`` (before
  normalisation) and at least 99% of them equal (measured on random-noise images, the worst
  case: at most 2/255, under 1% off by one step; 2/255 ≈ 0.03 in normalised units).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(H, W) after resizing the shorter side to ``size`` (transformers' rule, truncating)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"empty image of size {height}x{width}")
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _crop_offsets(height: int, width: int, crop: int) -> tuple[int, int]:
    return (height - crop) // 2, (width - crop) // 2


def _to_rgb_pil(image):
    from PIL import Image
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"numpy images must be uint8 (H, W[, C]); got {array.dtype}. "
                        "For float images in [-1, 1] use preprocess_images_jax")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image; got {array.shape}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        return _to_rgb_pil(Image.fromarray(array, "RGBA"))
    return Image.fromarray(array, "RGB")


def _normalise(x: np.ndarray, mean, std) -> np.ndarray:
    # transformers: rescale in float64, cast to float32, then normalise in float32.
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def preprocess_images(images: Sequence, size: int = 224, crop_size: int | None = None,
                      mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> np.ndarray:
    """PIL images or uint8 (H, W[, C]) arrays of any sizes -> (B, crop, crop, 3) float32.

    ``crop_size`` defaults to ``size`` (224 for ViT-B/L/H, 336 for ViT-L/14-336).
    """
    from PIL import Image
    crop = size if crop_size is None else crop_size
    if isinstance(images, (Image.Image, np.ndarray)) and np.ndim(images) != 4:
        images = [images]
    out = np.empty((len(images), crop, crop, 3), np.float32)
    for i, image in enumerate(images):
        rgb = _to_rgb_pil(image)
        h, w = resized_shape(rgb.height, rgb.width, size)
        resized = np.asarray(rgb.resize((w, h), resample=Image.BICUBIC))
        if h < crop or w < crop:
            raise ValueError(f"crop_size {crop} is larger than the resized image {h}x{w}")
        top, left = _crop_offsets(h, w, crop)
        out[i] = _normalise(resized[top:top + crop, left:left + crop], mean, std)
    return out


def _resize_axis(x, axis: int, new: int):
    import jax
    shape = list(x.shape)
    shape[axis] = new
    return jax.image.resize(x, tuple(shape), method="bicubic", antialias=True)


def preprocess_images_jax(images, size: int = 224, crop_size: int | None = None,
                          mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, quantize: bool = True):
    """(B, H, W, 3) float images in [-1, 1] -> (B, crop, crop, 3) float32 CLIP input, jit-able.

    ``quantize=True`` follows the 8-bit route of ``CLIPImageProcessor``: the input is rounded
    to uint8 levels (as ``image_output.to_uint8``), resized like PIL in two passes (width,
    then height) with rounding and clipping to [0, 255] after each pass. ``quantize=False``
    skips the rounding (differentiable; slightly further from the reference). Shapes are
    static, so one call handles one image size.
    """
    import jax.numpy as jnp
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (B, H, W, 3) images in [-1, 1]; got {images.shape}")
    crop = size if crop_size is None else crop_size
    _, height, width, _ = images.shape
    h, w = resized_shape(height, width, size)
    if h < crop or w < crop:
        raise ValueError(f"crop_size {crop} is larger than the resized image {h}x{w}")

    def to_8bit(x):  # PIL rounds half up and clips every pass to the uint8 range
        return jnp.clip(jnp.floor(x + 0.5) if quantize else x, 0.0, 255.0)

    x = to_8bit(jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0) * 255.0)
    if w != width:
        x = to_8bit(_resize_axis(x, 2, w))
    if h != height:
        x = to_8bit(_resize_axis(x, 1, h))
    top, left = _crop_offsets(h, w, crop)
    x = x[:, top:top + crop, left:left + crop] / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
