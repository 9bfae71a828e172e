"""Sampler parity with diffusers' UnCLIPScheduler, DDPMScheduler and DDIMScheduler (float32,
max abs diff ≤ 1e-5), step by step and over whole loops, plus CFG and DDIM inversion.

The reference side gets exactly our per-step noise: diffusers' UnCLIP/DDPM `step` draw it
with the module-level `randn_tensor`, which is patched to return the prepared noise;
DDIMScheduler.step takes it as `variance_noise`. Our layout is channel-last, diffusers'
is channel-first: arrays are transposed at the boundary.
"""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.diffusion import gaussian as g
from unclip_jax.diffusion.samplers import (classifier_free_guidance, ddim_invert, ddim_sample, ddim_step,
                                           ddpm_sample, ddpm_step, dynamic_thresholding)
from unclip_jax.diffusion.schedule import Schedule, respace

import torch
import diffusers
import diffusers.schedulers.scheduling_ddpm as ddpm_module  # noqa: E402
import diffusers.schedulers.scheduling_unclip as unclip_module  # noqa: E402

TOL = 1e-5

# name, x shape (channel last), model output channels, prediction, variance, clip range (Karlo's settings)
KARLO_SETTINGS = [
    ("prior", (2, 16), 16, "sample", "fixed_small_log", 5.0),
    ("decoder", (2, 4, 4, 3), 6, "epsilon", "learned_range", 1.0),
    ("super_res", (2, 8, 8, 3), 3, "epsilon", "fixed_small_log", 1.0),
]


def to_torch(a):
    """Channel-last numpy → channel-first torch."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(a), -1, 1)))


def to_numpy(a):
    return np.moveaxis(a.numpy(), 1, -1)


def patched_noise(module, z):
    return mock.patch.object(module, "randn_tensor", lambda *a, **k: to_torch(z))


def random_output(rng, shape, c_out):
    out = rng.standard_normal(shape[:-1] + (c_out,)).astype(np.float32)
    c = shape[-1]
    if c_out == 2 * c:
        out[..., c:] = np.tanh(out[..., c:])  # v in [−1, 1]
    return out


class RandomModel:
    """A fixed random function f(x, t) = x·W + cos(t/100)·b written twice: jnp (ours) and numpy
    (the reference loop); the v half of a 2C output goes through tanh. W has gain 0.5, so the
    ulp-level differences between the two matmuls are damped rather than amplified over a
    loop; `scale` sizes b (large enough to exercise clipping)."""

    def __init__(self, seed, c_in, c_out, scale=1.0):
        rng = np.random.default_rng(seed)
        self.w = (rng.standard_normal((c_in, c_out)) * 0.5 / np.sqrt(c_in)).astype(np.float32)
        self.b = (rng.standard_normal(c_out) * scale).astype(np.float32)
        self.c_in, self.c_out = c_in, c_out

    def jax(self, x, t):
        tt = g.broadcast_to_rank(jnp.cos(t.astype(jnp.float32) * 0.01), x.ndim)
        h = jnp.einsum("...i,io->...o", x, self.w) + tt * self.b
        if self.c_out == 2 * self.c_in:
            h = jnp.concatenate([h[..., :self.c_in], jnp.tanh(h[..., self.c_in:])], -1)
        return h

    def numpy(self, x, t):
        tt = np.float32(np.cos(np.float32(t) * np.float32(0.01)))
        h = (np.einsum("...i,io->...o", x, self.w) + tt * self.b).astype(np.float32)
        if self.c_out == 2 * self.c_in:
            h[..., self.c_in:] = np.tanh(h[..., self.c_in:])
        return h


@pytest.fixture(scope="module")
def cosine():
    return Schedule.create("cosine")


# ---------------------------------------------------------------- UnCLIPScheduler


@pytest.mark.parametrize("setting", KARLO_SETTINGS, ids=[s[0] for s in KARLO_SETTINGS])
def test_unclip_scheduler_step_parity(setting, cosine):
    name, shape, c_out, pt, vt, clip = setting
    ref = diffusers.UnCLIPScheduler(variance_type=vt, prediction_type=pt, clip_sample=True, clip_sample_range=clip)
    n = 7 if name == "super_res" else 25
    ref.set_timesteps(n)
    ts = respace(n)
    assert ref.timesteps.tolist() == ts.tolist()
    step = jax.jit(lambda o, t, tp, x, z: ddpm_step(cosine, o, t, tp, x, z, prediction_type=pt, variance_type=vt,
                                                     clip_range=clip, return_x0=True))
    rng = np.random.default_rng(0)
    # Every listed step, plus unit steps (β from the table) near both ends.
    pairs = [(t, ts[i + 1] if i + 1 < n else t - 1) for i, t in enumerate(ts)] + [(1, 0), (2, 1), (999, 998)]
    for t, tp in pairs:
        x = rng.standard_normal(shape).astype(np.float32)
        out = random_output(rng, shape, c_out)
        z = rng.standard_normal(shape).astype(np.float32)
        with patched_noise(unclip_module, z):
            r = ref.step(to_torch(out), int(t), to_torch(x), prev_timestep=int(tp))
        x_prev, x0 = step(out, int(t), int(tp), x, z)
        np.testing.assert_allclose(x_prev, to_numpy(r.prev_sample), atol=TOL, rtol=0, err_msg=f"{name} t={t}")
        np.testing.assert_allclose(x0, to_numpy(r.pred_original_sample), atol=TOL, rtol=0)


def unclip_reference_loop(ref, model, x, noise):
    """UnCLIPPipeline's loop: prev = next listed timestep, or t − 1 on the last step."""
    ts = ref.timesteps.tolist()
    xt = to_torch(x)
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else None
        out = to_torch(model.numpy(to_numpy(xt), t))
        with patched_noise(unclip_module, noise[i]):
            xt = ref.step(out, t, xt, prev_timestep=prev).prev_sample
    return to_numpy(xt)


