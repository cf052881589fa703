"""Writing a cache: create it (metadata, index, arrays), write whole shards (workers), mark them and record runs (the orchestrator).

Objects: a worker writes whole data shards only (``write_shard_data``), so two jobs never touch one
Zarr object. Every object it does not own (markers, the valid/error rows of the index, attributes)
is written by the one process that orchestrates a run (``MarkWriter``, ``record_run``), after the
shard's data is on disk; the index is written once, in chunks of many shards, by ``create_cache``.
Every index chunk's checksum is recorded in its array's attributes when the chunk is written
(``integrity.INDEX_CHECKSUMS``); a cache written before they existed gets them on the next
``create_cache`` of an extract (path, label and image_id after they are compared with the dataset;
valid and error as they stand) or ``diffrep verify --repair``.
"""

from __future__ import annotations

import datetime as _dt
import errno
import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from extract.cache.damage import explain_bad_metadata, list_numbers, shorten_error
from extract.cache.integrity import (
    INDEX_CHECKSUMS, PENDING_CHECKSUMS, WRITE_CONFIG, all_finite, index_checksum_problems, index_checksums,
    marker_from_checksum, marker_problem, marker_value, object_problems, remove_objects, values_checksum,
)
from extract.cache.order import row_order
from extract.cache.provenance import compute_conflict
from extract.cache.reader import DEFAULT_RAM_CAP_BYTES, FeatureCache
from extract.cache.shard_io import write_shard_object
from extract.cache.spec import (
    FORMAT_VERSION, INDEX_NAMES, CacheSpec, array_name, cache_path, chunk_rows, chunk_shards, index_chunk_count,
    index_chunk_rows, inner_chunk_rows, marker_name, read_spec,
)
from extract.errors import CacheDamagedError, CacheError, CacheMismatchError

__all__ = ["create_cache", "write_shard_data", "ShardMarks", "MarkWriter", "record_run", "reset_shards"]

logger = logging.getLogger(__name__)


