"""Shared pytest set-up: float32 everywhere, deterministic torch, a repo-root import path."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
