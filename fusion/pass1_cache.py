"""DifFeed's pass 1 read from the feature cache instead of run: it is a pure function of (image, t, noise).

Pass 1 only feeds the source blocks' features to the feedback layers, and those are exactly what
``diffrep extract`` stores when it keeps full maps (``--pool none``, or a pool at least the map's
side) for the same backbone and noise seed. Reading them replaces the longest of the two passes
(to the deepest source, b=36 of 39 on the 256x256 model) by a memory read. The rows are matched by
image path and the live images then take the cache's noise ids, so pass 2 sees the very x_t the
cached pass 1 saw. Anything else (no cache, another noise seed, a pooled or missing array,
fresh noise or augmentation, more than the RAM cap) runs pass 1 live, and ``find_cached_pass1``
says why. A damaged cache (objects changed after they were written, Inf/NaN in a shard) is refused
in one line, as every reader refuses it: the fix is to repair it, not to train on it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from extract.cache import cache_path, open_cache
from extract.cache.spec import NOISE_KEY
from extract.errors import CacheDamagedError, CacheError, CacheIncompleteError

__all__ = ["CachedPass1", "find_cached_pass1"]


@dataclass
class CachedPass1:
    """Pass-1 features of one split's images, or why they are not used.

    Attributes:
        features: ``{(source, t): (N, C, h, w) float16}`` aligned with the images asked about (None: live).
        image_ids: the cache's noise id of each image (the live x_t must use them).
        reason: where the features come from, or why pass 1 runs live (for the plan).
        missing: when arrays of the cache are missing, the error that names them with what the command line
            needs to print the exact extract command that adds them (``pipeline.advice.advised``).
    """

    features: dict | None
    image_ids: np.ndarray | None
    reason: str
    missing: CacheIncompleteError | None = None


def _cache_noise_ids(cache) -> np.ndarray:
    """The image id each cache row's seeded noise was drawn with (``image_ids`` where the cache records a row order)."""
    ids = getattr(cache, "image_ids", None)
    return np.asarray(ids, dtype=np.int64) if ids is not None else np.arange(cache.num_images, dtype=np.int64)


def find_cached_pass1(cache_dir: str | os.PathLike | None, dataset: str, split: str, backbone_id: str,
                      noise_seed: int, sources: Sequence[int], t: int, native_sides: dict[int, int],
                      paths: Sequence[str]) -> CachedPass1:
    """Read every source block at ``t`` for ``paths`` from the cache when it holds them unpooled.

    Args:
        cache_dir: the cache root (None: pass 1 runs live). dataset, split, backbone_id: which cache.
        noise_seed: the seed pass 2's noise uses; the cache must have been written with it.
        sources: the feedback source blocks. t: the timestep. native_sides: ``{block: map side}``.
        paths: the images, in the live source's order.

    Raises:
        CacheDamagedError: the cache holds damaged shards, markers or index chunks, or Inf/NaN features.
    """
    live = lambda why: CachedPass1(None, None, f"runs live ({why})")  # noqa: E731
    if cache_dir is None:
        return live("no cache asked for")
    where = cache_path(cache_dir, dataset, split, backbone_id)
    if not os.path.exists(os.path.join(where, "zarr.json")):
        return live(f"no {backbone_id} cache of {dataset}/{split}")
    try:
        cache = open_cache(cache_dir, dataset, split, backbone_id)
        if cache.spec.noise_seed != noise_seed:
            return live(f"the cache's noise seed is {cache.spec.noise_seed}, not {noise_seed}")
        if cache.spec.noise_key != NOISE_KEY:
            return live("the cache's noise is keyed on the row index alone (written before the split was in the key)")
        for b in sources:
            if cache.has_array(b, t):
                cache.require_sound(b, t)
        missing = [b for b in sources if not cache.has_array(b, t) or not cache.is_complete(b, t, 0)]
        if missing:
            what = f"the cache lacks complete b{','.join(map(str, missing))} at t={t}"
            if cache.spec.pool and any(cache.spec.pool < native_sides[b] for b in missing):
                return live(f"{what} and pools its maps to {cache.spec.pool}, while pass 1 needs full maps: extract "
                            f"them with --pool none into another --cache-dir")
            found = live(f"{what}: add them with the diffrep extract command that wrote it, with --blocks "
                         f"{','.join(map(str, missing))} --timesteps {t}")
            found.missing = CacheIncompleteError(found.reason, problem=what, spec=cache.spec, path=cache.path,
                                                 arrays=[(b, t) for b in missing], runs=cache.runs)
            return found
        pooled = [b for b in sources if cache.shape(b, t)[-1] != native_sides[b]]
        if pooled:
            return live(f"the cache pools b{','.join(map(str, pooled))} (pass 1 needs full maps: extract with --pool none)")
        row_of = {p: r for r, p in enumerate(cache.paths)}
        rows = [row_of.get(p) for p in paths]
        if any(r is None for r in rows):
            return live(f"{sum(r is None for r in rows)} images are not in the cache")
        rows = np.asarray(rows, dtype=np.int64)
        if not np.asarray(cache.valid, dtype=bool)[rows].all():
            return live("the cache marks some of these images invalid")
        need = sum(2 * int(np.prod(cache.shape(b, t))) for b in sources)  # whole arrays are read, then the rows taken
        if need > cache.ram_cap_bytes:
            return live(f"the source arrays take {need / 2**30:.1f} GiB, over the RAM cap")
        index = torch.from_numpy(rows)
        features = {(b, t): torch.from_numpy(np.ascontiguousarray(cache.load(b, t)))[index] for b in sources}
    except CacheDamagedError:
        raise
    except CacheError as exc:
        return live(str(exc))
    return CachedPass1(features, _cache_noise_ids(cache)[rows],
                       f"read from the cache {where} (b{','.join(map(str, sources))} at t={t}, full maps)")
