"""The guided prior sampling loop against diffusers' UnCLIPPipeline prior loop; best-of-n.

The reference is the prior part of ``UnCLIPPipeline.__call__`` (step 2) run by hand with
the real ``PriorTransformer`` and ``UnCLIPScheduler``: z_T drawn from a torch generator,
CFG on x0 in [uncond; cond] order, ``scheduler.step(..., generator=g)`` (which draws the
per-step noise from ``g`` when t > 0), then ``post_process_latents``. Our side gets the
same draws, replicated from an identically seeded generator.
"""

import jax
import numpy as np
import pytest

import torch
import diffusers

from test_prior_model import TINY, make_reference, max_rel  # noqa: E402

from unclip_jax.convert.prior import convert_prior  # noqa: E402
from unclip_jax.stages.prior import (make_prior_sampler, sample_prior,  # noqa: E402
                                     select_best_of_n)

B, D, L = 2, 32, 77


def conditioning(seed=5):
    rng = np.random.default_rng(seed)
    text_embed = rng.standard_normal((B, D)).astype(np.float32)
    hidden = rng.standard_normal((B, L, D)).astype(np.float32)
    mask = np.zeros((B, L), bool)
    mask[0, :7] = True
    mask[1, :31] = True
    null_embed = rng.standard_normal((1, D)).astype(np.float32)
    null_hidden = rng.standard_normal((1, L, D)).astype(np.float32)
    null_mask = np.zeros((1, L), bool)
    null_mask[0, :2] = True  # "" = [SOT, EOT]
    return text_embed, hidden, mask, null_embed, null_hidden, null_mask


def diffusers_prior_loop(prior, steps, guidance_scale, clip_range, seed, cond):
    """UnCLIPPipeline.__call__ step 2, by hand. Returns (image_embeds, init latents, noise)."""
    text_embed, hidden, mask, null_embed, null_hidden, null_mask = cond
    scheduler = diffusers.UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                          num_train_timesteps=1000, clip_sample=True,
                                          clip_sample_range=clip_range)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    # [uncond; cond], as _encode_prompt concatenates them.
    prompt_embeds = torch.from_numpy(np.concatenate([np.repeat(null_embed, B, 0), text_embed]))
    hid = torch.from_numpy(np.concatenate([np.repeat(null_hidden, B, 0), hidden]))
    text_mask = torch.from_numpy(np.concatenate([np.repeat(null_mask, B, 0), mask]))
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((B, D), generator=generator) * scheduler.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            model_in = torch.cat([latents] * 2)
            pred = prior(model_in, timestep=t, proj_embedding=prompt_embeds,
                         encoder_hidden_states=hid, attention_mask=text_mask).predicted_image_embedding
            uncond, cond_ = pred.chunk(2)
            pred = uncond + guidance_scale * (cond_ - uncond)
            prev = None if i + 1 == len(timesteps) else timesteps[i + 1]
            latents = scheduler.step(pred, timestep=t, sample=latents, generator=generator,
                                     prev_timestep=prev).prev_sample
        out = prior.post_process_latents(latents).numpy()
    # Replicate the generator's draws: z_T, then one (B, D) draw per step with t > 0.
    replay = torch.Generator().manual_seed(seed)
    init = torch.randn((B, D), generator=replay).numpy()
    noise = np.stack([torch.randn((B, D), generator=replay).numpy() if int(t) > 0 else np.zeros((B, D), np.float32)
                      for t in timesteps])
    return out, init, noise


@pytest.fixture(scope="module")
def tiny_prior(tmp_path_factory):
    ref, src = make_reference(str(tmp_path_factory.mktemp("prior")), TINY, seed=2)
    params, stats, config = convert_prior(src)
    return ref, params, stats, config


@pytest.mark.parametrize("steps,clip_range", [(25, 5.0), (6, 0.3)])
def test_guided_loop_matches_diffusers(tiny_prior, steps, clip_range):
    ref, params, stats, config = tiny_prior
    cond = conditioning()
    want, init, noise = diffusers_prior_loop(ref, steps, 4.0, clip_range, seed=11, cond=cond)
    sampler = make_prior_sampler(config, steps=steps, guidance_scale=4.0, clip_range=clip_range, best_of_n=1)
    got = np.asarray(sampler(params, stats, *cond, None, init_latents=init, noise=noise))
    assert got.shape == (B, D)
    assert max_rel(got, want) <= 1e-4, max_rel(got, want)
    # The loop is sensitive to what we feed it: other noise gives another embedding.
    other = np.asarray(sampler(params, stats, *cond, None, init_latents=init, noise=noise[::-1].copy()))
    assert max_rel(other, want) > 10 * max(max_rel(got, want), 1e-5)


