"""The cache's row order: a seeded, class-stratified permutation of the dataset index, so any run of rows mixes the classes.

Dataset indexes are sorted by class; a cache stored in that order hands anything that streams it
shard by shard a few classes at a time. A uniform shuffle is not enough either: with 10 images
per class, the first 10% of a shuffled order misses a third of the classes. Here each class is
spread evenly over the whole order: an image at (seeded) rank k of a class of n images gets the
position key (k + u) / n, u a seeded jitter in [0, 1), and rows are sorted by that key. Any prefix
of a fraction f of the rows then holds about f of every class (within one image), and within a
class the images come in a seeded random order. Keys come from a 64-bit hash of (seed, image id),
so the order is a pure function of (labels, seed) that no library version can change.
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


def _hash(seed: int, ids: np.ndarray, stream: int) -> np.ndarray:
    salt = _mix(np.asarray([(int(seed) * 0x100000001B3 + stream) & _MASK], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        return _mix(ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + salt)


def row_order(labels: np.ndarray, seed: int | None) -> np.ndarray:
    """Which image of the dataset index each cache row holds.

    Args:
        labels: (N,) int class labels of the index (after any ``--per-class``/``--limit`` subset).
        seed: the order seed; None keeps the index order.

    Returns:
        (N,) int64, a permutation of 0..N-1: row r holds image ``order[r]``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = labels.shape[0]
    ids = np.arange(n, dtype=np.int64)
    if seed is None or n == 0:
        return ids
    shuffle, jitter = _hash(seed, ids, 1), _hash(seed, ids, 2)
    by_class = np.argsort(shuffle)
    by_class = by_class[np.argsort(labels[by_class], kind="stable")]  # each class together, in a seeded order
    sizes = np.bincount(labels)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.empty(n, dtype=np.int64)
    rank[by_class] = ids - starts[labels[by_class]]
    fraction = (jitter >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # in [0, 1)
    key = (rank + fraction) / sizes[labels]
    return np.argsort(key, kind="stable").astype(np.int64)
