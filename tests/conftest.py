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
