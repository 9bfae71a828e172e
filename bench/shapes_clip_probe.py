"""Where does the shapes CLIP lose shape? (CPU, about a minute)

    python -m bench.shapes_clip_probe [--pipeline DIR] [--num 600] [--num_train 3000]

On one-object images of the 'test' split (seen colour-shape pairs) and the 'heldout' split
(the three held-out pairs), prints one JSON line with:

* ``zero_shot``: CLIP's zero-shot shape accuracy with the recipe's prompt ensembles (each
  shape class averaged over training-style captions of every colour, size and place, as
  ``unclip_jax.stages.clip.evaluate_shapes_zero_shot``), overall and per object size;
* ``linear_probe``: the accuracy of a linear classifier (ridge regression onto one-hot
  labels, closed form) fitted on the unit image embeddings of ``--num_train`` one-object
  'train' images. It asks whether the image embedding carries shape at all, and whether it
  carries it apart from colour: a probe fitted on seen pairs that fails on held-out pairs
  means the image tower encodes colour-shape conjunctions, not shape.

``--pipeline`` defaults to the shipped model.
"""

from __future__ import annotations

import argparse
import json


def one_object_examples(split: str, num: int, image_size: int, seed: int):
    """The first ``num`` one-object examples of ``split``: uint8 images, shape and size indices."""
    from unclip_jax.stages.clip import single_object_examples
    examples = single_object_examples(split, num, {"data": {"image_size": image_size, "dataset_seed": seed}},
                                      max_scan=40 * num)
    return examples["image"], examples["shape"], examples["size"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", default="", help="exported pipeline directory (default: the shipped one)")
    ap.add_argument("--num", type=int, default=600, help="one-object images per evaluated split")
    ap.add_argument("--num_train", type=int, default=3000, help="one-object 'train' images the probe is fitted on")
    args = ap.parse_args(argv)

    import numpy as np
    from unclip_jax.assets import default_checkpoint
    from unclip_jax.data import shapes
    from unclip_jax.pipeline import load_pipeline
    from unclip_jax.stages.clip import _caption_templates, ensemble_classifier
    pipe = load_pipeline(args.pipeline or default_checkpoint())
    size = pipe.clip_config.vision.image_size

    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    def embed_images(images):
        return unit(np.concatenate([pipe.encode_image(list(images[i:i + 200])) for i in range(0, len(images), 200)]))

    classifier = ensemble_classifier(lambda prompts: pipe.encode_text(prompts).embed, shapes.SHAPES,
                                     _caption_templates("shape"))

    train_images, train_labels, _ = one_object_examples("train", args.num_train, size, seed=5)
    features = np.c_[embed_images(train_images), np.ones(len(train_images))]
    weights = np.linalg.solve(features.T @ features + 1e-3 * np.eye(features.shape[1]),
                              features.T @ np.eye(len(shapes.SHAPES))[train_labels])

    result = {"num_train": args.num_train}
    for split in ("test", "heldout"):
        images, labels, sizes = one_object_examples(split, args.num, size, seed=0)
        z = embed_images(images)
        zero_shot = (z @ classifier.T).argmax(1) == labels
        probe = (np.c_[z, np.ones(len(z))] @ weights).argmax(1) == labels
        result[split] = {
            "n": len(labels),
            "zero_shot": round(float(zero_shot.mean()), 4),
            "zero_shot_by_size": {s: round(float(zero_shot[sizes == i].mean()), 4) for i, s in enumerate(shapes.SIZES)},
            "linear_probe": round(float(probe.mean()), 4),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
