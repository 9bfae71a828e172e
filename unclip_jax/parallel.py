"""Meshes, parameter shardings and multi-host helpers: one sharded-``jit`` path for all scales.

Every array lives on one ``jax.make_mesh`` mesh with three named axes:

* ``data``   — pure data parallelism: parameters replicated, batch split;
* ``fsdp``   — data parallelism that also splits each large parameter (and its
  optimizer state) along one dimension, gathered by XLA just before use (ZeRO-3);
* ``tensor`` — optional model parallelism for parameters matched by regex rules.

The batch dimension is split over ``('data', 'fsdp')`` together, so a mesh of
``data × fsdp`` devices always sees ``data × fsdp`` distinct slices of the batch.
The axes are ``AxisType.Auto`` (GSPMD propagation): models are written without any
sharding annotations and XLA inserts the gathers and reductions.

Nothing here runs at import time; ``init_distributed`` is the only function that
touches ``jax.distributed`` and only ``train.py``/``sample.py`` call it.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# A rule is (regex searched in the '/'-joined parameter path, PartitionSpec). The
# first matching rule wins; its spec names mesh axes per dimension (None = replicated).
Rule = tuple[str, P]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``('data', 'fsdp', 'tensor')`` mesh over ``devices`` (default: all devices).

    One of the sizes may be -1: it takes what the others leave. The product must equal
    the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(data), int(fsdp), int(tensor)]
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into a mesh with "
                             f"data={data} fsdp={fsdp} tensor={tensor}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh data={sizes[0]} × fsdp={sizes[1]} × tensor={sizes[2]} = "
                         f"{math.prod(sizes)} devices, but {len(devices)} are available; "
                         "set one axis to -1 to use all of them")
    return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                         devices=devices)


def mesh_from_config(mesh_config: Mapping[str, Any]) -> Mesh:
    """``make_mesh`` from a ``config.mesh`` section (keys data, fsdp, tensor)."""
    return make_mesh(mesh_config.get("data", -1), mesh_config.get("fsdp", 1),
                     mesh_config.get("tensor", 1))


def path_str(path) -> str:
    """'a/b/kernel' for a ``jax.tree_util`` key path (dict keys, attributes, indices)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts)


def _axis_size(mesh: Mesh, axis) -> int:
    if axis is None:
        return 1
    names = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(mesh.shape[n] for n in names)


def partition_spec(path: str, shape: Sequence[int], mesh: Mesh, rules: Sequence[Rule] = (),
                   fsdp_min_size: int = 2 ** 14) -> P:
    """The ``PartitionSpec`` of one parameter (or optimizer-state leaf) of ``shape``.

    1. The first rule whose regex is found in ``path`` gives the spec (tensor parallelism);
       dimensions it names must divide evenly, or a ValueError says which.
    2. Then FSDP: if the leaf has at least ``fsdp_min_size`` elements and the mesh has
       ``fsdp > 1``, the largest dimension not already sharded and divisible by the fsdp
       size is split over ``'fsdp'``. Smaller leaves (biases, norms, scalars) replicate.

    Optimizer-state leaves mirror parameters (their paths end with the parameter path
    and they have its shape), so one function gives both the same layout.
    """
    shape = tuple(shape)
    spec: list[Any] = [None] * len(shape)
    for pattern, rule_spec in rules:
        if re.search(pattern, path):
            rule_spec = tuple(rule_spec)
            if len(rule_spec) > len(shape):
                raise ValueError(f"partition rule {pattern!r} gives {len(rule_spec)} dims for "
                                 f"'{path}' of shape {shape}")
            for d, axis in enumerate(rule_spec):
                size = _axis_size(mesh, axis)
                if shape[d] % size:
                    raise ValueError(f"partition rule {pattern!r}: dim {d} of '{path}' {shape} "
                                     f"is not divisible by mesh axis {axis} of size {size}")
                spec[d] = axis
            break
    fsdp = mesh.shape.get("fsdp", 1)
    used = {a for s in spec if s is not None for a in (s if isinstance(s, tuple) else (s,))}
    if fsdp > 1 and "fsdp" not in used and math.prod(shape) >= fsdp_min_size:
        candidates = [d for d in range(len(shape)) if spec[d] is None and shape[d] % fsdp == 0]
        if candidates:
            d = max(candidates, key=lambda i: (shape[i], -i))
            spec[d] = "fsdp"
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def tree_shardings(tree, mesh: Mesh, rules: Sequence[Rule] = (), fsdp_min_size: int = 2 ** 14):
    """A ``NamedSharding`` for every array leaf of ``tree`` (arrays or ``ShapeDtypeStruct``)."""
    def one(path, leaf):
        return NamedSharding(mesh, partition_spec(path_str(path), getattr(leaf, "shape", ()),
                                                  mesh, rules, fsdp_min_size))
    return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``('data', 'fsdp')``; other dims replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_shard_count(mesh: Mesh) -> int:
    """How many distinct slices of the batch the mesh holds (``data × fsdp``)."""
    return _axis_size(mesh, BATCH_AXES)


