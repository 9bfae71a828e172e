"""Parity of our UNet / TextProj with diffusers' Karlo modules, through our importer.

The references are diffusers ``UNet2DConditionModel`` (Karlo decoder layout),
``UnCLIPTextProjModel`` and ``UNet2DModel`` (Karlo super-res layout) with tiny configs
and ALL parameters randomised (also those diffusers zero-initialises, e.g. conv_out), saved
with ``save_pretrained`` and imported by ``unclip_jax.convert.unet``. The helpers here are
shared with ``test_unet_karlo.py`` and the sampler tests.
"""

from __future__ import annotations

import gc
import json
import os

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from unclip_jax.convert.common import ConversionError
from unclip_jax.convert.unet import (convert_decoder, convert_super_res, torch_name,
                                     unet_config_from_diffusers)
from unclip_jax.models.text_proj import TextProj
from unclip_jax.models.unet import unet_from_config

TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small torch models run several times faster on one thread on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- reference builders

def decoder_kwargs(size="tiny"):
    if size == "karlo":
        return dict(sample_size=64, layers_per_block=3, block_out_channels=(320, 640, 960, 1280),
                    down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
                    up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
                    cross_attention_dim=1536, attention_head_dim=64)
    if size == "tiny3":   # three levels, two resblocks per level: skip bookkeeping
        return dict(sample_size=16, layers_per_block=2, block_out_channels=(32, 64, 96),
                    down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 2,
                    up_block_types=("SimpleCrossAttnUpBlock2D",) * 2 + ("ResnetUpsampleBlock2D",),
                    cross_attention_dim=100, attention_head_dim=8)
    # REFERENCE §6: the deleted diffusers test's dummy decoder.
    return dict(sample_size=32, layers_per_block=1, block_out_channels=(32, 64),
                down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                cross_attention_dim=100, attention_head_dim=4)


def make_torch_decoder(size="tiny", seed=0):
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.deprecated.unclip import UnCLIPTextProjModel
    kw = decoder_kwargs(size)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(in_channels=3, out_channels=6, mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                                class_embed_type="identity", resnet_time_scale_shift="scale_shift", **kw)
    clip_dim = 768 if size == "karlo" else 32
    proj = UnCLIPTextProjModel(clip_embeddings_dim=clip_dim, time_embed_dim=4 * kw["block_out_channels"][0],
                               cross_attention_dim=kw["cross_attention_dim"])
    randomize(unet, seed + 1)
    randomize(proj, seed + 2)
    return unet.eval(), proj.eval()


def make_torch_super_res(size="tiny", seed=0):
    from diffusers import UNet2DModel
    if size == "karlo":
        kw = dict(sample_size=256, layers_per_block=3, block_out_channels=(320, 640, 960, 1280))
    else:
        kw = dict(sample_size=64, layers_per_block=1, block_out_channels=(32, 64))
    levels = len(kw["block_out_channels"])
    torch.manual_seed(seed)
    unet = UNet2DModel(in_channels=6, out_channels=3, add_attention=False,
                       down_block_types=("ResnetDownsampleBlock2D",) * levels,
                       up_block_types=("ResnetUpsampleBlock2D",) * levels, **kw)
    randomize(unet, seed + 1)
    return unet.eval()


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (scaled so activations stay O(1)), zero-inits included."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if p.ndim >= 2:
            p.copy_(noise / np.sqrt(p[0].numel()))
        elif name.endswith("weight"):          # norm scales
            p.copy_(1.0 + 0.2 * noise)
        else:                                   # biases, null embedding
            p.copy_(0.2 * noise)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def save_decoder(unet, proj, root):
    unet.save_pretrained(os.path.join(root, "decoder"))
    proj.save_pretrained(os.path.join(root, "text_proj"))
    return os.path.join(root, "decoder"), os.path.join(root, "text_proj")


def decoder_inputs(rng, batch, size, clip_dim, text_len=7, padded=True):
    """Random decoder inputs; with ``padded`` every row but the first has padding."""
    mask = np.ones((batch, text_len), bool)
    if padded:
        for b in range(1, batch):
            mask[b, 2 + b:] = False
    return dict(x=rng.standard_normal((batch, size, size, 3)).astype(np.float32),
                image_embed=rng.standard_normal((batch, clip_dim)).astype(np.float32),
                text_embed=rng.standard_normal((batch, clip_dim)).astype(np.float32),
                text_hidden=rng.standard_normal((batch, text_len, clip_dim)).astype(np.float32),
                text_mask=mask)


