"""What computed a cache's shards (device kind, GPU, precision, TF32), and the rule that one array never mixes them.

CPU and GPU kernels, and float32 against bf16/fp16 autocast, give different numbers; an array
whose shards came from both would hold features of two different functions without saying so.
Each job reports ``compute_settings``; the process that marks shards records the first settings
of every array in its attributes (and every run's in the run history) and refuses a shard whose
settings ``compute_conflict`` with them. The GPU model and TF32 are recorded, not enforced.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["compute_settings", "compute_conflict", "describe_compute"]


def compute_settings(device: torch.device | str, precision: str) -> dict[str, Any]:
    """The settings a job computes with.

    Args:
        device: the resolved device; precision: fp32, bf16 or fp16 (the autocast the forward runs under).

    Returns:
        ``{"device": "cpu" | "cuda", "gpu": name or "", "precision": ..., "tf32": {"matmul": bool, "cudnn": bool} or None}``.
    """
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    return {
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if on_gpu else "",
        "precision": str(precision),
        "tf32": {"matmul": bool(torch.backends.cuda.matmul.allow_tf32), "cudnn": bool(torch.backends.cudnn.allow_tf32)}
        if on_gpu else None,
    }


def describe_compute(settings: Mapping[str, Any]) -> str:
    """``cuda (NVIDIA H200, bf16, TF32 matmul off / cudnn on)`` or ``cpu (fp32)``."""
    parts = [settings.get("gpu") or "", str(settings.get("precision"))]
    tf32 = settings.get("tf32")
    if tf32:
        parts.append(f"TF32 matmul {'on' if tf32.get('matmul') else 'off'} / cudnn {'on' if tf32.get('cudnn') else 'off'}")
    return f"{settings.get('device')} ({', '.join(p for p in parts if p)})"


def compute_conflict(array: str, recorded: Mapping[str, Any] | None, current: Mapping[str, Any]) -> str | None:
    """One line refusing to add shards computed with ``current`` to an array recorded with ``recorded``, or None.

    Only the device kind and the precision must agree (another GPU model or TF32 setting is allowed).
    """
    if not recorded:
        return None
    if recorded.get("device") == current.get("device") and recorded.get("precision") == current.get("precision"):
        return None
    device = "cuda" if recorded.get("device") == "cuda" else "cpu"
    return (
        f"array {array} was computed on {describe_compute(recorded)}, this run computes on "
        f"{describe_compute(current)}: one array must not mix them; resume with --device {device} "
        f"--precision {recorded.get('precision')}, or extract into a new --cache-dir"
    )
