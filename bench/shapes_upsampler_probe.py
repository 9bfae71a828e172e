"""Does the shapes upsampler keep what a perfect decoder would give it? (CPU, ~1 min)

    python -m bench.shapes_upsampler_probe [--pipeline DIR] [--num 128] [--steps 7]

Feeds the pipeline's upsampler cascade the dataset's own low-resolution renders of
``--num`` 'test'-split images (what an ideal decoder outputs) and scores the results with
the pixel oracle against those images' objects, beside the same renders resized bilinearly
to the output size. A gap between the two is colour, shape, size or position the learned
upsampler loses. Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", default="", help="exported pipeline directory (default: the shipped one)")
    ap.add_argument("--num", type=int, default=128)
    ap.add_argument("--steps", default="7", help="upsampler steps, comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-seed", type=int, default=1234, help="dataset seed of the 'test' images")
    args = ap.parse_args(argv)

    import jax.numpy as jnp
    import numpy as np
    from PIL import Image

    from unclip_jax.assets import default_checkpoint
    from unclip_jax.data import oracle, shapes
    from unclip_jax.image_output import to_uint8
    from unclip_jax.pipeline import load_pipeline
    from unclip_jax.stages.decoder import decoder_spec
    from unclip_jax.stages.upsampler import upsampler_spec

    pipe = load_pipeline(args.pipeline or default_checkpoint())
    if not pipe.upsamplers:
        raise SystemExit("this pipeline has no upsampler")
    low = decoder_spec(pipe.decoder_config)["image_size"]
    high = upsampler_spec(pipe.upsamplers[-1].config)["image_size"]
    batch = shapes.make_batch("test", 0, args.num, image_size=low, seed=args.data_seed)
    bilinear = np.stack([np.asarray(Image.fromarray(im).resize((high, high), Image.BILINEAR))
                         for im in batch["image"]])
    rows = [("bilinear resize", None, bilinear)]
    low_res = jnp.asarray(batch["image"], jnp.float32) / 127.5 - 1.0
    for steps in (int(s) for s in args.steps.split(",")):
        images = to_uint8(pipe.upsample(low_res, args.seed, upsampler_steps=steps))
        rows.append(("learned upsampler", steps, images))
    for variant, steps, images in rows:
        scores = oracle.score(np.asarray(images), batch["objects"])
        print(json.dumps({"variant": variant, "upsampler_steps": steps, "n": args.num, "low_res": low,
                          "out": high, **{k: round(float(scores[k]), 4)
                                         for k in ("color", "shape", "size", "position")}}))


if __name__ == "__main__":
    main()
