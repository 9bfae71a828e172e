"""Captioned shapes: a tiny, embedded text-to-image dataset whose truth is known.

Each image (``image_size`` × ``image_size`` RGB uint8, 64 by default, 32 also
supported) shows one or two flat, anti-aliased objects on a muted background, with a
caption and the structured attributes the caption was made from::

    {'image': uint8 (H, W, 3), 'caption': 'a small red circle on the left',
     'objects': [{'color': 'red', 'shape': 'circle', 'size': 'small', 'position': 'left'}]}

Vocabulary: ``COLORS`` × ``SHAPES`` × ``SIZES`` × ``POSITIONS``. Two-object images carry
a relation ('left of', 'right of', 'above', 'below') that fixes both positions: "A left
of B" puts A at 'left' and B at 'right'; "A above B" puts A at 'top' and B at 'bottom'.

Geometry is simple on purpose so that the pixel oracle (``oracle.py``) recovers every
attribute exactly: an object of nominal radius r (``SIZE_RADIUS`` × W, jittered ±6 %) is
a disc of radius r, an axis-aligned square of half-side 0.88 r, or an upward equilateral
triangle of side 2 r; its area centroid sits at the anchor of its position
(``ANCHORS``, jittered ±0.035 W) and two objects never overlap.

Splits and the held-out rule: ``HELDOUT_PAIRS`` lists (color, shape) pairs that never
occur in the 'train' and 'test' splits — in no object of any image. The 'heldout' split
holds exactly those combinations: every one of its images contains at least one object
whose (color, shape) is a held-out pair. Each held-out colour and shape still occurs in
training with other partners, so the split measures compositional generalisation.

Determinism: example ``i`` of a split is a pure function of ``(seed, split, i,
image_size)`` (its own ``np.random.default_rng([seed, split_id, i])``), so any process
can produce any example: ``ShapesSource`` is a random-access source for grain.
"""

from __future__ import annotations

import colorsys
import re
from typing import Any, Iterable, Sequence

import numpy as np

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
RELATIONS = ("left of", "right of", "above", "below")
ATTRIBUTES = ("color", "shape", "size", "position")
VOCAB = {"color": COLORS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}

# Saturated colours with well separated hues (red ≈ 0°, orange ≈ 30°, yellow ≈ 55°,
# green ≈ 135°, blue ≈ 225°, purple ≈ 285°); backgrounds are low-chroma greys.
PALETTE = {
    "red": (220, 40, 45),
    "orange": (245, 135, 25),
    "yellow": (235, 215, 40),
    "green": (45, 170, 70),
    "blue": (45, 85, 220),
    "purple": (145, 55, 190),
}

# Nominal object radius as a fraction of the image width: ratio ~2 keeps the classes
# apart under blur, and two large objects still fit side by side with a gap.
SIZE_RADIUS = {"small": 0.10, "large": 0.19}
# Area-centroid anchors (x, y) as fractions of (W, H).
ANCHORS = {
    "left": (0.26, 0.5),
    "right": (0.74, 0.5),
    "top": (0.5, 0.26),
    "bottom": (0.5, 0.74),
    "center": (0.5, 0.5),
}
SQUARE_HALF_SIDE = 0.88  # × r: gives the square nearly the disc's area (3.10 r² vs π r²)
TRIANGLE_HEIGHT = np.sqrt(3.0)  # × r: equilateral triangle of side 2r

HELDOUT_PAIRS = (("purple", "triangle"), ("orange", "square"), ("yellow", "circle"))
SPLITS = {"train": 0, "test": 1, "heldout": 2}
MAX_OBJECTS = 2

_RADIUS_JITTER = 0.06
_POSITION_JITTER = 0.035
_MARGIN = 0.03       # min distance (× W) from an object's box to the border
_MIN_GAP = 0.04      # min gap (× W) between the boxes of two objects
_SUPERSAMPLE = 4     # sub-pixels per pixel side for anti-aliased coverage
P_TWO_OBJECTS = 0.4  # the default share of two-object images

_ALL_PAIRS = tuple((c, s) for c in COLORS for s in SHAPES)
_SEEN_PAIRS = tuple(p for p in _ALL_PAIRS if p not in HELDOUT_PAIRS)


