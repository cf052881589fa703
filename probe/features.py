"""Cached (b, t) arrays of one split as tensors for the probes: read once, invalid rows dropped.

Features stay float16, as stored, in RAM and on the training device (half the memory of
float32, so the RAM cap admits twice as many rows); consumers cast each batch to float32.
``load_features`` reads whole arrays into RAM (``FeatureCache.load``, under its RAM cap); ``iter_feature_batches`` streams the same rows in fixed-size
batches (``FeatureCache.iter_shards``) for the consumers that work chunk by chunk (kNN's train
side, minibatch CKA), and ``StreamedFeatures`` gives training a shuffled stream per epoch when
the arrays do not fit. ``resolve_backbone_id`` finds the cache folder
of a named configuration when the caller does not name the backbone id.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from extract.cache import FeatureCache, cache_path, open_cache
from extract.errors import CacheError

__all__ = [
    "FeatureSet", "StreamedFeatures", "open_split", "in_shapes", "feature_bytes", "load_features",
    "iter_feature_batches", "resolve_backbone_id",
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
        if name.startswith(f"{config_name}-") and os.path.exists(os.path.join(parent, name, "zarr.json"))
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


def load_features(cache: FeatureCache, keys: Sequence[Key], pool: int | None = None) -> FeatureSet:
    """Read the (b, t) arrays of one split into float16 tensors, dropping invalid rows.

    Args:
        cache: an opened split (``open_split``). keys: the (b, t) arrays to read.
        pool: None (as stored) or a coarser pool derived exactly by the cache.

    Returns:
        ``FeatureSet`` with ``{(b, t): (N_valid, C, h, w) float16}``.

    Raises:
        CacheError: a missing or incomplete array, or more than the cache's RAM cap.
    """
    valid = np.asarray(cache.valid, dtype=bool)
    keep = None if valid.all() else np.flatnonzero(valid)
    features = {}
    for b, t in keys:
        array = cache.load(b, t, pool=pool)
        if keep is not None:
            array = array[keep]
        features[(b, t)] = torch.from_numpy(np.ascontiguousarray(array))
    labels = np.asarray(cache.labels, dtype=np.int64)
    labels = labels if keep is None else labels[keep]
    return FeatureSet(features, torch.from_numpy(labels.copy()), list(cache.class_names), int((~valid).sum()))


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


class StreamedFeatures:
    """One split read from the cache batch by batch, every epoch, for training that does not fit in RAM.

    Rows are read shard by shard in order; shuffling happens inside windows of ``window_rows``
    (whole batches) with a generator seeded by (seed, epoch), so an epoch's batches are a pure
    function of (seed, epoch) and memory stays at one window.

    Args:
        cache: an opened split. keys: its (b, t) arrays. pool: None (as stored) or a coarser pool.
        window_rows: rows shuffled together (rounded to whole batches).
    """

    def __init__(self, cache: FeatureCache, keys: Sequence[Key], pool: int | None = None, window_rows: int = 8192):
        self.cache, self.keys, self.pool, self.window_rows = cache, list(keys), pool, int(window_rows)
        self.num_images = int(np.asarray(cache.valid, dtype=bool).sum())
        self.class_names = list(cache.class_names)

    def batches(self, batch_size: int, seed: int | None = None, epoch: int = 0) -> Iterator[tuple[dict[Key, torch.Tensor], torch.Tensor]]:
        """Every valid row once: ``({(b, t): (n, C, h, w) float16}, (n,) int64)``; row order when seed is None."""
        window = batch_size * max(1, self.window_rows // batch_size)
        for count, (features, labels) in enumerate(iter_feature_batches(self.cache, self.keys, window, self.pool)):
            if seed is not None:
                generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) * 100_003 + count)
                order = torch.randperm(labels.shape[0], generator=generator)
                features = {key: value[order] for key, value in features.items()}
                labels = labels[order]
            for start in range(0, labels.shape[0], batch_size):
                yield ({key: value[start:start + batch_size] for key, value in features.items()},
                       labels[start:start + batch_size])
