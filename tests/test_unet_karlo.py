"""Parity at the full Karlo sizes (decoder 64px ≈0.9B parameters, super-res 256px ≈0.7B).

Marked ``karlo``: several GB of RAM and minutes of CPU. Run alone, under the shared lock:

    flock /tmp/bigmem.lock python -m pytest -q -m karlo tests/test_unet_karlo.py

Each test builds the diffusers model with every parameter random, computes the reference
outputs at batch 1, saves it with ``save_pretrained``, frees it, imports the directory
with our converter and compares (max |ours − ref| / max |ref| ≤ 1e-4, float32).
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from test_unet_parity import (TOL, decoder_inputs, jax_decoder_forward, make_torch_decoder,
                              make_torch_super_res, nchw, nhwc, one_torch_thread,  # noqa: F401
                              rel_err, save_decoder, torch_decoder_forward)
from unclip_jax.convert.unet import convert_decoder, convert_super_res
from unclip_jax.models.unet import unet_from_config

pytestmark = pytest.mark.karlo


def test_karlo_decoder_matches_diffusers(tmp_path):
    unet, proj = make_torch_decoder("karlo", seed=21)
    rng = np.random.default_rng(0)
    inputs = {"full": decoder_inputs(rng, batch=1, size=64, clip_dim=768, text_len=77, padded=False)}
    padded = decoder_inputs(rng, batch=1, size=64, clip_dim=768, text_len=77, padded=False)
    padded["text_mask"][:, 9:] = False            # a 7-token caption: BOS, 7 words, EOS
    inputs["padded"] = padded
    t = 633
    refs = {name: torch_decoder_forward(unet, proj, inp, t) for name, inp in inputs.items()}
    dirs = save_decoder(unet, proj, str(tmp_path))
    del unet, proj
    gc.collect()

    params, config = convert_decoder(*dirs)
    assert config["unet"]["channel_mult"] == [1, 2, 3, 4] and config["unet"]["head_channels"] == 64
    params = jax.tree.map(jnp.asarray, params)
    gc.collect()
    for name, inp in inputs.items():
        ours = jax_decoder_forward(params, config, inp, t)
        err = rel_err(ours, refs[name])
        print(f"karlo decoder ({name}) rel err {err:.2e}")
        assert err <= TOL, (name, err)
    assert rel_err(refs["padded"], refs["full"]) > 1e-3      # the padding mask matters at this size too
    del params
    jax.clear_caches()
    gc.collect()


def test_karlo_super_res_matches_diffusers(tmp_path):
    unet = make_torch_super_res("karlo", seed=22)
    x = np.random.default_rng(1).standard_normal((1, 256, 256, 6)).astype(np.float32)
    t = 832
    with torch.no_grad():
        ref = nhwc(unet(nchw(x), torch.tensor(t)).sample)
    unet.save_pretrained(str(tmp_path))
    del unet
    gc.collect()

    params, config = convert_super_res(str(tmp_path))
    assert config["sample_size"] == 256 and config["unet"]["attention_levels"] == []
    params = jax.tree.map(jnp.asarray, params)
    gc.collect()
    model = unet_from_config(config["unet"])
    ours = jax.jit(lambda p, x: model.apply({"params": p}, x, jnp.full((1,), t, jnp.float32)))(params, x)
    err = rel_err(ours, ref)
    print(f"karlo super-res rel err {err:.2e}")
    assert err <= TOL
    del params
    jax.clear_caches()
    gc.collect()