def is_heldout(objects: Iterable[dict]) -> bool:
    """True when any object's (color, shape) is one of ``HELDOUT_PAIRS``."""
    return any((o.get("color"), o.get("shape")) in HELDOUT_PAIRS for o in objects)


# ---------------------------------------------------------------------------- captions

_POS_ON = {"left": "on the left", "right": "on the right", "top": "at the top",
           "bottom": "at the bottom", "center": "in the center"}
_POS_AT = {"left": "at the left", "right": "at the right", "top": "at the top",
           "bottom": "at the bottom", "center": "in the middle"}
_REL_TEXT = {"left of": ("left of", "to the left of"), "right of": ("right of", "to the right of"),
             "above": ("above",), "below": ("below",)}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(o: dict) -> str:
    words = " ".join(o[a] for a in ("size", "color", "shape") if o.get(a))  # colour may be left out
    return f"{_article(words)} {words}"


_SINGLE_TEMPLATES = (
    lambda o: f"{_noun_phrase(o)} {_POS_ON[o['position']]}",
    lambda o: (f"{_article(o['color'])} {o['color']} {o['shape']}, {o['size']}, "
               f"{_POS_AT[o['position']]}"),
    lambda o: f"{_POS_ON[o['position']]}, {_noun_phrase(o)}",
    lambda o: (f"{_article(o['size'])} {o['size']} {o['shape']} in {o['color']} "
               f"{_POS_ON[o['position']]}"),
    lambda o: f"there is {_noun_phrase(o)} {_POS_ON[o['position']]}",
    lambda o: f"a picture of {_noun_phrase(o)} {_POS_AT[o['position']]}",
)
_PAIR_TEMPLATES = (
    lambda a, rel, b: f"{_noun_phrase(a)} {rel} {_noun_phrase(b)}",
    lambda a, rel, b: f"{_noun_phrase(a)} is {rel} {_noun_phrase(b)}",
    lambda a, rel, b: f"there is {_noun_phrase(a)} {rel} {_noun_phrase(b)}",
)


# The single-object templates that name the colour only through _noun_phrase.
_NOUN_PHRASE_TEMPLATES = (0, 2, 4, 5)


def caption_for(objects: Sequence[dict], relation: str | None, template: int = 0,
                wording: int = 0, *, with_color: bool = True) -> str:
    """The caption of one template for one or two objects.

    ``template`` indexes ``_SINGLE_TEMPLATES`` (1 object) or ``_PAIR_TEMPLATES`` (2
    objects, relation required), modulo their count; ``wording`` picks among the
    phrasings of the relation ('left of' / 'to the left of'). ``with_color=False`` leaves
    every colour out ("a small circle on the left"; single objects then use the templates
    whose only colour word is in the noun phrase).
    """
    if not with_color:
        objects = [{**o, "color": None} for o in objects]
        if len(objects) == 1:
            template = _NOUN_PHRASE_TEMPLATES[template % len(_NOUN_PHRASE_TEMPLATES)]
    if len(objects) == 1:
        return _SINGLE_TEMPLATES[template % len(_SINGLE_TEMPLATES)](objects[0])
    if len(objects) != 2 or relation not in _REL_TEXT:
        raise ValueError(f"a caption needs 1 object, or 2 objects and a relation in "
                         f"{RELATIONS}; got {len(objects)} objects, relation {relation!r}")
    words = _REL_TEXT[relation]
    return _PAIR_TEMPLATES[template % len(_PAIR_TEMPLATES)](
        objects[0], words[wording % len(words)], objects[1])


_RELATION_POSITIONS = {"left of": ("left", "right"), "right of": ("right", "left"),
                       "above": ("top", "bottom"), "below": ("bottom", "top")}

