"""End to end: a tiny random-weight diffusers UnCLIPPipeline, saved as users download Karlo,
converted by ``python -m unclip_jax.convert karlo``, sampled by our pipeline with the same
initial latents and per-step noise: the same images."""

import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipeline_fixtures import torch_nchw
from unclip_jax import pipeline as pl

import torch
import diffusers  # noqa: F401 - the reference side must be installed

PROMPTS = ["a red horse", "a photo of a small blue square"]
STEPS = dict(prior_steps=3, decoder_steps=4, upsampler_steps=3)
SEED = 7


@pytest.fixture(scope="module")
def karlo(tiny_karlo):
    return tiny_karlo


@contextlib.contextmanager
def scheduler_noise(queue):
    """Feeds diffusers' UnCLIPScheduler.step the given noise tensors, in order."""
    import diffusers.schedulers.scheduling_unclip as mod
    original = mod.randn_tensor

    def fake(shape, generator=None, device=None, dtype=None, layout=None):
        noise = queue.pop(0)
        assert tuple(noise.shape) == tuple(shape), (noise.shape, shape)
        return noise.to(dtype)
    mod.randn_tensor = fake
    try:
        yield
    finally:
        mod.randn_tensor = original
    assert not queue, f"{len(queue)} noise tensors were not used"


def _stage_noise(stage: int, shape, steps: int, batch: int, sub: int | None = None):
    key = jax.random.fold_in(jax.random.PRNGKey(SEED), stage)
    if sub is not None:
        key = jax.random.fold_in(key, sub)
    return pl.example_noise(key, jnp.arange(batch), shape, steps)


def test_converted_karlo_reproduces_diffusers_images(karlo):
    ref, _, out = karlo
    pipe = pl.load_pipeline(out)
    b = len(PROMPTS)

    # Our side, stage by stage (floats, before uint8).
    text = pipe.encode_text(PROMPTS)
    z_i = pipe.prior(text, SEED, best_of_n=1, **STEPS)
    small = pipe.decode(z_i, text, SEED, **STEPS)
    big = pipe.upsample(small, SEED, **STEPS)
    ours = np.clip(np.asarray(big) / 2 + 0.5, 0, 1)

    # diffusers with the same x_T and per-step noise (the last step of each loop draws none).
    prior_init, prior_noise = _stage_noise(pl._STAGE_PRIOR, (1, 32), STEPS["prior_steps"], b)
    dec_init, dec_noise = _stage_noise(pl._STAGE_DECODER, (32, 32, 3), STEPS["decoder_steps"], b)
    sr_init, sr_noise = _stage_noise(pl._STAGE_UPSAMPLER, (64, 64, 3), STEPS["upsampler_steps"], b, sub=0)
    queue = ([torch_nchw(n[:, 0]) for n in np.asarray(prior_noise)[:-1]]
             + [torch_nchw(n) for n in np.asarray(dec_noise)[:-1]]
             + [torch_nchw(n) for n in np.asarray(sr_noise)[:-1]])
    with scheduler_noise(queue), torch.no_grad():
        theirs = ref(PROMPTS, prior_num_inference_steps=STEPS["prior_steps"],
                     decoder_num_inference_steps=STEPS["decoder_steps"],
                     super_res_num_inference_steps=STEPS["upsampler_steps"],
                     prior_latents=torch_nchw(np.asarray(prior_init)[:, 0]),
                     decoder_latents=torch_nchw(dec_init), super_res_latents=torch_nchw(sr_init),
                     output_type="np").images
    assert theirs.shape == ours.shape == (b, 64, 64, 3)
    assert np.abs(theirs - ours).max() <= 1e-3, np.abs(theirs - ours).max()
    # The images are not trivial (saturated or constant): the comparison has teeth.
    assert 0.05 < ours.std() and 0.02 < ours.mean() < 0.98

    # The uint8 cascade API gives the same pictures.
    result = pipe.text_to_image(PROMPTS, SEED, best_of_n=1, **STEPS)
    assert result["images"].dtype == np.uint8 and result["images"].shape == (b, 64, 64, 3)
    assert np.abs(result["images"].astype(np.float32) / 255 - ours).max() <= 1 / 255 + 1e-3
    # One prompt at a time: each prompt keeps its noise (its index in the list), so the same pictures.
    chunked = pipe.text_to_image(PROMPTS, SEED, best_of_n=1, max_batch=1, **STEPS)
    assert chunked["images"].shape == result["images"].shape
    assert np.abs(chunked["images"].astype(int) - result["images"].astype(int)).max() <= 1
    np.testing.assert_allclose(chunked["image_embeds"], result["image_embeds"], atol=1e-4)


def test_pipeline_rejects_bad_input_before_compiling(karlo):
    pipe = pl.load_pipeline(karlo[2])
    with pytest.raises(pl.PipelineError, match="no prompts"):
        pipe.text_to_image([])
    with pytest.raises(pl.PipelineError, match="decoder_guidance"):
        pipe.text_to_image(["a horse"], decoder_guidance=-1.0)
    with pytest.raises(pl.PipelineError, match="prior_steps"):
        pipe.text_to_image(["a horse"], prior_steps=0)
    with pytest.raises(pl.PipelineError, match="unknown sampling setting"):
        pipe.text_to_image(["a horse"], decoder_stpes=3)
    with pytest.raises(pl.PipelineError, match="max_batch"):
        pipe.text_to_image(["a horse"], max_batch=0)
    with pytest.raises(pl.PipelineError, match="no image tower"):
        pipe.variations([np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(pl.PipelineError, match="not a pipeline directory"):
        pl.load_pipeline(os.path.dirname(karlo[2]))
