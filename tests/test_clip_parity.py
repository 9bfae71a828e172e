"""Parity of our CLIP with transformers' PyTorch CLIP (random weights, tiny configs),
through our converters: transformers directories and OpenCLIP-named checkpoints."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch
import transformers

from safetensors.numpy import save_file  # noqa: E402

from unclip_jax.convert import clip as convert_clip  # noqa: E402
from unclip_jax.convert.common import ConversionError  # noqa: E402
from unclip_jax.models.clip import CLIPModel, CLIPTextModel, CLIPVisionModel  # noqa: E402

VOCAB, CTX, IMAGE = 1000, 77, 30
ATOL = 1e-4


def _towers(act, eos_token_id):
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=CTX, hidden_act=act,
                eos_token_id=eos_token_id, bos_token_id=998, pad_token_id=0, projection_dim=24)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=IMAGE, patch_size=6, hidden_act=act, projection_dim=24)
    return text, vision


def _randomise(model):
    """transformers initialises LayerNorms to (1, 0) and biases to 0, which would hide swapped
    or misplaced tensors; perturb every vector parameter, and set a non-default temperature."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1:
                p.add_(0.1 * torch.randn_like(p))
        if hasattr(model, "logit_scale"):
            model.logit_scale.fill_(1.234)
    return model


def _clip_model(act, eos_token_id, seed=0):
    torch.manual_seed(seed)
    text, vision = _towers(act, eos_token_id)
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    return _randomise(transformers.CLIPModel(cfg).eval())


def _token_batch(eos_token_id):
    """Three padded rows. Legacy (eos 2): EOT = 999 is each row's largest id; otherwise EOT
    = ``eos_token_id`` (500) with larger ids before it, so argmax and first-eos pooling differ,
    and one row is padded with the eos id itself (transformers' default pad)."""
    rng = np.random.default_rng(1)
    eot, pad = (999, [0, 0, 0]) if eos_token_id == 2 else (eos_token_id, [0, eos_token_id, 0])
    ids = np.zeros((3, CTX), np.int64)
    mask = np.zeros((3, CTX), bool)
    for row, n in enumerate((5, 12, CTX - 2)):
        body = rng.integers(3, 990, size=n)
        if eos_token_id != 2:
            body[0] = 990  # > eos id: argmax pooling would pick this position
        ids[row] = pad[row]
        ids[row, : n + 2] = [998, *body, eot]
        mask[row, : n + 2] = True
    return ids, mask


def _pixels(n=2, seed=2):
    return np.random.default_rng(seed).standard_normal((n, 3, IMAGE, IMAGE)).astype(np.float32)


def _nhwc(x):
    return jnp.asarray(x.transpose(0, 2, 3, 1))


def _close(ours, theirs, what):
    ours, theirs = np.asarray(ours), np.asarray(theirs.detach().numpy() if hasattr(theirs, "detach") else theirs)
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    err = np.abs(ours - theirs).max()
    assert err < ATOL, f"{what}: max abs error {err:.2e}"