# Longest phrases first so that 'to the left of' wins over 'left'.
_RELATION_PATTERNS = (
    (r"\bto the left of\b", "left of"), (r"\bto the right of\b", "right of"),
    (r"\bleft of\b", "left of"), (r"\bright of\b", "right of"),
    (r"\bon top of\b", "above"), (r"\babove\b", "above"), (r"\bover\b", "above"),
    (r"\bbelow\b", "below"), (r"\bunder(neath)?\b", "below"), (r"\bbeneath\b", "below"),
)
_SYNONYMS = {
    "color": {c: c for c in COLORS} | {"violet": "purple"},
    "shape": {"circle": "circle", "circles": "circle", "disc": "circle", "disk": "circle",
              "square": "square", "squares": "square", "triangle": "triangle",
              "triangles": "triangle"},
    "size": {"small": "small", "little": "small", "tiny": "small", "large": "large",
             "big": "large"},
    "position": {"left": "left", "right": "right", "top": "top", "bottom": "bottom",
                 "center": "center", "centre": "center", "middle": "center"},
}


def _parse_object(words: Sequence[str]) -> dict | None:
    obj = {a: None for a in ATTRIBUTES}
    for w in words:
        for attr, table in _SYNONYMS.items():
            if w in table and obj[attr] is None:
                obj[attr] = table[w]
    return obj if any(v is not None for v in obj.values()) else None


def parse_prompt(text: str) -> list[dict]:
    """Objects named by a prompt: ``[{'color', 'shape', 'size', 'position'}, ...]``.

    Understands every caption template of this module and looser prompts ("a red
    circle", "big blue square at the top", "a red circle and a blue square"). An
    attribute the prompt does not name is None. A relation ("A left of B", "A above B",
    "to the right of", "below", ...) splits the prompt into two objects and sets their
    positions as the generator does ('left'/'right', 'top'/'bottom'). Raises ValueError
    for a prompt that names no colour, shape, size or position.
    """
    norm = re.sub(r"[^a-z ]+", " ", text.lower())
    norm = " ".join(norm.split())
    for pattern, relation in _RELATION_PATTERNS:
        m = re.search(pattern, norm)
        if not m:
            continue
        first = _parse_object(norm[:m.start()].split())
        second = _parse_object(norm[m.end():].split())
        if first is None or second is None:
            continue
        first["position"], second["position"] = _RELATION_POSITIONS[relation]
        return [first, second]
    words = norm.split()
    n_shapes = sum(w in _SYNONYMS["shape"] for w in words)
    segments = [words]
    if n_shapes >= 2:  # "a red circle and a blue square"
        segments, current = [], []
        for w in words:
            if w in ("and", "with") and current:
                segments.append(current)
                current = []
            else:
                current.append(w)
        segments.append(current)
    objects = [o for o in (_parse_object(s) for s in segments) if o is not None]
    if not objects:
        raise ValueError(f"prompt {text!r} names no colour {COLORS}, shape {SHAPES}, size "
                         f"{SIZES} or position {POSITIONS}")
    return objects


# ------------------------------------------------------------------ attribute encoding

def encode_objects(objects: Sequence[dict], max_objects: int = MAX_OBJECTS) -> np.ndarray:
    """Objects → int32 (max_objects, 4): indices into ``VOCAB`` per ``ATTRIBUTES``; -1 pads.

    An attribute that is None (unspecified in a prompt) is also -1.
    """
    if len(objects) > max_objects:
        raise ValueError(f"{len(objects)} objects > max_objects={max_objects}")
    out = np.full((max_objects, len(ATTRIBUTES)), -1, np.int32)
    for i, o in enumerate(objects):
        for j, a in enumerate(ATTRIBUTES):
            if o.get(a) is not None:
                out[i, j] = VOCAB[a].index(o[a])
    return out


def decode_attributes(attributes: np.ndarray) -> list[dict]:
    """Inverse of ``encode_objects``: rows that are all -1 are padding and dropped."""
    objects = []
    for row in np.asarray(attributes).reshape(-1, len(ATTRIBUTES)):
        if np.all(row < 0):
            continue
        objects.append({a: (VOCAB[a][int(v)] if v >= 0 else None)
                        for a, v in zip(ATTRIBUTES, row)})
    return objects


# ---------------------------------------------------------------------------- geometry

def _half_extents(shape: str, r: float) -> tuple[float, float, float, float]:
    """(left, right, up, down) extents of the shape from its area centroid."""
    if shape == "circle":
        return r, r, r, r
    if shape == "square":
        a = SQUARE_HALF_SIDE * r
        return a, a, a, a
    h = TRIANGLE_HEIGHT * r  # centroid sits h/3 above the base
    return r, r, 2.0 * h / 3.0, h / 3.0


