"""The super-resolution sampler equals diffusers' UnCLIPPipeline super-res loop.

Reference: ``UnCLIPPipeline.__call__``'s super-res section by hand — antialiased bicubic
``F.interpolate`` of the low-res image, ``super_res_first`` for all but the last step and
``super_res_last`` for the last (two differently randomised UNet2DModels, imported by our
converter), ``UnCLIPScheduler`` (fixed_small_log, ε, clip ±1) with a seeded generator. Our
side gets the same x_T and pre-drawn per-step noise. As in test_decoder_sampling.py, the
residual-branch outputs are damped and the instance's own float32 sensitivity is checked
first (see there for why).
"""

from __future__ import annotations

import os

import torch

import jax

from test_decoder_sampling import damp_residual_outputs, predrawn_noise
from test_unet_parity import (TOL, make_torch_super_res, nhwc, one_torch_thread,  # noqa: F401
                              rel_err)
from unclip_jax.convert.unet import convert_super_res
from unclip_jax.stages.upsampler import sample_upsampler


@torch.no_grad()
def diffusers_super_res_loop(first, last, image_small, latents, steps, seed):
    from diffusers import UnCLIPScheduler
    scheduler = UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon", clip_sample=True,
                                clip_sample_range=1.0, num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    height = width = first.config.sample_size
    image_upscaled = torch.nn.functional.interpolate(image_small, size=[height, width], mode="bicubic",
                                                     align_corners=False, antialias=True)
    generator = torch.Generator().manual_seed(seed)
    x = latents.clone()
    for i, t in enumerate(timesteps):
        unet = last if i == len(timesteps) - 1 else first
        noise_pred = unet(sample=torch.cat([x, image_upscaled], dim=1), timestep=t).sample
        prev = None if i + 1 == len(timesteps) else timesteps[i + 1]
        x = scheduler.step(noise_pred, t, x, prev_timestep=prev, generator=generator).prev_sample
    return x, timesteps.numpy()


def test_super_res_loop_with_last_step_swap_matches_unclip_pipeline(tmp_path):
    first, last = make_torch_super_res("tiny", seed=3), make_torch_super_res("tiny", seed=4)
    damp_residual_outputs(first)
    damp_residual_outputs(last)
    first.save_pretrained(os.path.join(tmp_path, "first"))
    last.save_pretrained(os.path.join(tmp_path, "last"))
    params_first, config = convert_super_res(os.path.join(tmp_path, "first"))
    params_last, _ = convert_super_res(os.path.join(tmp_path, "last"))
    assert config["sample_size"] == 64

    steps, seed = 7, 321                     # the pipeline's default: 7 steps
    gen = torch.Generator().manual_seed(10)
    image_small = torch.rand((2, 3, 32, 32), generator=gen) * 2 - 1     # a decoder output in [-1, 1]
    latents = torch.randn((2, 3, 64, 64), generator=gen)
    ref, timesteps = diffusers_super_res_loop(first, last, image_small, latents, steps, seed)
    ref_nudged, _ = diffusers_super_res_loop(first, last, image_small, latents * (1 + 1e-6), steps, seed)
    assert rel_err(ref_nudged, ref) < 3e-5, "ill-conditioned instance: diffusers disagrees with itself"

    noise = predrawn_noise(timesteps, (2, 3, 64, 64), seed)
    ours = sample_upsampler(params_first, params_last, config, nhwc(image_small), jax.random.key(0), steps=steps,
                            init_latents=nhwc(latents), noise=noise, out_size=64)
    assert ours.shape == (2, 64, 64, 3)
    err = rel_err(ours, nhwc(ref))
    print("super-res loop rel err", err)
    assert err <= TOL

    # The swap matters: the last step with super_res_first instead gives another image.
    same = sample_upsampler(params_first, params_first, config, nhwc(image_small), jax.random.key(0), steps=steps,
                            init_latents=nhwc(latents), noise=noise, out_size=64)
    assert rel_err(same, nhwc(ref)) > 1e-3