@pytest.mark.parametrize("setting", KARLO_SETTINGS, ids=[s[0] for s in KARLO_SETTINGS])
def test_unclip_scheduler_loop_parity(setting, cosine):
    name, shape, c_out, pt, vt, clip = setting
    n = 7 if name == "super_res" else 25
    ref = diffusers.UnCLIPScheduler(variance_type=vt, prediction_type=pt, clip_sample=True, clip_sample_range=clip)
    ref.set_timesteps(n)
    model = RandomModel(1, shape[-1], c_out, scale=3.0 if pt == "sample" else 1.0)
    rng = np.random.default_rng(2)
    x_T = rng.standard_normal(shape).astype(np.float32)
    noise = rng.standard_normal((n,) + shape).astype(np.float32)
    sample = jax.jit(lambda x, z: ddpm_sample(model.jax, x, respace(n), cosine, noise=z, prediction_type=pt,
                                              variance_type=vt, clip_range=clip))
    ours = np.asarray(sample(x_T, noise))
    theirs = unclip_reference_loop(ref, model, x_T, noise)
    assert np.abs(theirs).max() > 0.1  # not a degenerate all-zero result
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)


def test_ddpm_sample_key_noise_is_fold_in_per_step(cosine):
    """`key` draws step i's noise from fold_in(key, i): equal to passing that noise explicitly."""
    model = RandomModel(3, 3, 3)
    ts = respace(5)
    x_T = jnp.asarray(np.random.default_rng(4).standard_normal((2, 4, 4, 3)), jnp.float32)
    key = jax.random.key(7)
    noise = jax.jit(lambda k: jnp.stack([jax.random.normal(jax.random.fold_in(k, i), x_T.shape)
                                         for i in range(len(ts))]))(key)
    kw = dict(prediction_type="epsilon", variance_type="fixed_small_log", clip_range=1.0)
    a = jax.jit(lambda x: ddpm_sample(model.jax, x, ts, cosine, key, **kw))(x_T)
    b = jax.jit(lambda x: ddpm_sample(model.jax, x, ts, cosine, noise=noise, **kw))(x_T)
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)  # different fusion: ulps
    with pytest.raises(ValueError, match="key"):
        ddpm_sample(model.jax, x_T, ts, cosine, **kw)
    with pytest.raises(ValueError, match="noise must have shape"):
        ddpm_sample(model.jax, x_T, ts, cosine, noise=noise[:2], **kw)
    with pytest.raises(ValueError, match="descending"):
        ddpm_sample(model.jax, x_T, ts[::-1], cosine, key, **kw)


# ---------------------------------------------------------------- DDPMScheduler