def _box(obj: dict) -> tuple[float, float, float, float]:
    """(x0, x1, y0, y1) in fractions of the image side."""
    left, right, up, down = _half_extents(obj["shape"], obj["radius"])
    return obj["cx"] - left, obj["cx"] + right, obj["cy"] - up, obj["cy"] + down


def _place(obj: dict, rng: np.random.Generator, jitter: bool) -> None:
    ax, ay = ANCHORS[obj["position"]]
    dx, dy = rng.uniform(-_POSITION_JITTER, _POSITION_JITTER, 2) if jitter else (0.0, 0.0)
    left, right, up, down = _half_extents(obj["shape"], obj["radius"])
    obj["cx"] = float(np.clip(ax + dx, _MARGIN + left, 1.0 - _MARGIN - right))
    obj["cy"] = float(np.clip(ay + dy, _MARGIN + up, 1.0 - _MARGIN - down))


def _separated(a: dict, b: dict) -> bool:
    ax0, ax1, ay0, ay1 = _box(a)
    bx0, bx1, by0, by1 = _box(b)
    return (bx0 - ax1 >= _MIN_GAP or ax0 - bx1 >= _MIN_GAP
            or by0 - ay1 >= _MIN_GAP or ay0 - by1 >= _MIN_GAP)


def _coverage(obj: dict, size: int) -> tuple[np.ndarray, int, int]:
    """Anti-aliased coverage in [0, 1] of the object over its pixel box: (cov, y0, x0)."""
    x0f, x1f, y0f, y1f = (v * size for v in _box(obj))
    px0, px1 = max(int(np.floor(x0f)), 0), min(int(np.ceil(x1f)), size)
    py0, py1 = max(int(np.floor(y0f)), 0), min(int(np.ceil(y1f)), size)
    ss = _SUPERSAMPLE
    xs = px0 + (np.arange((px1 - px0) * ss) + 0.5) / ss
    ys = py0 + (np.arange((py1 - py0) * ss) + 0.5) / ss
    x, y = np.meshgrid(xs, ys)
    cx, cy, r = obj["cx"] * size, obj["cy"] * size, obj["radius"] * size
    if obj["shape"] == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif obj["shape"] == "square":
        a = SQUARE_HALF_SIDE * r
        inside = (np.abs(x - cx) <= a) & (np.abs(y - cy) <= a)
    else:
        h = TRIANGLE_HEIGHT * r
        apex = cy - 2.0 * h / 3.0
        inside = (y >= apex) & (y <= apex + h) & (np.abs(x - cx) <= r * (y - apex) / h)
    cov = inside.reshape(py1 - py0, ss, px1 - px0, ss).mean(axis=(1, 3))
    return cov, py0, px0


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, float]:
    """A muted background (H, W, 3) float: light or dark grey, a tint, a mild gradient."""
    grey = rng.uniform(170, 225) if rng.random() < 0.5 else rng.uniform(25, 85)
    tint = rng.uniform(-12, 12, 3)
    angle = rng.uniform(0, 2 * np.pi)
    amplitude = rng.uniform(0, 16)
    noise_std = rng.uniform(0, 3)
    coords = (np.arange(size) + 0.5) / size - 0.5
    ramp = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]
    bg = grey + tint[None, None, :] + amplitude * ramp[:, :, None]
    return bg, noise_std


# Hues of the objects drawn in unnamed colours (``unnamed_colors``): at least this far (in
# degrees) from the hue of every colour in a held-out pair, so no unnamed object looks like
# a held-out pair; they may lie near the other palette colours, all of whose pairs are seen.
UNNAMED_HUE_MARGIN = 35.0


def _hue_degrees(rgb: Sequence[float]) -> float:
    return 360.0 * colorsys.rgb_to_hsv(*(np.asarray(rgb, np.float64) / 255.0))[0]


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


_HELDOUT_HUES = tuple(_hue_degrees(PALETTE[c]) for c in sorted({c for c, _ in HELDOUT_PAIRS}))