def create_cache(
    root: str | os.PathLike,
    spec: CacheSpec,
    paths: Sequence[str],
    labels: np.ndarray,
    class_names: Sequence[str],
    arrays: Mapping[tuple[int, int], tuple[int, int, int]] | None = None,
    native_sizes: Mapping[int, int] | None = None,
) -> FeatureCache:
    """Create (or reopen) a cache: attributes, index and labels first, then any missing (b, t) arrays.

    Nothing here writes features: that is the jobs' job, shard by shard. The rows are put in the
    cache's order here (``row_order(labels, spec.row_order_seed)``), once; calling it again on an
    existing cache checks that it was written with the same spec and index (rewriting lost index
    chunks), then adds the arrays that are new.

    Args:
        root: cache root (``--cache-dir``); the group goes to ``cache_path(root, dataset, split, backbone_id)``.
        spec: what the numbers depend on; paths: (N,) image paths and labels: (N,) int class labels,
            both in dataset-index order (row i is image id i).
        class_names: names of the label values.
        arrays: ``{(b, t): (C, h, w)}`` stored shapes to create (every view of each).
        native_sizes: ``{b: native side}`` recorded on each array (lets readers derive pools).

    Returns:
        The cache, opened for reading.

    Raises:
        CacheMismatchError: an existing cache was written with another spec or image index.
    """
    path = cache_path(root, spec.dataset, spec.split, spec.backbone_id)
    labels = np.asarray(labels, dtype=np.int64)
    if len(paths) != spec.num_images or labels.shape != (spec.num_images,):
        raise CacheError(f"the index has {len(paths)} paths and {labels.shape[0]} labels for num_images={spec.num_images}")
    order = row_order(labels, spec.row_order_seed)
    rows = {"path": np.asarray([str(paths[i]) for i in order]), "label": labels[order], "image_id": order}
    if os.path.exists(os.path.join(path, "zarr.json")):
        with explain_bad_metadata(path):
            group = zarr.open_group(path, mode="r+")
            read_spec(group, path).require_match(spec)
            _check_or_repair_index(group, path, spec, rows)
    else:
        os.makedirs(path, exist_ok=True)
        group = zarr.open_group(path, mode="w", zarr_format=3)
        n = spec.num_images
        index = group.require_group("index")
        rows.update(valid=np.ones(n, dtype=bool), error=np.full(n, "", dtype=object).astype(str))
        kinds = {"path": str, "label": "int64", "valid": "bool", "error": str, "image_id": "int64"}
        for name in INDEX_NAMES:  # each with the checksums of the chunks written next
            index.create_array(
                name, shape=(n,), dtype=kinds[name], chunks=(index_chunk_rows(spec),), compressors=None,
                dimension_names=("image",), fill_value=True if name == "valid" else None,
                attributes={INDEX_CHECKSUMS: index_checksums(rows[name], index_chunk_rows(spec))},
            )
        # written once, whole; every chunk is stored now, so a missing index object always means lost data
        for name in INDEX_NAMES:
            _writable(index[name])[:] = rows[name]
        group.attrs.update({
            "diffrep": {"spec": spec.to_attrs(), "format_version": FORMAT_VERSION},
            "class_names": list(class_names),
            "invalid_images": [],
            "runs": [],
        })
    with explain_bad_metadata(path):
        for (b, t), (channels, h, w) in sorted((arrays or {}).items()):
            for view in spec.view_ids:
                name = array_name(b, t, view)
                if name not in group:
                    image_bytes = channels * h * w * 2
                    inner = inner_chunk_rows(spec.shard_size, image_bytes)
                    array = group.create_array(
                        name, shape=(spec.num_images, channels, h, w), dtype="float16", fill_value=0,
                        chunks=(inner, channels, h, w), shards=(spec.shard_size, channels, h, w),
                        compressors=None, dimension_names=("image", "channel", "y", "x"),
                    )
                    native = (native_sizes or {}).get(b, h)
                    array.attrs.update({"b": int(b), "t": int(t), "view": view, "native_size": int(native), "pool": spec.pool})
                    if marker_name(b, t, view) in group:
                        # re-created after its zarr.json was lost: nothing records what computed its old shards, so
                        # they are redone (the plan of an array it did not find redoes them all anyway), and the
                        # first shard marked records its compute settings (MarkWriter.mark)
                        remove_objects(group[marker_name(b, t, view)], [0])
                if marker_name(b, t, view) not in group:  # a deleted marker array: every shard is redone
                    group.create_array(  # one object: only the orchestrating process writes it (MarkWriter)
                        marker_name(b, t, view), shape=(spec.num_shards,), dtype="uint64", fill_value=0,
                        chunks=(max(1, spec.num_shards),), compressors=None, dimension_names=("shard",),
                    )
    return FeatureCache(path, ram_cap_bytes=DEFAULT_RAM_CAP_BYTES)


def write_shard_data(
    path: str, shard: int, features: Mapping[tuple[int, int], np.ndarray], view: int = 0,
    checksums: Mapping[tuple[int, int], int] | None = None,
) -> dict[tuple[int, int], int]:
    """Write whole shards of (b, t) arrays of one cache, and nothing else: what a job (worker) does.

    Every object is stored, zeros included. The shard counts as written only once the process
    that runs the extraction marks it (``MarkWriter.mark``) with the values returned here.

    Args:
        path: the cache group (``cache_path(...)``).
        shard: shard number; rows shard*shard_size up to the next shard or N.
        features: ``{(b, t): (n, C, h, w) float16}``, n the rows of this shard.
        view: 0, or 1 for the flipped view (2k+f with noise draws).
        checksums: ``{(b, t): CRC-32}`` of the data as given, when the caller chained it while the rows
            came in (an extraction job does, beside the forward); None: computed here beside the write.

    Returns:
        ``{(b, t): marker value}``: MARKER_DONE + the CRC-32 of each shard.

    Raises:
        CacheError: a missing array or a block of the wrong shape (a bug in the caller), or features holding
            Inf/NaN (nothing of the shard is written).
    """
    handles = _WriteHandles.of(path)
    spec = handles.spec
    start = shard * spec.shard_size
    stop = min(start + spec.shard_size, spec.num_images)
    for (b, t), data in features.items():  # readers refuse Inf/NaN as damage: never store them
        if not all_finite(data):
            raise CacheError(
                f"the features of b{b} at t={t} for shard {shard} hold Inf/NaN (the forward overflowed float16, whose "
                f"largest value is 65504, or diverged): nothing of the shard is written; check the --checkpoint and "
                f"--precision"
            )
    markers = {}
    known = checksums or {}
    pending = [key for key in features if key not in known]
    # a CRC-32 not chained by the caller runs beside the write: both release the GIL
    pool = ThreadPoolExecutor(1, thread_name_prefix="diffrep-crc") if pending else None
    try:
        for (b, t), data in features.items():
            name = array_name(b, t, view)
            array = handles.array(name)
            if data.shape != (stop - start, *array.shape[1:]):
                raise CacheError(f"shard {shard} of {name} must be {(stop - start, *array.shape[1:])}, got {data.shape}")
            data = np.asarray(data, dtype=np.float16)
            if (b, t) in known:
                markers[(int(b), int(t))] = marker_from_checksum(int(known[(b, t)]))
            else:
                markers[(int(b), int(t))] = pool.submit(marker_value, data)
            if not write_shard_object(array, shard, data):  # whole shards go straight to the file (extract.cache.shard_io)
                _writable(array)[start:stop] = data
        return {key: value if isinstance(value, int) else value.result() for key, value in markers.items()}
    finally:
        if pool is not None:
            pool.shutdown()


