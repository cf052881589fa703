"""The cache's row order: a seeded permutation of a class-sorted index in which every prefix holds its share of every class."""

import numpy as np

from extract.cache.order import row_order


def _class_sorted(sizes):
    return np.repeat(np.arange(len(sizes)), sizes)


def test_every_prefix_holds_its_share_of_every_class():
    sizes = np.random.default_rng(1).integers(1, 80, size=100)  # uneven, as real datasets
    labels = _class_sorted(sizes)
    order = row_order(labels, seed=0)
    assert sorted(order) == list(range(len(labels)))
    for fraction in (0.01, 0.1, 0.37, 0.5, 1.0):
        prefix = int(round(fraction * len(labels)))
        counts = np.bincount(labels[order[:prefix]], minlength=len(sizes))
        assert np.all(np.abs(counts - fraction * sizes) <= 1.5), f"prefix {fraction}: a class is over- or under-drawn"
    tenth = labels[order[: len(labels) // 10]]
    assert len(np.unique(tenth)) >= np.sum(sizes >= 10), "every class of 10 or more images is in the first 10%"


def test_the_order_is_a_pure_function_of_labels_and_seed():
    labels = _class_sorted([7, 3, 12, 5])
    np.testing.assert_array_equal(row_order(labels, 4), row_order(labels.copy(), 4))
    assert list(row_order(labels, 4)) != list(row_order(labels, 5))
    assert list(row_order(labels, None)) == list(range(len(labels))), "None: the index order of formats 1 and 2"
    within = [int(i) for i in row_order(labels, 4) if labels[i] == 2]
    assert within != sorted(within), "inside a class the images come in a seeded order, not the index order"
    assert row_order(np.zeros(0, np.int64), 0).shape == (0,)
