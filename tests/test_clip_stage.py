"""Contrastive losses (also over a batch sharded on 8 fake devices) and the evaluators."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from unclip_jax.config import load_config
from unclip_jax.models.clip import CLIPModel, clip_param_shapes
from unclip_jax.stages import clip as stage
from unclip_jax.tokenizer import load_tokenizer, write_word_level_vocab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _normed(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_clip_loss(zi, zt, s):
    logits = np.exp(min(s, np.log(100.0))) * _normed(zi.astype(np.float64)) @ _normed(zt.astype(np.float64)).T
    def ce(l):
        return np.mean(np.log(np.exp(l).sum(1)) - np.diag(l))
    return 0.5 * (ce(logits) + ce(logits.T))


def test_clip_loss_matches_numpy_and_caps_the_temperature():
    rng = np.random.default_rng(0)
    zi, zt = rng.standard_normal((6, 5)).astype(np.float32), rng.standard_normal((6, 5)).astype(np.float32)
    loss_fn = jax.jit(stage.clip_loss)
    for s in (np.log(1 / 0.07), 1.0, 6.0):  # 6.0 > log 100: capped
        loss, metrics = loss_fn(zi, zt, jnp.float32(s))
        assert float(loss) == pytest.approx(_np_clip_loss(zi, zt, s), rel=1e-5)
        assert float(metrics["temperature"]) == pytest.approx(min(np.exp(s), 100.0), rel=1e-5)
    grad_s = jax.jit(jax.grad(lambda s: stage.clip_loss(zi, zt, s)[0]))
    assert float(grad_s(6.0)) == 0.0 and float(grad_s(1.0)) != 0.0
    # Perfectly aligned pairs: accuracy 1 and a small loss.
    loss, metrics = loss_fn(zi, zi * 3, jnp.float32(np.log(100)))
    assert float(metrics["acc_image_to_text"]) == float(metrics["acc_text_to_image"]) == 1.0
    assert float(loss) < 0.05


def test_siglip_loss_matches_numpy():
    rng = np.random.default_rng(1)
    zi, zt = rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal((5, 4)).astype(np.float32)
    s, b = np.log(10.0), -10.0
    logits = np.exp(s) * _normed(zi.astype(np.float64)) @ _normed(zt.astype(np.float64)).T + b
    y = 2 * np.eye(5) - 1
    want = np.sum(np.log1p(np.exp(-y * logits))) / 5
    loss, _ = stage.contrastive_loss({"image_embeds": zi, "text_embeds": zt, "logit_scale": s, "logit_bias": b},
                                     kind="siglip")
    assert float(loss) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="logit_bias"):
        stage.contrastive_loss({"image_embeds": zi, "text_embeds": zt, "logit_scale": s}, kind="siglip")


SHARDED = textwrap.dedent("""
    import os, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from unclip_jax.stages.clip import clip_loss, siglip_loss
    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    zi, zt = (rng.standard_normal((16, 8)).astype(np.float32) for _ in range(2))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))  # as unclip_jax.parallel
    batch = NamedSharding(mesh, P("data"))
    szi, szt = jax.device_put(zi, batch), jax.device_put(zt, batch)
    assert len(szi.sharding.device_set) == 8 and szi.addressable_shards[0].data.shape == (2, 8)
    out = {}
    for name, fn, extra in (("clip", clip_loss, ()), ("siglip", siglip_loss, (jnp.float32(-3.0),))):
        def loss(a, b, s):
            return fn(a, b, s, *extra)[0]
        grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        v, (ga, gb, gs) = grad(szi, szt, jnp.float32(2.0))
        one = jax.devices()[0]
        v1, (ga1, gb1, gs1) = grad(jax.device_put(zi, one), jax.device_put(zt, one), jnp.float32(2.0))
        local = np.mean([float(loss(zi[i:i + 2], zt[i:i + 2], 2.0)) for i in range(0, 16, 2)])
        out[name] = dict(sharded=float(v), single=float(v1), local_mean=local,
                         grad_err=float(max(np.abs(np.asarray(ga) - np.asarray(ga1)).max(),
                                            np.abs(np.asarray(gb) - np.asarray(gb1)).max(),
                                            abs(float(gs) - float(gs1)))),
                         grad_sharded=str(ga.sharding.spec))
    print("RESULT" + json.dumps(out))
