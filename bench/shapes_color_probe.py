"""Where the shapes model's colours go wrong: palette or binding? (CPU, minutes per variant)

    python -m bench.shapes_color_probe [--pipeline DIR] [--num 200] [--prompt_seed 1234] [decoder_best_of_n=1 ...]

Samples the recipe's ``--num`` evaluation prompts (half of them held-out colour-shape
pairs; ``--prompt_seed`` other than the recipe's 1234 draws a development set of other
prompts, for choosing settings without tuning on the report's prompts) with each
variant's sampling overrides (``key=value,...``; none: the pipeline's defaults), then
prints per variant one JSON line: the oracle scores and
``oracle.color_errors``: target objects, missed and wrongly coloured ones by object count,
how many wrong objects of two-object prompts show the colour the prompt gave the *other*
object (a binding error, which a CLIP that reads captions as bags of words cannot rank
away), and the colour confusions (asked->seen). ``--pipeline`` defaults to the shipped model.
"""

from __future__ import annotations

import argparse
import json

from bench.shapes_prior_probe import parse_variant


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", default="", help="exported pipeline directory (default: the shipped one)")
    ap.add_argument("--num", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt_seed", type=int, default=1234, help="evaluation prompts' seed (the recipe's: 1234)")
    ap.add_argument("variants", nargs="*", default=[""], help="sampling overrides, e.g. decoder_best_of_n=1")
    args = ap.parse_args(argv)
    variants = [(v, parse_variant("prompt:" + v)[1]) for v in args.variants]  # bad input fails first

    from unclip_jax.assets import default_checkpoint
    from unclip_jax.data import oracle
    from unclip_jax.pipeline import load_pipeline
    from unclip_jax.recipe import evaluation_prompts, sample_images
    pipe = load_pipeline(args.pipeline or default_checkpoint())
    prompts = evaluation_prompts(args.num, seed=args.prompt_seed)
    for name, overrides in variants:
        pipe.settings(**overrides)  # unknown names or bad values fail before sampling
        images, seconds = sample_images(pipe, prompts, seed=args.seed, **overrides)
        detections = oracle.detect_batch(images)
        scores = oracle.score(images, prompts, detections=detections)
        print(json.dumps({"variant": name or "defaults", "n": args.num, "prompt_seed": args.prompt_seed,
                          "sampling_s": round(seconds, 1),
                          **{k: round(v, 4) for k, v in scores.items() if isinstance(v, float)},
                          "color_errors": oracle.color_errors(images, prompts, detections=detections)}),
              flush=True)


if __name__ == "__main__":
    main()
