"""Captioned shapes: determinism, vocabulary, held-out split, captions and their parser."""

import re

import grain
import numpy as np
import pytest

from unclip_jax.data import shapes


def test_examples_are_pure_functions_of_seed_split_index():
    a = shapes.generate_example(3, "train", 17)
    b = shapes.generate_example(3, "train", 17)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["caption"] == b["caption"] and a["objects"] == b["objects"]
    # Any other seed, split or index gives another image.
    for other in (shapes.generate_example(4, "train", 17), shapes.generate_example(3, "test", 17),
                  shapes.generate_example(3, "train", 18)):
        assert not np.array_equal(a["image"], other["image"])
    source = shapes.ShapesSource("train", 50, seed=3)
    np.testing.assert_array_equal(source[17]["image"], a["image"])
    assert source[17]["caption"] == a["caption"]
    assert shapes.decode_attributes(source[17]["attributes"]) == a["objects"]
    batch = shapes.make_batch("train", 15, 4, seed=3)
    np.testing.assert_array_equal(batch["image"][2], a["image"])
    assert batch["image"].shape == (4, 64, 64, 3) and batch["image"].dtype == np.uint8


def test_image_sizes_and_errors():
    small = shapes.generate_example(0, "train", 5, image_size=32)
    assert small["image"].shape == (32, 32, 3) and small["image"].dtype == np.uint8
    assert small["objects"] == shapes.generate_example(0, "train", 5)["objects"]
    with pytest.raises(ValueError, match="unknown shapes split"):
        shapes.ShapesSource("training")
    with pytest.raises(IndexError):
        shapes.ShapesSource("train", 10)[10]


def test_vocabulary_and_templates_are_covered():
    examples = [shapes.generate_example(0, "train", i, image_size=16) for i in range(600)]
    seen = {a: set() for a in shapes.ATTRIBUTES}
    for e in examples:
        for o in e["objects"]:
            for a in shapes.ATTRIBUTES:
                seen[a].add(o[a])
    for a in shapes.ATTRIBUTES:
        assert seen[a] == set(shapes.VOCAB[a]), a
    assert {len(e["objects"]) for e in examples} == {1, 2}
    assert {e["relation"] for e in examples} == set(shapes.RELATIONS) | {None}
    # Caption forms: the caption with every vocabulary word replaced by a slot.
    words = "|".join(w for v in shapes.VOCAB.values() for w in v)
    forms = {re.sub(rf"\b({words})\b", "_", e["caption"]).replace("an _", "a _")
             for e in examples}
    assert len(forms) >= 12, forms


def test_heldout_pairs_never_in_train_or_test_and_always_in_heldout():
    for i in range(5):  # the cheap layout-only path agrees with the rendered examples
        e = shapes.generate_example(1, "train", i, image_size=32)
        assert shapes.example_objects(1, "train", i) == (e["objects"], e["relation"])
    for split in ("train", "test"):
        for i in range(3000):
            objects, _ = shapes.example_objects(1, split, i)
            assert not shapes.is_heldout(objects), (split, i, objects)
    heldout = [shapes.generate_example(1, "heldout", i, image_size=32) for i in range(300)]
    assert all(e["heldout"] and shapes.is_heldout(e["objects"]) for e in heldout)
    found = {(o["color"], o["shape"]) for e in heldout for o in e["objects"]}
    assert set(shapes.HELDOUT_PAIRS) <= found
    # Held-out colours and shapes do occur in training, with other partners.
    train_objects = [o for i in range(300) for o in shapes.example_objects(1, "train", i)[0]]
    for color, shape in shapes.HELDOUT_PAIRS:
        assert any(o["color"] == color for o in train_objects)
        assert any(o["shape"] == shape for o in train_objects)


def test_two_objects_follow_their_relation():
    for i in range(400):
        e = shapes.generate_example(2, "train", i, image_size=16)
        if e["relation"] is None:
            continue
        a, b = e["objects"]
        expected = {"left of": ("left", "right"), "right of": ("right", "left"),
                    "above": ("top", "bottom"), "below": ("bottom", "top")}[e["relation"]]
        assert (a["position"], b["position"]) == expected
        assert e["relation"].split()[0] in e["caption"] or e["relation"] in e["caption"]


def test_parser_recovers_every_caption():
    for split in ("train", "heldout"):
        for i in range(800):
            e = shapes.generate_example(5, split, i, image_size=16)
            assert shapes.parse_prompt(e["caption"]) == e["objects"], e["caption"]


def test_parser_on_loose_prompts():
    assert shapes.parse_prompt("A red circle.") == [
        dict(color="red", shape="circle", size=None, position=None)]
    assert shapes.parse_prompt("big blue square in the middle") == [
        dict(color="blue", shape="square", size="large", position="center")]
    two = shapes.parse_prompt("a green triangle and a yellow circle")
    assert [(o["color"], o["shape"]) for o in two] == [("green", "triangle"), ("yellow", "circle")]
    below = shapes.parse_prompt("a tiny purple square below an orange circle")
    assert [(o["color"], o["size"], o["position"]) for o in below] == [
        ("purple", "small", "bottom"), ("orange", None, "top")]
    with pytest.raises(ValueError, match="names no colour"):
        shapes.parse_prompt("a photo of a dog")


