"""The feature cache: a Zarr v3 group per (dataset, split, backbone), one float16 array per (b, t), written shard by shard.

Layout of ``<root>/<dataset>/<split>/<backbone-id>`` (plain Zarr v3, readable without diffrep)::

    zarr.json                 attributes: the CacheSpec, class names, invalid images, runs
    index/path  (N,) str      image paths, in cache-row order
    index/label (N,) int64    class labels
    index/valid (N,) bool     False for images that could not be decoded (their features are zeros)
    index/error (N,) str      why, for those images ('' otherwise)
    index/image_id (N,) int64 the row's position in the dataset index (format 3; rows = images before)
    b<b>/t<t>   (N, C, h, w)  float16, h = w = min(native size, pool); sharded by shard_size images;
                              attrs["compute"]: device kind, GPU, precision, TF32 of its shards
    b<b>/t<t>_flip            the same for the horizontally flipped view (caches written with flip)
    done/b<b>/t<t>[...]       (num_shards,) uint64 completion markers in ONE object (format 3; one per
                              shard before): 2**32 + the CRC-32 of the shard's values once it is written

Row order (format 3): row r holds image ``index/image_id[r]`` of the dataset index, a seeded
class-stratified permutation (``extract.cache.order``, seed ``spec.row_order_seed``) fixed when the cache
is created, so that every shard mixes the classes; the per-image noise still depends on the image id, not the
row. Formats 1 and 2 keep the index order (``row_order_seed`` None) and are still read.

Objects: a worker writes whole data shards only, so two jobs never touch one Zarr object. Every
object it does not own (markers, the valid/error rows of the index, attributes) is written by the
one process that orchestrates a run (``MarkWriter``), after the shard's data is on disk; the index
is written once, in chunks of many shards. An ImageNet cache thus needs one object per data shard
and a handful more per array (``count_objects``). A marker is not proof: every object is stored
even when it is all zeros, so a marked shard (or an index chunk) whose object is missing or short
counts as not written (``extract.cache.integrity``), readers refuse it by name, and ``diffrep extract``
re-runs it. Use ``load`` to get a whole array in RAM (under ``ram_cap_bytes``), ``iter_shards`` to stream.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import threading
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from extract.errors import CacheError, CacheIncompleteError, CacheMismatchError
from extract.cache.integrity import (
    WRITE_CONFIG, marker_checksum, marker_from_checksum, marker_value, object_problems, remove_objects, shard_checksum,
)
from extract.cache.order import row_order
from extract.pooling import derive_pool
from extract.cache.provenance import compute_conflict
from extract.cache.shard_io import read_shard_object, write_shard_object

__all__ = [
    "FORMAT_VERSION",
    "CacheSpec",
    "FeatureCache",
    "make_backbone_id",
    "cache_path",
    "create_cache",
    "write_shard",
    "write_shard_data",
    "ShardMarks",
    "MarkWriter",
    "count_objects",
    "record_run",
    "reset_shards",
    "open_cache",
    "inner_chunk_rows",
    "view_suffix",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3
"""3: rows in a seeded order (index/image_id), one marker object per array, index chunks of many shards.
2: every chunk object is stored (even all zeros) and markers carry shard checksums. 1 and 2 are still read."""
READABLE_VERSIONS = (1, 2, 3)
_INDEX_NAMES = ("path", "label", "valid", "error", "image_id")
INDEX_CHUNK_ROWS = 1 << 18
"""Rows per index object (format 3), rounded to whole shards: five objects per index array for ImageNet."""
_INNER_CHUNK_BYTES = 16 << 20


def _default_ram_cap() -> int:
    env = os.environ.get("DIFFREP_RAM_CAP_GB")
    if env:
        return int(float(env) * (1 << 30))
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


DEFAULT_RAM_CAP_BYTES = _default_ram_cap()


@dataclass(frozen=True, kw_only=True)
class CacheSpec:
    """Everything that changes the cached numbers (blocks and timesteps excepted: arrays are added one by one).

    Args:
        dataset, split: dataset name and split; subset: ``all``, ``per_class=K`` or ``limit=N`` (which rows).
        num_images: N, rows of every array.
        backbone_id: directory name of the backbone (see ``make_backbone_id``).
        config_name, config_flags: named configuration and its factory flags.
        checkpoint_sha256: sha256 of the weights file ('' for random weights); weight_seed: seed of
            random weights (None with a checkpoint).
        image_size, preprocessing: model input side and how images became tensors.
        noise_schedule, diffusion_steps: the schedule and T; noise_seed: seed of the per-image noise.
        flip: whether a horizontally flipped view is stored too (same noise as view 0).
        pool: stored side is min(native, pool); 0 keeps full maps. precision: fp32, bf16 or fp16 compute.
        dtype: storage dtype (float16); shard_size: images per shard.
        row_order_seed: seed of the row order (``extract.cache.order.row_order``); None keeps the dataset
            index order (every cache of format 1 and 2). (The layout version is kept
        beside the spec, in ``attrs["diffrep"]["format_version"]``, so it is read before the spec.)
    """

    dataset: str
    split: str
    backbone_id: str
    config_name: str
    config_flags: dict[str, Any] = field(default_factory=dict)
    checkpoint_sha256: str = ""
    weight_seed: int | None = None
    image_size: int
    preprocessing: str = "adm-center-crop-bicubic:[-1,1]"
    noise_schedule: str = "linear"
    diffusion_steps: int = 1000
    noise_seed: int = 0
    flip: bool = False
    pool: int = 16
    precision: str = "fp32"
    subset: str = "all"
    num_images: int
    shard_size: int = 256
    dtype: str = "float16"
    row_order_seed: int | None = None
    noise_draws: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "config_flags", json.loads(json.dumps(dict(self.config_flags), sort_keys=True)))
        if self.shard_size < 1:
            raise CacheError(f"shard_size {self.shard_size} must be at least 1: pass --shard-size 256")
        if self.pool < 0:
            raise CacheError(f"pool {self.pool} must be 0 (none) or positive: pass --pool 16 or --pool none")
        if self.noise_draws < 1:
            raise CacheError(f"noise_draws {self.noise_draws} must be at least 1: pass --noise-draws 1")

    @property
    def views(self) -> int:
        """How many views each (b, t) has: noise draws x (2 with flip)."""
        return len(self.view_ids)

    @property
    def view_ids(self) -> list[int]:
        """The views stored: 2k+f for noise draw k < noise_draws, f = 1 the flipped image (with flip)."""
        return [2 * draw + flipped for draw in range(self.noise_draws) for flipped in ((0, 1) if self.flip else (0,))]

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def to_attrs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> "CacheSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in attrs.items() if k in names})

    def mismatches(self, other: "CacheSpec", ignore: Sequence[str] = ()) -> list[tuple[str, Any, Any]]:
        """(field, value here, value in other) for every field that differs, fields in ``ignore`` excepted."""
        mine, theirs = self.to_attrs(), other.to_attrs()
        return [(k, mine[k], theirs[k]) for k in mine if k not in ignore and mine[k] != theirs[k]]

    def require_match(self, asked: "CacheSpec", ignore: Sequence[str] = ()) -> None:
        """Check that a cache written with this spec serves ``asked``.

        Raises:
            CacheMismatchError: for the first differing field, naming the flag that restores it.
        """
        for name, stored, wanted in self.mismatches(asked, ignore=ignore):
            raise _mismatch_error(name, stored, wanted)


_HINTS = {
    "noise_seed": "pass --noise-seed {v}",
    "weight_seed": "pass --weight-seed {v}",
    "checkpoint_sha256": "pass the --checkpoint whose sha256 is {v:.12}",
    "pool": "pass --pool {pool}",
    "flip": "{flip}",
    "noise_draws": "pass the same --noise-draws ({v})",
    "precision": "pass --precision {v}",
    "shard_size": "pass --shard-size {v}",
    "config_name": "pass --config {v}",
    "subset": "pass the same --per-class/--limit ({v})",
    "num_images": "pass the same --per-class/--limit (the cache has {v} images)",
    "row_order_seed": "pass --order-seed {v}",
}


def _mismatch_error(field_name: str, stored: Any, asked: Any) -> CacheMismatchError:
    if field_name == "format_version":
        return CacheMismatchError(
            f"cache has format version {stored}, this diffrep reads {asked}: re-extract into a new --cache-dir"
        )
    hint = _HINTS.get(field_name, "pass the settings it was written with").format(
        v=stored, pool=stored or "none", flip="pass --flip" if stored else "leave out --flip"
    )
    return CacheMismatchError(
        f"cache was written with {field_name}={_short(stored)}, asked for {_short(asked)}: {hint} or use a new --cache-dir"
    )


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def make_backbone_id(config_name: str, checkpoint_sha256: str = "", weight_seed: int | None = None) -> str:
    """Directory name of a backbone: ``<config>-<sha256[:12]>`` for a checkpoint, ``<config>-random<seed>`` otherwise."""
    if checkpoint_sha256:
        return f"{config_name}-{checkpoint_sha256[:12]}"
    return f"{config_name}-random{int(weight_seed or 0)}"


def cache_path(root: str | os.PathLike, dataset: str, split: str, backbone_id: str) -> str:
    """``<root>/<dataset>/<split>/<backbone-id>``: the Zarr group of one cache."""
    return os.path.join(os.fspath(root), dataset, split, backbone_id)


def _array_name(b: int, t: int, view: int = 0) -> str:
    return f"b{int(b)}/t{int(t)}{view_suffix(view)}"


def view_suffix(view: int) -> str:
    """View 2k+f is noise draw k, flipped when f: '' (draw 0), '_flip', '_n1', '_n1_flip', ..."""
    draw, flipped = divmod(int(view), 2)
    return (f"_n{draw}" if draw else "") + ("_flip" if flipped else "")


def _marker_name(b: int, t: int, view: int = 0) -> str:
    return "done/" + _array_name(b, t, view)


def inner_chunk_rows(shard_size: int, image_bytes: int) -> int:
    """Largest divisor of shard_size whose chunk stays under _INNER_CHUNK_BYTES (at least 1 image)."""
    best = 1
    for d in range(1, shard_size + 1):
        if shard_size % d == 0 and d * image_bytes <= _INNER_CHUNK_BYTES:
            best = d
    return best


def _path_keys(paths: Sequence[str]) -> list[str]:
    """Paths relative to their common folder, so a moved data root still matches."""
    if not paths:
        return []
    paths = [os.path.normpath(p) for p in paths]
    common = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    return [os.path.relpath(p, common or os.curdir) for p in paths]


def index_chunk_rows(spec: CacheSpec) -> int:
    """Rows per index object of a new cache: ``INDEX_CHUNK_ROWS`` rounded to whole shards, at most the whole index."""
    per_chunk = spec.shard_size * max(1, INDEX_CHUNK_ROWS // spec.shard_size)
    return min(per_chunk, max(1, spec.num_shards) * spec.shard_size)


def count_objects(
    spec: CacheSpec, arrays: Iterable[tuple[int, int]], format_version: int = FORMAT_VERSION
) -> dict[str, int]:
    """How many files a complete cache holds, by kind (every object is stored, zeros included).

    Args:
        spec: the cache's spec; arrays: its (b, t) arrays (each in every view); format_version: its layout.

    Returns:
        ``{"data", "markers", "index", "metadata", "total"}``: one data object per shard and array view;
        format 3: one marker object per array view and index chunks of many shards (format 1/2: one
        of each per shard); metadata: the ``zarr.json`` of the root, the index group and arrays, every
        block group and array, the ``done`` group, its block groups and marker arrays.
    """
    arrays = sorted(set(arrays))
    views, shards = len(arrays) * spec.views, spec.num_shards
    blocks = len({b for b, _ in arrays})
    if format_version >= 3:
        index_arrays, chunks = len(_INDEX_NAMES), -(-spec.num_images // index_chunk_rows(spec))
        markers = views
    else:
        index_arrays, chunks, markers = len(_INDEX_NAMES) - 1, shards, views * shards
    counts = {
        "data": views * shards,
        "markers": markers,
        "index": index_arrays * chunks,
        "metadata": 2 + index_arrays + (blocks + views) * 2 + (1 if views else 0),
    }
    counts["total"] = sum(counts.values())
    return counts


def _index_chunks(array: zarr.Array) -> int:
    rows = int(array.metadata.chunk_grid.chunk_shape[0])
    return -(-int(array.shape[0]) // rows)


def _chunk_rows(array: zarr.Array) -> int:
    return int(array.metadata.chunk_grid.chunk_shape[0])


def create_cache(
    root: str | os.PathLike,
    spec: CacheSpec,
    paths: Sequence[str],
    labels: np.ndarray,
    class_names: Sequence[str],
    arrays: Mapping[tuple[int, int], tuple[int, int, int]] | None = None,
    native_sizes: Mapping[int, int] | None = None,
) -> "FeatureCache":
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
        with _readable(path):
            group = zarr.open_group(path, mode="r+")
            version = _check_version(group, path)
            _check_spec(group, spec, ignore=())
            _check_or_repair_index(group, path, spec, rows, strict=version >= 2)
    else:
        version = FORMAT_VERSION
        os.makedirs(path, exist_ok=True)
        group = zarr.open_group(path, mode="w", zarr_format=3)
        n = spec.num_images
        index = group.require_group("index")
        kw = dict(chunks=(index_chunk_rows(spec),), compressors=None, dimension_names=("image",))
        index.create_array("path", shape=(n,), dtype=str, **kw)
        index.create_array("label", shape=(n,), dtype="int64", **kw)
        index.create_array("valid", shape=(n,), dtype="bool", fill_value=True, **kw)
        index.create_array("error", shape=(n,), dtype=str, **kw)
        index.create_array("image_id", shape=(n,), dtype="int64", **kw)
        # written once, whole; every chunk is stored now, so a missing index object always means lost data
        for name in ("path", "label", "image_id"):
            _writable(index[name])[:] = rows[name]
        _writable(index["valid"])[:] = np.ones(n, dtype=bool)
        _writable(index["error"])[:] = np.full(n, "", dtype=object).astype(str)
        group.attrs.update({
            "diffrep": {"spec": spec.to_attrs(), "format_version": FORMAT_VERSION},
            "class_names": list(class_names),
            "invalid_images": [],
            "runs": [],
        })
    marker_dtype = "uint64" if version >= 2 else "uint8"
    with _readable(path):
        for (b, t), (channels, h, w) in sorted((arrays or {}).items()):
            for view in spec.view_ids:
                name = _array_name(b, t, view)
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
                if _marker_name(b, t, view) not in group:  # a deleted marker array: every shard is redone
                    group.create_array(  # one object: only the orchestrating process writes it (MarkWriter)
                        _marker_name(b, t, view), shape=(spec.num_shards,), dtype=marker_dtype, fill_value=0,
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
        ``{(b, t): marker value}``: MARKER_DONE + the CRC-32 of each shard (1 in a format-1 cache).

    Raises:
        CacheError: a missing array or a block of the wrong shape (a bug in the caller).
    """
    handles = _WriteHandles.of(path)
    spec = handles.spec
    start = shard * spec.shard_size
    stop = min(start + spec.shard_size, spec.num_images)
    markers = {}
    known = checksums or {}
    pending = [key for key in features if key not in known]
    # a CRC-32 not chained by the caller runs beside the write: both release the GIL
    pool = ThreadPoolExecutor(1, thread_name_prefix="diffrep-crc") if pending else None
    try:
        for (b, t), data in features.items():
            name = _array_name(b, t, view)
            array, marker_dtype = handles.array(name, _marker_name(b, t, view))
            if data.shape != (stop - start, *array.shape[1:]):
                raise CacheError(f"shard {shard} of {name} must be {(stop - start, *array.shape[1:])}, got {data.shape}")
            data = np.asarray(data, dtype=np.float16)
            if (b, t) in known:
                markers[(int(b), int(t))] = marker_from_checksum(int(known[(b, t)]), marker_dtype)
            else:
                markers[(int(b), int(t))] = pool.submit(marker_value, data, marker_dtype)
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
        self.spec = CacheSpec.from_attrs(self.group.attrs["diffrep"]["spec"])
        self._arrays: dict[str, tuple[zarr.Array, np.dtype]] = {}

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

    def array(self, name: str, marker: str) -> tuple[zarr.Array, np.dtype]:
        """(the data array, its marker array's dtype); a missing array is a CacheError."""
        if name not in self._arrays:
            if name not in self.group:
                raise CacheError(f"cache has no array {name}: create it with create_cache before writing")
            self._arrays[name] = (self.group[name], self.group[marker].dtype)
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
        with _readable(path):
            self._group = zarr.open_group(path, mode="r+")
            meta = self._group.attrs["diffrep"]
            self.spec = CacheSpec.from_attrs(meta["spec"])
            self._strict = int(meta["format_version"]) >= 2
        self._markers: dict[str, np.ndarray] = {}
        self._marker_nodes: dict[str, zarr.Array] = {}
        self._compute: dict[str, dict | None] = {}
        self._index: dict[str, tuple[zarr.Array, np.ndarray, set[int]]] = {}

    def _index_rows(self, name: str) -> tuple[zarr.Array, np.ndarray, set[int]]:
        """(the array, kept open; its rows in memory; chunks whose objects are missing or short) of index/valid or index/error."""
        if name not in self._index:
            array = self._group[f"index/{name}"]
            bad = object_problems(array, range(_index_chunks(array)), strict=self._strict)
            rows = array.shape[0]
            fill = np.ones(rows, bool) if name == "valid" else np.full(rows, "", dtype=object).astype(str)
            values = _read_chunkwise(array, bad, fill)
            self._index[name] = (array, values.astype(bool) if name == "valid" else values.astype(object), set(bad))
        return self._index[name]

    def _write_index(self, shards: list[tuple[int, dict[int, str]]]) -> None:
        for name in ("valid", "error"):
            array, values, bad = self._index_rows(name)
            rows = _chunk_rows(array)
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
            for chunk in sorted(dirty):
                lo, hi = chunk * rows, min((chunk + 1) * rows, array.shape[0])
                if chunk in bad:
                    remove_objects(array, [chunk])
                part = values[lo:hi]
                _writable(array)[lo:hi] = part.astype(bool) if name == "valid" else np.asarray(part.astype(str))
                bad.discard(chunk)

    def _marker_array(self, name: str) -> np.ndarray:
        """The markers of array ``name`` in memory; its Zarr array is kept open (each open reads its metadata)."""
        if name not in self._markers:
            node = self._group["done/" + name]
            self._marker_nodes[name] = node
            self._markers[name] = node[:]
        return self._markers[name]

    def recorded_compute(self, b: int, t: int, view: int = 0) -> dict | None:
        name = _array_name(b, t, view)
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
                name = _array_name(b, t, view)
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
                name = _array_name(b, t, view)
                values = self._marker_array(name)
                if item.compute is not None and self.recorded_compute(b, t, view) is None and not values.any():
                    # the first shard of a new array: its settings become the array's
                    self._group[name].attrs["compute"] = dict(item.compute)
                    self._compute[name] = dict(item.compute)
                values[item.shard] = value
                touched.add(name)
        for name in sorted(touched):
            self._marker_nodes[name][:] = self._markers[name]


