"""How well does the shapes decoder know the clean image at each noise level? (CPU, ~1 min)

    python -m bench.shapes_x0_probe [--pipeline DIR] [--num 64] [--timesteps 999,950,900,800,600,400,200,50]

Noises ``--num`` 'train'-split images to x_t at each timestep, runs the conditional decoder
once (true CLIP image embedding and caption) and turns its output into x̂_0 with the
decoder's own parameterisation (ε, x_0 or v), clipped to [−1, 1] as the sampler clips it.
Prints one JSON line per timestep: the MSE of x̂_0, and the mean colour of the image's
3-pixel border (background) of x̂_0 against the truth: its error and its chroma (max − min
of the RGB means, 0–255; the dataset's backgrounds are muted greys, chroma ≈ 11).

An ε-predicting model must reach x̂_0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t: at the first sampling step
(t = 999, √ᾱ ≈ 5e-5 for the cosine schedule) any error in ε̂ is multiplied by ~2e4, and the
clipped x̂_0 is a saturated random colour that the next steps take for signal.
"""

from __future__ import annotations

import argparse
import json


def border_colour(images):
    """Mean RGB (0–255) of the 3-pixel border of (B, S, S, 3) images in [−1, 1] → (B, 3)."""
    import numpy as np
    x = (np.asarray(images, np.float64) + 1.0) * 127.5
    ring = np.ones(x.shape[1:3], bool)
    ring[3:-3, 3:-3] = False
    return x[:, ring].mean(axis=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", default="", help="exported pipeline directory (default: the shipped one)")
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--timesteps", default="999,950,900,800,600,400,200,50")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from unclip_jax import diffusion
    from unclip_jax.assets import default_checkpoint
    from unclip_jax.data import shapes
    from unclip_jax.diffusion import gaussian as g
    from unclip_jax.pipeline import load_pipeline
    from unclip_jax.stages.decoder import decoder_spec

    pipe = load_pipeline(args.pipeline or default_checkpoint())
    size = decoder_spec(pipe.decoder_config)["image_size"]
    small = shapes.make_batch("train", 0, args.num, image_size=size)   # as the decoder trains: CLIP sees these
    x0 = jnp.asarray(small["image"], jnp.float32) / 127.5 - 1.0
    model_fn, spec = pipe._decoder_model_fn(pipe.encode_image(list(small["image"])),
                                            pipe.encode_text(small["caption"]))
    diff = spec["diffusion"]
    schedule = diffusion.Schedule.create(diff["schedule"], diff["num_timesteps"])
    true_border = border_colour(x0)
    print(json.dumps({"prediction_type": diff["prediction_type"], "n": args.num,
                      "true_border_chroma": round(float(np.ptp(true_border, axis=1).mean()), 2)}))
    key = jax.random.PRNGKey(args.seed)
    for step in (int(s) for s in args.timesteps.split(",")):
        t = jnp.full((args.num,), step, jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, step), x0.shape)
        x_t = g.q_sample(schedule, x0, t, noise)
        pred = model_fn(x_t, t)[..., :x0.shape[-1]]
        x0_hat = jnp.clip(g.predict_x0_eps(schedule, pred, x_t, t, diff["prediction_type"])[0], -1.0, 1.0)
        border = border_colour(x0_hat)
        print(json.dumps({"t": step, "x0_mse": round(float(jnp.mean((x0_hat - x0) ** 2)), 4),
                          "border_colour_error": round(float(np.abs(border - true_border).mean()), 2),
                          "border_chroma": round(float(np.ptp(border, axis=1).mean()), 2)}))


if __name__ == "__main__":
    main()
