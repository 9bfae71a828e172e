"""What a run reports: JSON-lines metrics, TensorBoard events, sample PNGs, a progress bar, MFU.

Only process 0 writes (``enabled=False`` elsewhere). Files in the workdir:

* ``metrics.jsonl`` — one ``{"step": s, "name": value, ...}`` object per line; on resume,
  lines past the restored step are dropped (those steps are redone), so the file
  always reads like one uninterrupted run;
* ``tb/`` — TensorBoard event files (tensorboardX; skipped with a warning if absent);
* ``samples/step_<s>.png`` — sample grids of generative stages.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

# Dense bf16 peak FLOP/s per chip, matched (in order) against ``device.device_kind``.
PEAK_FLOPS_PER_DEVICE: tuple[tuple[str, float], ...] = (
    ("h200", 989e12),
    ("h100", 989e12),
    ("v6 lite", 918e12), ("v6e", 918e12),
    ("v5 lite", 197e12), ("v5e", 197e12),
    ("v5p", 459e12), ("tpu v5", 459e12),
    ("tpu v4", 275e12),
)


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """The chip's peak bf16 FLOP/s, or None when unknown (CPU): MFU is then omitted."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    kind = device.device_kind.lower()
    for pattern, flops in PEAK_FLOPS_PER_DEVICE:
        if pattern in kind:
            return flops
    return None


def model_flops_utilization(flops_per_example: float | None, examples_per_s: float,
                            num_devices: int, peak_per_device: float | None) -> float | None:
    """Achieved training FLOP/s over the mesh's peak, in [0, 1]; None if either is unknown."""
    if not flops_per_example or not peak_per_device or examples_per_s <= 0:
        return None
    return flops_per_example * examples_per_s / (peak_per_device * num_devices)


def _truncate_jsonl(path: str, last_step: int) -> None:
    """Drops lines whose step is past ``last_step`` (written by a run that was cut off)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) > last_step:
                    continue
            except json.JSONDecodeError:
                continue  # a line half-written when the process died
            kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def _summary_writer_class():
    """tensorboardX's ``SummaryWriter``, imported without importing torch.

    tensorboardX imports torch whenever it is installed (seconds) only to accept torch
    tensors; we log numpy, so the import is made to fail for that moment.
    """
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter  # noqa: PLC0415 - only process 0 needs it
    except ImportError:
        logging.warning("tensorboardX is not installed: no TensorBoard event files "
                        "(pip install tensorboardX); metrics.jsonl is still written")
        return None
    finally:
        if blocked and sys.modules.get("torch", False) is None:
            del sys.modules["torch"]
    return SummaryWriter


def _plain(value: Any) -> Any:
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()


class MetricsWriter:
    """Scalars to ``metrics.jsonl`` + TensorBoard, images to PNG + TensorBoard."""

    def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.workdir = workdir
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        _truncate_jsonl(self.jsonl_path, resume_step)
        self._jsonl = open(self.jsonl_path, "a")
        writer_class = _summary_writer_class()
        if writer_class is not None:
            self._tb = writer_class(os.path.join(workdir, "tb"), purge_step=resume_step + 1)

    def scalars(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: _plain(v) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in record.items():
            if (self._tb is not None and name != "step" and isinstance(value, (int, float))
                    and math.isfinite(value)):
                self._tb.add_scalar(name, value, step)

    def image(self, step: int, name: str, image: np.ndarray) -> str | None:
        """Writes a uint8 (H, W, 3) image as ``samples/<name>_<step>.png``; returns its path."""
        if not self.enabled:
            return None
        from PIL import Image  # noqa: PLC0415
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3:
            raise ValueError(f"sample image must be uint8 (H, W, C), got {image.dtype} {image.shape}")
        out_dir = os.path.join(self.workdir, "samples")
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"{name}_{step:08d}.png")
        Image.fromarray(image).save(path)
        if self._tb is not None:
            self._tb.add_image(name, image, step, dataformats="HWC")
        return path

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
            self.enabled = False


class Progress:
    """A tqdm bar on process 0 (step, loss, examples/s, MFU where known; tqdm shows the
    ETA). Each value shown stays until it is updated: the per-step loss does not hide the
    examples/s of the last logging step."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self._bar = None
        self._postfix: dict = {}
        if enabled:
            from tqdm import tqdm  # noqa: PLC0415
            self._bar = tqdm(total=total, initial=initial, desc="train", unit="step",
                             dynamic_ncols=True, file=sys.stderr, mininterval=1.0)

    def update(self, n: int, **postfix) -> None:
        if self._bar is not None:
            self._postfix.update({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()})
            self._bar.set_postfix(self._postfix, refresh=False)
            self._bar.update(n)

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
