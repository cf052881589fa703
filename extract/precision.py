"""Compute precision of the backbone: bf16 autocast by default on a GPU, float32 on the CPU (bit-reproducible there)."""

from __future__ import annotations

import contextlib
import os

import torch

from extract.errors import ConfigError

__all__ = ["PRECISIONS", "autocast", "resolve_device", "resolve_precision"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` and ``cuda``: $DIFFREP_DEVICE if set (one GPU per Dask worker); else ``auto`` is cuda when available, else cpu.

    Anything else is passed to torch.device.

    Raises:
        ConfigError: an unknown device string, or cuda asked for where there is none.
    """
    if device in ("auto", "cuda") and os.environ.get("DIFFREP_DEVICE"):
        device = os.environ["DIFFREP_DEVICE"]  # set per worker by a multi-GPU local cluster
    elif device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {device!r} is unknown: use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device} asked for, but this machine has no CUDA GPU: use --device cpu")
    return resolved


def resolve_precision(precision: str = "auto", device: str = "auto") -> str:
    """``auto``: bf16 where the backbone runs on a CUDA GPU (tensor cores, half the memory traffic), fp32 on the CPU.

    ``cuda``/``cuda:N`` give bf16 even where this process sees no GPU (a plan made for a remote
    cluster); ``auto`` follows the machine (or the worker's $DIFFREP_DEVICE) as :func:`resolve_device`
    does. An explicit precision is returned as it is.

    Raises:
        ConfigError: an unknown precision or device.
    """
    if precision != "auto":
        if precision not in PRECISIONS:
            raise ConfigError(f"precision {precision!r} is unknown: choose auto, {', '.join(PRECISIONS)}")
        return precision
    if str(device).startswith("cuda"):
        return "bf16"
    return "bf16" if resolve_device(device).type == "cuda" else "fp32"


def autocast(device: torch.device | str, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """A context in which the backbone computes at ``precision`` (fp32: a no-op).

    GroupNorm and the attention softmax stay in float32 inside the layers, as in ADM's fp16 mode.

    Raises:
        ConfigError: an unknown precision, or fp16 on a CPU (use bf16 there).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is unknown: choose {', '.join(PRECISIONS)}")
    device_type = torch.device(device).type
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device_type == "cpu":
        raise ConfigError("precision fp16 needs a GPU: use --precision bf16 or fp32 on the CPU")
    return torch.autocast(device_type=device_type, dtype=PRECISIONS[precision])