@pytest.mark.parametrize("act,eos_token_id", [("quick_gelu", 2), ("gelu", 500), ("gelu", 2), ("quick_gelu", 500)])
def test_clip_model_matches_transformers(tmp_path, act, eos_token_id):
    ref = _clip_model(act, eos_token_id)
    ref.save_pretrained(tmp_path / "hf")
    config, params = convert_clip.load_hf(str(tmp_path / "hf"))
    assert config.text.act == config.vision.act == act
    assert config.text.pool == ("argmax" if eos_token_id == 2 else "eos")

    ids, mask = _token_batch(eos_token_id)
    pixels = _pixels()
    model = CLIPModel(config)
    with torch.no_grad():  # CLIPModel.forward normalises; the feature getters do not
        masked = ref.get_text_features(input_ids=torch.tensor(ids),
                                       attention_mask=torch.tensor(mask.astype(np.int64)))
        image = ref.get_image_features(pixel_values=torch.tensor(pixels)).pooler_output
        unmasked = ref.text_model(input_ids=torch.tensor(ids))
        unmasked_embeds = ref.text_projection(unmasked.pooler_output)

    out = model.apply({"params": params}, jnp.asarray(ids, jnp.int32), _nhwc(pixels), jnp.asarray(mask))
    _close(out["text_embeds"], masked.pooler_output, "text_embeds (masked)")
    _close(out["last_hidden_state"], masked.last_hidden_state, "hidden (masked)")
    _close(out["image_embeds"], image, "image_embeds")
    _close(out["logit_scale"], ref.logit_scale, "logit_scale")

    # Without a mask: causal only, as OpenAI/Karlo and diffusers' UnCLIPPipeline.
    embeds, hidden = model.apply({"params": params}, jnp.asarray(ids, jnp.int32), method="encode_text")
    _close(embeds, unmasked_embeds, "text_embeds (no mask)")
    _close(hidden, unmasked.last_hidden_state, "hidden (no mask)")
    # The mask changes nothing at real positions (padding follows EOT; the mask is causal).
    np.testing.assert_allclose(np.asarray(hidden)[mask], np.asarray(out["last_hidden_state"])[mask], atol=ATOL)


def test_text_only_and_vision_only_directories(tmp_path):
    torch.manual_seed(3)
    text, vision = _towers("quick_gelu", 2)
    text_ref = _randomise(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**text)).eval())
    vision_ref = _randomise(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**vision)).eval())
    text_ref.save_pretrained(tmp_path / "text_encoder")
    vision_ref.save_pretrained(tmp_path / "image_encoder")

    ids, mask = _token_batch(2)
    pixels = _pixels()
    with torch.no_grad():
        t = text_ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)))
        v = vision_ref(pixel_values=torch.tensor(pixels))

    config, params = convert_clip.load_hf(str(tmp_path / "text_encoder"))
    assert config.vision is None and set(params) == {"text"}
    embeds, hidden = CLIPTextModel(config).apply({"params": params["text"]}, jnp.asarray(ids), jnp.asarray(mask))
    _close(embeds, t.text_embeds, "text-only text_embeds")
    _close(hidden, t.last_hidden_state, "text-only hidden")
    # The same params through CLIPModel.encode_text.
    embeds2, _ = CLIPModel(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                                         method="encode_text")
    np.testing.assert_array_equal(np.asarray(embeds2), np.asarray(embeds))

    config, params = convert_clip.load_hf(str(tmp_path / "image_encoder"))
    assert config.text is None and set(params) == {"vision"}
    _close(CLIPVisionModel(config).apply({"params": params["vision"]}, _nhwc(pixels)), v.image_embeds,
           "vision-only image_embeds")


def test_cli_writes_our_format_and_load_clip_reads_it(tmp_path):
    ref = _clip_model("quick_gelu", 2, seed=4)
    ref.save_pretrained(tmp_path / "hf")
    convert_clip.main([f"--src={tmp_path / 'hf'}", f"--out={tmp_path / 'ours'}", "--format=hf"])
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model"] == "clip" and saved["text"]["width"] == 32
    config, params = convert_clip.load_clip(str(tmp_path / "ours"))
    ids, mask = _token_batch(2)
    with torch.no_grad():
        t = ref.get_text_features(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)))
    embeds, _ = CLIPModel(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                                        method="encode_text")
    _close(embeds, t.pooler_output, "text_embeds after save/load")


def test_mismatch_lists_missing_unexpected_and_misshaped(tmp_path):
    ref = _clip_model("gelu", 2)
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    config = convert_clip.config_from_hf(ref.config.to_dict())
    state.pop("text_model.final_layer_norm.bias")
    state["text_model.extra.weight"] = np.zeros(3, np.float32)
    state["visual_projection.weight"] = np.zeros((24, 33), np.float32)
    with pytest.raises(ConversionError) as e:
        convert_clip.params_from_hf_state(state, config)
    msg = str(e.value)
    assert "text/ln_final/bias" in msg and "text_model.extra.weight" in msg
    assert "vision/projection/kernel: checkpoint (33, 24) vs model (32, 24)" in msg