def write_shard(
    path: str,
    shard: int,
    features: Mapping[tuple[int, int], np.ndarray],
    view: int = 0,
    valid: np.ndarray | None = None,
    errors: Sequence[str] | None = None,
) -> None:
    """Write whole shards of (b, t) arrays, then their index rows and completion markers, in this process.

    For a single writer (tests, benchmarks, a script): concurrent jobs call ``write_shard_data``
    and leave the marking to the one orchestrating process (``MarkWriter``), because markers and
    index rows of many shards share one object.

    Args:
        path: the cache group; shard: shard number; features: ``{(b, t): (n, C, h, w) float16}``;
        view: 0, or 1 for the flipped view; valid: (n,) bool and errors: (n,) str for the shard's rows
            (None: all valid).
    """
    values = write_shard_data(path, shard, features, view=view)
    spec = CacheSpec.from_attrs(zarr.open_group(path, mode="r").attrs["diffrep"]["spec"])
    start = shard * spec.shard_size
    invalid = {}
    if valid is not None:
        reasons = list(errors) if errors is not None else [""] * len(valid)
        invalid = {start + i: reasons[i] for i in np.flatnonzero(~np.asarray(valid, dtype=bool))}
    MarkWriter(path).mark([ShardMarks(shard, {(b, t, view): v for (b, t), v in values.items()}, invalid)])


