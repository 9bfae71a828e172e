"""Helpers for tests that run code in other Python processes: fake CPU devices (XLA_FLAGS
must be set before JAX starts) and two processes on localhost (a multi-host run in miniature)."""

from __future__ import annotations

import os
import socket
import subprocess
from typing import Callable, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def child_env(**overrides: str) -> dict[str, str]:
    """This process's environment, the repository on PYTHONPATH, and ``overrides``."""
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, **overrides)


def run_two_processes(command: Callable[[str, int], Sequence[str]], env: dict[str, str],
                      timeout: float = 600) -> list[str]:
    """Runs ``command(port, process_id)`` for process ids 0 and 1 at once (one coordinator
    port) and waits for both; fails with both outputs unless both exit 0. Returns the outputs."""
    port = str(free_port())
    procs = [subprocess.Popen(list(command(port, i)), cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    return outputs


def assert_same_pictures(images: np.ndarray, reference: np.ndarray) -> None:
    """uint8 images of one cascade run another way (other device count, process count or
    attention backend). Another split of the batch rounds differently (float32, ~1e-7) and
    the tiny random-weight cascade amplifies that: most pixels move by a level or none, a
    rare one more (2 of 49,152 by up to 117 levels at 8 devices since CPU attention runs in
    query blocks, session 18; 3 levels before), never a picture."""
    assert images.shape == reference.shape, (images.shape, reference.shape)
    diff = np.abs(images.astype(int) - reference.astype(int))
    assert (diff > 4).mean() <= 1e-4 and diff.mean() < 0.01, ((diff > 4).sum(), diff.max(), diff.mean())
