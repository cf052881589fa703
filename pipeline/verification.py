"""Checking caches at rest: every marked shard and index chunk read back and compared with the checksum recorded when it was written.

Readers and ``diffrep extract`` check what is cheap (each object is there with its full size, the
index against its chunk checksums, each shard read for Inf/NaN); ``verify_caches`` also decodes
every marked shard and compares its CRC-32 with the one in its marker, which catches damage that
keeps sizes (a flipped bit, a file overwritten in place). With ``repair`` it forgets what is bad
(shard objects go and their markers are unset; damaged marker objects and index chunks go), so that
the same ``diffrep extract`` command writes exactly those again, and it records the index checksums
of a cache written before they existed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import zarr

from extract.cache import FeatureCache, record_missing_checksums, reset_shards, view_suffix
from extract.errors import CacheError

from pipeline.locks import LockHeld, file_lock

__all__ = ["CacheReport", "find_caches", "verify_cache", "verify_caches"]



@dataclass
class CacheReport:
    """What ``verify_cache`` found in one cache.

    Attributes:
        path: the cache group; arrays: (b, t) arrays checked; shards: marked shards read.
        bad: one line per bad shard, marker object or index chunk; unwritten: shards not written yet (not an
        error); notes: what is not an error but worth a line (index checksums not recorded);
        repaired: whether the bad shards were reset.
    """

    path: str
    arrays: int = 0
    shards: int = 0
    bad: list[str] = field(default_factory=list)
    unwritten: int = 0
    notes: list[str] = field(default_factory=list)
    repaired: bool = False


def find_caches(root: str | os.PathLike, dataset: str | None = None, split: str | None = None) -> list[str]:
    """Cache groups ``<root>/<dataset>/<split>/<backbone-id>`` below a root, sorted (filtered by dataset and split)."""
    root = os.fspath(root)
    found = []
    for current, dirs, files in os.walk(root):
        depth = 0 if current == root else len(os.path.relpath(current, root).split(os.sep))
        if depth == 3:
            dirs[:] = []
            if "zarr.json" in files:
                dataset_name, split_name, _ = os.path.relpath(current, root).split(os.sep)
                if dataset in (None, dataset_name) and split in (None, split_name):
                    found.append(current)
        else:
            dirs.sort()
    return found


def verify_cache(path: str, repair: bool = False) -> CacheReport:
    """Check one cache: index chunks, then every marked shard of every array (decoded, checksum compared).

    Args:
        path: the cache group; repair: reset what is bad so that ``diffrep extract`` redoes it.

    Returns:
        The report (``bad`` empty when everything read back as written).

    Raises:
        CacheError: the cache's metadata cannot be read (names the file and the fix), or a repair
            while a diffrep extract holds the cache.
    """
    cache = FeatureCache(path)
    report = CacheReport(path=path)
    index = cache.verify_index()
    for name, chunks in sorted(index.items()):
        for chunk, why in chunks.items():
            report.bad.append(f"{path}: index/{name} chunk {chunk}: {why}")
    # lost valid/error rows come back when their shards run again (reset_shards unsets their markers;
    # path, label and image_id: extract rewrites them from the dataset index)
    damaged: dict[tuple[int, int, int], list[int]] = {}
    for b, t in cache.arrays():
        for view in cache.spec.view_ids:
            if not cache.has_array(b, t, view):
                continue
            report.arrays += 1
            name = f"b{b}/t{t}{view_suffix(view)}"
            problems = cache.verify_shards(b, t, view)
            unmarked = set(cache.missing_shards(b, t, view)) - set(problems)
            report.unwritten += len(unmarked)
            report.shards += cache.num_shards - len(unmarked)
            marker = cache.marker_damage(b, t, view)
            if marker:  # one line for the array: none of its shards can be told written
                report.bad.append(f"{path}: done/{name}: completion markers damaged ({marker}): "
                                  f"its {cache.num_shards} shard(s) are redone")
            for shard, why in problems.items() if not marker else ():
                report.bad.append(f"{path}: {name} shard {shard}: {why}")
            if problems:
                damaged[(b, t, view)] = sorted(problems)
    unrecorded = not index and not cache.index_checksums_recorded()
    if unrecorded and not repair:
        report.notes.append(f"{path}: the index has no chunk checksums (written by an older diffrep): "
                            f"verify --repair or the next extract records them")
    if repair and (report.bad or unrecorded):
        # the markers of an array share one object, rewritten by a running extract: never reset under it
        try:
            with file_lock(path.rstrip(os.sep) + ".lock", blocking=False):
                if report.bad:
                    reset_shards(path, damaged, {name: list(chunks) for name, chunks in index.items()})
                if unrecorded:
                    record_missing_checksums(zarr.open_group(path, mode="r+"))
                    report.notes.append(f"{path}: recorded the index's chunk checksums")
        except LockHeld as held:
            raise CacheError(f"diffrep extract ({held.holder}) is writing {path}: run verify --repair again when it "
                             f"has finished") from None
        report.repaired = bool(report.bad)
    return report


def verify_caches(root: str | os.PathLike, dataset: str | None = None, split: str | None = None,
                  repair: bool = False) -> list[CacheReport]:
    """``verify_cache`` for every cache below ``root`` (see ``find_caches``).

    Raises:
        CacheError: no cache there (names what was looked for), or unreadable metadata.
    """
    paths = find_caches(root, dataset, split)
    if not paths:
        what = "/".join(part for part in (dataset, split) if part) or "any dataset"
        raise CacheError(f"no feature cache of {what} under {os.fspath(root)}: pass the --cache-dir that diffrep extract wrote")
    return [verify_cache(path, repair=repair) for path in paths]
