"""Image resizing and the conditioning corruptions of the unCLIP upsamplers (paper §2.1).

- :func:`resize` — separable antialiased resampling, the arithmetic of PyTorch's
  ``F.interpolate(mode='bicubic'|'bilinear', align_corners=False, antialias=True)`` (Keys
  cubic with a = −0.5, support widened by the scale when shrinking, weights renormalised at
  the borders), and ``antialias=False`` bicubic (a = −0.75, clamped borders). It is what
  diffusers' UnCLIPPipeline uses to upsample the 64px decoder output for the upsampler.
  Works on numpy arrays (host) and JAX arrays (inside jit) alike.
- :func:`gaussian_blur` — the 64→256 stage's corruption (kernel 3, σ 0.6), reflect padding.
- :func:`bsr_degrade` — the 256→1024 stage's BSR-style degradation (Zhang et al. 2021,
  simplified; host-side numpy + PIL because of JPEG): random anisotropic blur, random
  intermediate resize, Gaussian noise and JPEG in random order, then a final resize to the
  low-res size with a random filter and a final JPEG.
- :func:`random_crops` — the same random crop from several aligned images (training on
  crops of a quarter of the target size; the UNet is fully convolutional).

Images are (…, H, W, C) float arrays, channels last; values are not clipped unless said.
"""

from __future__ import annotations

import functools
import io
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


# ------------------------------------------------------------------ resampling weights

def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(x))


def _box(x: np.ndarray) -> np.ndarray:
    return ((x >= -0.5) & (x < 0.5)).astype(np.float64)


# filter, half-width of its support at scale 1
_FILTERS = {"bicubic": (functools.partial(_cubic, a=-0.5), 2.0), "bilinear": (_triangle, 1.0),
            "box": (_box, 0.5)}