def unnamed_color(rng: np.random.Generator) -> tuple[float, float, float]:
    """A saturated RGB colour (0-255 floats) outside the vocabulary's held-out hues (see
    ``UNNAMED_HUE_MARGIN``): hue uniform over what the margin allows, saturation 0.55-0.9,
    value 0.6-0.95."""
    while True:  # rejection: about 2/3 of hues are allowed
        hue = rng.uniform(0.0, 360.0)
        if min(_hue_distance(hue, h) for h in _HELDOUT_HUES) >= UNNAMED_HUE_MARGIN:
            break
    rgb = colorsys.hsv_to_rgb(hue / 360.0, rng.uniform(0.55, 0.9), rng.uniform(0.6, 0.95))
    return tuple(255.0 * c for c in rgb)


def _object_color(rng: np.random.Generator, base: Sequence[float]) -> np.ndarray:
    base = np.asarray(base, np.float64)
    return np.clip(base * rng.uniform(0.9, 1.05) + rng.uniform(-6, 6, 3), 0, 255)


# --------------------------------------------------------------------------- examples

def _sample_pair(rng: np.random.Generator, pairs: Sequence[tuple[str, str]]) -> tuple[str, str]:
    return pairs[rng.integers(len(pairs))]


def _sample_layout(rng: np.random.Generator, split: str,
                   two_object_fraction: float = P_TWO_OBJECTS) -> tuple[list[dict], str | None]:
    allowed = HELDOUT_PAIRS if split == "heldout" else _SEEN_PAIRS
    if rng.random() >= two_object_fraction:
        color, shape = _sample_pair(rng, allowed)
        objects = [dict(color=color, shape=shape, size=SIZES[rng.integers(2)],
                        position=POSITIONS[rng.integers(len(POSITIONS))])]
        return objects, None
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    first = _sample_pair(rng, allowed)
    # In 'heldout' one object is a held-out pair and the other any pair; order random.
    second_pool = _ALL_PAIRS if split == "heldout" else _SEEN_PAIRS
    second = _sample_pair(rng, second_pool)
    while second == first:
        second = _sample_pair(rng, second_pool)
    pairs = [first, second]
    if split == "heldout" and rng.random() < 0.5:
        pairs.reverse()
    positions = _RELATION_POSITIONS[relation]
    objects = [dict(color=c, shape=s, size=SIZES[rng.integers(2)], position=p)
               for (c, s), p in zip(pairs, positions)]
    return objects, relation


def _check_fraction(name: str, fraction: float) -> float:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {fraction}")
    return float(fraction)


def example_objects(seed: int, split: str, index: int, *,
                    two_object_fraction: float = P_TWO_OBJECTS) -> tuple[list[dict], str | None]:
    """The (objects, relation) of example ``index`` without rendering it (cheap)."""
    if split not in SPLITS:
        raise ValueError(f"unknown shapes split {split!r}; choose one of {sorted(SPLITS)}")
    rng = np.random.default_rng([int(seed), SPLITS[split], int(index)])
    return _sample_layout(rng, split, _check_fraction("two_object_fraction", two_object_fraction))


def _swap_one_shape(objects: list[dict], split: str, rng: np.random.Generator) -> None:
    """Gives one object another shape that ``split`` allows with its colour (and that does
    not repeat the other object's colour-shape pair); nothing else changes. Rarely no
    object has such a shape (two objects of one colour that has a held-out pair): then
    nothing changes at all."""
    pool = _ALL_PAIRS if split == "heldout" else _SEEN_PAIRS
    for k in rng.permutation(len(objects)):
        o = objects[k]
        taken = {(p["color"], p["shape"]) for j, p in enumerate(objects) if j != k}
        options = [s for s in SHAPES
                   if s != o["shape"] and (o["color"], s) in pool and (o["color"], s) not in taken]
        if options:
            o["shape"] = options[int(rng.integers(len(options)))]
            return