def _writable(array: zarr.Array) -> zarr.Array:
    return array.with_config(WRITE_CONFIG)


def record_run(path: str, invalid: Mapping[int, tuple[str, str]], info: Mapping[str, Any]) -> None:
    """Add a run's summary and its invalid images ``{row: (path, reason)}`` to the cache attributes.

    Only the process that orchestrates a run calls this (workers write shards only).
    """
    group = zarr.open_group(path, mode="r+")
    known = {entry["index"]: entry for entry in group.attrs.get("invalid_images", [])}
    for row, (image_path, reason) in invalid.items():
        known[int(row)] = {"index": int(row), "path": str(image_path), "reason": str(reason)}
    runs = list(group.attrs.get("runs", []))
    runs.append({"finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **dict(info)})
    group.attrs.update({"invalid_images": [known[k] for k in sorted(known)], "runs": runs})


def reset_shards(
    path: str,
    shards: Mapping[tuple[int, int, int], Iterable[int]] | None = None,
    index_chunks: Mapping[str, Iterable[int]] | None = None,
) -> None:
    """Forget damaged shards so that the next run writes them again: delete their objects, unset their markers.

    Only objects already found missing or short (or failing ``verify``) belong here: nothing
    sound is deleted, and the data objects go before their markers are unset. A lost valid/error
    chunk of the index covers many shards: every array's markers of those shards are unset too,
    since their rows of the index come back only when they run again.

    Args:
        path: the cache group.
        shards: ``{(b, t, view): shard numbers}``.
        index_chunks: ``{"valid" or "error": chunk numbers}`` of the image index (rewritten with their shards).
    """
    with _readable(path):
        group = zarr.open_group(path, mode="r+")
        spec = CacheSpec.from_attrs(group.attrs["diffrep"]["spec"])
        todo = {key: {int(s) for s in numbers} for key, numbers in (shards or {}).items()}
        rerun: set[int] = set()
        for name, chunks in (index_chunks or {}).items():
            if name not in ("valid", "error"):
                raise CacheError(f"index/{name} is rebuilt by create_cache, not reset: a bug in the caller")
            array = group[f"index/{name}"]
            remove_objects(array, chunks)
            for chunk in chunks:
                rerun |= set(_chunk_shards(_chunk_rows(array), int(chunk), spec))
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
            if damaged and _array_name(b, t, view) in group:  # rerun shards keep their sound data until rewritten
                remove_objects(group[_array_name(b, t, view)], damaged)
            if numbers and _marker_name(b, t, view) in group:
                marker = group[_marker_name(b, t, view)]
                values = marker[:]
                values[numbers] = 0
                marker[:] = values


def _chunk_shards(rows_per_chunk: int, chunk: int, spec: CacheSpec) -> range:
    """Shards whose rows lie (partly) in index chunk ``chunk``."""
    lo = chunk * rows_per_chunk
    hi = min(lo + rows_per_chunk, spec.num_images)
    return range(lo // spec.shard_size, -(-hi // spec.shard_size))


def _check_version(group: zarr.Group, path: str) -> int:
    meta = group.attrs.get("diffrep")
    if not meta or "spec" not in meta:
        raise CacheError(f"{path} is a Zarr group but not a diffrep cache: point --cache-dir at the folder extract wrote")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise _mismatch_error("format_version", version, FORMAT_VERSION)
    return int(version)


def _check_spec(group: zarr.Group, expect: CacheSpec, ignore: Sequence[str]) -> CacheSpec:
    meta = group.attrs.get("diffrep")
    if not meta or "spec" not in meta:
        raise CacheError(f"{group.store_path} is a Zarr group but not a diffrep cache: use another --cache-dir")
    stored = CacheSpec.from_attrs(meta["spec"])
    stored.require_match(expect, ignore=ignore)
    return stored


def _read_chunkwise(array: zarr.Array, bad: dict[int, str], fallback: np.ndarray) -> np.ndarray:
    """Read a chunked 1-D index array; chunks in ``bad`` (and any that cannot be decoded, added to it)
    come from ``fallback``."""
    rows = _chunk_rows(array)
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
                bad[chunk] = f"cannot be decoded: {_first_line(exc)}"
        parts.append(np.asarray(fallback[lo:hi]))
    return np.concatenate(parts) if parts else np.asarray(fallback[:0])


def _check_or_repair_index(
    group: zarr.Group, path: str, spec: CacheSpec, rows: Mapping[str, np.ndarray], strict: bool
) -> None:
    """Compare an existing cache's image index with this selection (in cache-row order), and rewrite its lost chunks from it.

    Chunks whose objects are missing or short are left out of the comparison (they prove nothing)
    and, when every sound chunk matches, rewritten from ``rows`` (path, label, image_id).

    Raises:
        CacheMismatchError: a sound chunk names other images, labels or image ids.
    """
    names = [name for name in ("path", "label", "image_id") if f"index/{name}" in group]
    bad, stored = {}, {}
    for name in names:
        array = group[f"index/{name}"]
        bad[name] = object_problems(array, range(_index_chunks(array)), strict=strict)
        stored[name] = _read_chunkwise(array, bad[name], rows[name])
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
        per_chunk = _chunk_rows(array)
        remove_objects(array, chunks)
        for chunk in sorted(chunks):
            lo, hi = chunk * per_chunk, min((chunk + 1) * per_chunk, spec.num_images)
            _writable(array)[lo:hi] = rows[name][lo:hi]
        logger.warning("rewrote index/%s chunks %s of %s from the dataset index (%s)",
                       name, _numbers(chunks), path, "; ".join(f"{c}: {why}" for c, why in sorted(chunks.items())[:3]))


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text if len(text) <= 120 else text[:117] + "...") or type(exc).__name__


def _numbers(items: Iterable[int], limit: int = 8) -> str:
    """``3, 5, 9`` (and ``... (+12 more)`` past ``limit``)."""
    items = sorted(int(i) for i in items)
    text = ", ".join(str(i) for i in items[:limit])
    return text + (f" ... (+{len(items) - limit} more)" if len(items) > limit else "")


# -- damaged metadata ------------------------------------------------------------------------

def _metadata_problem(document: Any) -> str | None:
    if not isinstance(document, dict):
        return "not a JSON object"
    if document.get("zarr_format") != 3 or document.get("node_type") not in ("group", "array"):
        return "no zarr_format 3 / node_type"
    return None


def _find_bad_metadata(path: str) -> tuple[str, str] | None:
    """(relative folder, why) of the first zarr.json under a cache that does not parse, skipping chunk folders."""
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not (d == "c" and "zarr.json" in files))
        if "zarr.json" not in files:
            continue
        try:
            with open(os.path.join(folder, "zarr.json"), "rb") as handle:
                problem = _metadata_problem(json.loads(handle.read() or b"null"))
        except (ValueError, UnicodeDecodeError) as exc:
            problem = f"not JSON: {_first_line(exc)}"
        if problem:
            return os.path.relpath(folder, path), problem
    return None


def _metadata_fix(relative: str) -> str:
    """What to do about a damaged zarr.json, by the node it describes."""
    parts = relative.replace(os.sep, "/").split("/")
    if relative == os.curdir:
        return "it holds the cache's settings and cannot be rebuilt: restore it from a backup or extract into a new --cache-dir"
    if re.fullmatch(r"b\d+/t\d+(_flip)?", "/".join(parts)) or (parts[0] == "done" and len(parts) == 3):
        array = "/".join(parts[-2:])
        return (f"delete the folders {array} and done/{array} of the cache and run the same diffrep extract "
                f"command again: it writes that array again")
    if parts[0] == "index" and len(parts) == 2:
        return "the image index cannot be rebuilt in place: extract into a new --cache-dir"
    return 'replace its content with {"zarr_format": 3, "node_type": "group", "attributes": {}}'


class _readable:
    """Turn Zarr's errors about unreadable metadata into one CacheError that names the file and the fix."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or isinstance(exc, CacheError) or not isinstance(exc, (ValueError, TypeError)):
            return False
        found = _find_bad_metadata(self.path)
        if found is None:
            return False
        relative, why = found
        where = os.path.join(self.path, "zarr.json" if relative == os.curdir else os.path.join(relative, "zarr.json"))
        raise CacheError(f"cache metadata {where} is damaged ({why}): {_metadata_fix(relative)}") from exc


class FeatureCache:
    """A cache opened for reading: index, labels, and its (b, t) arrays (see ``open_cache``)."""

    def __init__(self, path: str, expect: CacheSpec | None = None, ram_cap_bytes: int = DEFAULT_RAM_CAP_BYTES):
        self.path = path
        self.ram_cap_bytes = int(ram_cap_bytes)
        with _readable(path):
            self._group = zarr.open_group(path, mode="r")
            meta = self._group.attrs.get("diffrep")
        if not meta or "spec" not in meta:
            raise CacheError(f"{path} is not a diffrep cache: point --cache-dir at the folder extract wrote")
        if meta.get("format_version") not in READABLE_VERSIONS:
            raise _mismatch_error("format_version", meta.get("format_version"), FORMAT_VERSION)
        self.format_version = int(meta["format_version"])
        if expect is not None:  # rows are read with their labels, so their order is free too
            _check_spec(self._group, expect, ignore=("pool", "shard_size", "row_order_seed"))
        self.spec = CacheSpec.from_attrs(meta["spec"])
        self.class_names: list[str] = list(self._group.attrs.get("class_names", []))
        self._index: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"FeatureCache({self.path!r}, images={self.num_images}, arrays={len(self.arrays())})"

    @property
    def _strict(self) -> bool:
        """Format 2 stores every object, so a missing one is lost data (format 1 skipped all-zero ones)."""
        return self.format_version >= 2

    def _node(self, name: str) -> Any:
        with _readable(self.path):
            return self._group[name]

    def _rerun_hint(self) -> str:
        return "run the same diffrep extract command again: it re-runs exactly those shards"

    # -- index ---------------------------------------------------------------------------------
    def _index_names(self) -> list[str]:
        with _readable(self.path):
            return [name for name in _INDEX_NAMES if f"index/{name}" in self._group]

    def index_chunk_shards(self, name: str, chunk: int) -> list[int]:
        """The shards whose rows lie in chunk ``chunk`` of index array ``name`` (one shard in formats 1 and 2)."""
        return list(_chunk_shards(_chunk_rows(self._node(f"index/{name}")), int(chunk), self.spec))

    def index_damage(self) -> dict[str, dict[int, str]]:
        """``{name: {chunk: why}}`` for index arrays (path, label, valid, error, image_id) whose objects are missing or short.

        ``index_chunk_shards`` says which shards a chunk covers.
        """
        damage = {}
        for name in self._index_names():
            array = self._node(f"index/{name}")
            problems = object_problems(array, range(_index_chunks(array)), strict=self._strict)
            if problems:
                damage[name] = problems
        return damage

    def _index_array(self, name: str) -> np.ndarray:
        if name not in self._index:
            array = self._node(f"index/{name}")
            problems = object_problems(array, range(_index_chunks(array)), strict=self._strict)
            if not problems:
                try:
                    self._index[name] = array[:]
                except ValueError as exc:
                    problems = {-1: f"cannot be decoded: {_first_line(exc)}"}
            if problems:
                where = "" if -1 in problems else f" {_numbers(problems)}"
                raise CacheError(
                    f"index/{name} of cache {self.path} has damaged chunks{where} "
                    f"({'; '.join(sorted(set(problems.values())))}): run the same diffrep extract command again: "
                    f"it rewrites them"
                )
        return self._index[name]

    @property
    def image_ids(self) -> np.ndarray:
        """(N,) int64: the dataset-index position (image id, the noise's key) of each row; 0..N-1 before format 3."""
        if "image_id" not in self._index_names():
            return np.arange(self.num_images, dtype=np.int64)
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
    def invalid_images(self) -> list[dict[str, Any]]:
        """``[{index, path, reason}]`` recorded by finished runs."""
        return list(self._group.attrs.get("invalid_images", []))

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
        with _readable(self.path):
            for bname, bgroup in self._group.groups():
                if not re.fullmatch(r"b\d+", bname):
                    continue
                for tname, _ in bgroup.arrays():
                    if re.fullmatch(r"t\d+", tname):
                        found.append((int(bname[1:]), int(tname[1:])))
        return sorted(found)

    def has_array(self, b: int, t: int, view: int = 0) -> bool:
        with _readable(self.path):
            return _array_name(b, t, view) in self._group

    def _array(self, b: int, t: int, view: int = 0) -> zarr.Array:
        if view not in self.spec.view_ids:
            hint = "it has no flipped view (extract with --flip)" if view % 2 else "extract with --noise-draws"
            raise CacheError(f"view {view} is not in this cache ({', '.join(map(str, self.spec.view_ids))}): {hint}")
        name = _array_name(b, t, view)
        if not self.has_array(b, t, view):
            raise CacheError(
                f"cache has no array {_array_name(b, t)}: run diffrep extract --dataset {self.spec.dataset} "
                f"--timesteps {t} --blocks {b}"
            )
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

    def _markers(self, b: int, t: int, view: int, array: zarr.Array | None = None) -> np.ndarray | None:
        """The array's markers, None without them; ``array``: the data array already opened (one lookup less)."""
        name = _marker_name(b, t, view)
        with _readable(self.path):
            if array is None and not self.has_array(b, t, view):
                return None
            try:
                return self._group[name][:]
            except KeyError:
                return None

    def _state(self, b: int, t: int, view: int, array: zarr.Array | None = None) -> tuple[set[int], dict[int, str]]:
        """(unmarked shards, ``{marked shard: why}`` for those whose data object is missing or short)."""
        done = self._markers(b, t, view, array)
        if done is None:
            return set(range(self.num_shards)), {}
        marked = [int(s) for s in np.flatnonzero(done != 0)]
        array = self._node(_array_name(b, t, view)) if array is None else array
        damaged = object_problems(array, marked, strict=self._strict)
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

    def _check_complete(self, b: int, t: int, view: int, array: zarr.Array | None = None) -> None:
        name = _array_name(b, t, view)
        unmarked, damaged = self._state(b, t, view, array)
        if damaged:
            raise CacheIncompleteError(
                f"array {name} of {self.path} has {len(damaged)} damaged shard(s) {_numbers(damaged)} "
                f"(data object {'; '.join(sorted(set(damaged.values())))}): {self._rerun_hint()}"
            )
        if unmarked:
            raise CacheIncompleteError(
                f"array {name} is missing {len(unmarked)} of {self.num_shards} shards: "
                f"run diffrep extract --dataset {self.spec.dataset} --timesteps {t} --blocks {b} again to finish it"
            )

    def _read_shard(self, array: zarr.Array, name: str, shard: int, out: np.ndarray | None = None) -> np.ndarray:
        """The shard's rows as stored, read into ``out`` when given (a C-contiguous slice of the caller's result)."""
        start, stop = self.shard_bounds(shard)
        if out is None:
            out = np.empty((stop - start, *array.shape[1:]), dtype=array.dtype)
        if read_shard_object(array, shard, out):  # straight from the file (extract.cache.shard_io); else through Zarr
            return out
        try:
            out[...] = array[start:stop]
            return out
        except ValueError as exc:  # damage that keeps the object's size: only its checksum tells
            raise self._undecodable(f"shard {shard} of {name}", exc) from exc

    def _undecodable(self, what: str, exc: Exception) -> CacheError:
        """The one-line error for stored bytes that do not decode: verify --repair, then extract again."""
        root = os.path.dirname(os.path.dirname(os.path.dirname(self.path)))
        return CacheError(
            f"{what} in {self.path} cannot be decoded ({_first_line(exc)}): run diffrep verify --cache-dir {root} "
            f"--dataset {self.spec.dataset} --split {self.spec.split} --repair, then the same diffrep extract command again"
        )

    def row_reader(self, b: int, t: int, pool: int | None = None, view: int = 0):
        """A function (start, stop) -> rows start..stop of a complete array as (n, C, h, w) float16, read as one slice.

        For readers that take pieces of shards in their own order (a streamed epoch): the same
        completeness check and the same one-line error for damage as ``load``. Never per-image indexing.
        """
        array = self._array(b, t, view)
        self._check_complete(b, t, view, array)  # unwritten or damaged shards: one line naming the command that finishes them
        native, name = self._native(array), _array_name(b, t, view)

        def read(start: int, stop: int) -> np.ndarray:
            try:
                data = array[start:stop]
            except ValueError as exc:  # damage that keeps the object's size: only its checksum tells
                raise self._undecodable(f"rows {start}-{stop} of {name}", exc) from exc
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
        name = _array_name(b, t, view)
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
        name = _array_name(b, t, view)

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
                f"{_array_name(b, t, view)} needs {need / 2**30:.1f} GiB in RAM, over the "
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
        done = self._markers(b, t, view)
        if done is None:
            return {}
        name = _array_name(b, t, view)
        array = self._node(name)
        problems = self.damaged_shards(b, t, view)
        for shard in (int(s) for s in np.flatnonzero(done != 0)):
            if shard in problems:
                continue
            start, stop = self.shard_bounds(shard)
            try:
                data = array[start:stop]
            except ValueError as exc:
                problems[shard] = f"cannot be decoded: {_first_line(exc)}"
                continue
            expected = marker_checksum(done[shard])
            if expected is not None and shard_checksum(data) != expected:
                problems[shard] = "checksum mismatch (the data changed after it was written)"
        return dict(sorted(problems.items()))

    def verify_index(self) -> dict[str, dict[int, str]]:
        """``{name: {chunk: why}}`` for index chunks that are missing, short, or cannot be decoded (reads them all)."""
        damage = self.index_damage()
        for name in self._index_names():
            array = self._node(f"index/{name}")
            problems = damage.get(name, {})
            rows = _chunk_rows(array)
            for chunk in range(_index_chunks(array)):
                if chunk not in problems:
                    try:
                        array[chunk * rows:min((chunk + 1) * rows, self.num_images)]
                    except ValueError as exc:
                        problems[chunk] = f"cannot be decoded: {_first_line(exc)}"
            if problems:
                damage[name] = dict(sorted(problems.items()))
        return damage

    def has_checksums(self, b: int, t: int, view: int = 0) -> bool:
        """Whether the markers of (b, t) record shard checksums (caches of format 2)."""
        done = self._markers(b, t, view)
        return done is not None and done.dtype.itemsize >= 8


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
