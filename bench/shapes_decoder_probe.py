"""Which stage of the shapes model falls short: decoder or upsampler? (CPU, a few minutes)

    python -m bench.shapes_decoder_probe [--pipeline DIR] [--num 64] [--decoder-steps 25,100]

Decodes the true CLIP image embeddings of ``--num`` 'test'-split images (with their
captions, as ``unclip_jax.recipe.score_true_embeddings``), then scores with the pixel oracle
(a) the pipeline's own output (decoder + learned upsampler) and (b) the decoder's output
resized bilinearly to the same size (no learned upsampler), for each decoder step count.
If (b) matches (a), the upsampler adds nothing and loses nothing: the decoder is the limit.
Prints one JSON line per variant. ``--pipeline`` defaults to the shipped model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
from PIL import Image


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", default="", help="exported pipeline directory (default: the shipped one)")
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--decoder-steps", default="25")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from unclip_jax.assets import default_checkpoint
    from unclip_jax.data import oracle, shapes
    from unclip_jax.pipeline import load_pipeline
    pipe = load_pipeline(args.pipeline or default_checkpoint())
    batch = shapes.make_batch("test", 0, args.num, image_size=pipe.clip_config.vision.image_size, seed=1234)
    z_i = pipe.encode_image(list(batch["image"]))
    prompts = list(batch["caption"])
    decoder_only = dataclasses.replace(pipe, upsamplers=[])

    def report(variant, steps, images):
        scores = oracle.score(np.asarray(images), batch["objects"])
        print(json.dumps({"variant": variant, "decoder_steps": steps, "n": args.num,
                          **{k: round(v, 4) for k, v in scores.items() if isinstance(v, float)}}), flush=True)

    for steps in (int(s) for s in args.decoder_steps.split(",")):
        full = pipe.images_from_embeddings(z_i, seed=args.seed, prompts=prompts, decoder_steps=steps)
        report("decoder + learned upsampler", steps, full)
        low = decoder_only.images_from_embeddings(z_i, seed=args.seed, prompts=prompts, decoder_steps=steps)
        size = (full.shape[2], full.shape[1])
        report("decoder, bilinear resize", steps,
               np.stack([np.asarray(Image.fromarray(im).resize(size, Image.BILINEAR)) for im in low]))


if __name__ == "__main__":
    main()
