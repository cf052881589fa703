"""Every subset drawn from a class-sorted split (the real layout) is class-balanced and seeded, never the first rows."""

import numpy as np
import pytest

from probe.errors import ProbeError
from probe.subsets import balanced_rows, heldout_split, label_fraction_rows

IMAGENET = np.repeat(np.arange(1000), 1281)[:1_281_167]  # class-sorted, ImageNet's size and class count


@pytest.mark.parametrize("count", [1, 999, 1000, 2500, 50_000])
def test_balanced_rows_spread_any_count_evenly_over_imagenet_classes(count):
    rows = balanced_rows(IMAGENET, count, seed=0)
    per_class = np.bincount(IMAGENET[rows], minlength=1000)
    assert len(rows) == count and len(np.unique(rows)) == count and (np.diff(rows) > 0).all()
    assert per_class.max() - per_class.min() <= 1 and per_class.sum() == count
    if 1 < count < 1000:  # fewer rows than classes: distinct classes, drawn from the whole range
        assert per_class.max() == 1 and IMAGENET[rows].max() - IMAGENET[rows].min() > 900
    if count > 1:
        rank = rows - np.searchsorted(IMAGENET, IMAGENET[rows])  # position inside its class
        assert rank.max() > 1000  # not the first images of each class


def test_balanced_rows_are_seeded_and_respect_small_classes():
    labels = np.repeat(np.arange(5), [1, 2, 50, 50, 50])
    rows = balanced_rows(labels, 20, seed=1)
    assert np.array_equal(rows, balanced_rows(labels, 20, seed=1))
    assert not np.array_equal(rows, balanced_rows(labels, 20, seed=2))
    counts = np.bincount(labels[rows], minlength=5)
    assert counts.tolist()[:2] == [1, 2] and counts[2:].min() >= 5 and counts.sum() == 20
    assert np.array_equal(balanced_rows(labels, 500, seed=0), np.arange(153))
    with pytest.raises(ProbeError, match="at least 1 row"):
        balanced_rows(labels, 0, seed=0)


def test_label_fractions_and_heldout_parts_take_every_class_seeded():
    labels = np.repeat(np.arange(100), 50)
    rows = label_fraction_rows(labels, 0.1, seed=0)
    assert (np.bincount(labels[rows], minlength=100) == 5).all()
    assert (rows - np.searchsorted(labels, labels[rows])).max() >= 5  # not each class's first five
    assert not np.array_equal(rows, label_fraction_rows(labels, 0.1, seed=1))
    fit_rows, held_rows = heldout_split(labels, 0.2, seed=0)
    assert (np.bincount(labels[held_rows], minlength=100) == 10).all()
    assert np.array_equal(np.sort(np.concatenate([fit_rows, held_rows])), np.arange(5000))
    assert not np.array_equal(held_rows, heldout_split(labels, 0.2, seed=1)[1])