class _WriteHandles:
    """A worker's opened cache group, spec and arrays, kept across its shards (opening costs ms a shard).

    Keyed by the group's path and its ``zarr.json`` modification time, so a cache deleted and made
    again at the same path is opened anew.
    """

    _open: dict[str, tuple[int, "_WriteHandles"]] = {}
    _lock = threading.Lock()

    def __init__(self, path: str):
        self.group = zarr.open_group(path, mode="r+")
        self.spec = read_spec(self.group, path)
        self._arrays: dict[str, zarr.Array] = {}

    @classmethod
    def of(cls, path: str) -> "_WriteHandles":
        stamp = os.stat(os.path.join(path, "zarr.json")).st_mtime_ns
        with cls._lock:
            held = cls._open.get(path)
            if held is None or held[0] != stamp:
                held = (stamp, cls(path))
                if len(cls._open) > 16:
                    cls._open.clear()
                cls._open[path] = held
            return held[1]

    def array(self, name: str) -> zarr.Array:
        """The data array ``name``, kept open; a missing array is a CacheError."""
        if name not in self._arrays:
            if name not in self.group:
                raise CacheError(f"cache has no array {name}: create it with create_cache before writing")
            self._arrays[name] = self.group[name]
        return self._arrays[name]


@dataclass
class ShardMarks:
    """What a finished job hands to the process that marks shards.

    Args:
        shard: the shard; markers: ``{(b, t, view): marker value}`` of every array it wrote;
        invalid: ``{cache row: reason}`` for its rows that could not be decoded (all its rows were read);
        compute: the job's ``extract.cache.provenance.compute_settings`` (None: not known).
    """

    shard: int
    markers: dict[tuple[int, int, int], int]
    invalid: dict[int, str] = field(default_factory=dict)
    compute: dict[str, Any] | None = None


