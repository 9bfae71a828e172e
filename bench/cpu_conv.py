"""CPU: one 3x3 convolution (stride 1, SAME padding, fp32) in XLA against torch, by shape.

    python -m bench.cpu_conv --out OUT/cpu_conv.jsonl

The shapes are those of the tiny decoder UNet of ``bench/arch.py`` at batch 2 (classifier-
free guidance doubles the batch of 1). Convolutions take most of that UNet's time on CPU,
so this splits the cascade's ratio (``bench.cpu_tiny``) down to the operation XLA:CPU and
torch's oneDNN each run. Reports the median of ``--reps`` timed calls after two warm-ups.
XLA runs Eigen's convolutions (``unclip_jax/xla_cpu.py``, as ``sample.py``) unless
``--ynn-convolutions``; ``taskset -c 0`` in front shows what a second core adds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from bench import common

# (spatial size, input channels, output channels) at batch 2
SHAPES = ((64, 32, 32), (64, 64, 32), (32, 64, 64), (16, 128, 128))


def median_ms(fn, reps: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 3)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--out", default="")
    common.add_xla_cpu_convolutions_flag(ap)
    args = ap.parse_args(argv)
    common.choose_xla_cpu_convolutions(args)

    import jax
    import jax.numpy as jnp
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    emit = common.Emitter(args.out, side="both", setting="cpu conv3x3 fp32")
    emit("setup", command=common.argv_string(), **common.versions(("jax", "jaxlib", "numpy", "torch")),
         **common.jax_device_info(), torch_threads=torch.get_num_threads())

    conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    rng = np.random.default_rng(0)
    for size, cin, cout in SHAPES:
        x = rng.standard_normal((2, size, size, cin)).astype(np.float32)
        w = (rng.standard_normal((3, 3, cin, cout)) * 0.1).astype(np.float32)
        xj, wj = jnp.asarray(x), jnp.asarray(w)
        xt = torch.as_tensor(x).permute(0, 3, 1, 2).contiguous()
        wt = torch.as_tensor(w).permute(3, 2, 0, 1).contiguous()
        with common.StealMeter() as steal, torch.no_grad():
            ours = median_ms(lambda: conv(xj, wj).block_until_ready(), args.reps)
            reference = median_ms(lambda: torch.nn.functional.conv2d(xt, wt, padding=1), args.reps)
            diff = float(np.abs(np.asarray(conv(xj, wj)) - torch.nn.functional.conv2d(xt, wt, padding=1)
                                .permute(0, 2, 3, 1).numpy()).max())
        emit("conv", input_nhwc=[2, size, size, cin], out_channels=cout, ours_ms=ours, torch_ms=reference,
             ratio=round(reference / ours, 3), max_abs_diff=diff,
             cpu_steal=steal.share)


if __name__ == "__main__":
    main()
