"""Which stage of the shapes model falls short: decoder or upsampler? (CPU, a few minutes)

    python -m bench.shapes_decoder_probe [--pipeline DIR] [--num 64] [--decoder-steps 25,100]

Decodes the true CLIP image embeddings of ``--num`` 'test'-split images (with their
captions: ``unclip_jax.recipe.score_true_embeddings``), then scores with the pixel oracle
(a) the pipeline's own output (decoder + learned upsampler) and (b) the decoder's output
resized bilinearly to the same size (no learned upsampler), for each decoder step count.
If (b) matches (a), the upsampler adds nothing and loses nothing: the decoder is the limit.
Prints one JSON line per variant. ``--pipeline`` defaults to the shipped model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", default="", help="exported pipeline directory (default: the shipped one)")
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--decoder-steps", default="25")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from unclip_jax.assets import default_checkpoint
    from unclip_jax.pipeline import load_pipeline
    from unclip_jax.recipe import score_true_embeddings
    from unclip_jax.stages.upsampler import upsampler_spec
    pipe = load_pipeline(args.pipeline or default_checkpoint())
    decoder_only = dataclasses.replace(pipe, upsamplers=[])
    out_size = upsampler_spec(pipe.upsamplers[-1].config)["image_size"] if pipe.upsamplers else None

    for steps in (int(s) for s in args.decoder_steps.split(",")):
        for variant, p, resize in (("decoder + learned upsampler", pipe, None),
                                   ("decoder, bilinear resize", decoder_only, out_size)):
            scores = score_true_embeddings(p, num=args.num, seed=args.seed, resize_to=resize, decoder_steps=steps)
            print(json.dumps({"variant": variant, "decoder_steps": steps, "n": args.num,
                              **{k: round(v, 4) for k, v in scores.items() if isinstance(v, float)}}), flush=True)


if __name__ == "__main__":
    main()
