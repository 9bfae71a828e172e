"""Pallas splash attention (``implementation="splash"``), run in interpret mode on CPU.

Checked three ways: against the XLA path (outputs and gradients, masks, odd lengths), through
whole models against the PyTorch references (diffusers' prior and decoder, transformers'
CLIP), and sharded over 8 fake CPU devices under ``jax.set_mesh`` (the ``shard_map`` path a
TPU pod takes). Not checked here: the Mosaic compile and speed on a real TPU.
"""

import dataclasses
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.subprocesses import assert_same_pictures, child_env, run_two_processes
from unclip_jax.models.attention import dot_product_attention


def _qkv(seed, batch, q_len, kv_len, heads, dim, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, q_len, heads, dim))
    k, v = (rng.standard_normal((batch, kv_len, heads, dim)) for _ in range(2))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _key_mask(batch, kv_len, visible):
    return jnp.arange(kv_len)[None, :] < jnp.asarray(visible)[:, None]


@pytest.mark.parametrize("causal", [False, True])
def test_splash_matches_xla_outputs_and_gradients(causal):
    # Odd lengths (padded to 128 inside), a key mask per example, a non-default scale.
    q_len = kv_len = 81 if causal else None
    q, k, v = _qkv(0, 3, q_len or 37, kv_len or 145, 2, 16)
    kv_len = k.shape[1]
    mask = _key_mask(3, kv_len, [kv_len, 20, 3])
    for scale in (None, 0.3):
        attend = lambda impl: lambda q, k, v: dot_product_attention(
            q, k, v, key_mask=mask, is_causal=causal, scale=scale, implementation=impl)
        ours, xla = attend("splash"), attend("xla")
        np.testing.assert_allclose(ours(q, k, v), xla(q, k, v), atol=2e-6)
        loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
        for a, b in zip(jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v),
                        jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)):
            np.testing.assert_allclose(a, b, atol=2e-5)
    # The masked keys take no weight: changing their values changes nothing.
    v2 = v.at[1, 25:].add(100.0)
    np.testing.assert_allclose(ours(q, k, v2)[1], ours(q, k, v)[1], atol=2e-6)


def test_splash_in_bfloat16_and_without_a_mask():
    q, k, v = _qkv(1, 2, 64, 64, 4, 32, jnp.bfloat16)
    ours = dot_product_attention(q, k, v, implementation="splash")
    xla = dot_product_attention(q, k, v, implementation="xla")
    assert ours.dtype == jnp.bfloat16 and ours.shape == q.shape
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(xla, np.float32), atol=2e-2)


def test_bad_attention_requests_fail_clearly():
    q, k, v = _qkv(2, 1, 4, 4, 1, 8)
    with pytest.raises(ValueError, match="not an additive bias"):
        dot_product_attention(q, k, v, bias=jnp.zeros((1, 1, 4, 4)), implementation="splash")
    with pytest.raises(ValueError, match="not one of"):
        dot_product_attention(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match="equal query and key lengths"):
        dot_product_attention(q, k[:, :3], v[:, :3], is_causal=True, implementation="splash")


def test_prior_with_splash_matches_diffusers(tmp_path):
    from test_prior_model import TINY, make_inputs, make_reference, max_rel, torch_forward
    from unclip_jax.convert.prior import convert_prior
    from unclip_jax.models.prior import prior_from_config

    ref, src = make_reference(str(tmp_path), TINY)
    params, _, config = convert_prior(src)
    model = prior_from_config(config, attention_impl="splash")
    inputs = make_inputs(3, 32, pad_from=[5, 20, 77])
    got = np.asarray(jax.jit(model.apply)({"params": params}, *inputs))
    assert max_rel(got, torch_forward(ref, *inputs)) <= 1e-4