def test_attribute_encoding_round_trip():
    objects = [dict(color="orange", shape="square", size="small", position="top"),
               dict(color="blue", shape=None, size=None, position="bottom")]
    codes = shapes.encode_objects(objects)
    assert codes.shape == (2, 4) and codes.dtype == np.int32
    assert shapes.decode_attributes(codes) == objects
    assert shapes.decode_attributes(shapes.encode_objects(objects[:1])) == objects[:1]


def test_shapes_source_works_with_grain():
    source = shapes.ShapesSource("test", 20, image_size=32)
    ds = grain.MapDataset.source(source).shuffle(seed=1).batch(4)
    batch = ds[0]
    assert batch["image"].shape == (4, 32, 32, 3) and batch["attributes"].shape == (4, 2, 4)
    assert len(batch["caption"]) == 4


def test_shape_twins_differ_only_in_one_seen_shape():
    source = shapes.ShapesSource("train", 200, image_size=32, seed=5, shape_twins=True)
    unchanged = 0
    for i in range(100):
        item = source[i]
        assert item["image"].shape == (2, 32, 32, 3) and len(item["caption"]) == 2
        original = shapes.generate_example(5, "train", i, 32)
        np.testing.assert_array_equal(item["image"][0], original["image"])
        a, b = (shapes.decode_attributes(x) for x in item["attributes"])
        changed = [k for k, (x, y) in enumerate(zip(a, b)) if x != y]
        assert len(a) == len(b) and len(changed) <= 1, (a, b)
        if not changed:  # two objects of a colour whose third shape is held out
            unchanged += 1
            assert len(a) == 2 and a[0]["color"] == a[1]["color"]
            continue
        k = changed[0]
        assert a[k]["shape"] != b[k]["shape"]
        assert {key: v for key, v in a[k].items() if key != "shape"} == \
            {key: v for key, v in b[k].items() if key != "shape"}
        assert (b[k]["color"], b[k]["shape"]) not in shapes.HELDOUT_PAIRS
        words = [c.replace(",", " ").split() for c in item["caption"]]
        diff = [(x, y) for x, y in zip(*words) if x != y]
        assert len(words[0]) == len(words[1]) and diff == [(a[k]["shape"], b[k]["shape"])], item["caption"]
        if len(a) == 1:  # one object: the image changes only where the outline does
            differs = np.any(item["image"][0] != item["image"][1], axis=-1)
            assert 0 < differs.mean() < 0.25
    assert unchanged <= 3


def test_clip_preprocess_flattens_twins_side_by_side(monkeypatch):
    from unclip_jax.config import load_config
    from unclip_jax.data import batches
    from unclip_jax.stages import clip as clip_stage
    config = load_config("configs/shapes_clip.py:tiny")
    assert config.data.shape_twins  # the recipe's CLIP trains on twins
    source = shapes.ShapesSource("train", 20, image_size=32, shape_twins=True)
    raw = next(iter(batches(source, 3, seed=0)))
    assert raw["image"].shape == (3, 2, 32, 32, 3)
    captured = {}
    monkeypatch.setattr(clip_stage, "tokenize_for_model",
                        lambda cfg, captions: captured.setdefault("captions", captions))
    out = clip_stage.stage_preprocess(raw, config)
    assert captured["captions"] == [c for pair in raw["caption"] for c in pair]
    np.testing.assert_array_equal(out["pixels"],
                                  clip_stage.images_for_model(config, raw["image"].reshape(6, 32, 32, 3)))
    # Microbatches take every A-th row: they would part the twins, so that fails loudly.
    with pytest.raises(ValueError, match="grad_accum"):
        clip_stage.stage_preprocess(raw, load_config("configs/shapes_clip.py:tiny", ["train.grad_accum=2"]))
    with pytest.raises(ValueError, match="heldout"):
        shapes.ShapesSource("heldout", 10, shape_twins=True)


def test_two_object_fraction_sets_the_share_of_two_object_images_in_train_only():
    from unclip_jax.data import sources

    default = [shapes.example_objects(2, "train", i) for i in range(40)]
    assert default == [shapes.example_objects(2, "train", i, two_object_fraction=shapes.P_TWO_OBJECTS)
                       for i in range(40)]
    counts = {f: sum(len(shapes.example_objects(2, "train", i, two_object_fraction=f)[0]) == 2
                     for i in range(200)) for f in (0.0, 0.4, 0.8, 1.0)}
    assert counts[0.0] == 0 and counts[1.0] == 200
    assert 50 <= counts[0.4] <= 110 and counts[0.8] >= 140, counts

    config = sources.default_data_config("shapes")
    config.num_examples, config.num_eval_examples, config.image_size = 30, 30, 16
    config.two_object_fraction = 1.0
    train = sources.make_source(config, split="train")
    assert all((train[i]["attributes"][1] >= 0).all() for i in range(30))
    test = sources.make_source(config, split="test")  # evaluation splits keep the dataset's mix
    assert test.two_object_fraction == shapes.P_TWO_OBJECTS
    config.two_object_fraction = 1.5
    with pytest.raises(Exception, match="two_object_fraction"):
        sources.make_source(config, split="train")
    with pytest.raises(ValueError, match="two_object_fraction"):
        shapes.ShapesSource("train", 10, two_object_fraction=-0.1)


