"""Weighted kNN of the test split against the cached train split, one results row per k: ``diffrep knn``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from extract.cache import FeatureCache
from extract.precision import resolve_device
from probe.features import choose_read_pool, flatten_features, iter_feature_batches, load_at_pools
from probe.knn import knn_classify
from probe.logistic import Standardizer

from pipeline.evaluate.cache_pair import (
    CacheSelection, Key, fmt_keys, keys_of, open_pair, provenance, require_arrays, require_in_ram,
)
from pipeline.results import record_rows

__all__ = ["KnnRequest", "run_knn", "standardizer_on"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnnRequest:
    """Weighted kNN of the test split against the train split at every k.

    Args:
        cache: the train/test caches. blocks, timesteps: the (b, t) arrays, flattened and concatenated.
        pool: side the maps are pooled to before flattening. k: neighbour counts.
        temperature: votes weigh exp(cosine / temperature). batch_size: train rows per similarity block.
        standardize: the train split's mean and std first. device: where the products run.
    """

    cache: CacheSelection
    blocks: tuple[int, ...]
    timesteps: tuple[int, ...]
    pool: int | None = 2
    k: tuple[int, ...] = (10, 20, 100, 200)
    temperature: float = 0.07
    batch_size: int = 4096
    standardize: bool = True
    device: str = "auto"


def run_knn(request: KnnRequest, announce: Callable[[dict], None] | None = None) -> list[dict]:
    """kNN of the test split against the (streamed) train split; records and returns one results row per k."""
    selection = request.cache
    pair = open_pair(selection)
    keys = keys_of(request.blocks, request.timesteps)
    require_arrays(pair, keys, selection)
    read_pool = {key: choose_read_pool(pair.train, key, request.pool) for key in keys}
    require_in_ram(pair.test, keys, read_pool, selection.test_split, "; the train split streams whatever its size")
    test = load_at_pools(pair.test, keys, read_pool)
    test_x = flatten_features(test.features, keys, request.pool)
    num_classes = len(test.class_names) or int(test.labels.max()) + 1
    train_size = int(np.asarray(pair.train.valid).sum())
    ks = sorted({int(k) for k in request.k})
    capped = [k for k in ks if k > train_size]
    if capped:
        log.warning("k=%s exceeds the %d training rows: those k use all %d rows", fmt_keys(capped), train_size, train_size)

    def train_stream():
        return _iter_flat(pair.train, keys, read_pool, request.batch_size, request.pool)

    began = time.perf_counter()
    device = resolve_device(request.device)
    transform = standardizer_on(Standardizer.from_batches(x for x, _ in train_stream()), device) \
        if request.standardize else None
    scores = knn_classify(train_stream(), None, test_x, test.labels, num_classes, ks=ks, temperature=request.temperature,
                          device=device, transform=transform)
    seconds = time.perf_counter() - began
    rows = [dict(**provenance(selection, pair), train_size=train_size, test_size=test.num_images, head="knn",
                 protocol="knn", standardize=request.standardize, blocks=list(request.blocks),
                 timesteps=list(request.timesteps), pool=int(request.pool or 0), k=min(k, train_size), parameters=0,
                 epochs=0, seed=0, top1=s["top1"], top5=s["top5"], train_seconds=seconds)
            for k, s in scores.items()]
    record_rows(rows, selection.results_path, announce)
    return rows


def standardizer_on(scale: Standardizer, device: torch.device) -> Standardizer:
    """The standardiser with its statistics on ``device``: applied there to each chunk, never to a whole split."""
    return replace(scale, mean=scale.mean.to(device), std=scale.std.to(device))


def _iter_flat(cache: FeatureCache, keys: list[Key], read_pool: dict, batch_size: int, pool: int | None):
    """Stream ((n, sum of flattened widths), (n,) labels) batches of several keys, each read at its own pool."""
    streams = [iter_feature_batches(cache, [key], batch_size, pool=read_pool[key]) for key in keys]
    for parts in zip(*streams):
        features = {key: part[0][key] for part, key in zip(parts, keys)}
        yield flatten_features(features, keys, pool), parts[0][1]
