"""Cached (b, t) arrays of one split as tensors for the probes: read once, invalid rows dropped.

Features stay float16, as stored, in RAM and on the training device (half the memory of
float32, so the RAM cap admits twice as many rows); consumers cast each batch to float32.
``load_features`` reads whole arrays into RAM (``FeatureCache.load``, under its RAM cap);
``load_at_pools`` reads each at its own pool, and ``flatten_features`` makes the linear probe's input.
``iter_feature_batches`` streams the same rows in row order, in fixed-size batches
(``FeatureCache.iter_shards``), for consumers to whom order does not matter (kNN's train side,
statistics). ``StreamedFeatures`` gives training and minibatch CKA a stream mixed across the whole
split every epoch when the arrays do not fit. ``resolve_backbone_id`` finds the cache folder of a
named configuration when the caller does not name the backbone id.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from extract import distributed
from extract.cache import FeatureCache, cache_path, open_cache
from extract.errors import CacheError

from extract.inputs.read_ahead import read_ahead
from extract.pooling import pool_features
from probe.train import epoch_order
from probe.views import ViewStack

__all__ = [
    "FeatureSet", "StreamedFeatures", "open_split", "in_shapes", "feature_bytes", "load_features", "choose_read_pool",
    "load_at_pools", "flatten_features", "iter_feature_batches", "resolve_backbone_id", "WINDOW_SHARE",
]

Key = tuple[int, int]


@dataclass
class FeatureSet:
    """The valid rows of one split.

    Attributes:
        features: ``{(b, t): (N, C, h, w) float16}`` on the CPU (as stored; cast per batch).
        labels: (N,) int64. class_names: names of the label values.
        dropped: rows of images the cache marked invalid (not in ``features``).
    """

    features: dict[Key, torch.Tensor]
    labels: torch.Tensor
    class_names: list[str]
    dropped: int = 0

    @property
    def num_images(self) -> int:
        return int(self.labels.shape[0])


def resolve_backbone_id(root: str | os.PathLike, dataset: str, split: str, config_name: str,
                        backbone_id: str | None = None) -> str:
    """The backbone id to read: ``backbone_id`` when given, else the one cache folder of ``config_name``.

    Raises:
        CacheError: no cache of that configuration, or several (the message lists them).
    """
    if backbone_id:
        return backbone_id
    parent = os.path.dirname(cache_path(root, dataset, split, "x"))
    found = sorted(
        name for name in (os.listdir(parent) if os.path.isdir(parent) else [])
        # the rest is one sha12 or random<seed>: sd21's caches are not sd21-base's
        if name.startswith(f"{config_name}-") and "-" not in name[len(config_name) + 1:]
        and os.path.exists(os.path.join(parent, name, "zarr.json"))
    )
    if len(found) == 1:
        return found[0]
    if not found:
        raise CacheError(
            f"no {config_name} cache for {dataset}/{split} under {root}: run diffrep extract --dataset {dataset} "
            f"--config {config_name} first, or pass --cache-dir / --backbone-id"
        )
    raise CacheError(f"several {config_name} caches for {dataset}/{split} ({', '.join(found)}): choose one with --backbone-id")


def open_split(root: str | os.PathLike, dataset: str, split: str, backbone_id: str,
               ram_cap_bytes: int | None = None) -> FeatureCache:
    """``open_cache`` with the cache's default RAM cap unless one is given."""
    if ram_cap_bytes is None:
        return open_cache(root, dataset, split, backbone_id)
    return open_cache(root, dataset, split, backbone_id, ram_cap_bytes=ram_cap_bytes)


def in_shapes(cache: FeatureCache, keys: Sequence[Key], pool: int | None = None) -> dict[Key, tuple[int, int, int]]:
    """``{(b, t): (C, h, w)}`` as ``load(b, t, pool)`` returns them (what ``create_head`` takes)."""
    return {(b, t): tuple(int(v) for v in cache.shape(b, t, pool)[1:]) for b, t in keys}


