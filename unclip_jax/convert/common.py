"""Shared pieces of every converter: read a state dict, check it against our model, save.

A converter is one name table per model: it maps each PyTorch tensor name to one of our
parameter paths (with a layout transform), then :func:`assemble` checks the result
against the parameter shapes our model expects and fails with the full list of missing,
unexpected and mis-shaped parameters, instead of the first one.

Layouts: PyTorch ``Linear.weight`` is (out, in), Flax ``Dense.kernel`` is (in, out);
PyTorch ``Conv2d.weight`` is (O, I, kh, kw), Flax ``Conv.kernel`` is (kh, kw, I, O).

Our pretrained format (written by :func:`save_pretrained`) is a directory holding
``config.json`` (our model config, a plain dict) and ``params/`` (an orbax checkpoint
of the parameter tree, restorable onto any device layout).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

StateDict = dict[str, np.ndarray]
ParamPath = tuple[str, ...]

_WEIGHT_FILES = (
    "model.safetensors", "diffusion_pytorch_model.safetensors", "open_clip_model.safetensors",
    "model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json",
    "pytorch_model.bin", "diffusion_pytorch_model.bin", "open_clip_pytorch_model.bin",
)


class ConversionError(ValueError):
    """A checkpoint that does not fit the model; the message lists every mismatch."""


def load_state_dict(path: str) -> StateDict:
    """Reads a checkpoint file or a model directory into ``{name: np.ndarray}``.

    Directories are searched for the usual transformers/diffusers/OpenCLIP file names,
    safetensors first (also sharded ``*.index.json``). ``.bin``/``.pt``/``.pth`` files are
    read with ``torch.load(weights_only=True)``: tensors only, no pickled code runs.
    """
    if os.path.isdir(path):
        for name in _WEIGHT_FILES:
            candidate = os.path.join(path, name)
            if os.path.exists(candidate):
                return load_state_dict(candidate)
        raise ConversionError(
            f"no weights found in {path!r}; expected one of: {', '.join(_WEIGHT_FILES)}")
    if not os.path.exists(path):
        raise ConversionError(f"checkpoint {path!r} does not exist")
    if path.endswith(".index.json"):
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        merged: StateDict = {}
        for shard in shards:
            merged.update(load_state_dict(os.path.join(os.path.dirname(path), shard)))
        return merged
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        try:
            return dict(load_file(path))
        except Exception as e:  # bf16 tensors cannot be read by the numpy backend
            if "bf16" not in str(e).lower() and "bfloat16" not in str(e).lower():
                raise
            return _load_safetensors_bf16(path)
    if path.endswith((".bin", ".pt", ".pth", ".ckpt")):
        return _load_torch_weights_only(path)
    raise ConversionError(f"unknown checkpoint format: {path!r}")


def _load_safetensors_bf16(path: str) -> StateDict:
    import ml_dtypes  # shipped with jax
    from safetensors import safe_open
    out = {}
    with safe_open(path, framework="flax") as f:
        for key in f.keys():
            out[key] = np.asarray(f.get_tensor(key).astype(ml_dtypes.bfloat16)).astype(np.float32)
    return out


def _load_torch_weights_only(path: str) -> StateDict:
    try:
        import torch
    except ImportError as e:
        raise ConversionError(
            f"{path!r} is a PyTorch file; reading it needs torch (pip install torch), "
            "or convert it to .safetensors first") from e
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    out = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.detach().float().numpy() if value.is_floating_point() else value.numpy()
    return out


def read_json(path: str) -> dict:
    """Reads ``path`` (a file, or ``path/config.json`` for a directory)."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise ConversionError(f"config file {path!r} does not exist")
    with open(path) as f:
        return json.load(f)


def linear(w: np.ndarray) -> np.ndarray:
    """PyTorch Linear weight (out, in) -> Flax Dense kernel (in, out)."""
    return np.ascontiguousarray(np.asarray(w).T)


def conv2d(w: np.ndarray) -> np.ndarray:
    """PyTorch Conv2d weight (O, I, kh, kw) -> Flax Conv kernel (kh, kw, I, O)."""
    return np.ascontiguousarray(np.asarray(w).transpose(2, 3, 1, 0))


def identity(w: np.ndarray) -> np.ndarray:
    return np.asarray(w)