def test_colorless_captions_leave_out_every_colour_and_nothing_else():
    from unclip_jax.data import sources

    def has_colour(caption):
        return bool(set(re.findall(r"\w+", caption)) & set(shapes.COLORS))

    for i in range(30):
        plain = shapes.generate_example(4, "train", i, 16)
        always = shapes.generate_example(4, "train", i, 16, colorless_captions=1.0)
        assert np.array_equal(plain["image"], always["image"]) and plain["objects"] == always["objects"]
        assert not set(re.findall(r"\w+", always["caption"])) & set(shapes.COLORS), always["caption"]
        parsed = shapes.parse_prompt(always["caption"])
        assert [(o["shape"], o["size"], o["color"]) for o in parsed] == \
            [(o["shape"], o["size"], None) for o in plain["objects"]], always["caption"]
        twin = shapes.generate_example(4, "train", i, 16, colorless_captions=0.5, shape_twin=True)
        half = shapes.generate_example(4, "train", i, 16, colorless_captions=0.5)
        assert has_colour(twin["caption"]) == has_colour(half["caption"])  # a twin makes its original's choice
    share = np.mean([not has_colour(shapes.generate_example(4, "train", i, 16, colorless_captions=0.5)["caption"])
                     for i in range(200)])
    assert 0.35 < share < 0.65

    config = sources.default_data_config("shapes")
    config.num_examples, config.num_eval_examples, config.image_size = 20, 20, 16
    config.colorless_captions = 1.0
    assert not any(has_colour(sources.make_source(config, split="train")[i]["caption"]) for i in range(20))
    assert any(has_colour(sources.make_source(config, split="test")[i]["caption"]) for i in range(20))
    config.colorless_captions = 2.0
    with pytest.raises(Exception, match="colorless_captions"):
        sources.make_source(config, split="train")
    with pytest.raises(ValueError, match="colorless_captions"):
        shapes.ShapesSource("train", 5, colorless_captions=1.5)


def test_unnamed_colors_draw_objects_off_the_held_out_hues_with_colourless_captions():
    from unclip_jax.data import oracle, sources

    rng = np.random.default_rng(0)
    held_hues = [shapes._hue_degrees(shapes.PALETTE[c]) for c, _ in shapes.HELDOUT_PAIRS]
    hues = [shapes._hue_degrees(shapes.unnamed_color(rng)) for _ in range(500)]
    assert min(shapes._hue_distance(h, g) for h in hues for g in held_hues) >= shapes.UNNAMED_HUE_MARGIN
    assert max(hues) - min(hues) > 180  # a spread of hues, not one colour

    for i in range(12):
        plain = shapes.generate_example(5, "train", i, 64)
        always = shapes.generate_example(5, "train", i, 64, unnamed_colors=1.0)
        assert not set(re.findall(r"\w+", always["caption"])) & set(shapes.COLORS), always["caption"]
        assert [o["color"] for o in always["objects"]] == [None] * len(plain["objects"])
        assert [{**o, "color": None} for o in plain["objects"]] == always["objects"]
        assert not np.array_equal(plain["image"], always["image"])
        # The same geometry: the pixel oracle reads the same shape, size and place.
        found = oracle.detect(always["image"])
        assert sorted((o["shape"], o["size"], o["position"]) for o in found) == \
            sorted((o["shape"], o["size"], o["position"]) for o in plain["objects"]), i
        half = shapes.generate_example(5, "train", i, 32, unnamed_colors=0.5)
        twin = shapes.generate_example(5, "train", i, 32, unnamed_colors=0.5, shape_twin=True)
        assert (half["objects"][0]["color"] is None) == (twin["objects"][0]["color"] is None)
    share = np.mean([shapes.generate_example(5, "train", i, 16, unnamed_colors=0.3)["objects"][0]["color"] is None
                     for i in range(300)])
    assert 0.2 < share < 0.4

    config = sources.default_data_config("shapes")
    config.num_examples, config.num_eval_examples, config.image_size = 20, 20, 16
    config.unnamed_colors = 1.0
    train = sources.make_source(config, split="train")
    assert all((train[i]["attributes"][:, 0] == -1).all() for i in range(20))
    # Evaluation splits keep the vocabulary's colours.
    assert all(sources.make_source(config, split="heldout")[i]["attributes"][0, 0] >= 0 for i in range(20))
    config.unnamed_colors = -0.5
    with pytest.raises(Exception, match="unnamed_colors"):
        sources.make_source(config, split="train")
    with pytest.raises(ValueError, match="unnamed_colors"):
        shapes.ShapesSource("train", 5, unnamed_colors=1.5)
