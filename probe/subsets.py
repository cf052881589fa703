"""Seeded, class-balanced row subsets: held-out parts of a training split and label fractions.

Dataset indexes are sorted by class (ImageNet: 1,000 classes of about 1,300 rows), so any subset
taken as "the first rows" holds a few classes. These draws take the same share of every class,
with a seed, and return rows sorted so that reads of a class-sorted cache stay slices.
"""

from __future__ import annotations

import numpy as np
import torch

from probe.errors import ProbeError

__all__ = ["heldout_split", "label_fraction_rows", "balanced_rows"]


def heldout_split(labels: np.ndarray | torch.Tensor, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, held-out rows): a seeded class-balanced split, ``fraction`` of every class held out.

    Every class keeps at least one fitting row and, with two or more images, gives one held-out row.
    Rows are returned sorted, so slices of a class-sorted cache stay cheap to read.
    """
    labels = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels)
    rng = np.random.default_rng([int(seed), 0x6865_6c64])
    held = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        take = int(round(fraction * len(rows)))
        take = min(max(take, 1 if len(rows) > 1 else 0), len(rows) - 1)
        held.append(rng.permutation(rows)[:take])
    held_rows = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[held_rows] = False
    return np.flatnonzero(mask), held_rows



def label_fraction_rows(labels: np.ndarray | torch.Tensor, fraction: float, seed: int) -> np.ndarray:
    """Rows of a label fraction (e.g. 0.01, 0.1): ``fraction`` of every class, at least one row each, seeded, sorted."""
    if not 0 < fraction <= 1:
        raise ProbeError(f"label fraction {fraction} must be in (0, 1], e.g. 0.01 or 0.1")
    labels = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels)
    if fraction == 1:
        return np.arange(len(labels))
    rng = np.random.default_rng([int(seed), 0x6672_6163])
    rows = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        take = min(len(members), max(1, int(round(fraction * len(members)))))
        rows.append(rng.permutation(members)[:take])
    return np.sort(np.concatenate(rows))


def balanced_rows(labels: np.ndarray | torch.Tensor, count: int, seed: int) -> np.ndarray:
    """``count`` rows spread evenly over the classes, seeded, sorted (e.g. ``--limit``).

    Every class gives ``count // classes`` rows or one more (which classes give one more is seeded),
    fewer only when it has fewer; the rows of a class are a seeded random choice, not its first ones.
    """
    labels = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels)
    if count < 1:
        raise ProbeError(f"a subset needs at least 1 row, got {count}")
    if count >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng([int(seed), 0x6c69_6d74])
    grouped = np.lexsort((rng.random(len(labels)), labels))  # by class, random inside each class
    sorted_labels = labels[grouped]
    first = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(len(labels)) - first  # 0, 1, 2, ... inside each class
    classes, inverse = np.unique(sorted_labels, return_inverse=True)
    class_tiebreak = rng.permutation(len(classes))[inverse]
    chosen = grouped[np.lexsort((class_tiebreak, rank))[:count]]  # every class's 1st, then every 2nd, ...
    return np.sort(chosen)
