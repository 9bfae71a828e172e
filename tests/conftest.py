"""Shared pytest set-up: float32 everywhere, deterministic torch, a repo-root import path."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One persistent compilation cache for the whole test run, made before JAX is imported: the
# subprocesses (sample.py, train.py, fake-device scripts) and the pytest-xdist workers
# inherit it, so a program one of them compiled is loaded, not compiled again, by the next.
# A test that studies the cache itself sets its own directory.
_RUN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile
    _RUN_CACHE = tempfile.mkdtemp(prefix="unclip_jax_test_xla_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _RUN_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

# The XLA:CPU setting sample.py and train.py run with (faster convolutions), before JAX starts.
from unclip_jax import xla_cpu  # noqa: E402

xla_cpu.prefer_eigen_convolutions()

import jax  # noqa: E402

# Parity with the float32 PyTorch references: no TF32-style reduced precision matmuls.
jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_karlo(tmp_path_factory):
    """(diffusers UnCLIPPipeline, its saved directory, our converted pipeline directory)."""
    import subprocess
    from pipeline_fixtures import build_tiny_diffusers_unclip
    tmp = str(tmp_path_factory.mktemp("karlo"))
    ref, src = build_tiny_diffusers_unclip(tmp)
    out = os.path.join(tmp, "ours")
    proc = subprocess.run([sys.executable, "-m", "unclip_jax.convert", "karlo", f"--src={src}", f"--out={out}"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return ref, src, out


def pytest_unconfigure(config):
    # Only the process that made the run's cache removes it (xdist workers inherit the
    # variable, so their _RUN_CACHE is None).
    if _RUN_CACHE is not None:
        import shutil
        shutil.rmtree(_RUN_CACHE, ignore_errors=True)