@functools.lru_cache(maxsize=64)
def resize_matrix(in_size: int, out_size: int, method: str = "bicubic", antialias: bool = True) -> np.ndarray:
    """The (out_size, in_size) float32 matrix W with out = W @ in along one axis.

    ``antialias=True``: PyTorch's antialiased kernels (= PIL's resampling): for output
    pixel i, centre c = s·(i + ½) with s = in/out; taps j in [⌊c − r + ½⌋, ⌊c + r + ½⌋)
    clipped to the image, r = s·support when shrinking (support otherwise), weights
    filter((j − c + ½)/max(s, 1)) normalised to sum 1.
    ``antialias=False`` (bicubic only): Keys cubic a = −0.75 at source x = s·(i + ½) − ½,
    taps ⌊x⌋−1 … ⌊x⌋+2 with indices clamped to the border (``F.interpolate`` bicubic).
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} → {out_size}")
    scale = in_size / out_size
    w = np.zeros((out_size, in_size), np.float64)
    if not antialias:
        if method != "bicubic":
            raise ValueError("antialias=False is implemented for 'bicubic' only")
        for i in range(out_size):
            x = scale * (i + 0.5) - 0.5
            base = int(np.floor(x))
            frac = x - base
            for d in (-1, 0, 1, 2):
                w[i, min(max(base + d, 0), in_size - 1)] += _cubic(np.array(frac - d), -0.75)
        return w.astype(np.float32)
    if method not in _FILTERS:
        raise ValueError(f"unknown resize method {method!r}; expected one of {sorted(_FILTERS)}")
    filt, support = _FILTERS[method]
    stretch = max(scale, 1.0)
    radius = support * stretch
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - radius + 0.5), 0)
        hi = min(int(center + radius + 0.5), in_size)
        taps = np.arange(lo, hi)
        weights = filt((taps - center + 0.5) / stretch)
        total = weights.sum()
        w[i, lo:hi] = weights / total if total != 0 else weights
    return w.astype(np.float32)


def resize(images, size: int | tuple[int, int], *, method: str = "bicubic", antialias: bool = True):
    """Resizes (…, H, W, C) images to ``size`` (an int for square, or (h, w)).

    numpy in → numpy out (float32); JAX in → JAX out (jit-able; two matmuls at highest
    precision). See :func:`resize_matrix` for the kernels.
    """
    h_out, w_out = (size, size) if isinstance(size, int) else size
    h_in, w_in = images.shape[-3], images.shape[-2]
    wh = resize_matrix(h_in, h_out, method, antialias)
    ww = resize_matrix(w_in, w_out, method, antialias)
    if isinstance(images, np.ndarray):
        x = np.asarray(images, np.float32)
        x = np.einsum("oh,...hwc->...owc", wh, x, optimize=True)
        return np.einsum("pw,...owc->...opc", ww, x, optimize=True).astype(np.float32)
    x = jnp.asarray(images)
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,...hwc->...owc", jnp.asarray(wh, dtype), x.astype(dtype), precision=hi)
    return jnp.einsum("pw,...owc->...opc", jnp.asarray(ww, dtype), x, precision=hi)


# ------------------------------------------------------------------ blur

def gaussian_kernel1d(kernel_size: int = 3, sigma: float = 0.6) -> np.ndarray:
    """Normalised 1-D Gaussian taps exp(−x²/2σ²), x = −(k−1)/2 … (k−1)/2 (float32)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
    x = np.arange(kernel_size, dtype=np.float64) - (kernel_size - 1) / 2
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(images, *, kernel_size: int = 3, sigma: float = 0.6):
    """Separable Gaussian blur of (…, H, W, C) images with reflect padding (numpy or JAX),
    as ``torchvision.transforms.functional.gaussian_blur``. The 64→256 corruption uses
    kernel 3, σ 0.6 (paper §2.1)."""
    taps = gaussian_kernel1d(kernel_size, sigma)
    r = kernel_size // 2
    xp = np if isinstance(images, np.ndarray) else jnp
    x = images.astype(np.float32) if xp is np else jnp.asarray(images)
    nd = x.ndim
    for axis in (nd - 3, nd - 2):
        pad = [(0, 0)] * nd
        pad[axis] = (r, r)
        padded = xp.pad(x, pad, mode="reflect")
        n = x.shape[axis]
        x = sum(float(taps[k]) * xp.take(padded, xp.arange(k, k + n), axis=axis) for k in range(kernel_size))
    return x


# ------------------------------------------------------------------ crops

def random_crops(key: jax.Array, images: Sequence[jax.Array], size: int) -> list[jax.Array]:
    """The same random ``size``×``size`` window (per example) cut from each of ``images``.

    Args:
      key: PRNG key.
      images: arrays (B, H, W, C_k) sharing B, H, W (e.g. the target and the upsampled
        conditioning image).
      size: crop side (a quarter of the target size in the paper).
    Returns:
      list of (B, size, size, C_k).
    """
    b, h, w = images[0].shape[:3]
    if any(im.shape[:3] != (b, h, w) for im in images):
        raise ValueError(f"images to crop together need one (B, H, W); got {[im.shape for im in images]}")
    if size > h or size > w:
        raise ValueError(f"crop {size} larger than the images {h}×{w}")
    ky, kx = jax.random.split(key)
    ys = jax.random.randint(ky, (b,), 0, h - size + 1)
    xs = jax.random.randint(kx, (b,), 0, w - size + 1)

    def crop(im, y, x):
        return jax.lax.dynamic_slice(im, (y, x, 0), (size, size, im.shape[-1]))

    return [jax.vmap(crop)(im, ys, xs) for im in images]


# ------------------------------------------------------------------ BSR-style degradation

