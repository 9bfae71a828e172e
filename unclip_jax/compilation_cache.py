"""JAX's persistent compilation cache, so a second process start skips XLA compiles.

``sample.py`` enables it by default (``--compilation_cache``); library users call
:func:`enable` once, before their first compile.
"""

from __future__ import annotations

import os


def default_directory() -> str:
    """``$UNCLIP_JAX_CACHE`` or ``~/.cache/unclip_jax/xla``."""
    return os.environ.get("UNCLIP_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                               "unclip_jax", "xla")


def enable(directory: str | None = None) -> str:
    """Caches every compiled program in ``directory`` (default :func:`default_directory`)
    and returns it. Entries are keyed by the program, the JAX/XLA version and the device
    kind, so a new JAX or another accelerator recompiles; on CPU the key does not name the
    instruction set, so do not share one directory between different CPU machines."""
    import jax
    directory = os.path.abspath(directory or default_directory())
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    except AttributeError:  # an older JAX without the size threshold
        pass
    return directory