def assemble(converted: Mapping[ParamPath, np.ndarray], expected: Any,
             unused_source_keys: list[str] | tuple[str, ...] = (), *,
             model_name: str = "model", dtype=np.float32) -> dict:
    """Checks converted parameters against the model's expected tree and nests them.

    Args:
      converted: {our param path tuple: array}, produced by a converter's name table.
      expected: the parameter tree our model expects (arrays or ``jax.ShapeDtypeStruct``,
        e.g. from ``jax.eval_shape(model.init, ...)['params']``).
      unused_source_keys: source tensor names the name table did not consume.
    Returns:
      The nested parameter dict (numpy arrays of ``dtype``).
    Raises:
      ConversionError: listing all missing, unexpected and mis-shaped parameters, and the
        source tensors that were not used.
    """
    want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(expected).items()}
    missing = sorted("/".join(k) for k in want if k not in converted)
    unexpected = sorted("/".join(k) for k in converted if k not in want)
    misshaped = sorted(f"{'/'.join(k)}: checkpoint {tuple(np.shape(v))} vs model {want[k]}"
                       for k, v in converted.items() if k in want and tuple(np.shape(v)) != want[k])
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", misshaped), ("unused checkpoint tensors", sorted(unused_source_keys))):
        if items:
            problems.append(f"{len(items)} {title}:\n  " + "\n  ".join(items))
    if problems:
        raise ConversionError(f"checkpoint does not fit {model_name}:\n" + "\n".join(problems))
    return traverse_util.unflatten_dict({k: np.asarray(v, dtype) for k, v in converted.items()})


def apply_table(state: StateDict, table: Mapping[str, tuple[ParamPath, Callable]]
                ) -> tuple[dict[ParamPath, np.ndarray], list[str]]:
    """Applies a {source name: (our path, transform)} table; returns (converted, unused names)."""
    converted, unused = {}, []
    for name, value in state.items():
        if name in table:
            path, fn = table[name]
            converted[path] = fn(value)
        else:
            unused.append(name)
    return converted, unused


PARAMS_SAFETENSORS = "params.safetensors"


def save_pretrained(out_dir: str, params: Any, config: Mapping[str, Any], *,
                    storage_dtype: str | None = None) -> None:
    """Writes ``out_dir/config.json`` and the parameters.

    By default the parameters go to the orbax checkpoint ``out_dir/params`` (sharded
    restores onto any device layout). With ``storage_dtype`` ('float16' or
    'float32') they go to one flat ``out_dir/params.safetensors`` in that dtype instead:
    the compact form the package ships its embedded model in; loading casts back to
    float32. ``float16`` is checked against its range.
    """
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)
    # One format per directory: load_pretrained prefers the flat file, so a stale one from
    # an earlier export must not outlive this one (nor a stale orbax tree a flat export).
    flat_file, orbax_dir = os.path.join(out_dir, PARAMS_SAFETENSORS), os.path.join(out_dir, "params")
    if storage_dtype is not None:
        if os.path.isdir(orbax_dir):
            shutil.rmtree(orbax_dir)
        _save_flat_safetensors(flat_file, params, storage_dtype)
        return
    if os.path.exists(flat_file):
        os.remove(flat_file)
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(out_dir, "params"), params, force=True)


def _save_flat_safetensors(path: str, params: Any, dtype: str) -> None:
    import jax
    from safetensors.numpy import save_file
    if dtype not in ("float16", "float32"):
        raise ValueError(f"storage_dtype must be 'float16' or 'float32', got {dtype!r}")
    tensors = {}
    for name, value in traverse_util.flatten_dict(jax.device_get(params), sep="/").items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating):
            if dtype == "float16" and np.abs(value).max(initial=0.0) > np.finfo(np.float16).max:
                raise ValueError(f"parameter {name} exceeds the float16 range; store it as float32")
            value = value.astype(dtype)
        tensors[name] = np.array(value, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
    save_file(tensors, path, metadata={"format": "unclip_jax", "storage_dtype": dtype})


def load_pretrained(path: str, target: Any = None) -> tuple[Any, dict]:
    """Reads a directory written by :func:`save_pretrained`: (params, config dict).

    ``target``: optional tree of ``jax.ShapeDtypeStruct`` with shardings to restore onto
    a device layout; by default arrays are restored to the default device. Parameters
    stored as ``params.safetensors`` come back as float32 numpy arrays (``target`` is
    then ignored: the caller places them).
    """
    path = os.path.abspath(path)
    config = read_json(os.path.join(path, "config.json"))
    flat_file = os.path.join(path, PARAMS_SAFETENSORS)
    if os.path.isfile(flat_file):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        try:
            flat = load_file(flat_file)
        except SafetensorError as e:  # truncated or not safetensors: name the file
            raise ConversionError(f"cannot read {flat_file}: {e}") from e
        params = traverse_util.unflatten_dict({k: (v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v)
                                 for k, v in flat.items()}, sep="/")
        return params, config
    import orbax.checkpoint as ocp
    params_dir = os.path.join(path, "params")
    if not os.path.isdir(params_dir):
        raise ConversionError(f"{path!r} has no params/ checkpoint nor {PARAMS_SAFETENSORS}; "
                              "was it written by save_pretrained?")
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(params_dir, target) if target is not None else ckptr.restore(params_dir)
    return params, config