DDPM_CONFIGS = [
    # (beta schedule, variance, prediction, clip/threshold kwargs, output channels ×)
    ("squaredcos_cap_v2", "fixed_small", "v_prediction", dict(clip_sample=True), 1),
    ("linear", "fixed_large", "epsilon", dict(clip_sample=False, thresholding=True,
                                               dynamic_thresholding_ratio=0.9, sample_max_value=3.0), 1),
    ("squaredcos_cap_v2", "learned_range", "epsilon", dict(clip_sample=True), 2),
    ("linear", "fixed_small_log", "sample", dict(clip_sample=True, clip_sample_range=2.0), 1),
]


def _our_kwargs(cfg):
    _, vt, pt, kw, _ = cfg
    out = dict(prediction_type=pt, variance_type=vt, beta_rule="ddpm")
    if kw.get("thresholding"):
        out.update(dynamic_threshold=kw["dynamic_thresholding_ratio"], dynamic_threshold_max=kw["sample_max_value"])
    elif kw.get("clip_sample"):
        out.update(clip_range=kw.get("clip_sample_range", 1.0))
    return out


@pytest.mark.parametrize("cfg", DDPM_CONFIGS, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in DDPM_CONFIGS])
def test_ddpm_scheduler_parity(cfg):
    beta_schedule, vt, pt, kw, mult = cfg
    sched = Schedule.create("cosine" if beta_schedule == "squaredcos_cap_v2" else "linear")
    shape = (2, 4, 4, 3)
    rng = np.random.default_rng(5)
    kwargs = _our_kwargs(cfg)

    # Unit steps (no set_timesteps: prev = t − 1).
    ref = diffusers.DDPMScheduler(beta_schedule=beta_schedule, variance_type=vt, prediction_type=pt, **kw)
    if beta_schedule == "linear":  # our float64 linspace differs from torch's float32 one by ulps
        ref = diffusers.DDPMScheduler(trained_betas=np.asarray(sched.betas), variance_type=vt, prediction_type=pt, **kw)
    step = jax.jit(lambda o, t, tp, x, z: ddpm_step(sched, o, t, tp, x, z, return_x0=True, **kwargs))
    for t in (999, 700, 250, 10, 1, 0):
        x = (rng.standard_normal(shape) * (1.5 if t else 0.3)).astype(np.float32)
        out = random_output(rng, shape, 3 * mult)
        z = rng.standard_normal(shape).astype(np.float32)
        with patched_noise(ddpm_module, z):
            r = ref.step(to_torch(out), t, to_torch(x))
        x_prev, x0 = step(out, t, t - 1, x, z)
        np.testing.assert_allclose(x_prev, to_numpy(r.prev_sample), atol=TOL, rtol=0, err_msg=f"t={t}")
        np.testing.assert_allclose(x0, to_numpy(r.pred_original_sample), atol=TOL, rtol=0)

    # A whole loop over custom (respaced) timesteps.
    ts = respace(10)
    ref.set_timesteps(timesteps=ts.tolist())
    model = RandomModel(6, 3, 3 * mult, scale=2.0 if pt == "sample" else 1.0)
    x_T = rng.standard_normal(shape).astype(np.float32)
    noise = rng.standard_normal((len(ts),) + shape).astype(np.float32)
    xt = to_torch(x_T)
    for i, t in enumerate(ts.tolist()):
        with patched_noise(ddpm_module, noise[i]):
            xt = ref.step(to_torch(model.numpy(to_numpy(xt), t)), t, xt).prev_sample
    ours = jax.jit(lambda x, z: ddpm_sample(model.jax, x, ts, sched, noise=z, **kwargs))(x_T, noise)
    np.testing.assert_allclose(ours, to_numpy(xt), atol=TOL, rtol=0)


