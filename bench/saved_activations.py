"""Activations a training step keeps for the backward pass, per example, by remat policy.

    python -m bench.saved_activations [--stage decoder] [--policies full,convs]

Traces (no device work, no parameters allocated) the loss of the Karlo-size stage at
batch 1 with each ``model.remat_policy`` and sums JAX's ``saved_residuals`` that are not
arguments: what a batch of B needs on top of parameters, gradients and optimiser state,
about B times this. Prints one JSON line per policy.
"""

from __future__ import annotations

import argparse
import json


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", default="decoder", choices=["decoder", "prior"])
    ap.add_argument("--policies", default="full,convs")
    args = ap.parse_args(argv)

    import jax
    import numpy as np
    from jax._src.ad_checkpoint import saved_residuals  # not re-exported by jax's public API
    from bench.training import stage_pieces
    from unclip_jax.config import load_config

    for policy in args.policies.split(","):
        config = load_config(f"configs/{args.stage}.py:karlo",
                             [f"model.remat_policy={policy}", "model.attention_impl=xla"])
        shapes, loss_fn, data, _ = stage_pieces(args.stage, config, 1, 0)  # data: one example
        residuals = saved_residuals(lambda p, b: loss_fn(p, b, jax.random.key(0))[0], shapes, data)
        nbytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a, why in residuals if "argument" not in why)
        print(json.dumps({"stage": args.stage, "remat_policy": policy, "residuals": len(residuals),
                          "GB_per_example": round(nbytes / 1e9, 3)}), flush=True)


if __name__ == "__main__":
    main()
