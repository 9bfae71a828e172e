"""Analytic FLOP counts: 2 × multiply-adds of every matmul and convolution in a program.

:func:`count_flops` traces a function (abstract inputs are fine: nothing runs, nothing is
allocated) and walks its jaxpr: ``dot_general`` costs 2·|out|·|contracted|, a convolution
2·|out|·(kernel window × input channels per group); sub-programs (jit, scan × length,
while with a static trip count is not assumed: counted once, cond: the largest branch,
remat/custom derivatives) are entered. Elementwise work, normalisations and softmax are
not counted (the usual MFU convention: matmul FLOPs only). With attention implemented by
XLA (``implementation="xla"``) the attention scores and values are matmuls and counted; a
cuDNN custom call would not be, so count with the 'xla' configuration.

Training FLOPs per example are 3 × the forward count (forward + backward, the backward
costing two forwards); recomputation under remat is not counted (it is not useful work).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax import core
from jax.extend import core as ext_core  # noqa: F401  (kept for older/newer JAX layouts)


def _prod(xs) -> int:
    return int(math.prod(int(x) for x in xs))


def _dot_flops(eqn) -> int:
    (contract_l, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    return 2 * _prod(out) * _prod(lhs[d] for d in contract_l)


def _conv_flops(eqn) -> int:
    dn = eqn.params["dimension_numbers"]
    rhs = eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    # rhs_spec = (out feature dim, in feature dim, *spatial dims)
    rhs_spec = dn.rhs_spec
    window = _prod(rhs[d] for d in rhs_spec[2:])
    in_per_group = rhs[rhs_spec[1]]
    return 2 * _prod(out) * window * in_per_group


def _sub_jaxprs(eqn):
    """(jaxpr, multiplier) pairs of the sub-programs of ``eqn``."""
    name = eqn.primitive.name
    params = eqn.params
    if name == "scan":
        return [(params["jaxpr"], int(params["length"]))]
    if name == "cond":
        branches = params["branches"]
        best = max(branches, key=lambda b: jaxpr_flops(b))
        return [(best, 1)]
    if name == "while":
        return [(params["body_jaxpr"], 1), (params["cond_jaxpr"], 1)]
    subs = []
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in params:
            subs.append((params[key], 1))
    return subs


def jaxpr_flops(jaxpr) -> int:
    """Matmul + convolution FLOPs of a (closed) jaxpr, sub-programs included."""
    inner = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in inner.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        else:
            for sub, mult in _sub_jaxprs(eqn):
                total += mult * jaxpr_flops(sub)
    return total


def count_flops(fn: Callable, *args: Any, **kwargs: Any) -> int:
    """FLOPs of ``fn(*args, **kwargs)`` (arrays or ``jax.ShapeDtypeStruct``)."""
    return jaxpr_flops(jax.make_jaxpr(fn, static_argnums=())(*args, **kwargs))


def abstract(tree):
    """Arrays → ``jax.ShapeDtypeStruct`` (shapes only)."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


# Dense bf16 peak (no sparsity), FLOP/s, by device kind substring (first match wins).
PEAK_BF16 = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),        # SXM / HBM3
    ("H800", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
    ("TPU v6", 918e12),
)


def peak_flops(device=None) -> float | None:
    """Dense bf16 peak FLOP/s of ``device`` (default: the first device), None if unknown."""
    kind = (device or jax.devices()[0]).device_kind
    for name, value in PEAK_BF16:
        if name.lower() in kind.lower():
            return value
    return None