def test_decoder_with_splash_matches_diffusers(tmp_path):
    from test_unet_parity import (decoder_inputs, make_torch_decoder, rel_err, save_decoder,
                                  torch_decoder_forward, TOL)
    from unclip_jax.convert.unet import convert_decoder
    from unclip_jax.models.text_proj import TextProj
    from unclip_jax.models.unet import unet_from_config

    unet_ref, proj_ref = make_torch_decoder("tiny")
    params, config = convert_decoder(*save_decoder(unet_ref, proj_ref, str(tmp_path)))
    proj = TextProj(**config["text_proj"])
    unet = unet_from_config({**config["unet"], "attention_impl": "splash"})

    @jax.jit
    def forward(x, t, image_embed, text_embed, text_hidden, text_mask):
        context, context_mask, added = proj.apply({"params": params["text_proj"]}, image_embed,
                                                  text_embed, text_hidden, text_mask)
        return unet.apply({"params": params["unet"]}, x, t, added_emb=added, context=context,
                          context_mask=context_mask)

    inp = decoder_inputs(np.random.default_rng(1), batch=2, size=32, clip_dim=32, padded=True)
    ours = forward(inp["x"], jnp.full((2,), 517.0), inp["image_embed"], inp["text_embed"],
                   inp["text_hidden"], inp["text_mask"])
    assert rel_err(ours, torch_decoder_forward(unet_ref, proj_ref, inp, 517)) <= TOL


def test_clip_text_with_splash_matches_transformers(tmp_path):
    import torch
    from test_clip_parity import ATOL, _clip_model, _token_batch
    from unclip_jax.convert import clip as convert_clip
    from unclip_jax.models.clip import CLIPModel

    ref = _clip_model("quick_gelu", 2)
    ref.save_pretrained(tmp_path / "hf")
    config, params = convert_clip.load_hf(str(tmp_path / "hf"))
    model = CLIPModel(dataclasses.replace(config, attention="splash"))
    ids, mask = _token_batch(2)
    with torch.no_grad():
        want = ref.get_text_features(input_ids=torch.tensor(ids),
                                     attention_mask=torch.tensor(mask.astype(np.int64)))
    embeds, hidden = model.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask),
                                 method="encode_text")
    assert np.abs(np.asarray(embeds) - want.pooler_output.numpy()).max() < ATOL
    assert np.abs(np.asarray(hidden) - want.last_hidden_state.numpy()).max() < ATOL


SHARDED = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from unclip_jax import parallel
    from unclip_jax.models.attention import dot_product_attention

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((8, 81, 4, 16)), jnp.float32) for _ in range(3))
    mask = jnp.arange(81)[None, :] < jnp.asarray([81, 60, 5, 30, 81, 2, 77, 40])[:, None]
    # batch 8 over data x fsdp (heads over tensor), batch 4 over data alone, batch 3 replicated
    for data, fsdp, tensor, batch in ((4, 2, 1, 8), (2, 2, 2, 8), (4, 2, 1, 4), (8, 1, 1, 3)):
        mesh = parallel.make_mesh(data, fsdp, tensor)
        put = lambda x: jax.device_put(x[:batch], parallel.batch_sharding(mesh) if batch == 8
                                       else parallel.replicated(mesh))
        args = [put(x) for x in (q, k, v, mask)]
        def loss(impl):
            def f(q, k, v, m):
                out = dot_product_attention(q, k, v, key_mask=m, is_causal=True, implementation=impl)
                return jnp.sum(jnp.sin(out)), out
            return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
        with jax.set_mesh(mesh):
            (_, ours), grads = loss("splash")(*args)
            text = loss("splash").lower(*args).as_text()
        (_, want), want_grads = loss("xla")(*args)
        np.testing.assert_allclose(ours, want, atol=2e-6)
        for a, b in zip(grads, want_grads):
            np.testing.assert_allclose(a, b, atol=2e-5)
        assert ("shard_map" in text or "sdy.manual_computation" in text), "no shard_map in the program"
        print("ok", data, fsdp, tensor, batch)
""")


def test_splash_shards_over_a_mesh_of_8_fake_devices():
    proc = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=child_env(),
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("ok") == 4, proc.stdout


PIPELINE_ON_8 = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import numpy as np
    from unclip_jax.models import splash as splash_lib
    from tests.subprocesses import assert_same_pictures
    from unclip_jax.pipeline import load_pipeline
    placements, mesh_specs = [], splash_lib._mesh_specs
    splash_lib._mesh_specs = lambda *a: placements.append(mesh_specs(*a)) or placements[-1]
    prompts = ["a red horse", "a blue square", "a small circle", "a green tree"]
    run = lambda pipe: pipe.text_to_image(prompts, 3, prior_steps=2, decoder_steps=2, upsampler_steps=2)
    splash = load_pipeline(sys.argv[1], attention="splash")
    assert splash.clip_config.attention == "splash"
    assert splash.prior_config["attention_impl"] == "splash"
    assert splash.decoder_config["unet"]["attention_impl"] == "splash"
    assert all(up.config["unet"]["attention_impl"] == "splash" for up in splash.upsamplers)
    xla = load_pipeline(sys.argv[1])
    a, b = run(splash), run(xla)
    np.testing.assert_allclose(a["image_embeds"], b["image_embeds"], atol=1e-5)
    assert_same_pictures(a["images"], b["images"])
    # Every splash call ran under the pipeline's 8-device mesh (inside shard_map); the prior's
    # and decoder's batches (padded to 8) and CLIP's 8 prompts split over it, the empty
    # prompt's batch of 1 ran replicated.
    assert placements and all(p is not None and p[0].shape["data"] == 8 for p in placements), placements
    assert sum(p[1][0] is not None for p in placements) >= 3, placements
    splash.encode_text(prompts * 2)
    assert placements[-1][1][0] in ("data", ("data",)), placements[-1]
    print("ok")
""")


