"""Small shared pieces of the benchmark scripts: JSON-lines output, environment facts,
device memory, the persistent compilation cache, and timing statistics.

Every script prints one JSON object per line on stdout and appends the same line to
``--out`` (if given); ``bench/report.py`` turns a directory of such files into the summary.
A failure of one measurement is reported as a ``{"kind": "error", ...}`` line and the
script goes on with the next one.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Iterable

PROCESS_START = time.time()


class Emitter:
    """Writes JSON lines to stdout and, if ``path`` is set, appends them to that file."""

    def __init__(self, path: str = "", **common: Any):
        self.path, self.common = path, common
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def __call__(self, kind: str, **fields: Any) -> dict:
        record = {"kind": kind, **self.common, **fields}
        line = json.dumps(record, default=_jsonable)
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        return record

    def guard(self, what: str, fn: Callable[[], Any], **fields: Any) -> Any:
        """Runs ``fn``; on an exception emits an error record (with the traceback tail) and
        returns None instead of raising, so that one failed part does not end the run."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a benchmark reports every failure and goes on
            self("error", what=what, error=f"{type(e).__name__}: {e}"[:2000],
                 traceback=traceback.format_exc()[-4000:], **fields)
            return None


def _jsonable(x):
    try:
        import numpy as np
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:
        pass
    return str(x)


def versions(modules: Iterable[str] = ("jax", "jaxlib", "flax", "optax", "numpy")) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in modules:
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            out[name] = None
    return out


def jax_device_info() -> dict[str, Any]:
    import jax
    d = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": d.device_kind, "device_count": jax.device_count(),
            "platform_version": getattr(d.client, "platform_version", None),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), **host_cpu()}


def add_xla_cpu_convolutions_flag(ap) -> None:
    """``--ynn-convolutions`` on a CPU bench's parser (read by :func:`choose_xla_cpu_convolutions`)."""
    ap.add_argument("--ynn-convolutions", action="store_true",
                    help="keep XLA:CPU's default YNNPACK convolutions (default: Eigen's, as sample.py "
                         "runs them; unclip_jax/xla_cpu.py)")


def choose_xla_cpu_convolutions(args) -> None:
    """Before JAX starts: Eigen convolutions on XLA:CPU as ``sample.py`` runs them
    (``unclip_jax.xla_cpu``), or with ``--ynn-convolutions`` XLA's default YNNPACK ones."""
    if not args.ynn_convolutions:
        from unclip_jax import xla_cpu
        xla_cpu.prefer_eigen_convolutions()


def host_cpu() -> dict[str, Any]:
    """The host CPU's model name and vector extensions (Linux ``/proc/cpuinfo``; empty
    elsewhere): CPU timings differ across machines by more than the ratios they measure."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return {}
    field = lambda name: next((line.split(":", 1)[1].strip() for line in info.splitlines()
                               if line.startswith(name)), "")
    simd = sorted({flag for flag in field("flags").split() if flag.startswith(("avx", "amx", "fma"))})
    return {"cpu_model": field("model name"), "cpu_simd": " ".join(simd)}


def cpu_times(stat_path: str = "/proc/stat") -> tuple[int, ...] | None:
    """The host's cumulative CPU time counters, all CPUs together (the ``cpu`` line of Linux
    ``/proc/stat``: user nice system idle iowait irq softirq steal ..., in clock ticks);
    None where there is no such file."""
    try:
        with open(stat_path) as f:
            first = f.readline().split()
    except OSError:
        return None
    if not first or first[0] != "cpu":
        return None
    return tuple(int(v) for v in first[1:])


def steal_share(before: tuple[int, ...] | None, after: tuple[int, ...] | None) -> float | None:
    """Share of the CPU time between two :func:`cpu_times` readings that the hypervisor gave
    to other guests (``steal``, the 8th counter). On a shared VM this slows both sides of a
    comparison unevenly, so every timed comparison records it. None without both readings."""
    if before is None or after is None or len(before) < 8 or len(after) < 8:
        return None
    # guest time (counters 9 and 10) is already inside user/nice: leave it out of the total
    delta = [a - b for a, b in zip(after[:8], before[:8])]
    total = sum(delta)
    return round(delta[7] / total, 3) if total > 0 else None


class StealMeter:
    """``with StealMeter() as steal: ...`` then ``steal.share``: the :func:`steal_share` of
    the block (None where ``/proc/stat`` is missing, or until the block ends)."""

    def __init__(self, stat_path: str = "/proc/stat"):
        self.stat_path, self.share, self._before = stat_path, None, None

    def __enter__(self) -> "StealMeter":
        self._before = cpu_times(self.stat_path)
        return self

    def __exit__(self, *exc) -> None:
        self.share = steal_share(self._before, cpu_times(self.stat_path))


def memory_stats() -> dict[str, Any] | None:
    """``memory_stats()`` of the first device (None on backends without it, e.g. CPU)."""
    import jax
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None
    return dict(stats) if stats else None


def peak_gb() -> float | None:
    stats = memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return round(stats["peak_bytes_in_use"] / 1e9, 2)


def executable_gb(compiled) -> dict[str, float] | None:
    """Static memory of a compiled executable: arguments, outputs and temporaries (GB)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes")
    out = {f.replace("_size_in_bytes", "_GB"): round(getattr(m, f, 0) / 1e9, 3) for f in fields}
    out["total_GB"] = round(out["argument_GB"] + out["output_GB"] + out["temp_GB"] - out["alias_GB"], 3)
    return out


def enable_compilation_cache(directory: str) -> None:
    """JAX's persistent compilation cache in ``directory``, caching every compiled program."""
    from unclip_jax import compilation_cache
    compilation_cache.enable(directory)


def timing_stats(seconds: list[float], batch: int) -> dict[str, Any]:
    best, mean = min(seconds), statistics.fmean(seconds)
    return {"sec_per_batch": round(best, 4), "mean_sec_per_batch": round(mean, 4),
            "images_per_s": round(batch / best, 4), "mean_images_per_s": round(batch / mean, 4),
            "all_s": [round(s, 4) for s in seconds]}


def since_start() -> float:
    return round(time.time() - PROCESS_START, 2)


def argv_string() -> str:
    return " ".join([os.path.basename(sys.executable)] + sys.argv)
