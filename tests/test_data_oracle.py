"""The pixel oracle: exact on the generator's images, tolerant of blur/noise, and it has teeth."""

import collections

import numpy as np
import pytest

from unclip_jax.data import oracle, shapes


def _blur(images, sigma):
    """Separable Gaussian blur of uint8 (N, H, W, 3) → float."""
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    x = np.pad(images.astype(np.float64), ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    h, w = images.shape[1:3]
    x = sum(k[i] * x[:, i:i + h] for i in range(2 * r + 1))
    return sum(k[i] * x[:, :, i:i + w] for i in range(2 * r + 1))


@pytest.fixture(scope="module")
def batch64():
    train = shapes.make_batch("train", 0, 1500, seed=7)
    held = shapes.make_batch("heldout", 0, 500, seed=7)
    return {k: (np.concatenate([train[k], held[k]]) if isinstance(train[k], np.ndarray)
                else train[k] + held[k]) for k in train}


@pytest.fixture(scope="module")
def detections64(batch64):
    return oracle.detect_batch(batch64["image"])


def test_oracle_reads_2000_generated_64px_images(batch64, detections64):
    result = oracle.score(batch64["image"], batch64["objects"], detections=detections64)
    assert result["n"] == 2000
    for key in ("color", "shape", "size", "position", "count"):
        assert result[key] >= 0.99, (key, result)
    assert result["heldout"]["n"] == 500 and result["seen"]["n"] == 1500
    for part in ("heldout", "seen"):
        for a in shapes.ATTRIBUTES:
            assert result[part][a] >= 0.99, (part, a, result[part])


def test_oracle_reads_32px_images():
    batch = shapes.make_batch("train", 0, 1000, image_size=32, seed=8)
    result = oracle.score(batch["image"], batch["attributes"])
    for key in ("color", "shape", "size", "position", "count"):
        assert result[key] >= 0.99, (key, result)


def test_prompts_score_like_attributes(batch64, detections64):
    n = 300
    by_prompt = oracle.score(batch64["image"][:n], batch64["caption"][:n],
                             detections=detections64[:n])
    by_objects = oracle.score(batch64["image"][:n], batch64["objects"][:n],
                              detections=detections64[:n])
    np.testing.assert_equal(by_prompt, by_objects)  # NaN == NaN for the empty held-out part


def test_scores_drop_on_wrong_prompts(batch64, detections64):
    images, objects = batch64["image"], batch64["objects"]
    # Another image's caption: attributes agree only by chance.
    shifted = objects[1:] + objects[:1]
    wrong = oracle.score(images, shifted, detections=detections64)
    assert wrong["overall"] < 0.1 and wrong["color"] < 0.45 and wrong["position"] < 0.6, wrong
    # Every colour replaced by another: colour is always wrong, shape still right.
    recolored = [[dict(o, color=shapes.COLORS[(shapes.COLORS.index(o["color"]) + 1) % 6])
                  for o in objs] for objs in objects]
    result = oracle.score(images, recolored, detections=detections64)
    assert result["color"] < 0.02 and result["overall"] < 0.02 and result["shape"] >= 0.99
    # Sizes swapped: size always wrong.
    resized = [[dict(o, size="small" if o["size"] == "large" else "large") for o in objs]
               for objs in objects]
    assert oracle.score(images, resized, detections=detections64)["size"] < 0.02
    # A blank background has no object: everything wrong.
    blank = np.full((4, 64, 64, 3), 128, np.uint8)
    empty = oracle.score(blank, ["a red circle on the left"] * 4)
    assert empty["color"] == 0.0 and empty["count"] == 0.0


def test_oracle_tolerates_blur_and_noise():
    batch = shapes.make_batch("test", 0, 400, seed=9)
    rng = np.random.default_rng(0)
    noisy = _blur(batch["image"], 1.0) + rng.normal(0, 8, batch["image"].shape)
    noisy = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    result = oracle.score(noisy, batch["objects"])
    for a in shapes.ATTRIBUTES:
        assert result[a] >= 0.97, (a, result)


def test_label_components_matches_a_flood_fill():
    rng = np.random.default_rng(1)
    masks = rng.random((6, 23, 31)) < 0.45
    labels = oracle.label_components(masks)
    for mask, lab in zip(masks, labels):
        # Reference: BFS flood fill with 8-connectivity.
        ref = -np.ones(mask.shape, int)
        count = 0
        for y, x in zip(*np.nonzero(mask)):
            if ref[y, x] >= 0:
                continue
            queue = collections.deque([(y, x)])
            ref[y, x] = count
            while queue:
                cy, cx = queue.popleft()
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if (0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx]
                                and ref[ny, nx] < 0):
                            ref[ny, nx] = count
                            queue.append((ny, nx))
            count += 1
        assert ((lab >= 0) == mask).all()
        # Same partition: a bijection between our labels and the reference's.
        pairs = set(zip(lab[mask].tolist(), ref[mask].tolist()))
        assert len(pairs) == count == len({p[0] for p in pairs})