class MarkWriter:
    """The one writer of a cache's shared objects during a run: valid/error rows, markers, array provenance.

    Open it once in the process that runs the extraction (it holds the cache lock) and call
    ``mark`` as results come back: the data is on disk by then, so the index rows go first,
    then each array's recorded compute settings, then the markers, one object per array.
    Each object is replaced atomically (Zarr writes a temporary file and renames it), so a
    process killed mid-way leaves the previous version: its shards are simply redone.
    """

    def __init__(self, path: str):
        self.path = path
        with explain_bad_metadata(path):
            self._group = zarr.open_group(path, mode="r+")
            self.spec = read_spec(self._group, path)
        self._markers: dict[str, np.ndarray] = {}
        self._marker_nodes: dict[str, zarr.Array] = {}
        self._compute: dict[str, dict | None] = {}
        self._index: dict[str, tuple[zarr.Array, np.ndarray, set[int]]] = {}

    def _index_rows(self, name: str) -> tuple[zarr.Array, np.ndarray, set[int]]:
        """(the array, kept open; its rows in memory; chunks whose objects are missing or short) of index/valid or index/error."""
        if name not in self._index:
            array = self._group[f"index/{name}"]
            bad = object_problems(array, range(index_chunk_count(array)))
            rows = array.shape[0]
            fill = np.ones(rows, bool) if name == "valid" else np.full(rows, "", dtype=object).astype(str)
            values = _read_chunkwise(array, bad, fill)
            changed = index_checksum_problems(array, values, skip=bad)
            per_chunk = chunk_rows(array)
            for chunk in changed:  # rewritten with the next shard marked in it, like a lost chunk
                values[chunk * per_chunk:(chunk + 1) * per_chunk] = fill[chunk * per_chunk:(chunk + 1) * per_chunk]
            bad.update(changed)
            self._index[name] = (array, values.astype(bool) if name == "valid" else values.astype(object), set(bad))
        return self._index[name]

    def _write_index(self, shards: list[tuple[int, dict[int, str]]]) -> None:
        for name in ("valid", "error"):
            array, values, bad = self._index_rows(name)
            rows = chunk_rows(array)
            dirty = set()
            for shard, invalid in shards:
                start = shard * self.spec.shard_size
                stop = min(start + self.spec.shard_size, self.spec.num_images)
                new = np.ones(stop - start, bool) if name == "valid" else np.full(stop - start, "", dtype=object)
                for row, reason in invalid.items():
                    new[row - start] = False if name == "valid" else str(reason)
                chunks = set(range(start // rows, (stop - 1) // rows + 1))
                if not np.array_equal(values[start:stop], new) or chunks & bad:
                    values[start:stop] = new
                    dirty |= chunks
            if not dirty:
                continue
            parts = {chunk: values[chunk * rows:(chunk + 1) * rows] for chunk in sorted(dirty)}
            parts = {chunk: part.astype(bool) if name == "valid" else np.asarray(part.astype(str))
                     for chunk, part in parts.items()}
            sums = array.attrs.get(INDEX_CHECKSUMS)
            if not isinstance(sums, list) or len(sums) != index_chunk_count(array):  # recorded from now on
                sums = index_checksums(values, rows)
            before = {str(chunk): sums[chunk] for chunk in parts}
            sums = [values_checksum(parts[chunk]) if chunk in parts else value for chunk, value in enumerate(sums)]
            # killed between the chunks and their checksums, each chunk still matches its old or new checksum
            array.attrs.put({INDEX_CHECKSUMS: sums, PENDING_CHECKSUMS: before})
            for chunk, part in parts.items():
                if chunk in bad:
                    remove_objects(array, [chunk])
                _writable(array)[chunk * rows:chunk * rows + part.shape[0]] = part
                bad.discard(chunk)
            array.attrs.put({INDEX_CHECKSUMS: sums})

    def _marker_array(self, name: str) -> np.ndarray:
        """The markers of array ``name`` in memory; its Zarr array is kept open (each open reads its metadata)."""
        if name not in self._markers:
            node = self._group["done/" + name]
            problem = marker_problem(node)
            if problem:  # the plan resets damaged markers before a run: this one was damaged during it
                raise CacheDamagedError(
                    f"the completion markers of array {name} in {self.path} (done/{name}) are damaged ({problem}): "
                    f"run the same diffrep extract command again: it redoes the shards they covered"
                )
            self._marker_nodes[name] = node
            self._markers[name] = node[:]
        return self._markers[name]

    def recorded_compute(self, b: int, t: int, view: int = 0) -> dict | None:
        name = array_name(b, t, view)
        if name not in self._compute:
            self._compute[name] = self._group[name].attrs.get("compute")
        return self._compute[name]

    def mark(self, marks: Iterable[ShardMarks]) -> None:
        """Record finished shards: their index rows, then (first time) each array's compute settings, then markers.

        Raises:
            CacheMismatchError: a shard computed on another device kind or precision than its array's
                earlier shards (nothing of it is marked: it stays unwritten).
        """
        marks = list(marks)
        first: dict[str, dict] = {}  # what a new array would record, so that one batch cannot mix either
        for item in marks:
            for b, t, view in item.markers if item.compute is not None else ():
                name = array_name(b, t, view)
                recorded = self.recorded_compute(b, t, view) or first.setdefault(name, item.compute)
                problem = compute_conflict(name, recorded, item.compute)
                if problem:
                    raise CacheMismatchError(problem)
        if not marks:
            return
        self._write_index([(item.shard, item.invalid) for item in marks])
        touched: set[str] = set()
        for item in marks:
            for (b, t, view), value in item.markers.items():
                name = array_name(b, t, view)
                values = self._marker_array(name)
                if item.compute is not None and self.recorded_compute(b, t, view) is None and not values.any():
                    # the first shard of a new array: its settings become the array's
                    self._group[name].attrs["compute"] = dict(item.compute)
                    self._compute[name] = dict(item.compute)
                values[item.shard] = value
                touched.add(name)
        for name in sorted(touched):
            self._marker_nodes[name][:] = self._markers[name]


def _writable(array: zarr.Array) -> zarr.Array:
    return array.with_config(WRITE_CONFIG)


def record_run(path: str, invalid: Mapping[int, tuple[str, str]], info: Mapping[str, Any]) -> bool:
    """Add a run's summary and its invalid images ``{row: (path, reason)}`` to the cache attributes.

    Only the process that orchestrates a run calls this (workers write shards only). On a full
    disk the history is not recorded (the attributes are replaced atomically, so the old ones stay
    whole), a warning says so, and the shards and index written stay: it returns False.
    """
    try:
        group = zarr.open_group(path, mode="r+")
        known = {entry["index"]: entry for entry in group.attrs.get("invalid_images", [])}
        for row, (image_path, reason) in invalid.items():
            known[int(row)] = {"index": int(row), "path": str(image_path), "reason": str(reason)}
        runs = list(group.attrs.get("runs", []))
        runs.append({"finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **dict(info)})
        group.attrs.update({"invalid_images": [known[k] for k in sorted(known)], "runs": runs})
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        logger.warning("this run's history was not recorded in %s (disk full); the shards it wrote are kept", path)
        return False
    return True


def reset_shards(
    path: str,
    shards: Mapping[tuple[int, int, int], Iterable[int]] | None = None,
    index_chunks: Mapping[str, Iterable[int]] | None = None,
) -> None:
    """Forget damaged shards so that the next run writes them again: delete their objects, unset their markers.

    Only objects already found missing or short (or failing ``verify``) belong here: nothing
    sound is deleted, and the data objects go before their markers are unset. A lost valid/error
    chunk of the index covers many shards: every array's markers of those shards are unset too,
    since their rows of the index come back only when they run again. Damaged path, label and
    image_id chunks are deleted (extract rewrites them from the dataset index). An array whose
    marker object is damaged loses that object (every shard unmarked) and keeps its data objects,
    which the next run rewrites.

    Args:
        path: the cache group.
        shards: ``{(b, t, view): shard numbers}``.
        index_chunks: ``{index array name: chunk numbers}`` of the image index.
    """
    with explain_bad_metadata(path):
        group = zarr.open_group(path, mode="r+")
        spec = read_spec(group, path)
        todo = {key: {int(s) for s in numbers} for key, numbers in (shards or {}).items()}
        rerun: set[int] = set()
        for name, chunks in (index_chunks or {}).items():
            if name not in INDEX_NAMES:
                raise CacheError(f"the cache has no index/{name}: a bug in the caller")
            array = group[f"index/{name}"]
            remove_objects(array, chunks)
            for chunk in chunks if name in ("valid", "error") else ():
                rerun |= set(chunk_shards(chunk_rows(array), int(chunk), spec))
        if rerun:
            for bname, bgroup in group.require_group("done").groups():
                for tname, _ in bgroup.arrays():
                    match = re.fullmatch(r"b(\d+)/t(\d+)(_flip)?", f"{bname}/{tname}")
                    if match:
                        key = (int(match[1]), int(match[2]), 1 if match[3] else 0)
                        todo[key] = todo.get(key, set()) | rerun
        for (b, t, view), numbers in todo.items():
            numbers = sorted(numbers)
            damaged = sorted(int(s) for s in (shards or {}).get((b, t, view), ()))
            marker = group[marker_name(b, t, view)] if marker_name(b, t, view) in group else None
            if marker is not None and marker_problem(marker):
                remove_objects(marker, [0])  # every shard unmarked; their data objects are rewritten when redone
                continue
            if damaged and array_name(b, t, view) in group:  # rerun shards keep their sound data until rewritten
                remove_objects(group[array_name(b, t, view)], damaged)
            if numbers and marker_name(b, t, view) in group:
                marker = group[marker_name(b, t, view)]
                values = marker[:]
                values[numbers] = 0
                marker[:] = values


def _read_chunkwise(array: zarr.Array, bad: dict[int, str], fallback: np.ndarray) -> np.ndarray:
    """Read a chunked 1-D index array; chunks in ``bad`` (and any that cannot be decoded, added to it)
    come from ``fallback``."""
    rows = chunk_rows(array)
    if not bad:
        try:
            return array[:]
        except ValueError:
            pass
    parts = []
    for chunk in range(-(-array.shape[0] // rows)):
        lo, hi = chunk * rows, min((chunk + 1) * rows, array.shape[0])
        if chunk not in bad:
            try:
                parts.append(np.asarray(array[lo:hi]))
                continue
            except ValueError as exc:
                bad[chunk] = f"cannot be decoded: {shorten_error(exc)}"
        parts.append(np.asarray(fallback[lo:hi]))
    return np.concatenate(parts) if parts else np.asarray(fallback[:0])


def _path_keys(paths: Sequence[str]) -> list[str]:
    """Paths relative to their common folder, so a moved data root still matches."""
    if not paths:
        return []
    paths = [os.path.normpath(p) for p in paths]
    common = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    return [os.path.relpath(p, common or os.curdir) for p in paths]


def _check_or_repair_index(
    group: zarr.Group, path: str, spec: CacheSpec, rows: Mapping[str, np.ndarray]
) -> None:
    """Compare an existing cache's image index with this selection (in cache-row order), and rewrite its lost chunks from it.

    Chunks whose objects are missing or short are left out of the comparison (they prove nothing)
    and, when every sound chunk matches, rewritten from ``rows`` (path, label, image_id).

    Raises:
        CacheMismatchError: a sound chunk names other images, labels or image ids.
    """
    names = ("path", "label", "image_id")
    bad, stored = {}, {}
    for name in names:
        array = group[f"index/{name}"]
        bad[name] = object_problems(array, range(index_chunk_count(array)))
        stored[name] = _read_chunkwise(array, bad[name], rows[name])
        changed = index_checksum_problems(array, stored[name], skip=bad[name])
        per_chunk = chunk_rows(array)
        for chunk in changed:  # changed in place: compared no more than a lost chunk, rewritten the same way
            lo, hi = chunk * per_chunk, (chunk + 1) * per_chunk
            stored[name][lo:hi] = rows[name][lo:hi]
        bad[name].update(changed)
    same = _path_keys([str(p) for p in stored["path"]]) == _path_keys([str(p) for p in rows["path"]])
    same = same and all(np.array_equal(stored[name], rows[name]) for name in names if name != "path")
    if not same:
        raise CacheMismatchError(
            f"cache at {path} indexes other images than this dataset selection "
            f"(the image folder or manifest changed): use a new --cache-dir"
        )
    for name, chunks in bad.items():
        if not chunks:
            continue
        array = group[f"index/{name}"]
        per_chunk = chunk_rows(array)
        remove_objects(array, chunks)
        for chunk in sorted(chunks):
            lo, hi = chunk * per_chunk, min((chunk + 1) * per_chunk, spec.num_images)
            _writable(array)[lo:hi] = rows[name][lo:hi]
        logger.warning("rewrote index/%s chunks %s of %s from the dataset index (%s)",
                       name, list_numbers(chunks), path, "; ".join(f"{c}: {why}" for c, why in sorted(chunks.items())[:3]))
    for name in names:  # proven equal to the dataset's: (re)recorded from it (a cache from before checksums gets them)
        array = group[f"index/{name}"]
        sums = index_checksums(rows[name], chunk_rows(array))
        if array.attrs.get(INDEX_CHECKSUMS) != sums:
            array.attrs.put({INDEX_CHECKSUMS: sums})
    record_missing_checksums(group, ("valid", "error"))


def record_missing_checksums(group: zarr.Group, names: Sequence[str] = INDEX_NAMES) -> list[str]:
    """Record the chunk checksums of index arrays that have none (a cache from before them), from what they hold now.

    Chunks that are missing or short get the checksum of their fill values (they are rewritten, with
    new checksums, when their shards run again). Returns the names recorded.
    """
    recorded = []
    for name in names:
        array = group[f"index/{name}"]
        if isinstance(array.attrs.get(INDEX_CHECKSUMS), list):
            continue
        n = array.shape[0]
        fill = {"valid": np.ones(n, bool), "label": np.zeros(n, np.int64), "image_id": np.zeros(n, np.int64)}.get(
            name, np.full(n, "", dtype=object))
        values = _read_chunkwise(array, object_problems(array, range(index_chunk_count(array))), fill)
        array.attrs.put({INDEX_CHECKSUMS: index_checksums(values, chunk_rows(array))})
        recorded.append(name)
    return recorded