@torch.no_grad()
def torch_decoder_forward(unet, proj, inp, t):
    hid, added = proj(image_embeddings=torch.from_numpy(inp["image_embed"]),
                      prompt_embeds=torch.from_numpy(inp["text_embed"]),
                      text_encoder_hidden_states=torch.from_numpy(inp["text_hidden"]),
                      do_classifier_free_guidance=False)
    mask = torch.nn.functional.pad(torch.from_numpy(inp["text_mask"]), (proj.clip_extra_context_tokens, 0),
                                   value=True)
    out = unet(nchw(inp["x"]), torch.tensor(t), encoder_hidden_states=hid, class_labels=added,
               attention_mask=mask).sample
    return nhwc(out)


_JITTED = {}


def _decoder_fn(config):
    key = json.dumps(config, sort_keys=True)
    if key not in _JITTED:
        proj = TextProj(**config["text_proj"])
        unet = unet_from_config(config["unet"])

        @jax.jit
        def forward(params, x, t, image_embed, text_embed, text_hidden, text_mask):
            context, context_mask, added = proj.apply({"params": params["text_proj"]}, image_embed,
                                                      text_embed, text_hidden, text_mask)
            return unet.apply({"params": params["unet"]}, x, t, added_emb=added, context=context,
                              context_mask=context_mask)
        _JITTED[key] = forward
    return _JITTED[key]


def jax_decoder_forward(params, config, inp, t):
    """Our TextProj + UNet on ``inp`` at timestep ``t`` (jitted once per config)."""
    return _decoder_fn(config)(params, inp["x"], jnp.full((inp["x"].shape[0],), t, jnp.float32),
                               inp["image_embed"], inp["text_embed"], inp["text_hidden"], inp["text_mask"])


# ---------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory):
    unet, proj = make_torch_decoder("tiny")
    dirs = save_decoder(unet, proj, str(tmp_path_factory.mktemp("decoder")))
    params, config = convert_decoder(*dirs)
    return unet, proj, params, config


@pytest.mark.parametrize("padded", [False, True])
def test_tiny_decoder_matches_diffusers(tiny_decoder, padded):
    unet, proj, params, config = tiny_decoder
    inp = decoder_inputs(np.random.default_rng(1), batch=3, size=32, clip_dim=32, padded=padded)
    for t in (0, 517, 999):
        ref = torch_decoder_forward(unet, proj, inp, t)
        ours = jax_decoder_forward(params, config, inp, t)
        assert ours.shape == ref.shape == (3, 32, 32, 6)
        assert rel_err(ours, ref) <= TOL, (t, rel_err(ours, ref))
        print("decoder", padded, t, rel_err(ours, ref))


def test_text_padding_changes_output(tiny_decoder):
    """The mask is honoured: hiding tokens changes the output, and the hidden tokens' values
    then no longer matter."""
    _, _, params, config = tiny_decoder
    inp = decoder_inputs(np.random.default_rng(2), batch=2, size=32, clip_dim=32, padded=False)
    full = jax_decoder_forward(params, config, inp, 300)
    masked = dict(inp, text_mask=inp["text_mask"].copy())
    masked["text_mask"][:, 4:] = False
    out_masked = jax_decoder_forward(params, config, masked, 300)
    assert rel_err(out_masked, full) > 1e-3
    scrambled = dict(masked, text_hidden=masked["text_hidden"].copy())
    scrambled["text_hidden"][:, 4:] = 7.0
    assert rel_err(jax_decoder_forward(params, config, scrambled, 300), out_masked) < 1e-5