def feature_bytes(cache: FeatureCache, keys: Sequence[Key], pool: int | None = None) -> int:
    """Bytes ``load_features`` needs for the float16 tensors of ``keys`` (all rows)."""
    return sum(2 * int(np.prod(cache.shape(b, t, pool))) for b, t in keys)


def load_features(cache: FeatureCache, keys: Sequence[Key], pool: int | None = None, views: bool = False) -> FeatureSet:
    """Read the (b, t) arrays of one split into float16 tensors, dropping invalid rows.

    Args:
        cache: an opened split (``open_split``). keys: the (b, t) arrays to read.
        pool: None (as stored) or a coarser pool derived exactly by the cache.
        views: read every stored view (noise draws, flips) into a ``ViewStack`` when there are several.

    Returns:
        ``FeatureSet`` with ``{(b, t): (N_valid, C, h, w) float16}``, or a ``ViewStack`` of
        ``(V, N_valid, C, h, w)``.

    Raises:
        CacheError: a missing or incomplete array, or more than the cache's RAM cap.
    """
    valid = np.asarray(cache.valid, dtype=bool)
    keep = None if valid.all() else np.flatnonzero(valid)
    view_ids = cache.spec.view_ids if views else [0]
    features = ViewStack() if len(view_ids) > 1 else {}
    for b, t in keys:
        stack = []
        for view in view_ids:
            array = cache.load(b, t, pool=pool, view=view)
            stack.append(torch.from_numpy(np.ascontiguousarray(array if keep is None else array[keep])))
        features[(b, t)] = torch.stack(stack) if len(view_ids) > 1 else stack[0]
    labels = np.asarray(cache.labels, dtype=np.int64)
    labels = labels if keep is None else labels[keep]
    return FeatureSet(features, torch.from_numpy(labels.copy()), list(cache.class_names), int((~valid).sum()))


def choose_read_pool(cache: FeatureCache, key: Key, pool: int | None) -> int | None:
    """Pool to read ``key`` at: ``pool`` when the stored maps are larger, else None (as stored, never finer)."""
    if not pool:
        return None
    return pool if cache.shape(*key)[-1] > pool else None


def load_at_pools(cache: FeatureCache, keys: Sequence[Key], read_pools: Mapping[Key, int | None],
                  views: bool = False) -> FeatureSet:
    """``load_features`` of several keys, each read at its own pool (``choose_read_pool``), into one ``FeatureSet``.

    Args:
        cache: an opened split. keys: its (b, t) arrays. read_pools: ``{(b, t): pool or None}``.
        views: every stored view in a ``ViewStack`` (see ``load_features``).
    """
    loaded = None
    for key in keys:
        part = load_features(cache, [key], pool=read_pools[key], views=views)
        if loaded is None:
            loaded = part
        else:
            loaded.features.update(part.features)
    return loaded