def global_batch_from_local(local_batch, mesh: Mesh):
    """This process's rows (a pytree of numpy arrays) → global ``jax.Array``s split on dim 0.

    With P processes each passing B/P rows, the global batch has B rows; process p's
    rows land on its own devices (no cross-host transfer).
    """
    sharding = batch_sharding(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def local_batch_size(global_batch_size: int, mesh: Mesh | None = None) -> int:
    """Rows this process feeds per step; checks the global batch splits evenly."""
    count = jax.process_count()
    if global_batch_size % count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                         f"{count} processes")
    if mesh is not None and global_batch_size % batch_shard_count(mesh):
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                         f"data×fsdp = {batch_shard_count(mesh)} batch shards of the mesh")
    return global_batch_size // count


# Environment variables that mean "this is one of several processes". Cluster
# launchers (SLURM, Open MPI, multi-host TPU VMs) are auto-detected by
# ``jax.distributed.initialize()`` itself once we decide to call it.
_MULTIPROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "UNCLIP_COORDINATOR_ADDRESS")


def _is_multiprocess_env() -> bool:
    if any(os.environ.get(k) for k in _MULTIPROCESS_ENV):
        return True
    for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES"):
        if int(os.environ.get(key, "1") or 1) > 1:
            return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """Calls ``jax.distributed.initialize`` when this is one of several processes.

    Explicit arguments win; otherwise ``UNCLIP_COORDINATOR_ADDRESS`` /
    ``UNCLIP_NUM_PROCESSES`` / ``UNCLIP_PROCESS_ID`` are read, and cluster launchers
    (SLURM, Open MPI, multi-host TPU) are detected by JAX. A single process does nothing.
    Returns True when JAX now runs distributed. Must run before any other JAX call.
    """
    coordinator_address = coordinator_address or os.environ.get("UNCLIP_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("UNCLIP_NUM_PROCESSES"):
        num_processes = int(os.environ["UNCLIP_NUM_PROCESSES"])
    if process_id is None and os.environ.get("UNCLIP_PROCESS_ID"):
        process_id = int(os.environ["UNCLIP_PROCESS_ID"])
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    if not explicit and not _is_multiprocess_env():
        return False
    if explicit and (coordinator_address is None or num_processes is None or process_id is None):
        raise ValueError("a multi-process run needs all of coordinator_address, num_processes "
                         f"and process_id; got {coordinator_address!r}, {num_processes!r}, "
                         f"{process_id!r}")
    # CPU processes exchange data through gloo (the default in current JAX; set for older).
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # noqa: BLE001 - option absent in some JAX versions
        pass
    if explicit:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()
    return True


def is_main_process() -> bool:
    return jax.process_index() == 0