def test_key_driven_sampling_ddim_and_unguided(tiny_prior):
    _, params, stats, config = tiny_prior
    cond = conditioning()
    ancestral = make_prior_sampler(config, steps=4, best_of_n=2)
    a = ancestral(params, stats, *cond, jax.random.key(0))
    b = ancestral(params, stats, *cond, jax.random.key(0))
    c = ancestral(params, stats, *cond, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(np.max(np.abs(np.asarray(a) - np.asarray(c)))) > 1e-4
    init = np.random.default_rng(0).standard_normal((B, 2, D)).astype(np.float32)
    ddim = make_prior_sampler(config, steps=4, best_of_n=2, sampler="ddim")
    d1 = ddim(params, stats, *cond, jax.random.key(2), init_latents=init)
    d2 = ddim(params, stats, *cond, jax.random.key(3), init_latents=init)
    np.testing.assert_array_equal(np.asarray(d1), np.asarray(d2))  # eta = 0 is deterministic
    assert float(np.max(np.abs(np.asarray(d1) - np.asarray(a)))) > 1e-4
    u = make_prior_sampler(config, steps=4, guidance_scale=1.0, best_of_n=1)(params, stats, *cond, jax.random.key(0))
    assert np.all(np.isfinite(np.asarray(u))) and u.shape == (B, D)
    with pytest.raises(ValueError, match="init_latents"):
        sample_prior(params, stats, config, *cond, None, steps=4, best_of_n=2, init_latents=init[:, 0])
    with pytest.raises(ValueError, match="sampler"):
        sample_prior(params, stats, config, *cond, jax.random.key(0), sampler="plms")


def test_best_of_n_picks_argmax_candidate(tiny_prior):
    """Candidates folded into the batch are the same draws as separate n = 1 runs, and the
    kept one is the argmax of z_i·z_t. Running the candidates in reversed order must keep
    the same embeddings at the mirrored index, so a sampler that ignored the scores (e.g.
    always kept candidate 0) fails in at least one of the two orders."""
    _, params, stats, config = tiny_prior
    cond = conditioning()
    n, steps = 4, 3
    rng = np.random.default_rng(3)
    init = rng.standard_normal((B, n, D)).astype(np.float32)
    noise = rng.standard_normal((steps, B, n, D)).astype(np.float32)
    best_of = make_prior_sampler(config, steps=steps, best_of_n=n, return_candidates=True)
    single = make_prior_sampler(config, steps=steps, best_of_n=1)
    singles = np.stack([np.asarray(single(params, stats, *cond, None, init_latents=init[:, j],
                                          noise=noise[:, :, j])) for j in range(n)], axis=1)
    assert singles.std(axis=1).max(axis=-1).min() > 1e-3  # the candidates differ
    dots = np.einsum("bnd,bd->bn", singles, cond[0])
    chosen = []
    for order in (np.arange(n), np.arange(n)[::-1]):
        best, (cands, scores, index) = best_of(params, stats, *cond, None, init_latents=init[:, order],
                                               noise=noise[:, :, order])
        np.testing.assert_allclose(np.asarray(cands), singles[:, order], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(index), dots[:, order].argmax(1))
        np.testing.assert_allclose(np.asarray(best), singles[np.arange(B), dots.argmax(1)], rtol=1e-5, atol=1e-5)
        chosen.append(np.asarray(index))
    assert np.any(chosen[0] != 0) or np.any(chosen[1] != 0)


def test_select_best_of_n_constructed_case():
    cands = np.zeros((2, 3, 2), np.float32)
    cands[0] = [[1, 0], [0, 1], [3, 3]]       # prompt 0 along (0, 1): candidate 2 (dot 3)
    cands[1] = [[-5, 0], [2, 0], [9, -9]]     # prompt 1 along (1, 0): candidate 2 (dot 9) ...
    text = np.array([[0, 1], [-1, 0]], np.float32)  # ... but (−1, 0): candidate 0 (dot 5)
    best, index, scores = select_best_of_n(cands, text)
    np.testing.assert_array_equal(np.asarray(index), [2, 0])
    np.testing.assert_array_equal(np.asarray(best), [[3, 3], [-5, 0]])
    np.testing.assert_array_equal(np.asarray(scores), [[0, 1, 3], [5, -2, -9]])