def flatten_features(features: Mapping[Key, torch.Tensor], keys: Sequence[Key], pool: int | None,
                     chunk_rows: int = 8192) -> torch.Tensor:
    """The linear probe's input: each (b, t) map pooled to ``pool`` and flattened, concatenated over ``keys``.

    Args:
        features: ``{(b, t): (N, C, h, w)}``, float16 from the cache. keys: the order of the parts.
        pool: side to pool maps larger than it to (``extract.pooling.pool_features``, a chunk of rows at a
            time, averages in float32); None or 0 flattens the maps as they are.

    Returns:
        (N, sum of C * side * side) in the features' dtype.
    """
    parts = []
    for key in keys:
        x = features[key]
        if pool and x.shape[-1] > pool:
            x = torch.cat([pool_features(x[s:s + chunk_rows], pool).to(x.dtype) for s in range(0, x.shape[0], chunk_rows)])
        parts.append(x.flatten(1))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def iter_feature_batches(
    cache: FeatureCache, keys: Sequence[Key], batch_size: int, pool: int | None = None
) -> Iterator[tuple[dict[Key, torch.Tensor], torch.Tensor]]:
    """Stream the valid rows of several arrays in row order, ``batch_size`` rows at a time.

    Memory stays at about one shard plus one batch per array, whatever N is.

    Yields:
        ``({(b, t): (n, C, h, w) float16}, (n,) int64 labels)``; n = batch_size except the last.
    """
    valid = np.asarray(cache.valid, dtype=bool)
    labels = np.asarray(cache.labels, dtype=np.int64)
    streams = [cache.iter_shards(b, t, pool=pool) for b, t in keys]
    pending: list[list[np.ndarray]] = [[] for _ in keys]
    pending_labels: list[np.ndarray] = []
    count = 0
    for shards in zip(*streams):
        start, stop, _ = shards[0]
        if any((s, e) != (start, stop) for s, e, _ in shards):
            raise CacheError("arrays of one cache have different shard bounds: the cache is damaged, extract it again")
        mask = valid[start:stop]
        for slot, (_, _, data) in enumerate(shards):
            pending[slot].append(data[mask])
        pending_labels.append(labels[start:stop][mask])
        count += int(mask.sum())
        while count >= batch_size:
            yield _take(keys, pending, pending_labels, batch_size)
            count -= batch_size
    if count:
        yield _take(keys, pending, pending_labels, count)


def _take(keys, pending, pending_labels, n):
    """Pop the first n rows of the pending pieces (in place) as tensors."""
    out = {}
    for slot, key in enumerate(keys):
        joined = np.concatenate(pending[slot]) if len(pending[slot]) > 1 else pending[slot][0]
        out[key] = torch.from_numpy(np.ascontiguousarray(joined[:n]))
        pending[slot][:] = [joined[n:]] if joined.shape[0] > n else []
    joined = np.concatenate(pending_labels) if len(pending_labels) > 1 else pending_labels[0]
    pending_labels[:] = [joined[n:]] if joined.shape[0] > n else []
    return out, torch.from_numpy(joined[:n].copy())


WINDOW_SHARE = 4
"""A streamed window takes at most 1/WINDOW_SHARE of the RAM cap: with the window read ahead and the
one being cut into batches, at most three windows (3/4 of the cap) are held at once."""

MIN_PIECES = 16
"""A window gathers at least this many pieces (when it holds that many rows), so even a budget of a few
shards mixes rows from 16 places in the split."""