def test_dynamic_thresholding_matches_diffusers():
    ref = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=2.5)
    x = (np.random.default_rng(8).standard_normal((3, 5, 5, 4)) * np.array([0.3, 1.5, 4.0])[:, None, None, None])
    x = x.astype(np.float32)
    ours = dynamic_thresholding(jnp.asarray(x), 0.95, 2.5)
    np.testing.assert_allclose(ours, to_numpy(ref._threshold_sample(to_torch(x))), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(ours[0], x[0])  # s = max(1, ·) = 1 and |x| < 1 everywhere: unchanged
    assert np.abs(np.asarray(ours)).max() <= 1.0


# ---------------------------------------------------------------- DDIMScheduler


@pytest.mark.parametrize("pt", ["epsilon", "sample", "v_prediction"])
def test_ddim_scheduler_parity(pt, cosine):
    n = 20
    ref = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=pt, clip_sample=True,
                                  clip_sample_range=1.5, set_alpha_to_one=True, timestep_spacing="leading")
    ref.set_timesteps(n)
    ts = respace(f"ddim{n}")
    assert ref.timesteps.tolist() == ts.tolist()
    rng = np.random.default_rng(9)
    shape = (2, 4, 4, 3)
    kwargs = dict(prediction_type=pt, clip_range=1.5)
    for eta, clipped in ((0.0, False), (1.0, False), (0.5, True)):
        step = jax.jit(lambda o, t, tp, x, z: ddim_step(cosine, o, t, tp, x, z, eta=eta, return_x0=True,
                                                        use_clipped_model_output=clipped, **kwargs))
        for i in (0, 1, 10, n - 1):
            t, tp = int(ts[i]), int(ts[i + 1]) if i + 1 < n else -1
            x = rng.standard_normal(shape).astype(np.float32)
            out = random_output(rng, shape, 3)
            z = rng.standard_normal(shape).astype(np.float32)
            r = ref.step(to_torch(out), t, to_torch(x), eta=eta, use_clipped_model_output=clipped,
                         variance_noise=to_torch(z) if eta else None)
            x_prev, x0 = step(out, t, tp, x, z)
            np.testing.assert_allclose(x_prev, to_numpy(r.prev_sample), atol=TOL, rtol=0, err_msg=f"eta={eta} t={t}")
            np.testing.assert_allclose(x0, to_numpy(r.pred_original_sample), atol=TOL, rtol=0)

    model = RandomModel(10, 3, 3, scale=2.0 if pt == "sample" else 1.0)
    x_T = rng.standard_normal(shape).astype(np.float32)
    noise = rng.standard_normal((n,) + shape).astype(np.float32)
    for eta in (0.0, 0.5):
        xt = to_torch(x_T)
        for i, t in enumerate(ts.tolist()):
            out = to_torch(model.numpy(to_numpy(xt), t))
            xt = ref.step(out, t, xt, eta=eta, variance_noise=to_torch(noise[i]) if eta else None).prev_sample
        ours = jax.jit(lambda x, z: ddim_sample(model.jax, x, ts, cosine, noise=z if eta else None, eta=eta,
                                                **kwargs))(x_T, noise)
        np.testing.assert_allclose(ours, to_numpy(xt), atol=TOL, rtol=0, err_msg=f"eta={eta}")


# ---------------------------------------------------------------- DDIM inversion


