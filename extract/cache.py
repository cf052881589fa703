"""The feature cache: a Zarr v3 group per (dataset, split, backbone), one float16 array per (b, t), written shard by shard.

Layout of ``<root>/<dataset>/<split>/<backbone-id>`` (plain Zarr v3, readable without diffrep)::

    zarr.json                 attributes: the CacheSpec, class names, invalid images, runs
    index/path  (N,) str      image paths, as the dataset index gave them
    index/label (N,) int64    class labels
    index/valid (N,) bool     False for images that could not be decoded (their features are zeros)
    index/error (N,) str      why, for those images ('' otherwise)
    b<b>/t<t>   (N, C, h, w)  float16, h = w = min(native size, pool); sharded by shard_size images
    b<b>/t<t>_flip            the same for the horizontally flipped view (caches written with flip)
    done/b<b>/t<t>[...]       (num_shards,) uint8 completion markers, one object per shard

Writers (extraction jobs) write whole shards only, so two jobs never touch one Zarr object;
a shard's marker is set after its data, and readers refuse arrays with unmarked shards.
Use ``load`` to get a whole array in RAM (under ``ram_cap_bytes``), ``iter_shards`` to stream.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from .errors import CacheError, CacheIncompleteError, CacheMismatchError
from .pooling import derive_pool

__all__ = [
    "FORMAT_VERSION",
    "CacheSpec",
    "FeatureCache",
    "make_backbone_id",
    "cache_path",
    "create_cache",
    "write_shard",
    "record_run",
    "open_cache",
]

FORMAT_VERSION = 1
_VIEWS = ("", "_flip")
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
        dtype: storage dtype (float16); shard_size: images per shard. (The layout version is kept
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "config_flags", json.loads(json.dumps(dict(self.config_flags), sort_keys=True)))
        if self.shard_size < 1:
            raise CacheError(f"shard_size {self.shard_size} must be at least 1: pass --shard-size 256")
        if self.pool < 0:
            raise CacheError(f"pool {self.pool} must be 0 (none) or positive: pass --pool 16 or --pool none")

    @property
    def views(self) -> int:
        return 2 if self.flip else 1

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
    "precision": "pass --precision {v}",
    "shard_size": "pass --shard-size {v}",
    "config_name": "pass --config {v}",
    "subset": "pass the same --per-class/--limit ({v})",
    "num_images": "pass the same --per-class/--limit (the cache has {v} images)",
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
    return f"b{int(b)}/t{int(t)}{_VIEWS[view]}"


def _marker_name(b: int, t: int, view: int = 0) -> str:
    return "done/" + _array_name(b, t, view)


def _inner_chunk(shard_size: int, image_bytes: int) -> int:
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

    Nothing here writes features: that is ``write_shard``'s job, shard by shard. Calling it again
    on an existing cache checks that it was written with the same spec and index, then adds the
    arrays that are new.

    Args:
        root: cache root (``--cache-dir``); the group goes to ``cache_path(root, dataset, split, backbone_id)``.
        spec: what the numbers depend on; paths: (N,) image paths; labels: (N,) int class labels.
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
    if os.path.exists(os.path.join(path, "zarr.json")):
        group = zarr.open_group(path, mode="r+")
        _check_spec(group, spec, ignore=())
        stored_keys = _path_keys([str(p) for p in group["index/path"][:]])
        if stored_keys != _path_keys([str(p) for p in paths]) or not np.array_equal(group["index/label"][:], labels):
            raise CacheMismatchError(
                f"cache at {path} indexes other images than this dataset selection "
                f"(the image folder or manifest changed): use a new --cache-dir"
            )
    else:
        os.makedirs(path, exist_ok=True)
        group = zarr.open_group(path, mode="w", zarr_format=3)
        n, shard = spec.num_images, spec.shard_size
        index = group.require_group("index")
        kw = dict(chunks=(shard,), compressors=None, dimension_names=("image",))
        index.create_array("path", shape=(n,), dtype=str, **kw)[:] = np.asarray([str(p) for p in paths])
        index.create_array("label", shape=(n,), dtype="int64", **kw)[:] = labels
        index.create_array("valid", shape=(n,), dtype="bool", fill_value=True, **kw)
        index.create_array("error", shape=(n,), dtype=str, **kw)
        group.attrs.update({
            "diffrep": {"spec": spec.to_attrs(), "format_version": FORMAT_VERSION},
            "class_names": list(class_names),
            "invalid_images": [],
            "runs": [],
        })
    for (b, t), (channels, h, w) in sorted((arrays or {}).items()):
        for view in range(spec.views):
            name = _array_name(b, t, view)
            if name in group:
                continue
            image_bytes = channels * h * w * 2
            inner = _inner_chunk(spec.shard_size, image_bytes)
            array = group.create_array(
                name, shape=(spec.num_images, channels, h, w), dtype="float16", fill_value=0,
                chunks=(inner, channels, h, w), shards=(spec.shard_size, channels, h, w),
                compressors=None, dimension_names=("image", "channel", "y", "x"),
            )
            native = (native_sizes or {}).get(b, h)
            array.attrs.update({"b": int(b), "t": int(t), "view": view, "native_size": int(native), "pool": spec.pool})
            group.create_array(
                _marker_name(b, t, view), shape=(spec.num_shards,), dtype="uint8", fill_value=0,
                chunks=(1,), compressors=None, dimension_names=("shard",),
            )
    return FeatureCache(path, ram_cap_bytes=DEFAULT_RAM_CAP_BYTES)


def write_shard(
    path: str,
    shard: int,
    features: Mapping[tuple[int, int], np.ndarray],
    view: int = 0,
    valid: np.ndarray | None = None,
    errors: Sequence[str] | None = None,
) -> None:
    """Write whole shards of (b, t) arrays of one cache, then set their completion markers.

    Args:
        path: the cache group (``cache_path(...)``).
        shard: shard number; rows shard*shard_size up to the next shard or N.
        features: ``{(b, t): (n, C, h, w) float16}``, n the rows of this shard.
        view: 0, or 1 for the flipped view.
        valid: (n,) bool and errors: (n,) str, the shard's rows of the image index (written first).

    Raises:
        CacheError: a missing array or a block of the wrong shape (a bug in the caller).
    """
    group = zarr.open_group(path, mode="r+")
    spec = CacheSpec.from_attrs(group.attrs["diffrep"]["spec"])
    start = shard * spec.shard_size
    stop = min(start + spec.shard_size, spec.num_images)
    if valid is not None:
        group["index/valid"][start:stop] = np.asarray(valid, dtype=bool)
        group["index/error"][start:stop] = np.asarray(list(errors) if errors is not None else [""] * (stop - start))
    for (b, t), data in features.items():
        name = _array_name(b, t, view)
        if name not in group:
            raise CacheError(f"cache has no array {name}: create it with create_cache before writing")
        array = group[name]
        if data.shape != (stop - start, *array.shape[1:]):
            raise CacheError(f"shard {shard} of {name} must be {(stop - start, *array.shape[1:])}, got {data.shape}")
        array[start:stop] = np.asarray(data, dtype=np.float16)
    for b, t in features:
        group[_marker_name(b, t, view)][shard] = 1


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


def _check_spec(group: zarr.Group, expect: CacheSpec, ignore: Sequence[str]) -> CacheSpec:
    meta = group.attrs.get("diffrep")
    if not meta or "spec" not in meta:
        raise CacheError(f"{group.store_path} is a Zarr group but not a diffrep cache: use another --cache-dir")
    stored = CacheSpec.from_attrs(meta["spec"])
    stored.require_match(expect, ignore=ignore)
    return stored


class FeatureCache:
    """A cache opened for reading: index, labels, and its (b, t) arrays (see ``open_cache``)."""

    def __init__(self, path: str, expect: CacheSpec | None = None, ram_cap_bytes: int = DEFAULT_RAM_CAP_BYTES):
        self.path = path
        self.ram_cap_bytes = int(ram_cap_bytes)
        self._group = zarr.open_group(path, mode="r")
        meta = self._group.attrs.get("diffrep")
        if not meta or "spec" not in meta:
            raise CacheError(f"{path} is not a diffrep cache: point --cache-dir at the folder extract wrote")
        if meta.get("format_version") != FORMAT_VERSION:
            raise _mismatch_error("format_version", meta.get("format_version"), FORMAT_VERSION)
        if expect is not None:
            _check_spec(self._group, expect, ignore=("pool", "shard_size"))
        self.spec = CacheSpec.from_attrs(meta["spec"])
        self.class_names: list[str] = list(self._group.attrs.get("class_names", []))
        self._index: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"FeatureCache({self.path!r}, images={self.num_images}, arrays={len(self.arrays())})"

    # -- index ---------------------------------------------------------------------------------
    def _index_array(self, name: str) -> np.ndarray:
        if name not in self._index:
            self._index[name] = self._group[f"index/{name}"][:]
        return self._index[name]

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
        for bname, bgroup in self._group.groups():
            if not re.fullmatch(r"b\d+", bname):
                continue
            for tname, _ in bgroup.arrays():
                if re.fullmatch(r"t\d+", tname):
                    found.append((int(bname[1:]), int(tname[1:])))
        return sorted(found)

    def has_array(self, b: int, t: int, view: int = 0) -> bool:
        return _array_name(b, t, view) in self._group

    def _array(self, b: int, t: int, view: int = 0) -> zarr.Array:
        if view not in range(self.spec.views):
            hint = "it has no flipped view (extract with --flip)" if view == 1 else "views are 0 and 1"
            raise CacheError(f"view {view} is not in this cache: {hint}")
        name = _array_name(b, t, view)
        if name not in self._group:
            raise CacheError(
                f"cache has no array {_array_name(b, t)}: run diffrep extract --dataset {self.spec.dataset} "
                f"--timesteps {t} --blocks {b}"
            )
        return self._group[name]

    def shape(self, b: int, t: int, pool: int | None = None) -> tuple[int, int, int, int]:
        """(N, C, h, w) of an array as stored, or as ``load(b, t, pool)`` would return it."""
        array = self._array(b, t)
        if pool is None:
            return tuple(array.shape)
        side = derive_pool(np.zeros((1, 1, array.shape[-1], array.shape[-1]), np.float16),
                           self._native(array), pool).shape[-1]
        return (array.shape[0], array.shape[1], side, side)

    @staticmethod
    def _native(array: zarr.Array) -> int:
        return int(array.attrs.get("native_size", array.shape[-1]))

    def missing_shards(self, b: int, t: int, view: int = 0) -> list[int]:
        """Shards of an array whose completion marker is not set (all of them if the array is absent)."""
        name = _marker_name(b, t, view)
        if name not in self._group:
            return list(range(self.num_shards))
        done = self._group[name][:]
        return [int(s) for s in np.flatnonzero(done == 0)]

    def is_complete(self, b: int, t: int, view: int | None = None) -> bool:
        """Whether every shard of (b, t) is written (every view when view is None)."""
        views = range(self.spec.views) if view is None else [view]
        return all(self.has_array(b, t, v) and not self.missing_shards(b, t, v) for v in views)

    def _check_complete(self, b: int, t: int, view: int) -> None:
        missing = self.missing_shards(b, t, view)
        if missing:
            raise CacheIncompleteError(
                f"array {_array_name(b, t, view)} is missing {len(missing)} of {self.num_shards} shards: "
                f"run diffrep extract --dataset {self.spec.dataset} --timesteps {t} --blocks {b} again to finish it "
                f"(or pass allow_incomplete=True)"
            )

    def iter_shards(
        self, b: int, t: int, pool: int | None = None, view: int = 0, allow_incomplete: bool = False
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Stream an array shard by shard: memory stays at one shard whatever N is.

        Args:
            b, t: the array; pool: None (as stored) or a coarser pool derived exactly; view: 0 or 1 (flip).
            allow_incomplete: also yield unwritten shards (zeros) instead of raising.

        Yields:
            (start, stop, (stop - start, C, h, w) float16) in row order.

        Raises:
            CacheError: no such array or view, or a pool that cannot be derived; CacheIncompleteError.
        """
        array = self._array(b, t, view)
        if not allow_incomplete:
            self._check_complete(b, t, view)
        native = self._native(array)
        for shard in range(self.num_shards):
            start, stop = self.shard_bounds(shard)
            yield start, stop, derive_pool(array[start:stop], native, pool)

    def load(
        self, b: int, t: int, pool: int | None = None, view: int = 0, allow_incomplete: bool = False
    ) -> np.ndarray:
        """Read a whole array into RAM (shard-sized slices, never per-image indexing).

        Use it when the array fits under ``ram_cap_bytes``; otherwise stream with ``iter_shards``.

        Args:
            b, t: the array; pool: None (as stored) or a coarser pool derived exactly; view: 0 or 1 (flip).
            allow_incomplete: return unwritten shards as zeros instead of raising.

        Returns:
            (N, C, h, w) float16.

        Raises:
            CacheError: no such array, over the RAM cap, or a pool finer than stored;
            CacheIncompleteError: unwritten shards and not allow_incomplete.
        """
        array = self._array(b, t, view)
        n, c, h, w = self.shape(b, t, pool)
        need = n * c * h * w * 2
        if need > self.ram_cap_bytes:
            raise CacheError(
                f"{_array_name(b, t, view)} needs {need / 2**30:.1f} GiB in RAM, over the "
                f"{self.ram_cap_bytes / 2**30:.1f} GiB cap: stream it with iter_shards or raise ram_cap_bytes"
            )
        if not allow_incomplete:
            self._check_complete(b, t, view)
        out = np.empty((n, c, h, w), dtype=np.float16)
        native = self._native(array)
        for shard in range(self.num_shards):
            start, stop = self.shard_bounds(shard)
            out[start:stop] = derive_pool(array[start:stop], native, pool)
        return out


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
            (pool may be finer than asked, shard size is free).
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
