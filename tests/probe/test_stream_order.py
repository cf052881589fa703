"""Streamed epochs over class-sorted caches (the real layout) mix the whole split; the read-ahead thread behaves."""

import threading

import numpy as np
import pytest
import torch

from extract.cache import CacheSpec, FeatureCache, cache_path, create_cache, open_cache
from extract.errors import CacheError
from probe.features import WINDOW_SHARE, StreamedFeatures
from tests.extract.shard_writes import write_and_mark

KEY = (24, 150)
ROW_BYTES = 2 * 2 * 4 * 4  # (2, 4, 4) float16


def make_sorted_cache(root, num_classes=100, per_class=20, shard_size=20, invalid=(), permute_seed=None):
    """A cache whose index is sorted by class; each row's features hold its index row number (channels 0, 1).

    With ``permute_seed`` the cache rows are a seeded permutation of the index (what the extraction's
    row order will be), so a shard holds rows of many classes.
    """
    n = num_classes * per_class
    labels = np.repeat(np.arange(num_classes), per_class)
    order = np.arange(n) if permute_seed is None else np.random.default_rng(permute_seed).permutation(n)
    spec = CacheSpec(dataset="toy", split="train", backbone_id="32x32_small-random0", config_name="32x32_small",
                     image_size=32, num_images=n, shard_size=shard_size, pool=4)
    create_cache(root, spec, [f"img/{i}.jpg" for i in order], labels[order], [f"c{c}" for c in range(num_classes)],
                 arrays={KEY: (2, 4, 4)}, native_sizes={24: 8})
    data = np.zeros((n, 2, 4, 4), np.float16)
    data[:, 0] = (order // 1000)[:, None, None]  # float16 holds integers up to 2048 exactly
    data[:, 1] = (order % 1000)[:, None, None]
    valid = np.ones(n, bool)
    valid[list(invalid)] = False
    path = cache_path(root, "toy", "train", "32x32_small-random0")
    for shard in range(-(-n // shard_size)):
        rows = slice(shard * shard_size, min(n, (shard + 1) * shard_size))
        write_and_mark(path, shard, {KEY: data[rows]},
                       invalid={row: "broken" for row in range(rows.start, rows.stop) if not valid[row]})
    return open_cache(root, "toy", "train", "32x32_small-random0"), labels, order, valid


def epoch_rows(stream, batch_size, seed, epoch):
    """(index row of every streamed row, its label), in streaming order."""
    ids, labels = [], []
    for features, y in stream.batches(batch_size, seed=seed, epoch=epoch):
        x = features[KEY].float()
        ids.append((x[:, 0, 0, 0] * 1000 + x[:, 1, 0, 0]).long())
        labels.append(y)
    return torch.cat(ids).numpy(), torch.cat(labels).numpy()


def _piece_rows(stream, pieces):
    return np.concatenate([np.arange(stream.piece_starts[p], stream.piece_stops[p]) for p in pieces])


@pytest.mark.parametrize("window_shards, piece_rows", [(16, 20), (10, 12)])  # whole shards; a tight budget: smaller pieces
def test_class_sorted_epochs_permute_the_pieces_and_give_every_row_once(tmp_path, window_shards, piece_rows):
    invalid = (3, 450, 1999)
    cache, labels, _, valid = make_sorted_cache(tmp_path, invalid=invalid)  # 100 classes, one 20-row shard each
    stream = StreamedFeatures(cache, [KEY], window_bytes=window_shards * 20 * ROW_BYTES)
    assert stream.piece_rows == piece_rows and stream.pieces_per_window * piece_rows <= window_shards * 20
    orders = []
    for epoch in range(3):
        ids, got = epoch_rows(stream, 32, seed=7, epoch=epoch)
        assert np.array_equal(np.sort(ids), np.flatnonzero(valid))  # every valid row exactly once, invalid ones never
        assert np.array_equal(got, labels[ids])
        window = _piece_rows(stream, stream.windows(7, epoch)[0])
        first = int(valid[window].sum())
        # the first window is exactly its pieces' rows, drawn from the whole split, not the first classes
        assert np.array_equal(np.sort(ids[:first]), np.sort(window[valid[window]]))
        tenth = set(got[:len(ids) // 10].tolist())  # a window holds about a tenth here: 16 pieces, ~16 classes
        assert len(tenth) >= 14 and max(tenth) - min(tenth) > 50, tenth  # consecutive shards would give 10 classes
        orders.append(stream.piece_order(7, epoch))
        assert np.array_equal(np.sort(orders[-1]), np.arange(stream.num_pieces))
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    again, _ = epoch_rows(stream, 32, seed=7, epoch=1)
    assert np.array_equal(again, epoch_rows(stream, 32, seed=7, epoch=1)[0])  # a pure function of (seed, epoch)
    in_order, _ = epoch_rows(stream, 32, seed=None, epoch=0)
    assert np.array_equal(in_order, np.flatnonzero(valid))


def test_first_tenth_of_an_epoch_covers_nine_tenths_of_the_classes_once_rows_are_permuted(tmp_path):
    """100 classes of 50 images, index sorted by class; cache rows a seeded permutation of the index."""
    cache, labels, _, _ = make_sorted_cache(tmp_path, per_class=50, shard_size=50, permute_seed=3)
    stream = StreamedFeatures(cache, [KEY], window_bytes=10 * 50 * ROW_BYTES)
    for epoch in range(3):
        ids, got = epoch_rows(stream, 64, seed=0, epoch=epoch)
        assert np.array_equal(np.sort(ids), np.arange(5000)) and np.array_equal(got, labels[ids])
        assert len(set(got[:500])) >= 90, epoch


def test_windows_are_bounded_by_bytes_and_default_to_a_share_of_the_ram_cap(tmp_path):
    make_sorted_cache(tmp_path, num_classes=10, per_class=20, shard_size=8)
    shard_bytes = 8 * ROW_BYTES
    cache = open_cache(tmp_path, "toy", "train", "32x32_small-random0", ram_cap_bytes=WINDOW_SHARE * 3 * shard_bytes + 5)
    stream = StreamedFeatures(cache, [KEY])
    assert stream.window_bytes == 3 * shard_bytes + 1
    assert stream.piece_rows == 1 and stream.pieces_per_window == 24  # 24 rows fit: from 16+ places, not 3 shards
    windows = stream.windows(0, 0)
    assert np.array_equal(np.sort(np.concatenate(windows)), np.arange(stream.num_pieces))
    seen = []
    real = StreamedFeatures._produce

    def spy(self, seed, epoch, stop):
        for window in real(self, seed, epoch, stop):
            seen.append(sum(value.nbytes for value in window[0].values()))
            yield window

    StreamedFeatures._produce = spy
    try:
        assert sum(len(y) for _, y in stream.batches(16, seed=0)) == 200
    finally:
        StreamedFeatures._produce = real
    assert len(seen) == len(windows) and max(seen) <= stream.window_bytes
    roomy = StreamedFeatures(cache, [KEY], window_bytes=100 * shard_bytes)
    assert roomy.piece_rows == 8 and roomy.pieces_per_window == 100  # whole shards (their inner chunk) when they fit
    tiny = StreamedFeatures(cache, [KEY], window_bytes=1)
    assert (tiny.piece_rows, tiny.pieces_per_window) == (1, 1)  # always at least one row


def _read_ahead_threads():
    return [t for t in threading.enumerate() if t.name == "diffrep-read-ahead" and t.is_alive()]


def test_read_errors_reach_the_training_thread_and_an_early_stop_ends_the_reader(tmp_path, monkeypatch):
    cache, *_ = make_sorted_cache(tmp_path, num_classes=10, per_class=20, shard_size=10)
    stream = StreamedFeatures(cache, [KEY], window_bytes=2 * 10 * ROW_BYTES)
    batches = stream.batches(4, seed=0)
    next(batches)
    assert len(_read_ahead_threads()) == 1
    batches.close()
    assert not _read_ahead_threads()

    real = FeatureCache.row_reader

    def failing(cache_, b, t, pool=None, view=0):
        read = real(cache_, b, t, pool=pool, view=view)
        return lambda start, stop: (_ for _ in ()).throw(CacheError("rows cannot be decoded")) if start == 50 else read(start, stop)

    monkeypatch.setattr(FeatureCache, "row_reader", failing)
    with pytest.raises(CacheError, match="cannot be decoded"):
        for _ in stream.batches(4, seed=0):
            pass
    assert not _read_ahead_threads()


def test_a_cache_in_the_extract_stage_s_row_order_streams_every_class_early(tmp_path):
    """The real pair: create_cache's seeded row order (what extract writes) + the streamed reader's per-epoch pieces.

    100 classes of 60 images (ImageNet has 1,281 a class), index sorted by class; the first 10% of every
    streamed epoch holds >= 90 classes (in index order it would hold 10).
    """
    n, classes = 6000, 100
    labels = np.repeat(np.arange(classes), n // classes)
    spec = CacheSpec(dataset="toy", split="train", backbone_id="32x32_small-random0", config_name="32x32_small",
                     image_size=32, num_images=n, shard_size=20, pool=4, row_order_seed=0)
    cache = create_cache(tmp_path, spec, [f"img/{i}.jpg" for i in range(n)], labels, [f"c{c}" for c in range(classes)],
                         arrays={KEY: (2, 4, 4)}, native_sizes={24: 8})
    ids = np.asarray(cache.image_ids)
    assert sorted(ids) == list(range(n)) and not np.array_equal(ids, np.arange(n))
    data = np.zeros((n, 2, 4, 4), np.float16)
    data[:, 0] = (ids // 1000)[:, None, None]
    data[:, 1] = (ids % 1000)[:, None, None]
    for shard in range(n // 20):
        write_and_mark(cache.path, shard, {KEY: data[shard * 20:(shard + 1) * 20]})
    reader = open_cache(tmp_path, "toy", "train", "32x32_small-random0")
    stream = StreamedFeatures(reader, [KEY], window_bytes=30 * 20 * ROW_BYTES)  # a tenth of the split per window
    for epoch in range(3):
        got_ids, got = epoch_rows(stream, 32, seed=3, epoch=epoch)
        assert np.array_equal(got, labels[got_ids])  # labels travel with their rows
        assert len(set(got[:n // 10].tolist())) >= 90