def gaussian_data_eps(sched, m, s):
    """The exact ε-prediction E[ε | x_t] for data x_0 ~ N(m, s²) per element."""
    def model(x, t):
        ab = g.broadcast_to_rank(g.alpha_bar(sched, t), x.ndim)
        return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * m) / (ab * s ** 2 + 1 - ab)
    return model


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction"])
def test_ddim_inversion_round_trip_with_exact_model(pt, cosine):
    m, s = 0.3, 0.5
    eps_model = gaussian_data_eps(cosine, m, s)
    if pt == "epsilon":
        model = eps_model
    else:
        def model(x, t):  # the same exact model, v-parameterised: v = √ᾱ ε − √(1−ᾱ) x̂_0
            e = eps_model(x, t)
            return g.v_from_x0_eps(cosine, g.x0_from_eps(cosine, x, t, e), t, e)
    rng = np.random.default_rng(11)
    x0 = jnp.asarray(m + s * rng.standard_normal((4, 6, 6, 3)), jnp.float32)
    errors = {}
    for n in (50, 200):
        ts = respace(n)
        x_T = jax.jit(lambda x: ddim_invert(model, x, ts, cosine, prediction_type=pt))(x0)
        # For Gaussian data the DDIM ODE keeps z = (x_t − √ᾱ_t m)/√(ᾱ_t s² + 1 − ᾱ_t) fixed: exact x_T.
        ab = float(cosine.alphas_cumprod[ts[0]])
        expected = np.sqrt(ab) * m + np.sqrt(ab * s ** 2 + 1 - ab) * (np.asarray(x0) - m) / s
        x0_rec = jax.jit(lambda x: ddim_sample(model, x, ts, cosine, prediction_type=pt))(x_T)
        errors[n] = (np.abs(x_T - expected).max(), np.abs(x0_rec - x0).max())
    # First-order convergence to the exact ODE solution (measured: 0.058 → 0.017, 0.071 → 0.020).
    assert errors[200][0] < 0.025 and errors[200][1] < 0.03, errors
    assert errors[200][0] < 0.4 * errors[50][0] and errors[200][1] < 0.4 * errors[50][1], errors
    # Not vacuous: x_T is noise-like (unit variance), far from x0.
    assert abs(float(jnp.std(x_T)) - 1.0) < 0.1 and float(jnp.abs(x_T - x0).mean()) > 0.3

    # Fixed-point iterations make the inversion the exact inverse of the η = 0 sampler
    # (measured 0.066 → 1.7e-5 with 8 iterations). Timesteps stop at 979: the iteration
    # does not contract on the cosine schedule's last step into t = 999 (see ddim_invert).
    ts = respace(50)[1:]
    x_T = jax.jit(lambda x: ddim_invert(model, x, ts, cosine, prediction_type=pt, fixed_point_iters=8))(x0)
    x0_rec = jax.jit(lambda x: ddim_sample(model, x, ts, cosine, prediction_type=pt))(x_T)
    assert np.abs(x0_rec - x0).max() < 1e-4


# ---------------------------------------------------------------- classifier-free guidance


def test_classifier_free_guidance_one_call_diffusers_order():
    rng = np.random.default_rng(12)
    cond = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)  # [uncond (2); cond (2)]
    calls = []

    def model_fn(x, t):
        calls.append(x.shape)
        assert x.shape[0] == 4 and t.shape == (4,)
        return jnp.concatenate([x * cond[:, None, :3] + t[:, None, None], jnp.tanh(x + cond[:, None, 3:])], -1)

    x = jnp.asarray(rng.standard_normal((2, 5, 3)), jnp.float32)
    t = jnp.array([10, 20])
    out = classifier_free_guidance(model_fn, 4.0, guided_channels=3)(x, t)
    assert len(calls) == 1 and out.shape == (2, 5, 6)
    full = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]))
    u, c = full[:2], full[2:]
    np.testing.assert_allclose(out[..., :3], u[..., :3] + 4.0 * (c[..., :3] - u[..., :3]), rtol=1e-6)
    np.testing.assert_array_equal(out[..., 3:], c[..., 3:])
    all_guided = classifier_free_guidance(model_fn, 1.0)(x, t)  # scale 1 = the cond half
    np.testing.assert_allclose(all_guided, c, rtol=1e-6, atol=1e-6)
    per_example = classifier_free_guidance(model_fn, jnp.array([0.0, 2.0]))(x, t)
    np.testing.assert_allclose(per_example[0], u[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(per_example[1], u[1] + 2.0 * (c[1] - u[1]), rtol=1e-6, atol=1e-6)


def test_guided_sampler_jits_as_one_scan(cosine):
    """The whole CFG + DDPM chain compiles into one jit with a single scan (no Python per step)."""
    cond = jnp.ones((4, 1, 1, 3)) * jnp.array([0.0, 0.0, 1.0, 1.0])[:, None, None, None]
    model = classifier_free_guidance(lambda x, t: jnp.concatenate([0.1 * x + cond, jnp.zeros_like(x)], -1), 3.0,
                                     guided_channels=3)
    ts = respace(25)
    f = jax.jit(lambda x, k: ddpm_sample(model, x, ts, cosine, k, prediction_type="epsilon",
                                         variance_type="learned_range", clip_range=1.0))
    x_T = jnp.zeros((2, 4, 4, 3))
    jaxpr = jax.make_jaxpr(f)(x_T, jax.random.key(0)).jaxpr
    (inner,) = [e for e in jaxpr.eqns if e.primitive.name in ("jit", "pjit")]  # the jitted lambda
    scans = [e for e in inner.params["jaxpr"].jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == 25
    out = f(x_T, jax.random.key(0))
    assert out.shape == x_T.shape and bool(jnp.all(jnp.isfinite(out)))