def test_pipeline_with_splash_on_8_fake_devices_matches_xla(tiny_karlo):
    """The imported tiny Karlo cascade, every network's attention through splash (sharded
    over the pipeline's mesh): the same embeddings and pictures as the XLA path."""
    proc = subprocess.run([sys.executable, "-c", PIPELINE_ON_8, tiny_karlo[2]], capture_output=True, text=True,
                          env=child_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ok" in proc.stdout


TWO_PROCESSES = textwrap.dedent("""
    import sys
    import numpy as np
    from unclip_jax import parallel
    assert parallel.init_distributed(f"localhost:{sys.argv[2]}", 2, int(sys.argv[3]))
    import jax
    from unclip_jax.pipeline import load_pipeline
    assert jax.device_count() == 4
    pipe = load_pipeline(sys.argv[1], attention="splash")
    out = pipe.text_to_image(["a red horse", "a blue square", "a small circle", "a green tree"], 5,
                             prior_steps=2, decoder_steps=2, upsampler_steps=2)
    np.save(sys.argv[4], out["images"])
""")


def test_pipeline_with_splash_on_two_processes(tiny_karlo, tmp_path):
    """Two processes with 2 devices each: splash's shard_map spans both, CLIP included (4
    prompts on 4 devices); every process gets the pictures of the 1-device XLA run."""
    from unclip_jax.pipeline import load_pipeline

    env = child_env(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    paths = [str(tmp_path / f"images_{i}.npy") for i in range(2)]
    run_two_processes(lambda port, i: [sys.executable, "-c", TWO_PROCESSES, tiny_karlo[2], port, str(i), paths[i]],
                      env, timeout=900)
    want = load_pipeline(tiny_karlo[2]).text_to_image(
        ["a red horse", "a blue square", "a small circle", "a green tree"], 5,
        prior_steps=2, decoder_steps=2, upsampler_steps=2)["images"]
    for path in paths:
        assert_same_pictures(np.load(path), want)


def test_load_pipeline_compute_settings(tiny_karlo):
    from unclip_jax.pipeline import PipelineError, load_pipeline

    pipe = load_pipeline(tiny_karlo[2], dtype="bfloat16")
    assert pipe.clip_config.dtype == "bfloat16" and pipe.prior_config["dtype"] == "bfloat16"
    assert pipe.decoder_config["unet"]["dtype"] == pipe.decoder_config["text_proj"]["dtype"] == "bfloat16"
    assert pipe.upsamplers and all(up.config["unet"]["dtype"] == "bfloat16" for up in pipe.upsamplers)
    # Attention kept as saved; parameters stay float32.
    assert pipe.decoder_config["unet"].get("attention_impl", "xla") == load_pipeline(
        tiny_karlo[2]).decoder_config["unet"].get("attention_impl", "xla")
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(pipe.decoder_params))
    out = pipe.text_to_image(["a red horse"], 0, prior_steps=2, decoder_steps=2, upsampler_steps=2)
    assert out["images"].shape == (1, 64, 64, 3) and out["images"].std() > 0
    with pytest.raises(PipelineError, match="dtype"):
        load_pipeline(tiny_karlo[2], dtype="int8")
    with pytest.raises(PipelineError, match="attention"):
        load_pipeline(tiny_karlo[2], attention="flash")
    with pytest.raises(PipelineError, match="needs an NVIDIA GPU"):
        load_pipeline(tiny_karlo[2], attention="cudnn")
