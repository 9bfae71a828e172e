"""What do the shapes model's image embeddings carry, and at what scale does the decoder read them?

    python -m bench.shapes_embed_probe [--pipeline DIR] [--num 128] [--num-retrieval 150]

Two measurements on 'test'-split images (CPU, ~8 min for the shipped model):

1. ``decode``: the decoder + upsampler from four kinds of z_i for the same ``--num`` images
   and captions, scored by the pixel oracle against the images' objects: the images' own
   CLIP embeddings at their own norm (``true``) and scaled to unit norm (``true_unit``),
   and the prior's samples for the captions as the pipeline gives them (``prior``, at
   ``prior.l2_norm`` when set) and at unit norm (``prior_unit``). The decoder trains on
   raw CLIP embeddings; this is how the unit-norm prior samples of sessions 1-6 were found
   to cost 10-18 points.
2. ``retrieval``: for one-object test images, per attribute, how often the true z_i and
   the prior's sample (for the image's caption) are nearest (cosine) to the caption
   "a {size} {color} {shape} {place}" with the right value among those with every value of
   that attribute (others kept): whether the embedding carries the attribute at all,
   whatever the decoder makes of it.

Prints one JSON line per measurement; ``--pipeline`` defaults to the shipped model.
"""

from __future__ import annotations

import argparse
import json
import time

DATA_SEED = 1234   # the 'test' images (as bench.shapes_prior_probe)


def _unit(x):
    import numpy as np
    x = np.array(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def decode_scores(pipe, num: int, seed: int) -> dict:
    """Oracle scores of the decoder + upsampler from true / prior z_i at two scales."""
    import numpy as np
    from unclip_jax.data import oracle, shapes
    batch = shapes.make_batch("test", 0, num, image_size=pipe.clip_config.vision.image_size, seed=DATA_SEED)
    captions = list(batch["caption"])
    true = np.asarray(pipe.encode_image(list(batch["image"])))
    prior = np.asarray(pipe.prior(pipe.encode_text(captions), seed, **pipe.settings()))
    out = {"n": num, "true_norm_mean": float(np.linalg.norm(true, axis=-1).mean()),
           "true_norm_std": float(np.linalg.norm(true, axis=-1).std()),
           "prior_norm_mean": float(np.linalg.norm(prior, axis=-1).mean())}
    for name, z in (("true", true), ("true_unit", _unit(true)), ("prior", prior), ("prior_unit", _unit(prior))):
        images = pipe.images_from_embeddings(np.asarray(z, np.float32), seed=seed, prompts=captions)
        scores = oracle.score(images, batch["objects"])
        out[name] = {k: round(v, 4) for k, v in scores.items() if isinstance(v, float)}
    return out


def retrieval_scores(pipe, num: int, seed: int) -> dict:
    """Per attribute: accuracy of picking the right value by cosine with one-attribute-changed captions."""
    import numpy as np
    from unclip_jax.data import shapes
    batch = shapes.make_batch("test", 0, 4 * num, image_size=pipe.clip_config.vision.image_size, seed=DATA_SEED)
    keep = [i for i, objs in enumerate(batch["objects"]) if len(objs) == 1][:num]
    objects = [batch["objects"][i][0] for i in keep]
    true = _unit(pipe.encode_image([batch["image"][i] for i in keep]))
    prior = _unit(pipe.prior(pipe.encode_text([batch["caption"][i] for i in keep]), seed, **pipe.settings()))
    out = {"n": len(keep)}
    for attribute in shapes.ATTRIBUTES:
        values = shapes.VOCAB[attribute]
        captions = [shapes.caption_for([{**o, attribute: v}], None, 0) for o in objects for v in values]
        candidates = _unit(pipe.encode_text(captions).embed).reshape(len(keep), len(values), -1)
        truth = np.array([values.index(o[attribute]) for o in objects])
        out[attribute] = {name: round(float(np.mean(np.einsum("nd,nkd->nk", z, candidates).argmax(1) == truth)), 4)
                          for name, z in (("true", true), ("prior", prior))}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", default="", help="exported pipeline directory (default: the shipped one)")
    ap.add_argument("--num", type=int, default=128, help="test images decoded")
    ap.add_argument("--num-retrieval", type=int, default=150, help="one-object test images for retrieval")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.num < 1 or args.num_retrieval < 1:
        ap.error("--num and --num-retrieval must be positive")

    from unclip_jax.assets import default_checkpoint
    from unclip_jax.pipeline import load_pipeline
    pipe = load_pipeline(args.pipeline or default_checkpoint())
    for name, fn, n in (("retrieval", retrieval_scores, args.num_retrieval), ("decode", decode_scores, args.num)):
        start = time.perf_counter()
        result = fn(pipe, n, args.seed)
        print(json.dumps({"measure": name, "seconds": round(time.perf_counter() - start, 1), **result}), flush=True)


if __name__ == "__main__":
    main()