def test_text_proj_matches_diffusers_with_null_embedding(tiny_decoder):
    _, proj, params, config = tiny_decoder
    inp = decoder_inputs(np.random.default_rng(3), batch=2, size=32, clip_dim=32)
    with torch.no_grad():
        hid, added = proj(image_embeddings=torch.from_numpy(inp["image_embed"]),
                          prompt_embeds=torch.from_numpy(np.concatenate([inp["text_embed"]] * 2)),
                          text_encoder_hidden_states=torch.from_numpy(np.concatenate([inp["text_hidden"]] * 2)),
                          do_classifier_free_guidance=True)      # rows [null image; image]
    model = TextProj(**config["text_proj"])
    both = {k: np.concatenate([inp[k]] * 2) for k in ("image_embed", "text_embed", "text_hidden", "text_mask")}
    drop = np.array([True, True, False, False])
    context, context_mask, ours_added = model.apply({"params": params["text_proj"]}, both["image_embed"],
                                                    both["text_embed"], both["text_hidden"], both["text_mask"],
                                                    drop_image=drop)
    assert context.shape == (4, 4 + 7, 100) and context_mask.shape == (4, 11)
    assert bool(context_mask[:, :4].all())
    assert rel_err(context, hid.numpy()) <= TOL
    assert rel_err(ours_added, added.numpy()) <= TOL
    null = model.apply({"params": params["text_proj"]}, 3, method=TextProj.null_image_embedding)
    np.testing.assert_allclose(null[1], proj.learned_classifier_free_guidance_embeddings.detach().numpy())


def test_tiny3_decoder_matches_diffusers(tmp_path):
    unet, proj = make_torch_decoder("tiny3", seed=5)
    params, config = convert_decoder(*save_decoder(unet, proj, str(tmp_path)))
    assert config["unet"]["attention_levels"] == [1, 2] and config["unet"]["num_res_blocks"] == 2
    inp = decoder_inputs(np.random.default_rng(4), batch=2, size=16, clip_dim=32)
    ref = torch_decoder_forward(unet, proj, inp, 421)
    assert rel_err(jax_decoder_forward(params, config, inp, 421), ref) <= TOL


def test_tiny_super_res_matches_diffusers(tmp_path):
    unet = make_torch_super_res("tiny")
    unet.save_pretrained(str(tmp_path))
    params, config = convert_super_res(str(tmp_path))
    assert config["unet"]["attention_levels"] == [] and not config["unet"]["mid_attention"]
    assert not config["unet"]["scale_shift_norm"] and config["sample_size"] == 64
    model = unet_from_config(config["unet"])
    forward = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))
    x = np.random.default_rng(5).standard_normal((2, 64, 64, 6)).astype(np.float32)
    for t in (0, 666):
        with torch.no_grad():
            ref = nhwc(unet(nchw(x), torch.tensor(t)).sample)
        ours = forward(params, x, jnp.full((2,), t, jnp.float32))
        assert rel_err(ours, ref) <= TOL, (t, rel_err(ours, ref))


def test_names_round_trip():
    assert torch_name(("down_blocks_1", "attentions_0", "to_out_0", "kernel")) == \
        "down_blocks.1.attentions.0.to_out.0.weight"
    assert torch_name(("time_embedding", "linear_1", "bias")) == "time_embedding.linear_1.bias"
    assert torch_name(("conv_norm_out", "scale")) == "conv_norm_out.weight"


def test_unsupported_settings_fail_clearly():
    unet, _ = make_torch_decoder("tiny")
    cfg = dict(unet.config)
    bad = dict(cfg, resnet_time_scale_shift="spatial", only_cross_attention=True,
               down_block_types=["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"], foo_bar=3)
    with pytest.raises(ConversionError) as err:
        unet_config_from_diffusers(bad)
    msg = str(err.value)
    for key in ("resnet_time_scale_shift", "only_cross_attention", "CrossAttnDownBlock2D", "foo_bar"):
        assert key in msg
    assert unet_config_from_diffusers(json.loads(json.dumps(cfg)))["context_dim"] == 100


def test_mismatched_checkpoint_lists_every_problem(tmp_path):
    unet, proj = make_torch_decoder("tiny")
    unet_dir, proj_dir = save_decoder(unet, proj, str(tmp_path))
    from safetensors.numpy import load_file, save_file
    path = os.path.join(unet_dir, "diffusion_pytorch_model.safetensors")
    state = load_file(path)
    del state["conv_in.bias"]
    state["extra.weight"] = np.zeros(3, np.float32)
    state["conv_out.weight"] = np.zeros((6, 32, 1, 1), np.float32)
    save_file(state, path)
    with pytest.raises(ConversionError) as err:
        convert_decoder(unet_dir, proj_dir)
    msg = str(err.value)
    assert "conv_in/bias" in msg and "extra.weight" in msg and "conv_out/kernel" in msg
    del state
    gc.collect()


