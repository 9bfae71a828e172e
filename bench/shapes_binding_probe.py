"""Does the shapes CLIP bind attributes to objects? (CPU, seconds)

    python -m bench.shapes_binding_probe [--pipeline DIR] [--num 400] [--generated]

For two-object 'test' images whose objects differ in the attribute being probed, compares
CLIP's cosine between the image and its own caption with the cosine to the same caption
with the two objects' colours (or shapes, or sizes) swapped: the words are the same, only
which object has which differs. Prints one JSON line: per attribute, the fraction of
images where the true caption wins (0.5 = no binding at all) and the number of images.
A bag-of-words CLIP scores near 0.5, and then neither the prior (conditioned on its z_t)
nor CLIP reranking can tell "a red circle left of a blue square" from its swap.
``--generated`` also samples one image per two-colour caption with the pipeline and asks
the same of CLIP on those images, split by what the oracle sees: both colours right, the
two colours swapped (the swapped caption is then the right one), or one of the caption's
colours on both objects. If CLIP still prefers the true caption on swapped images, it
cannot rank such binding errors away (``decoder_best_of_n``). ``--pipeline`` defaults to the
shipped model.
"""

from __future__ import annotations

import argparse
import json
import re


def swap_words(caption: str, a: str, b: str) -> str:
    """``caption`` with every whole word ``a`` and ``b`` exchanged."""
    return re.sub(rf"\b({re.escape(a)}|{re.escape(b)})\b", lambda m: b if m.group(1) == a else a, caption)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", default="", help="exported pipeline directory (default: the shipped one)")
    ap.add_argument("--num", type=int, default=400, help="'test' examples drawn (about half have two objects)")
    ap.add_argument("--generated", action="store_true", help="also probe images sampled for the two-colour captions")
    args = ap.parse_args(argv)

    import numpy as np
    from unclip_jax.assets import default_checkpoint
    from unclip_jax.data import shapes
    from unclip_jax.pipeline import load_pipeline
    pipe = load_pipeline(args.pipeline or default_checkpoint())
    batch = shapes.make_batch("test", 0, args.num, image_size=pipe.clip_config.vision.image_size, seed=1234)

    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    def true_caption_wins(images, true, swapped):
        z_i = unit(pipe.encode_image(list(images)))
        return (z_i * unit(pipe.encode_text(true).embed)).sum(-1) > (z_i * unit(pipe.encode_text(swapped).embed)).sum(-1)

    result = {"n_examples": args.num}
    for attr in ("color", "shape", "size"):
        rows = [i for i, objs in enumerate(batch["objects"]) if len(objs) == 2 and objs[0][attr] != objs[1][attr]]
        if not rows:
            continue
        true = [batch["caption"][i] for i in rows]
        swapped = [swap_words(c, batch["objects"][i][0][attr], batch["objects"][i][1][attr])
                   for c, i in zip(true, rows)]
        wins = true_caption_wins(batch["image"][rows], true, swapped)
        result[attr] = {"true_caption_wins": round(float(wins.mean()), 4), "n": len(rows)}
        if attr == "color" and args.generated:
            result["generated"] = _generated(pipe, true, swapped, [batch["objects"][i] for i in rows],
                                             true_caption_wins)
    print(json.dumps(result), flush=True)


def _generated(pipe, captions, swapped, objects, true_caption_wins) -> dict:
    """CLIP's preference on images sampled for ``captions``, by the oracle's colour verdict."""
    import numpy as np
    from unclip_jax.data import oracle
    from unclip_jax.recipe import sample_images
    images, _ = sample_images(pipe, captions, decoder_best_of_n=1)
    detections = oracle.detect_batch(images)
    groups = {"colors_right": [], "colors_swapped": [], "one_color_on_both": []}
    for i, (target, found) in enumerate(zip(objects, detections)):
        seen = [None if f is None else f["color"] for f in oracle.match_objects(target, found)]
        asked = [o["color"] for o in target]
        if seen == asked:
            groups["colors_right"].append(i)
        elif seen == asked[::-1]:  # what the swapped caption says: CLIP should prefer it
            groups["colors_swapped"].append(i)
        elif seen[0] is not None and seen[0] == seen[1] and seen[0] in asked:
            groups["one_color_on_both"].append(i)
    wins = true_caption_wins(images, captions, swapped)
    out = {"n": len(captions)}
    for name, idx in groups.items():
        out[name] = {"n": len(idx), "true_caption_wins": round(float(np.mean(wins[idx])), 4) if idx else None}
    return out


if __name__ == "__main__":
    main()
