"""``train.init_from`` onto a data=2 × fsdp=4 mesh of 8 fake CPU devices; prints JSON.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (set by the test) and the
output directory as the only argument: trains the toy stage one step (data-parallel),
saves its EMA parameters as a pretrained directory, builds the sharded init from it and
reports the parameters' partition specs and whether every value came back unchanged.
"""

import json
import sys

import jax
import numpy as np

from tests.train_scripts.toy_stage import ToyStage, spec_text, toy_config
from unclip_jax.convert.common import save_pretrained
from unclip_jax.train import loop


def main(out: str) -> None:
    config = toy_config()
    config.train.update(steps=1, ckpt_every=0)
    first = loop.train(config, f"{out}/first")  # data-parallel over the 8 devices
    save_pretrained(f"{out}/pretrained", first.state.ema_params, {"stage": config.stage},
                    storage_dtype="float32")
    config.train.init_from = f"{out}/pretrained"
    config.mesh.update(data=2, fsdp=4)
    state = loop.Trainer(config, ToyStage()).init_state()
    loaded = jax.tree_util.tree_leaves(state.params)
    saved = jax.tree_util.tree_leaves(first.state.ema_params)
    print(json.dumps({
        "specs": sorted({spec_text(x.sharding.spec) for x in loaded}),
        "devices": len(jax.devices()),
        "equal": all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(loaded, saved, strict=True)),
    }))


if __name__ == "__main__":
    main(sys.argv[1])