def test_missing_directory_errors_say_what_to_do(tmp_path):
    with pytest.raises(ConversionError, match="hf download"):
        convert_clip.load_hf(str(tmp_path / "nope"))
    (tmp_path / "pipe" / "text_encoder").mkdir(parents=True)
    with pytest.raises(ConversionError, match="text_encoder"):
        convert_clip.load_hf(str(tmp_path / "pipe"))


def test_hf_defaults_match_transformers():
    t, v, c = transformers.CLIPTextConfig(), transformers.CLIPVisionConfig(), transformers.CLIPConfig()
    for ours, theirs in ((convert_clip.HF_TEXT_DEFAULTS, t), (convert_clip.HF_VISION_DEFAULTS, v),
                         (convert_clip.HF_CLIP_DEFAULTS, c)):
        for key, value in ours.items():
            assert getattr(theirs, key) == pytest.approx(value), key


# ----------------------------------------------------------------------------- OpenCLIP

def _to_openclip(hf_state):
    """Inverse of our OpenCLIP table, written independently: transformers names -> OpenCLIP."""
    out = {}
    blocks = {}
    for key, value in hf_state.items():
        value = value.numpy()
        if key.endswith("position_ids"):
            continue
        m = key.split(".")
        if ".encoder.layers." in key:
            tower = "transformer" if key.startswith("text_model") else "visual.transformer"
            i, rest = m[3], ".".join(m[4:])
            prefix = f"{tower}.resblocks.{i}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                blocks.setdefault((prefix, rest.split(".")[-1]), {})[rest.split(".")[1][0]] = value
                continue
            rest = (rest.replace("self_attn.out_proj", "attn.out_proj").replace("layer_norm1", "ln_1")
                    .replace("layer_norm2", "ln_2").replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))
            out[prefix + rest] = value
            continue
        simple = {
            "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
            "text_model.embeddings.position_embedding.weight": "positional_embedding",
            "text_model.final_layer_norm.weight": "ln_final.weight",
            "text_model.final_layer_norm.bias": "ln_final.bias",
            "vision_model.embeddings.class_embedding": "visual.class_embedding",
            "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
            "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
            "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
            "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
            "vision_model.post_layernorm.weight": "visual.ln_post.weight",
            "vision_model.post_layernorm.bias": "visual.ln_post.bias",
            "logit_scale": "logit_scale",
        }
        if key in simple:
            out[simple[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.copy()  # OpenCLIP: x @ text_projection
        elif key == "visual_projection.weight":
            out["visual.proj"] = value.T.copy()
        else:
            raise AssertionError(f"unmapped {key}")
    for (prefix, kind), qkv in blocks.items():
        out[f"{prefix}attn.in_proj_{kind}"] = np.concatenate([qkv["q"], qkv["k"], qkv["v"]], axis=0)
    out["attn_mask"] = np.triu(np.full((CTX, CTX), -np.inf, np.float32), 1)  # a buffer OpenAI files carry
    return {k: np.array(v, order="C") for k, v in out.items()}


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_openclip_names_reproduce_transformers(tmp_path, act):
    ref = _clip_model(act, 2, seed=5)  # OpenCLIP pools at argmax(ids): the legacy rule
    ckpt = tmp_path / "openclip"
    ckpt.mkdir()
    save_file(_to_openclip(ref.state_dict()), str(ckpt / "open_clip_model.safetensors"))
    model_cfg = {"embed_dim": 24, "quick_gelu": act == "quick_gelu",
                 "vision_cfg": {"image_size": IMAGE, "layers": 2, "width": 32, "patch_size": 6, "head_width": 8},
                 "text_cfg": {"context_length": CTX, "vocab_size": VOCAB, "width": 32, "heads": 4, "layers": 2}}
    (ckpt / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))

    assert convert_clip.detect_format(str(ckpt)) == "openclip"
    config, params = convert_clip.load_openclip(str(ckpt))
    assert (config.text.heads, config.vision.heads, config.text.act) == (4, 4, act)

    ids, mask = _token_batch(2)
    pixels = _pixels()
    with torch.no_grad():
        t = ref.get_text_features(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)))
        image = ref.get_image_features(pixel_values=torch.tensor(pixels)).pooler_output
    out = CLIPModel(config).apply({"params": params}, jnp.asarray(ids), _nhwc(pixels), jnp.asarray(mask))
    _close(out["text_embeds"], t.pooler_output, "openclip text_embeds")
    _close(out["last_hidden_state"], t.last_hidden_state, "openclip hidden")
    _close(out["image_embeds"], image, "openclip image_embeds")
    _close(out["logit_scale"], ref.logit_scale, "openclip logit_scale")