def test_score_input_errors():
    images = shapes.make_batch("train", 0, 2, image_size=32)["image"]
    with pytest.raises(ValueError, match="2 images but 1 targets"):
        oracle.score(images, ["a red circle"])
    with pytest.raises(ValueError, match="uint8"):
        oracle.score(images.astype(np.float32), ["a red circle"] * 2)


def test_color_errors_tell_binding_from_palette_errors(batch64, detections64):
    images, objects = batch64["image"], batch64["objects"]
    clean = oracle.color_errors(images, objects, detections=detections64)
    total = sum(clean["objects"].values())
    assert set(clean["objects"]) == {"1", "2"} and total == sum(len(o) for o in objects)
    assert sum(clean["wrong"].values()) + sum(clean["missed"].values()) <= 0.01 * total
    # Two-object prompts with the colours swapped: each object shows the other's colour.
    # (different shapes too, so that the matching cannot pair them by colour instead)
    pairs = [i for i, o in enumerate(objects)
             if len(o) == 2 and o[0]["color"] != o[1]["color"] and o[0]["shape"] != o[1]["shape"]][:200]
    swapped = [[dict(o[0], color=o[1]["color"]), dict(o[1], color=o[0]["color"])]
               for o in (objects[i] for i in pairs)]
    result = oracle.color_errors(images[pairs], swapped, detections=[detections64[i] for i in pairs])
    assert result["wrong"]["2"] >= 0.98 * 2 * len(pairs)
    assert result["took_other_object_color"] == result["wrong"]["2"]
    # One-object prompts asking for the next palette colour: palette errors only.
    singles = [i for i, o in enumerate(objects) if len(o) == 1][:200]
    shifted = [[dict(objects[i][0], color=shapes.COLORS[(shapes.COLORS.index(objects[i][0]["color"]) + 1) % 6])]
               for i in singles]
    result = oracle.color_errors(images[singles], shifted, detections=[detections64[i] for i in singles])
    assert result["wrong"]["1"] >= 0.98 * len(singles) and result["took_other_object_color"] == 0
    assert sum(result["confusions"].values()) == result["wrong"]["1"]
    palette = shapes.COLORS
    assert set(result["confusions"]) <= {f"{palette[(i + 1) % 6]}->{c}" for i, c in enumerate(palette)}


def test_match_objects_pairs_each_target_with_its_most_agreeing_detection():
    red = dict(color="red", shape="circle", size="small", position="left")
    blue = dict(color="blue", shape="square", size="large", position="right")
    green = dict(color="green", shape="triangle", size="small", position="top")
    # Detections in the other order, plus a stray one: each object still finds its own.
    assert oracle.match_objects([red, blue], [green, blue, red]) == [red, blue]
    # One detection for two objects: it goes to the object it agrees with; the other gets None.
    assert oracle.match_objects([red, blue], [dict(blue, size="small")]) == [None, dict(blue, size="small")]
    # Unspecified attributes (None) never count as agreement.
    assert oracle.match_objects([dict(color="blue", shape=None, size=None, position=None)],
                                [red, blue]) == [blue]


def test_background_of_a_ring_whose_background_pixels_lie_on_one_line():
    # Sides of three greys: the median (100) keeps only the top row, on which no plane can be
    # fitted; the background is then that row's colour, not an extrapolated plane.
    img = np.full((32, 32, 3), 128, np.uint8)
    img[:, 0], img[:, -1], img[-1, :], img[0, :] = 0, 0, 255, 100
    np.testing.assert_allclose(oracle.estimate_background(img), 100.0)
    # A fittable ring still gets its plane: a horizontal gradient is kept as one.
    ramp = np.broadcast_to(np.linspace(60, 180, 32)[None, :, None], (32, 32, 3)).astype(np.uint8)
    bg = oracle.estimate_background(ramp)
    assert bg[16, 0, 0] < 70 and bg[16, -1, 0] > 170