def anisotropic_gaussian_kernel(kernel_size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """Normalised 2-D Gaussian with covariance R·diag(σx², σy²)·Rᵀ, R a rotation by θ."""
    r = (kernel_size - 1) / 2
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    c, s = np.cos(theta), np.sin(theta)
    u, v = c * x + s * y, -s * x + c * y
    k = np.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return k / k.sum()


def _convolve_reflect(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """2-D convolution of (H, W, C) with reflect padding, via FFT (kernels up to 21×21)."""
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    ph_eff, pw_eff = min(ph, image.shape[0] - 1), min(pw, image.shape[1] - 1)
    padded = np.pad(image, ((ph_eff, ph_eff), (pw_eff, pw_eff), (0, 0)), mode="reflect")
    padded = np.pad(padded, ((ph - ph_eff,) * 2, (pw - pw_eff,) * 2, (0, 0)), mode="edge")
    H, W = padded.shape[:2]
    spec = np.fft.rfft2(padded, axes=(0, 1)) * np.fft.rfft2(kernel, s=(H, W))[..., None]
    out = np.fft.irfft2(spec, s=(H, W), axes=(0, 1))
    return out[kh - 1:kh - 1 + image.shape[0], kw - 1:kw - 1 + image.shape[1]]


def _jpeg(image01: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(image01, 0, 1) * 255).astype(np.uint8)).save(buf, format="JPEG",
                                                                                  quality=int(quality))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"), np.float32) / 255.0


def bsr_degrade(image: np.ndarray, out_size: int | tuple[int, int], rng: np.random.Generator, *,
                blur_sigma: tuple[float, float] = (0.2, 3.0), blur_kernel: tuple[int, int] = (7, 21),
                noise_sigma: tuple[float, float] = (1 / 255, 25 / 255), jpeg_quality: tuple[int, int] = (30, 95)
                ) -> np.ndarray:
    """BSR-style degradation of one high-resolution image to ``out_size`` (host side).

    Steps, in a random order: (a) blur with a random anisotropic Gaussian kernel (side
    ``blur_kernel``, σx, σy ~ U(``blur_sigma``), random rotation); (b) resize to a random
    size between the input and the output size with a random filter (bicubic / bilinear /
    box); (c) additive Gaussian noise, σ ~ U(``noise_sigma``), per channel (60%) or gray;
    (d) JPEG at quality ~ U(``jpeg_quality``). Then a resize to ``out_size`` with a random
    filter and a final JPEG. Follows BSRGAN's degradation_bsrgan_variant in spirit
    (simplified: no camera-sensor noise, one blur).

    Args:
      image: (H, W, 3) float in [−1, 1].
      out_size: int (square) or (h, w).
      rng: numpy Generator (the only source of randomness).
    Returns:
      (h, w, 3) float32 in [−1, 1].
    """
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"bsr_degrade wants one (H, W, 3) image, got {image.shape}")
    h_out, w_out = (out_size, out_size) if isinstance(out_size, int) else out_size
    x = (np.asarray(image, np.float64) + 1.0) / 2.0
    methods = ("bicubic", "bilinear", "box")

    def blur(x):
        k = 2 * int(rng.integers(blur_kernel[0] // 2, blur_kernel[1] // 2 + 1)) + 1
        sx, sy = rng.uniform(*blur_sigma, size=2)
        return _convolve_reflect(x, anisotropic_gaussian_kernel(k, sx, sy, rng.uniform(0, np.pi)))

    def shrink(x):
        h = int(round(rng.uniform(h_out, x.shape[0])))
        w = int(round(w_out / h_out * h))
        return resize(x.astype(np.float32), (max(h, h_out), max(w, w_out)), method=methods[rng.integers(3)])

    def noise(x):
        sigma = rng.uniform(*noise_sigma)
        if rng.random() < 0.6:
            return x + rng.normal(0.0, sigma, x.shape)
        return x + rng.normal(0.0, sigma, x.shape[:2] + (1,))

    def jpeg(x):
        return _jpeg(x, rng.integers(jpeg_quality[0], jpeg_quality[1] + 1))

    steps = [blur, shrink, noise, jpeg]
    for i in rng.permutation(len(steps)):
        x = np.clip(steps[i](x), 0.0, 1.0)
    x = resize(x.astype(np.float32), (h_out, w_out), method=methods[rng.integers(3)])
    x = jpeg(np.clip(x, 0.0, 1.0))
    return (x * 2.0 - 1.0).astype(np.float32)