def test_openclip_without_config_needs_the_activation(tmp_path):
    ref = _clip_model("gelu", 2, seed=6)
    path = str(tmp_path / "model.safetensors")
    save_file(_to_openclip(ref.state_dict()), path)
    with pytest.raises(ConversionError, match="act="):
        convert_clip.load_openclip(path)
    # Heads default to width/64 without a config; this tiny model has 4 heads of 8, so
    # override through a full config built from the shapes.
    config = convert_clip.config_from_openclip(
        convert_clip._split_in_proj(_to_openclip(ref.state_dict())),
        {"text_cfg": {"heads": 4}, "vision_cfg": {"head_width": 8}}, act="gelu")
    _, params = convert_clip.load_openclip(path, config=config)
    pixels = _pixels(1)
    with torch.no_grad():
        want = ref.get_image_features(pixel_values=torch.tensor(pixels)).pooler_output
    _close(CLIPModel(config).apply({"params": params}, _nhwc(pixels), method="encode_image"), want,
           "openclip (explicit config) image_embeds")


# ----------------------------------------------------------------------------- full size

VIT_L14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                    hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
VIT_L14_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")


@pytest.mark.karlo
def test_karlo_size_vit_l14_parity(tmp_path):
    """openai/clip-vit-large-patch14 sizes (Karlo's CLIP), as the text_encoder / image_encoder
    folders of the Karlo pipelines, random weights, batch 1. Run under flock /tmp/bigmem.lock."""
    import gc
    from unclip_jax.models.clip import clip_variant
    variant = clip_variant("ViT-L/14")
    torch.manual_seed(7)
    ids = np.zeros((1, 77), np.int64)
    ids[0, :6] = [49406, 320, 1125, 539, 320, 49407]  # pad 0, EOT the largest id (legacy pooling)

    ref = _randomise(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**VIT_L14_TEXT)).eval())
    ref.save_pretrained(tmp_path / "text_encoder")
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids))
        want_embeds, want_hidden = want.text_embeds.numpy(), want.last_hidden_state.numpy()
    del ref, want
    gc.collect()
    config, params = convert_clip.load_hf(str(tmp_path / "text_encoder"))
    assert config.text == variant.text  # our named variant is exactly Karlo's text tower
    embeds, hidden = jax.jit(lambda p, i: CLIPTextModel(config).apply({"params": p}, i))(
        params["text"], jnp.asarray(ids, jnp.int32))
    _close(embeds, want_embeds, "ViT-L/14 text_embeds")
    _close(hidden, want_hidden, "ViT-L/14 hidden")
    del params, embeds, hidden
    gc.collect()

    ref = _randomise(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VIT_L14_VISION)).eval())
    ref.save_pretrained(tmp_path / "image_encoder")
    pixels = np.random.default_rng(8).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        want_image = ref(pixel_values=torch.tensor(pixels)).image_embeds.numpy()
    del ref
    gc.collect()
    config, params = convert_clip.load_hf(str(tmp_path / "image_encoder"))
    assert config.vision == variant.vision
    got = jax.jit(lambda p, x: CLIPVisionModel(config).apply({"params": p}, x))(params["vision"], _nhwc(pixels))
    _close(got, want_image, "ViT-L/14 image_embeds")
    del params, got
    gc.collect()