class StreamedFeatures:
    """One split read from the cache window by window, every epoch, for training that does not fit in RAM.

    Dataset indexes are sorted by class, so consecutive rows hold one class. The split is cut into
    pieces: a shard's inner chunks (the smallest read that wastes nothing), or smaller when the byte
    budget would otherwise hold fewer than ``MIN_PIECES`` of them. Each epoch reads the pieces in a
    permuted order (a pure function of (seed, epoch)), gathers as many as fit in ``window_bytes`` into
    one window, shuffles the window's rows (seeded by (seed, epoch, window)) and cuts it into batches;
    the rows left over at a window's end open the next window's first batch. When the whole split fits
    in one window, its rows come in ``probe.train.epoch_order``: the same batches, and weights, as in RAM. Batches are therefore a
    pure function of (seed, epoch) (a resumed run repeats them) and every valid row comes once per
    epoch. The next window is read on a background thread while the current one is consumed; each
    piece is read as one slice. In a distributed run each rank reads a disjoint contiguous share of
    every window's pieces and the window is summed over ranks (``extract.distributed``): the cache is
    read once per epoch across the ranks, and the batches are those of one process.

    Args:
        cache: an opened split. keys: its (b, t) arrays. pool: None (as stored) or a coarser pool.
        window_bytes: most bytes of float16 features in one window (default: 1/``WINDOW_SHARE`` of the
            cache's RAM cap); always at least one row.
    """

    def __init__(self, cache: FeatureCache, keys: Sequence[Key], pool: int | None = None,
                 window_bytes: int | None = None):
        self.cache, self.keys, self.pool = cache, list(keys), pool
        if not self.keys:
            raise CacheError("no (b, t) array to stream: pass at least one --blocks and --timesteps")
        self.window_bytes = int(window_bytes if window_bytes is not None else cache.ram_cap_bytes // WINDOW_SHARE)
        self._valid = np.asarray(cache.valid, dtype=bool)
        self._labels = np.asarray(cache.labels, dtype=np.int64)
        self.num_images = int(self._valid.sum())
        self.class_names = list(cache.class_names)
        self._shapes = {key: tuple(int(v) for v in cache.shape(*key, pool)[1:]) for key in self.keys}
        self.row_bytes = sum(2 * int(np.prod(shape)) for shape in self._shapes.values())
        shard_size = int(cache.spec.shard_size)
        chunk = 1
        for b, t in self.keys:  # inner chunks divide the shard, so their lcm does too
            chunk = int(np.lcm(chunk, int(cache._array(b, t).chunks[0])))
        window_rows = max(1, self.window_bytes // max(1, self.row_bytes))
        self.piece_rows = max(1, min(chunk, shard_size, window_rows // MIN_PIECES))
        self.pieces_per_window = max(1, window_rows // self.piece_rows)
        starts = [np.arange(start, stop, self.piece_rows)
                  for start, stop in (cache.shard_bounds(shard) for shard in range(cache.num_shards))]
        self.piece_starts = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
        ends = np.minimum(self.piece_starts + self.piece_rows,
                          np.minimum((self.piece_starts // shard_size + 1) * shard_size, cache.num_images))
        self.piece_stops = ends.astype(np.int64)

    @property
    def num_pieces(self) -> int:
        return int(self.piece_starts.shape[0])

    def piece_order(self, seed: int | None, epoch: int) -> np.ndarray:
        """The pieces in the order epoch ``epoch`` reads them: permuted by (seed, epoch); in order when seed is None."""
        if seed is None:
            return np.arange(self.num_pieces)
        return np.random.default_rng([int(seed), int(epoch), 0x7069_6563]).permutation(self.num_pieces)

    def windows(self, seed: int | None, epoch: int) -> list[np.ndarray]:
        """The pieces of every window of one epoch, in reading order."""
        order = self.piece_order(seed, epoch)
        return [order[i:i + self.pieces_per_window] for i in range(0, len(order), self.pieces_per_window)]

    def _produce(self, seed: int | None, epoch: int, stop: threading.Event, ranks: bool = False):
        """Windows ``({key: (n, C, h, w) float16}, (n,) int64)``, rows shuffled (when seeded) as they are placed.

        ``ranks``: this rank reads only its contiguous share of each window's pieces (disjoint row ranges);
        the other rows stay zero until ``batches`` sums the window over ranks.
        """
        readers = {key: self.cache.row_reader(*key, pool=self.pool) for key in self.keys}
        windows = self.windows(seed, epoch)
        whole = None
        if seed is not None and len(windows) == 1:  # the split fits: the in-RAM epoch's order, batch for batch
            whole = np.argsort(epoch_order(self.num_images, seed, epoch).numpy())
            valid_index = np.cumsum(self._valid) - 1  # a row's position among the valid rows
        for number, pieces in enumerate(windows):
            bounds = [(int(self.piece_starts[p]), int(self.piece_stops[p])) for p in pieces]
            masks = [self._valid[start:stop_] for start, stop_ in bounds]
            total = int(sum(mask.sum() for mask in masks))
            if seed is None or whole is not None:
                place = np.arange(total)
            else:  # row i of the window goes to place[i]: shuffled while it is written, no second copy
                place = np.random.default_rng([int(seed), int(epoch), number, 0x7769_6e64]).permutation(total)
            fill = np.zeros if ranks else np.empty
            features = {key: fill((total, *shape), dtype=np.float16) for key, shape in self._shapes.items()}
            labels = fill(total, dtype=np.int64)
            offset = 0
            mine = distributed.share(len(bounds)) if ranks else slice(None)
            assigned = np.zeros(len(bounds), dtype=bool)
            assigned[mine] = True
            for number_, ((start, stop_), mask) in enumerate(zip(bounds, masks)):
                if stop.is_set():
                    return
                if whole is not None:
                    rows = whole[valid_index[start:stop_][mask]]
                else:
                    rows = place[offset:offset + int(mask.sum())]
                if not assigned[number_]:
                    offset += rows.shape[0]
                    continue
                for key, read in readers.items():
                    data = read(start, stop_)
                    if data.shape[0] != stop_ - start:
                        raise CacheError(f"rows {start}-{stop_} of b{key[0]}/t{key[1]} came back as {data.shape[0]} "
                                         f"rows: the cache is damaged, run diffrep verify --repair")
                    features[key][rows] = data[mask]
                labels[rows] = self._labels[start:stop_][mask]
                offset += rows.shape[0]
            yield features, labels

    def batches(self, batch_size: int, seed: int | None = None, epoch: int = 0) -> Iterator[tuple[dict[Key, torch.Tensor], torch.Tensor]]:
        """Every valid row once: ``({(b, t): (n, C, h, w) float16}, (n,) int64)``, n = batch_size except the last.

        Row order when seed is None (evaluation); otherwise mixed over the whole split as described above.
        """
        if batch_size < 1:
            raise CacheError(f"batch_size must be at least 1, got {batch_size}")
        ranks = distributed.active()
        windows = read_ahead(lambda stop: self._produce(seed, epoch, stop, True) if ranks else
                             self._produce(seed, epoch, stop))
        try:
            # several ranks: each read its pieces; the window is summed over ranks here, in the consumer's
            # thread, so every rank makes its collectives in the same order (and stops at the same batch)
            yield from self._cut((_summed(window) for window in windows) if ranks else windows, batch_size)
        finally:
            windows.close()  # stops the reading thread when the consumer stops early

    @staticmethod
    def _cut(windows, batch_size: int):
        """Batches of whole windows in turn; a window's last rows open the next window's first batch."""
        carry: tuple[dict[Key, np.ndarray], np.ndarray] | None = None
        for features, labels in windows:
            start = 0
            if carry is not None:
                start = min(batch_size - carry[1].shape[0], labels.shape[0])
                features_ = {key: np.concatenate([carry[0][key], value[:start]]) for key, value in features.items()}
                labels_ = np.concatenate([carry[1], labels[:start]])
                carry = None
                if labels_.shape[0] < batch_size:
                    carry = (features_, labels_)
                    continue
                yield _tensors(features_, labels_)
            while labels.shape[0] - start >= batch_size:
                yield _tensors({key: value[start:start + batch_size] for key, value in features.items()},
                               labels[start:start + batch_size])
                start += batch_size
            if start < labels.shape[0]:
                carry = ({key: value[start:].copy() for key, value in features.items()}, labels[start:].copy())
        if carry is not None and carry[1].shape[0]:
            yield _tensors(*carry)


def _summed(window: tuple[dict[Key, np.ndarray], np.ndarray]) -> tuple[dict[Key, np.ndarray], np.ndarray]:
    """A window whose rows each rank filled in part (zeros elsewhere), summed over ranks in place: the whole window."""
    features, labels = window
    for value in [*features.values(), labels]:
        distributed.all_reduce_sum(torch.from_numpy(value))
    return features, labels


def _tensors(features: dict[Key, np.ndarray], labels: np.ndarray) -> tuple[dict[Key, torch.Tensor], torch.Tensor]:
    return {key: torch.from_numpy(value) for key, value in features.items()}, torch.from_numpy(labels)