def generate_example(seed: int, split: str, index: int, image_size: int = 64, *,
                     shape_twin: bool = False,
                     two_object_fraction: float = P_TWO_OBJECTS,
                     colorless_captions: float = 0.0,
                     unnamed_colors: float = 0.0) -> dict[str, Any]:
    """Example ``index`` of ``split``: a pure function of its arguments.

    ``shape_twin``: the same example with one object's shape changed (same colours,
    sizes, places, background and caption wording): a contrastive hard negative that only
    shape tells apart. Rarely (under 1 % of two-object twins) the new outline needs
    another placement attempt, and the rest of the picture is drawn afresh.

    ``two_object_fraction``: the probability that the example shows two objects. At the
    default (0.4) the examples are the dataset's own; another value draws other examples
    from the same stream (e.g. more two-object images to train attribute binding).

    ``colorless_captions``: the probability that the caption leaves out every
    colour ("a small circle on the left"; ``objects`` still has them), drawn from a stream
    of its own, so the images and the other captions do not change and a shape twin
    makes the same choice as its original. Such captions ask CLIP to match shape apart
    from colour.

    ``unnamed_colors``: the probability that every object is drawn in a colour outside
    the vocabulary (``unnamed_color``: no held-out pair's hue), with a caption that names
    no colour and ``objects`` colours of None. The choice and the colours come from a
    stream of their own (a shape twin gets its original's), and the rest of the picture
    is drawn as without it. Such images ask CLIP to read shape from any colour, so that it
    carries over to colour-shape pairs it never saw.

    Returns ``{'image': uint8 (S, S, 3), 'caption': str, 'objects': [{'color', 'shape',
    'size', 'position'}, ...], 'relation': str | None, 'heldout': bool}``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown shapes split {split!r}; choose one of {sorted(SPLITS)}")
    if image_size < 16:
        raise ValueError(f"shapes image_size must be >= 16, got {image_size}")
    if index < 0:
        raise IndexError(f"negative example index {index}")
    _check_fraction("colorless_captions", colorless_captions)
    _check_fraction("unnamed_colors", unnamed_colors)
    rng = np.random.default_rng([int(seed), SPLITS[split], int(index)])
    objects, relation = _sample_layout(rng, split, _check_fraction("two_object_fraction", two_object_fraction))
    if shape_twin:  # its own stream, so the main one draws the rest exactly as for the original
        _swap_one_shape(objects, split, np.random.default_rng([int(seed), SPLITS[split], int(index), 7]))
    for o in objects:
        o["radius"] = SIZE_RADIUS[o["size"]] * rng.uniform(1 - _RADIUS_JITTER, 1 + _RADIUS_JITTER)
    for attempt in range(9):
        for o in objects:
            _place(o, rng, jitter=attempt < 8)
        if len(objects) == 1 or _separated(*objects):
            break
    unnamed_rng = np.random.default_rng([int(seed), SPLITS[split], int(index), 13])
    unnamed = unnamed_colors > 0 and unnamed_rng.random() < unnamed_colors
    image, noise_std = _background(rng, image_size)
    for o in objects:
        cov, y0, x0 = _coverage(o, image_size)
        color = _object_color(rng, unnamed_color(unnamed_rng) if unnamed else PALETTE[o["color"]])
        patch = image[y0:y0 + cov.shape[0], x0:x0 + cov.shape[1]]
        patch += cov[..., None] * (color - patch)
    image += rng.normal(0.0, noise_std, image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    with_color = not unnamed and not (colorless_captions > 0 and np.random.default_rng(
        [int(seed), SPLITS[split], int(index), 11]).random() < colorless_captions)
    caption = caption_for(objects, relation, template=int(rng.integers(6)),
                          wording=int(rng.integers(2)), with_color=with_color)
    clean = [{a: (None if unnamed and a == "color" else o[a]) for a in ATTRIBUTES} for o in objects]
    return {"image": image, "caption": caption, "objects": clean, "relation": relation,
            "heldout": is_heldout(clean)}


def make_batch(split: str, start: int, n: int, *, image_size: int = 64,
               seed: int = 0) -> dict[str, Any]:
    """Examples ``start .. start+n-1`` of ``split`` as a batch.

    Returns ``{'image': uint8 (n, S, S, 3), 'caption': list[str], 'objects': list of
    object lists, 'attributes': int32 (n, 2, 4) (see ``encode_objects``), 'heldout':
    bool (n,)}``.
    """
    examples = [generate_example(seed, split, start + i, image_size) for i in range(n)]
    return {
        "image": np.stack([e["image"] for e in examples]) if examples
        else np.zeros((0, image_size, image_size, 3), np.uint8),
        "caption": [e["caption"] for e in examples],
        "objects": [e["objects"] for e in examples],
        "attributes": np.stack([encode_objects(e["objects"]) for e in examples]) if examples
        else np.zeros((0, MAX_OBJECTS, len(ATTRIBUTES)), np.int32),
        "heldout": np.array([e["heldout"] for e in examples], bool),
    }


class ShapesSource:
    """Random-access captioned shapes (grain ``RandomAccessDataSource`` protocol).

    ``source[i]`` → ``{'image': uint8 (S, S, 3), 'caption': str, 'attributes': int32
    (2, 4), 'heldout': bool}``: fixed structure, so grain and ``batches`` can stack it;
    ``decode_attributes`` turns ``attributes`` back into object dicts. Usable as
    ``grain.MapDataset.source(ShapesSource(...))``.

    With ``shape_twins`` every item is an example and its shape twin (see
    ``generate_example``): 'image' (2, S, S, 3), 'caption' a pair of str, 'attributes'
    (2, 2, 4), 'heldout' (2,); contrastive training flattens the pairs, so each caption
    meets a negative that differs only in one shape.

    Args:
      split: 'train', 'test' or 'heldout'.
      num_examples: the length of the split (examples are generated on demand).
      image_size: side S in pixels.
      seed: the dataset seed (which images exist), not a shuffling seed.
      two_object_fraction: the share of two-object examples (``generate_example``).
      colorless_captions: the share of captions without colours (``generate_example``).
      unnamed_colors: the share of examples drawn in colours outside the vocabulary
        (``generate_example``); their 'attributes' colour is -1.
      process_index, process_count: recorded for ``sources.batches`` (which gives each
        process its slice of every global batch); the source holds all examples.
    """

    def __init__(self, split: str = "train", num_examples: int = 100_000, *,
                 image_size: int = 64, seed: int = 0, process_index: int = 0,
                 process_count: int = 1, shape_twins: bool = False,
                 two_object_fraction: float = P_TWO_OBJECTS,
                 colorless_captions: float = 0.0, unnamed_colors: float = 0.0):
        if split not in SPLITS:
            raise ValueError(f"unknown shapes split {split!r}; choose one of {sorted(SPLITS)}")
        if num_examples <= 0:
            raise ValueError(f"shapes num_examples must be positive, got {num_examples}")
        if shape_twins and split == "heldout":  # a twin could lose its held-out pair
            raise ValueError("shape_twins are for training splits, not 'heldout'")
        self.two_object_fraction = _check_fraction("two_object_fraction", two_object_fraction)
        self.colorless_captions = _check_fraction("colorless_captions", colorless_captions)
        self.unnamed_colors = _check_fraction("unnamed_colors", unnamed_colors)
        generate_example(seed, split, 0, image_size)  # validates image_size early
        self.split, self.num_examples = split, int(num_examples)
        self.image_size, self.seed = int(image_size), int(seed)
        self.process_index, self.process_count = process_index, process_count
        self.shape_twins = bool(shape_twins)
        self.stats = {"skipped_corrupt": 0}

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        items = [self._item(index, False)] + ([self._item(index, True)] if self.shape_twins else [])
        if not self.shape_twins:
            return items[0]
        return {"image": np.stack([i["image"] for i in items]), "caption": tuple(i["caption"] for i in items),
                "attributes": np.stack([i["attributes"] for i in items]),
                "heldout": np.array([i["heldout"] for i in items])}

    def _item(self, index: int, twin: bool) -> dict[str, Any]:
        e = generate_example(self.seed, self.split, index, self.image_size, shape_twin=twin,
                             two_object_fraction=self.two_object_fraction,
                             colorless_captions=self.colorless_captions,
                             unnamed_colors=self.unnamed_colors)
        return {"image": e["image"], "caption": e["caption"],
                "attributes": encode_objects(e["objects"]), "heldout": np.bool_(e["heldout"])}

    def __repr__(self) -> str:
        return (f"ShapesSource(split={self.split!r}, num_examples={self.num_examples}, "
                f"image_size={self.image_size}, seed={self.seed}, shape_twins={self.shape_twins}, "
                f"two_object_fraction={self.two_object_fraction}, "
                f"colorless_captions={self.colorless_captions}, "
                f"unnamed_colors={self.unnamed_colors})")
