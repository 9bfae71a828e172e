"""How much do the prior's embeddings lose against the true ones? (CPU, ~1.5 min a variant)

    python -m bench.shapes_prior_probe [--pipeline DIR] [--num 64] [VARIANT ...]

For the captions of ``--num`` 'test'-split images, scores with the pixel oracle against
those images' objects (a) ``true``: the decoder + upsamplers from the images' own CLIP
embeddings (``unclip_jax.recipe.score_true_embeddings``), and (b) ``prompt``: the whole
cascade from the captions (prior-sampled embeddings). Same captions, same decoder: the gap
between the two is the prior's share of the errors. A VARIANT is ``true`` or ``prompt``,
optionally followed by sampling overrides: ``prompt:prior_guidance=4.0,best_of_n=8``,
``true:decoder_guidance=6.0``. Prints one JSON line per variant; ``--pipeline`` defaults
to the shipped model.
"""

from __future__ import annotations

import argparse
import json
import time

DATA_SEED = 1234   # the 'test' images both variants use


def parse_variant(text: str) -> tuple[str, dict]:
    """``"prompt:prior_guidance=4.0,best_of_n=8"`` → ``('prompt', {...})`` (ints stay ints)."""
    kind, _, rest = text.partition(":")
    if kind not in ("true", "prompt"):
        raise ValueError(f"a variant is 'true' or 'prompt' with optional :key=value,...; got {text!r}")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} in {text!r} is not key=value")
        overrides[key] = float(value) if "." in value else int(value)
    return kind, overrides


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", default="", help="exported pipeline directory (default: the shipped one)")
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("variants", nargs="*", default=["true", "prompt"])
    args = ap.parse_args(argv)
    variants = [(v, *parse_variant(v)) for v in args.variants]   # bad input fails before loading

    import numpy as np
    from unclip_jax.assets import default_checkpoint
    from unclip_jax.data import oracle, shapes
    from unclip_jax.pipeline import load_pipeline
    from unclip_jax.recipe import score_true_embeddings
    pipe = load_pipeline(args.pipeline or default_checkpoint())
    batch = shapes.make_batch("test", 0, args.num, image_size=pipe.clip_config.vision.image_size, seed=DATA_SEED)
    captions = list(batch["caption"])

    for name, kind, overrides in variants:
        start = time.perf_counter()
        if kind == "true":  # builds the same batch from the same seed, then decodes its true z_i
            scores = score_true_embeddings(pipe, num=args.num, seed=args.seed, data_seed=DATA_SEED, **overrides)
        else:
            images = pipe.text_to_image(captions, seed=args.seed, **overrides)["images"]
            scores = oracle.score(np.asarray(images), batch["objects"])
        print(json.dumps({"variant": name, "n": args.num, "seconds": round(time.perf_counter() - start, 1),
                          **{k: round(v, 4) for k, v in scores.items() if isinstance(v, float)}}), flush=True)


if __name__ == "__main__":
    main()
