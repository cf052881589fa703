"""Adaptive average pooling of block outputs to min(native size, pool), and exact coarser pools from stored ones."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from extract.errors import CacheError

__all__ = ["pooled_size", "pool_features", "pool_float", "derive_pool"]


def pooled_size(native: int, pool: int | None) -> int:
    """Side of an adaptive average pool to ``pool`` that never upsamples: ``min(native, pool)``;
    pool 0 or None keeps the full map."""
    return native if not pool else min(native, int(pool))


def pool_features(x: torch.Tensor, pool: int) -> torch.Tensor:
    """Pool a block output the way the cache stores it.

    Args:
        x: (N, C, H, W) block output in any float dtype.
        pool: target side; 0 keeps the full map.

    Returns:
        (N, C, h, w) float16 with h = pooled_size(H, pool); averages are taken in float32.
    """
    return pool_float(x, pool).to(torch.float16)


def pool_float(x: torch.Tensor, pool: int) -> torch.Tensor:
    """``pool_features`` without the float16 rounding: (N, C, h, w) float32, for a backbone that trains
    (the rounding would stop no gradient, but it costs precision)."""
    size = pooled_size(x.shape[-1], pool)
    x = x.float()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.adaptive_avg_pool2d(x, size)
    return x


def derive_pool(stored: np.ndarray, native: int, pool: int | None) -> np.ndarray:
    """A coarser pool derived exactly from stored maps (average over equal windows).

    Args:
        stored: (N, C, s, s) float16 maps as stored, s = min(native, stored pool).
        native: side of the block's unpooled output.
        pool: wanted pool (None = as stored, 0 = full maps).

    Returns:
        (N, C, h, h) float16 with h = pooled_size(native, pool); averaged in float32.

    Raises:
        CacheError: the wanted maps are finer than the stored ones, or h does not divide s.
    """
    side = stored.shape[-1]
    if pool is None:
        return stored
    size = pooled_size(native, pool)
    if size == side:
        return stored
    if size > side:
        raise CacheError(
            f"pool {pool or 'none'} needs {size}x{size} maps but the cache stores {side}x{side}: "
            f"ask for a pool of at most {side} or re-extract with --pool {pool or 'none'} into a new --cache-dir"
        )
    if side % size:
        divisors = ", ".join(str(d) for d in range(1, side + 1) if side % d == 0)
        raise CacheError(
            f"pool {pool} cannot be derived exactly from the stored {side}x{side} maps: "
            f"choose one of {divisors} or re-extract with --pool {pool} into a new --cache-dir"
        )
    k = side // size
    n, c = stored.shape[:2]
    windows = stored.astype(np.float32).reshape(n, c, size, k, size, k)
    return windows.mean(axis=(3, 5)).astype(np.float16)
