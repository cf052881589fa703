"""Reading a cache: ``FeatureCache`` (index, labels, whole arrays under a RAM cap or shard by shard, checks) and ``open_cache``.

A marker is not proof: every object is stored even when it is all zeros, so a marked shard (or an
index chunk) whose object is missing or short counts as not written (``extract.cache.integrity``);
readers refuse it by name, and ``diffrep extract`` re-runs it. So do a marker object of the wrong size,
index chunks that fail their recorded checksums, and shards holding Inf or NaN (each shard read is
scanned for them: ``integrity.all_finite``, a vectorised pass over the bytes just read).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import zarr

from extract.cache.damage import explain_bad_metadata, list_numbers, shorten_error
from extract.cache.integrity import (
    INDEX_CHECKSUMS, all_finite, index_checksum_problems, marker_checksum, marker_problem, object_problems, shard_checksum,
)
from extract.cache.shard_io import read_shard_object
from extract.cache.spec import (
    INDEX_NAMES, CacheSpec, array_name, cache_path, chunk_rows, chunk_shards, index_chunk_count, marker_name, read_spec,
)
from extract.errors import CacheDamagedError, CacheError, CacheIncompleteError
from extract.pooling import derive_pool

__all__ = ["DEFAULT_RAM_CAP_BYTES", "FeatureCache", "open_cache"]


def _default_ram_cap() -> int:
    env = os.environ.get("DIFFREP_RAM_CAP_GB")
    if env:
        return int(float(env) * (1 << 30))
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


DEFAULT_RAM_CAP_BYTES = _default_ram_cap()
"""The most ``load`` allocates by default: $DIFFREP_RAM_CAP_GB, else half the RAM (8 GiB when unknown)."""


class FeatureCache:
    """A cache opened for reading: index, labels, and its (b, t) arrays (see ``open_cache``)."""

    def __init__(self, path: str, expect: CacheSpec | None = None, ram_cap_bytes: int = DEFAULT_RAM_CAP_BYTES):
        self.path = path
        self.ram_cap_bytes = int(ram_cap_bytes)
        with explain_bad_metadata(path):
            self._group = zarr.open_group(path, mode="r")
            self.spec = read_spec(self._group, path)
        if expect is not None:  # rows are read with their labels, so their order is free too
            self.spec.require_match(expect, ignore=("pool", "shard_size", "row_order_seed"))
        self.class_names: list[str] = list(self._group.attrs.get("class_names", []))
        self._index: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"FeatureCache({self.path!r}, images={self.num_images}, arrays={len(self.arrays())})"

    def _node(self, name: str) -> Any:
        with explain_bad_metadata(self.path):
            return self._group[name]

    # -- index ---------------------------------------------------------------------------------
    def index_chunk_shards(self, name: str, chunk: int) -> list[int]:
        """The shards whose rows lie in chunk ``chunk`` of index array ``name``."""
        return list(chunk_shards(chunk_rows(self._node(f"index/{name}")), int(chunk), self.spec))

    def index_damage(self) -> dict[str, dict[int, str]]:
        """``{name: {chunk: why}}`` for index arrays (path, label, valid, error, image_id) whose chunks are missing,
        short, undecodable or fail the checksums recorded when they were written.

        Reads the whole index (small: 5 arrays of N values; the sound ones are kept for the properties).
        ``index_chunk_shards`` says which shards a chunk covers.
        """
        damage = {}
        for name in INDEX_NAMES:
            problems = self._index_problems(name)
            if problems:
                damage[name] = dict(sorted(problems.items()))
        return damage

    def _index_problems(self, name: str) -> dict[int, str]:
        """``{chunk: why}`` of one index array; when there is none its values are kept in ``self._index``."""
        if name in self._index:
            return {}
        array = self._node(f"index/{name}")
        problems = object_problems(array, range(index_chunk_count(array)))
        if problems:
            return problems
        try:
            values = array[:]
        except ValueError:  # damage that keeps the size: find the chunks that do not decode
            rows = chunk_rows(array)
            for chunk in range(index_chunk_count(array)):
                try:
                    array[chunk * rows:min((chunk + 1) * rows, self.num_images)]
                except ValueError as exc:
                    problems[chunk] = f"cannot be decoded: {shorten_error(exc)}"
            return problems or {0: "cannot be decoded"}
        problems = index_checksum_problems(array, values)
        if not problems:
            self._index[name] = values
        return problems

    def _index_array(self, name: str) -> np.ndarray:
        problems = self._index_problems(name)
        if problems:
            raise CacheDamagedError(
                f"index/{name} of cache {self.path} has damaged chunks {list_numbers(problems)} "
                f"({'; '.join(sorted(set(problems.values())))}): run the same diffrep extract command again: "
                f"it rewrites them"
            )
        return self._index[name]

    @property
    def image_ids(self) -> np.ndarray:
        """(N,) int64: the dataset-index position (image id, the noise's key) of each row."""
        return self._index_array("image_id").astype(np.int64)

    def compute(self, b: int, t: int, view: int = 0) -> dict[str, Any] | None:
        """What computed the array's shards (``extract.cache.provenance.compute_settings``), None when not recorded."""
        recorded = self._array(b, t, view).attrs.get("compute")
        return dict(recorded) if recorded else None

    @property
    def num_images(self) -> int:
        return self.spec.num_images

    @property
    def num_shards(self) -> int:
        return self.spec.num_shards

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 class labels."""
        return self._index_array("label").astype(np.int64)

    @property
    def valid(self) -> np.ndarray:
        """(N,) bool: False where the image could not be decoded (its features are zeros)."""
        return self._index_array("valid").astype(bool)

    @property
    def errors(self) -> list[str]:
        """(N,) why each invalid image was skipped ('' for valid ones)."""
        return [str(e) for e in self._index_array("error")]

    @property
    def paths(self) -> list[str]:
        return [str(p) for p in self._index_array("path")]

    @property
    def runs(self) -> list[dict]:
        """What each extraction run recorded (where, threads, batch size, shards written, ...)."""
        return list(self._group.attrs.get("runs", []))

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        """(start, stop) rows of a shard."""
        start = shard * self.spec.shard_size
        return start, min(start + self.spec.shard_size, self.num_images)

    # -- arrays --------------------------------------------------------------------------------
    def arrays(self) -> list[tuple[int, int]]:
        """Every (b, t) with an array (view 0), sorted."""
        found = []
        with explain_bad_metadata(self.path):
            for bname, bgroup in self._group.groups():
                if not re.fullmatch(r"b\d+", bname):
                    continue
                for tname, _ in bgroup.arrays():
                    if re.fullmatch(r"t\d+", tname):
                        found.append((int(bname[1:]), int(tname[1:])))
        return sorted(found)

    def has_array(self, b: int, t: int, view: int = 0) -> bool:
        with explain_bad_metadata(self.path):
            return array_name(b, t, view) in self._group

    def _array(self, b: int, t: int, view: int = 0) -> zarr.Array:
        if view not in self.spec.view_ids:
            hint = "it has no flipped view (extract with --flip)" if view % 2 else "extract with --noise-draws"
            raise CacheError(f"view {view} is not in this cache ({', '.join(map(str, self.spec.view_ids))}): {hint}")
        name = array_name(b, t, view)
        if not self.has_array(b, t, view):
            raise self._missing_work(f"cache {self.path} has no array {array_name(b, t)}", b, t)
        return self._node(name)

    def shape(self, b: int, t: int, pool: int | None = None) -> tuple[int, int, int, int]:
        """(N, C, h, w) of an array as stored, or as ``load(b, t, pool)`` would return it."""
        return self._shape_of(self._array(b, t), pool)

    def _shape_of(self, array: zarr.Array, pool: int | None) -> tuple[int, int, int, int]:
        if pool is None:
            return tuple(array.shape)
        side = derive_pool(np.zeros((1, 1, array.shape[-1], array.shape[-1]), np.float16),
                           self._native(array), pool).shape[-1]
        return (array.shape[0], array.shape[1], side, side)

    @staticmethod
    def _native(array: zarr.Array) -> int:
        return int(array.attrs.get("native_size", array.shape[-1]))

    def _marker_node(self, b: int, t: int, view: int, array: zarr.Array | None = None) -> zarr.Array | None:
        """The array's marker array, None without it; ``array``: the data array already opened (one lookup less)."""
        with explain_bad_metadata(self.path):
            if array is None and not self.has_array(b, t, view):
                return None
            try:
                return self._group[marker_name(b, t, view)]
            except KeyError:
                return None

    def marker_damage(self, b: int, t: int, view: int = 0) -> str | None:
        """Why the completion markers of an array cannot be read (their object has the wrong size), else None.

        Damaged markers say nothing about any shard: all of the array's shards count as damaged.
        """
        node = self._marker_node(b, t, view)
        return None if node is None else marker_problem(node)

    def _markers(self, b: int, t: int, view: int, array: zarr.Array | None = None) -> np.ndarray | None:
        """The array's markers, None without them (callers check ``marker_damage`` first)."""
        node = self._marker_node(b, t, view, array)
        return None if node is None else node[:]

    def _state(self, b: int, t: int, view: int, array: zarr.Array | None = None) -> tuple[set[int], dict[int, str]]:
        """(unmarked shards, ``{marked shard: why}`` for those whose data object is missing or short).

        Every shard is damaged when the marker object is.
        """
        node = self._marker_node(b, t, view, array)
        if node is None:
            return set(range(self.num_shards)), {}
        problem = marker_problem(node)
        if problem:
            why = f"completion markers {marker_name(b, t, view)} damaged ({problem})"
            return set(), {shard: why for shard in range(self.num_shards)}
        done = node[:]
        marked = [int(s) for s in np.flatnonzero(done != 0)]
        array = self._node(array_name(b, t, view)) if array is None else array
        damaged = object_problems(array, marked)
        return {int(s) for s in np.flatnonzero(done == 0)}, damaged

    def damaged_shards(self, b: int, t: int, view: int = 0) -> dict[int, str]:
        """``{shard: why}`` for shards marked complete whose data object is missing or short.

        Costs one ``stat`` per marked shard; ``verify_shards`` also reads the data and checks it.
        """
        return self._state(b, t, view)[1]

    def missing_shards(self, b: int, t: int, view: int = 0) -> list[int]:
        """Shards of an array that are not written: unmarked, or marked but damaged (all of them if the array is absent)."""
        unmarked, damaged = self._state(b, t, view)
        return sorted(unmarked | set(damaged))

    def is_complete(self, b: int, t: int, view: int | None = None) -> bool:
        """Whether every shard of (b, t) is written and present (every view when view is None)."""
        views = self.spec.view_ids if view is None else [view]
        return all(self.has_array(b, t, v) and not self.missing_shards(b, t, v) for v in views)

    def require_sound(self, b: int, t: int, view: int = 0) -> None:
        """Refuse an array whose written shards or markers are damaged (unwritten shards are not damage).

        Raises:
            CacheDamagedError: damaged markers or shards (names them and the command that redoes them).
        """
        self._check_sound(b, t, view, self._array(b, t, view))

    def _check_complete(self, b: int, t: int, view: int, array: zarr.Array | None = None) -> None:
        unmarked = self._check_sound(b, t, view, array)
        if unmarked:
            raise self._missing_work(
                f"array {array_name(b, t, view)} of {self.path} is missing {len(unmarked)} of {self.num_shards} shards",
                b, t)

    def _check_sound(self, b: int, t: int, view: int, array: zarr.Array | None = None) -> set[int]:
        """The unmarked shards, after refusing damaged markers or shards in one line."""
        name = array_name(b, t, view)
        node = self._marker_node(b, t, view, array)
        problem = None if node is None else marker_problem(node)
        if problem:
            raise CacheDamagedError(
                f"the completion markers of array {name} in {self.path} ({marker_name(b, t, view)}) are damaged "
                f"({problem}): run the same diffrep extract command again: it redoes the {self.num_shards} shard(s) "
                f"they covered"
            )
        unmarked, damaged = self._state(b, t, view, array)
        if damaged:
            raise self._missing_work(
                f"array {name} of {self.path} has {len(damaged)} damaged shard(s) {list_numbers(damaged)} "
                f"(data object {'; '.join(sorted(set(damaged.values())))})", b, t,
                "run the same diffrep extract command again: it re-runs exactly those shards", CacheDamagedError)
        return unmarked

    def _missing_work(self, problem: str, b: int, t: int, hint: str | None = None,
                      error: type[CacheIncompleteError] = CacheIncompleteError) -> CacheIncompleteError:
        """The error for work ``diffrep extract`` does (write array b/t or its lost shards), carrying what the
        command line needs to print that exact command (``pipeline.advice``)."""
        hint = hint or (f"run the diffrep extract command that wrote this cache again with --blocks {b} "
                        f"--timesteps {t} (its settings are in the cache's zarr.json)")
        return error(f"{problem}: {hint}", problem=problem, spec=self.spec, path=self.path, arrays=[(b, t)],
                     runs=self.runs)

    def _read_shard(self, array: zarr.Array, name: str, shard: int, out: np.ndarray | None = None) -> np.ndarray:
        """The shard's rows as stored, read into ``out`` when given (a C-contiguous slice of the caller's result)."""
        start, stop = self.shard_bounds(shard)
        if out is None:
            out = np.empty((stop - start, *array.shape[1:]), dtype=array.dtype)
        if not read_shard_object(array, shard, out):  # straight from the file (extract.cache.shard_io); else through Zarr
            try:
                out[...] = array[start:stop]
            except ValueError as exc:  # damage that keeps the object's size: only its checksum tells
                raise self._damaged(f"shard {shard} of {name}", f"cannot be decoded ({shorten_error(exc)})") from exc
        if not all_finite(out):  # flipped bits that make Inf/NaN: a vectorised pass over the bytes just read
            raise self._damaged(f"shard {shard} of {name}", "holds Inf/NaN values")
        return out

    def _damaged(self, what: str, why: str) -> CacheDamagedError:
        """The one-line error for stored data that changed after it was written: verify --repair, then extract again."""
        root = os.path.dirname(os.path.dirname(os.path.dirname(self.path)))
        return CacheDamagedError(
            f"{what} in {self.path} {why}: run diffrep verify --cache-dir {root} --dataset {self.spec.dataset} "
            f"--split {self.spec.split} --repair, then the same diffrep extract command again: it redoes that shard"
        )

    def row_reader(self, b: int, t: int, pool: int | None = None, view: int = 0):
        """A function (start, stop) -> rows start..stop of a complete array as (n, C, h, w) float16, read as one slice.

        For readers that take pieces of shards in their own order (a streamed epoch): the same
        completeness check and the same one-line error for damage as ``load``. Never per-image indexing.
        """
        array = self._array(b, t, view)
        self._check_complete(b, t, view, array)  # unwritten or damaged shards: one line naming the command that finishes them
        native, name = self._native(array), array_name(b, t, view)

        def read(start: int, stop: int) -> np.ndarray:
            shard = start // self.spec.shard_size
            try:
                data = array[start:stop]
            except ValueError as exc:  # damage that keeps the object's size: only its checksum tells
                raise self._damaged(f"shard {shard} (rows {start}-{stop}) of {name}",
                                    f"cannot be decoded ({shorten_error(exc)})") from exc
            if not all_finite(data):
                raise self._damaged(f"shard {shard} (rows {start}-{stop}) of {name}", "holds Inf/NaN values")
            return derive_pool(data, native, pool)

        return read

    def _skipped(self, b: int, t: int, view: int, allow_incomplete: bool, array: zarr.Array) -> set[int]:
        """Shards to give as zeros (unwritten or damaged; allow_incomplete only), else the one-line incomplete error."""
        if not allow_incomplete:
            self._check_complete(b, t, view, array)
            return set()
        unmarked, damaged = self._state(b, t, view, array)
        return unmarked | set(damaged)

    def _shards(self, b: int, t: int, pool: int | None, view: int, allow_incomplete: bool, array: zarr.Array | None = None):
        """(start, stop, shard data) for every shard in order; zeros for shards not written (allow_incomplete only).

        ``array``: the data array already opened.
        """
        array = self._array(b, t, view) if array is None else array
        skip = self._skipped(b, t, view, allow_incomplete, array)
        name = array_name(b, t, view)
        native = self._native(array)
        _, c, h, w = self._shape_of(array, pool)
        for shard in range(self.num_shards):
            start, stop = self.shard_bounds(shard)
            if shard in skip:
                yield start, stop, np.zeros((stop - start, c, h, w), dtype=np.float16)
            else:
                yield start, stop, derive_pool(self._read_shard(array, name, shard), native, pool)

    READ_THREADS = 4  # shard files a whole-array load keeps in flight

    def _read_all_into(self, array: zarr.Array, b: int, t: int, view: int, allow_incomplete: bool, out: np.ndarray) -> None:
        """Every shard of an array straight into its rows of ``out``, ``READ_THREADS`` shard files in flight.

        A disk serves several outstanding reads faster than one at a time (cold reads here, median
        of 5, 4 shards: b24 1.47 GB/s one by one, 1.77 with 4 in flight; b19 1.10 and 1.34), and the
        file reads release the GIL. The same checks and errors as the one-by-one ``_shards``.
        """
        skip = self._skipped(b, t, view, allow_incomplete, array)
        name = array_name(b, t, view)

        def read(shard: int) -> None:
            start, stop = self.shard_bounds(shard)
            if shard in skip:
                out[start:stop] = 0
            else:
                self._read_shard(array, name, shard, out=out[start:stop])

        threads = min(self.READ_THREADS, self.num_shards)
        if threads <= 1:
            for shard in range(self.num_shards):
                read(shard)
            return
        with ThreadPoolExecutor(threads, thread_name_prefix="diffrep-read") as readers:
            for _ in readers.map(read, range(self.num_shards)):  # re-raises the first failure, in shard order
                pass

    def iter_shards(
        self, b: int, t: int, pool: int | None = None, view: int = 0, allow_incomplete: bool = False
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Stream an array shard by shard: memory stays at one shard whatever N is.

        Args:
            b, t: the array; pool: None (as stored) or a coarser pool derived exactly; view: 0 or 1 (flip).
            allow_incomplete: yield zeros for shards that are not written (or damaged) instead of raising.

        Yields:
            (start, stop, (stop - start, C, h, w) float16) in row order.

        Raises:
            CacheError: no such array or view, a pool that cannot be derived, a shard that cannot be decoded;
            CacheIncompleteError: unwritten or damaged shards (names them and the command that re-runs them).
        """
        yield from self._shards(b, t, pool, view, allow_incomplete)

    def load(
        self, b: int, t: int, pool: int | None = None, view: int = 0, allow_incomplete: bool = False
    ) -> np.ndarray:
        """Read a whole array into RAM (shard-sized slices, never per-image indexing).

        Use it when the array fits under ``ram_cap_bytes``; otherwise stream with ``iter_shards``.

        Args:
            b, t: the array; pool: None (as stored) or a coarser pool derived exactly; view: 0 or 1 (flip).
            allow_incomplete: return zeros for shards that are not written (or damaged) instead of raising.

        Returns:
            (N, C, h, w) float16.

        Raises:
            CacheError: no such array, over the RAM cap, a pool finer than stored, a shard that cannot be decoded;
            CacheIncompleteError: unwritten or damaged shards and not allow_incomplete.
        """
        array = self._array(b, t, view)  # opened once: each open reads its metadata (ms on a cold disk)
        stored = array.shape[1:]
        n, c, h, w = self._shape_of(array, pool)
        need = n * c * h * w * 2
        if need > self.ram_cap_bytes:
            raise CacheError(
                f"{array_name(b, t, view)} needs {need / 2**30:.1f} GiB in RAM, over the "
                f"{self.ram_cap_bytes / 2**30:.1f} GiB cap: stream it with iter_shards or raise ram_cap_bytes"
            )
        out = np.empty((n, c, h, w), dtype=np.float16)
        if (c, h, w) == tuple(stored):  # maps as stored: read straight into the result, a few shards at a time
            self._read_all_into(array, b, t, view, allow_incomplete, out)
            return out
        for start, stop, data in self._shards(b, t, pool, view, allow_incomplete, array=array):
            out[start:stop] = data
        return out

    # -- verify ------------------------------------------------------------------------------
    def verify_shards(self, b: int, t: int, view: int = 0) -> dict[int, str]:
        """``{shard: why}`` for marked shards that are missing, short, undecodable, or fail their recorded checksum.

        Reads every marked shard: use it to check a cache (``diffrep verify``), not before each read.
        """
        if self.marker_damage(b, t, view):
            return self.damaged_shards(b, t, view)  # every shard: nothing says which were written, or what they held
        done = self._markers(b, t, view)
        if done is None:
            return {}
        name = array_name(b, t, view)
        array = self._node(name)
        problems = self.damaged_shards(b, t, view)
        for shard in (int(s) for s in np.flatnonzero(done != 0)):
            if shard in problems:
                continue
            start, stop = self.shard_bounds(shard)
            try:
                data = array[start:stop]
            except ValueError as exc:
                problems[shard] = f"cannot be decoded: {shorten_error(exc)}"
                continue
            expected = marker_checksum(done[shard])
            if expected is not None and shard_checksum(data) != expected:
                problems[shard] = "checksum mismatch (the data changed after it was written)"
            elif not all_finite(data):
                problems[shard] = "holds Inf/NaN values"
        return dict(sorted(problems.items()))

    def verify_index(self) -> dict[str, dict[int, str]]:
        """``index_damage`` read afresh: chunks missing, short, undecodable or failing their checksums."""
        self._index.clear()
        return self.index_damage()

    def index_checksums_recorded(self) -> bool:
        """Whether every index array records its chunk checksums (caches written before they existed do not)."""
        return all(isinstance(self._node(f"index/{name}").attrs.get(INDEX_CHECKSUMS), list) for name in INDEX_NAMES)


def open_cache(
    root: str | os.PathLike,
    dataset: str,
    split: str,
    backbone_id: str,
    expect: CacheSpec | None = None,
    ram_cap_bytes: int = DEFAULT_RAM_CAP_BYTES,
) -> FeatureCache:
    """Open a cache for reading.

    Args:
        root: the cache root (``--cache-dir``); dataset, split, backbone_id: which cache.
        expect: the spec the caller needs; every field that changes the numbers must match
            (pool may be finer than asked, shard size and row order are free).
        ram_cap_bytes: the most ``load`` may allocate (default: half the RAM, or $DIFFREP_RAM_CAP_GB).

    Raises:
        CacheError: no cache there; CacheMismatchError: written with other settings (names the flag).
    """
    path = cache_path(root, dataset, split, backbone_id)
    if not os.path.exists(os.path.join(path, "zarr.json")):
        raise CacheError(
            f"no feature cache at {path}: run diffrep extract --dataset {dataset} --split {split} first "
            f"(or point --cache-dir at the folder it wrote)"
        )
    return FeatureCache(path, expect=expect, ram_cap_bytes=ram_cap_bytes)
