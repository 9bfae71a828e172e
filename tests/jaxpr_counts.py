"""Primitive counts of a jaxpr, nested jaxprs (remat, pjit, custom_vjp, scan) included:
what tests of rematerialisation and padding assert on."""

from __future__ import annotations

import collections


def primitive_counts(jaxpr) -> collections.Counter:
    from unclip_jax.stages.decoder import _sub_jaxprs  # the FLOP counter's jaxpr walk
    counts = collections.Counter(eqn.primitive.name for eqn in jaxpr.eqns)
    for eqn in jaxpr.eqns:
        for sub in _sub_jaxprs(eqn):
            counts += primitive_counts(sub)
    return counts