def test_bf16_compute_close_to_fp32(tiny_decoder):
    _, _, params, config = tiny_decoder
    inp = decoder_inputs(np.random.default_rng(6), batch=2, size=32, clip_dim=32)
    ref = jax_decoder_forward(params, config, inp, 250)
    cfg = dict(config, unet=dict(config["unet"], dtype="bfloat16", remat=True),
               text_proj=dict(config["text_proj"], dtype="bfloat16"))
    out = jax_decoder_forward(params, cfg, inp, 250)
    assert out.dtype == jnp.float32
    assert 0 < rel_err(out, ref) < 5e-2


def test_fast_variance_norms_stay_close(tiny_decoder):
    # norm_fast_variance (one-pass E[x²] − E[x]² GroupNorm statistics, a speed option) must
    # stay within the fp32 parity tolerance here, and it must reach the norms: with a large
    # mean the one-pass variance cancels digits that the two-pass one keeps.
    from unclip_jax.models.unet_blocks import ResBlock
    _, _, params, config = tiny_decoder
    inp = decoder_inputs(np.random.default_rng(6), batch=2, size=32, clip_dim=32)
    ref = jax_decoder_forward(params, config, inp, 250)
    fast = dict(config, unet=dict(config["unet"], norm_fast_variance=True))
    assert rel_err(jax_decoder_forward(params, fast, inp, 250), ref) <= TOL

    x = 300.0 + jnp.asarray(np.random.default_rng(7).standard_normal((1, 8, 8, 64)), jnp.float32)
    emb = jnp.ones((1, 16), jnp.float32)
    block = ResBlock(64)
    block_params = block.init(jax.random.key(0), x, emb)
    two_pass = block.apply(block_params, x, emb)
    one_pass = ResBlock(64, fast_variance=True).apply(block_params, x, emb)
    assert 0 < float(jnp.max(jnp.abs(one_pass - two_pass)))


def test_cli_converts_a_saved_pipeline_folder(tmp_path):
    """``python -m unclip_jax.convert.unet karlo`` on a folder laid out like the Karlo download
    writes our pretrained directories, which load back to the converter's parameters."""
    from unclip_jax.convert.common import load_pretrained
    from unclip_jax.convert.unet import main
    src, out = tmp_path / "karlo", tmp_path / "ours"
    unet, proj = make_torch_decoder("tiny", seed=31)
    save_decoder(unet, proj, str(src))
    for name, seed in (("super_res_first", 32), ("super_res_last", 33)):
        make_torch_super_res("tiny", seed=seed).save_pretrained(str(src / name))
    main(["karlo", "--src", str(src), "--out", str(out)])
    with pytest.raises(SystemExit, match="error: "):  # a message, not a traceback
        main(["super-res", "--src", str(src / "nowhere"), "--out", str(tmp_path / "bad")])
    params, config = load_pretrained(str(out / "decoder"))
    expected, expected_config = convert_decoder(str(src / "decoder"), str(src / "text_proj"))
    assert config == json.loads(json.dumps(expected_config))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), b)
    last, last_config = load_pretrained(str(out / "super_res_last"))
    assert last_config["sample_size"] == 64
    expected_last, _ = convert_super_res(str(src / "super_res_last"))
    np.testing.assert_array_equal(np.asarray(last["conv_out"]["kernel"]), expected_last["conv_out"]["kernel"])
    # The single-model subcommands write the same directories as the whole-folder one.
    main(["decoder", "--unet", str(src / "decoder"), "--text-proj", str(src / "text_proj"),
          "--out", str(tmp_path / "decoder_alone")])
    main(["super-res", "--src", str(src / "super_res_last"), "--out", str(tmp_path / "super_res_alone")])
    for alone, whole in (("decoder_alone", "decoder"), ("super_res_alone", "super_res_last")):
        got, got_config = load_pretrained(str(tmp_path / alone))
        want, want_config = load_pretrained(str(out / whole))
        assert got_config == want_config
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