""")


def test_loss_over_a_sharded_batch_is_the_global_loss():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    for name, r in result.items():
        assert r["sharded"] == pytest.approx(r["single"], rel=1e-5, abs=1e-6), name
        assert r["grad_err"] < 1e-5, name
        # The global loss contrasts each pair with all 16: different from averaging 8 local losses.
        assert abs(r["sharded"] - r["local_mean"]) > 0.1, name


# ----------------------------------------------------------------------------- evaluators

CLASSES = ["cat", "dog", "car"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("words")
    write_word_level_vocab(["a", "photo", "of", "the"] + CLASSES, str(path), verify=False)
    return load_tokenizer(str(path))


def _fake_text_encoder(tokenizer):
    """Sum of per-token vectors: class words map to basis vectors, other words to small noise."""
    vocab = tokenizer.hf.get_vocab()
    table = np.random.default_rng(0).normal(0, 0.05, (tokenizer.vocab_size, 3))
    for c, name in enumerate(CLASSES):
        table[vocab[name + "</w>"]] = np.eye(3)[c]
    return lambda ids, mask: (table[np.asarray(ids)] * np.asarray(mask)[..., None]).sum(1)


def test_zero_shot_classifier_and_accuracy(tokenizer):
    encode_text = _fake_text_encoder(tokenizer)
    templates = ["a photo of the {}", "{}"]
    weights = stage.zero_shot_classifier(encode_text, tokenizer, CLASSES, templates, batch_size=4)
    assert weights.shape == (3, 3)
    # By hand: normalise each prompt's embedding, average over templates, normalise.
    for c, name in enumerate(CLASSES):
        t = tokenizer([tpl.format(name) for tpl in templates])
        want = _normed(_normed(encode_text(t.input_ids, t.attention_mask)).mean(0))
        np.testing.assert_allclose(weights[c], want, atol=1e-6)
    images = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.4, 0.6, 0]], np.float32)  # last: a cat seen as a dog
    labels = np.array([0, 1, 2, 0])
    acc = stage.evaluate_zero_shot(lambda x: x, encode_text, tokenizer, [(images[:3], labels[:3]),
                                                                          (images[3:], labels[3:])],
                                   CLASSES, templates, ks=(1, 2))
    assert acc == {"top1": 0.75, "top2": 1.0}
    with pytest.raises(ValueError, match="exactly one"):
        stage.zero_shot_classifier(encode_text, tokenizer, CLASSES, ["no slot"])


def test_retrieval_recall_against_brute_force():
    rng = np.random.default_rng(3)
    images = rng.standard_normal((5, 6))
    text_to_image = np.repeat(np.arange(5), 2)  # two captions per image
    texts = images[text_to_image] + rng.normal(0, 1.2, (10, 6))
    got = stage.retrieval_recall(images, texts, text_to_image, ks=(1, 2, 5))
    sims = _normed(images) @ _normed(texts).T
    for k in (1, 2, 5):
        i2t = np.mean([any(text_to_image[j] == i for j in np.argsort(-sims[i])[:k]) for i in range(5)])
        t2i = np.mean([text_to_image[j] in np.argsort(-sims[:, j])[:k] for j in range(10)])
        assert got[f"image_to_text_R@{k}"] == pytest.approx(i2t)
        assert got[f"text_to_image_R@{k}"] == pytest.approx(t2i)
    assert 0 < got["text_to_image_R@1"] < 1  # the noise makes some mistakes: the check is not trivial
    assert got["text_to_image_R@5"] == 1.0


def test_config_builds_the_model_and_encoders_run(tokenizer):
    cfg = load_config("configs/clip.py:tiny", ["model.vocab_size=600", "loss.kind=siglip",
                                                "model.logit_bias_init=-10.0"])
    model_cfg = stage.model_config_from(cfg.model)
    assert model_cfg.text.vocab_size == 600 and model_cfg.logit_bias_init == -10.0
    shapes = clip_param_shapes(model_cfg)
    rng = np.random.default_rng(0)
    params = traverse_util.unflatten_dict({k: (rng.normal(0, 0.05, v.shape) + (k[-1] == "scale")).astype(np.float32)
                                           for k, v in traverse_util.flatten_dict(shapes).items()})
    encode_text, encode_image = stage.make_encoders(CLIPModel(model_cfg), params)
    pixels = rng.standard_normal((3, 32, 32, 3)).astype(np.float32)
    captions = ["a cat", "a dog", "a car", "the car"]
    recall = stage.evaluate_retrieval(encode_image, encode_text, tokenizer, pixels, captions,
                                      np.array([0, 1, 2, 2]), batch_size=2)
    assert set(recall) == {"image_to_text_R@1", "image_to_text_R@5", "text_to_image_R@1", "text_to_image_R@5"}
    assert recall["text_to_image_R@5"] == 1.0  # only 3 images
    with pytest.raises(Exception, match="variant"):
        load_config("configs/clip.py:XL")


def test_shapes_zero_shot_prompts_read_like_training_captions():
    from unclip_jax.data import shapes
    from unclip_jax.stages.clip import _caption_templates
    shape_prompts = _caption_templates("shape")
    assert len(shape_prompts) == len(shapes.COLORS) * len(shapes.SIZES) * len(shapes.POSITIONS)
    assert all(p.count("{}") == 1 for p in shape_prompts)
    # Filled in, each prompt is a caption the generator writes, and it parses back.
    obj = shapes.parse_prompt(shape_prompts[0].format("triangle"))[0]
    assert shape_prompts[0].format("triangle") == shapes.caption_for([obj], None, 0)
    assert {o["color"] for o in (shapes.parse_prompt(p.format("circle"))[0] for p in shape_prompts)} \
        == set(shapes.COLORS)
