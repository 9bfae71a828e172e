"""``unclip_jax.xla_cpu``: the XLA:CPU convolution setting goes into ``XLA_FLAGS`` only where
it can take effect and is known to exist, never over the user's own setting, and the
installed XLA accepts it (XLA aborts on a flag it does not know)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from subprocesses import child_env
from unclip_jax import xla_cpu


@pytest.fixture
def fresh_process(monkeypatch):
    """This process as if JAX had not started, with a jaxlib of the known versions."""
    monkeypatch.setattr(xla_cpu, "_backends_started", lambda: False)
    monkeypatch.setattr(xla_cpu, "_jaxlib_minor", lambda: (0, 10))
    return monkeypatch


def test_appends_the_flag_to_other_flags(fresh_process):
    fresh_process.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert xla_cpu.prefer_eigen_convolutions()
    assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {xla_cpu.FLAG}"
    assert xla_cpu.prefer_eigen_convolutions()  # a second call adds nothing
    assert os.environ["XLA_FLAGS"].count(xla_cpu.FLAG_NAME) == 1


def test_keeps_the_users_setting(fresh_process):
    mine = f"{xla_cpu.FLAG_NAME}=+individual_convolution"
    fresh_process.setenv("XLA_FLAGS", mine)
    assert xla_cpu.prefer_eigen_convolutions()
    assert os.environ["XLA_FLAGS"] == mine


@pytest.mark.parametrize("reason", ["unknown jaxlib", "no jaxlib", "backend started"])
def test_leaves_flags_alone_where_it_cannot_help(fresh_process, reason):
    fresh_process.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    if reason == "unknown jaxlib":
        fresh_process.setattr(xla_cpu, "_jaxlib_minor", lambda: (0, 7))
    elif reason == "no jaxlib":
        fresh_process.setattr(xla_cpu, "_jaxlib_minor", lambda: None)
    else:
        fresh_process.setattr(xla_cpu, "_backends_started", lambda: True)
    assert not xla_cpu.prefer_eigen_convolutions()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"


def test_backends_started_sees_this_process():
    import jax
    jax.numpy.zeros(1).block_until_ready()
    assert xla_cpu._backends_started()


SCRIPT = """
from unclip_jax import xla_cpu
import os, sys
applied = xla_cpu.prefer_eigen_convolutions()
import jax, jax.numpy as jnp, numpy as np
x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 8)), jnp.float32)
w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 8, 4)), jnp.float32)
y = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC")))(x, w)
np.save(sys.argv[1], np.asarray(y))
print(applied, os.environ.get("XLA_FLAGS", ""))
"""


def test_the_installed_xla_runs_a_convolution_with_and_without_it(tmp_path):
    # Where the jaxlib is not one of the known ones, XLA may not have the flag at all (jaxlib
    # 0.7 aborts on it): only the run without it, which must leave XLA_FLAGS alone.
    known = xla_cpu._jaxlib_minor() in xla_cpu._KNOWN_JAXLIB
    runs = (("ynn", f"{xla_cpu.FLAG_NAME}=+individual_convolution"), ("eigen", "")) if known else (("eigen", ""),)
    outputs = {}
    for name, flags in runs:
        env = child_env(XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / name)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs[name] = (proc.stdout.strip().partition(" ")[::2], np.load(tmp_path / f"{name}.npy"))
    (applied, flags), _ = outputs["eigen"]
    if not known:
        assert (applied, flags) == ("False", "")
        return
    assert applied == "True" and flags == xla_cpu.FLAG
    np.testing.assert_allclose(outputs["eigen"][1], outputs["ynn"][1], rtol=1e-5, atol=1e-5)
