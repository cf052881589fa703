"""The cache's row order: a seeded permutation of the dataset index, so that consecutive rows mix the classes.

Dataset indexes are sorted by class; a cache stored in that order would hand anything that
streams it shard by shard a few classes at a time. Row r of a cache of format 3 holds image
``row_order(n, seed)[r]`` of the index. The permutation sorts the images by a 64-bit hash of
(seed, image id), so it is a pure function of (n, seed) that no library version can change.
"""

from __future__ import annotations

import numpy as np

__all__ = ["row_order"]

_MASK = (1 << 64) - 1


def _mix(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 values (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64, copy=True)
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def row_order(num_images: int, seed: int | None) -> np.ndarray:
    """Which image of the dataset index each cache row holds.

    Args:
        num_images: N, rows of the index (after any ``--per-class``/``--limit`` subset).
        seed: the order seed; None keeps the index order (caches of format 1 and 2).

    Returns:
        (N,) int64, a permutation of 0..N-1: row r holds image ``order[r]``.
    """
    ids = np.arange(int(num_images), dtype=np.int64)
    if seed is None:
        return ids
    salt = _mix(np.asarray([int(seed) & _MASK], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        keys = _mix(ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + salt)
    return np.argsort(keys, kind="stable").astype(np.int64)
