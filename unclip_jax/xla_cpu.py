"""XLA:CPU setting for faster convolutions, applied through ``XLA_FLAGS`` before JAX starts.

From jaxlib 0.8, XLA:CPU hands convolutions to YNNPACK fusions. On the 2-core AMD EPYC of
session 21 the tiny decoder's 3x3 convolutions took up to 1.8x as long as XLA's
Eigen convolutions and gained nothing from the second core (``bench/cpu_conv.py``, with
and without ``taskset -c 0``).
Taking only convolutions out of the YNNPACK fusion types (dots, elementwise ops and
reductions stay: without them the tiny cascade was slower) makes the tiny cascade about a
quarter faster there (``bench/RESULTS.md``).

``sample.py``, ``train.py``, the recipe and the CPU benchmarks call :func:`prefer_eigen_convolutions`
first; library users call it before their first JAX computation. It only touches XLA:CPU
(GPU and TPU programs compile as before), and it never overrides a user's own setting of
the flag. Kept free of JAX imports: XLA reads ``XLA_FLAGS`` once, when its first backend starts.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

FLAG_NAME = "--xla_cpu_experimental_ynn_fusion_type"
FLAG = f"{FLAG_NAME}=-individual_convolution"

# jaxlib versions whose XLA has the flag with its '+'/'-' syntax (0.8.3 and 0.9.2 read from
# their binaries; 0.10.2 run). XLA aborts on an unknown flag in XLA_FLAGS, so an untested
# jaxlib gets nothing.
_KNOWN_JAXLIB = ((0, 8), (0, 9), (0, 10))


def _jaxlib_minor() -> tuple[int, int] | None:
    try:
        major, minor = importlib.metadata.version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def _backends_started() -> bool:
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge  # noqa: PLC0415 - only if the caller has imported JAX already
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if started is not None else bool(getattr(xla_bridge, "_backends", {}))


def prefer_eigen_convolutions() -> bool:
    """Adds :data:`FLAG` to ``XLA_FLAGS`` if that can still take effect and is known to be
    safe: the user has not set the flag, the installed jaxlib is one of :data:`_KNOWN_JAXLIB`,
    and no JAX backend has started in this process. Returns whether the flag is in
    ``XLA_FLAGS`` now (set here or by the user). Child processes inherit it."""
    flags = os.environ.get("XLA_FLAGS", "")
    if FLAG_NAME in flags:
        return True
    if _jaxlib_minor() not in _KNOWN_JAXLIB or _backends_started():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
    return True
