"""What a cache is: its format version, ``CacheSpec``, the names of its arrays and markers, and the checks that it matches.

Layout of ``<root>/<dataset>/<split>/<backbone-id>`` (plain Zarr v3, readable without diffrep)::

    zarr.json                 attributes: the CacheSpec, class names, invalid images, runs
    index/path  (N,) str      image paths, in cache-row order
    index/label (N,) int64    class labels
    index/valid (N,) bool     False for images that could not be decoded (their features are zeros)
    index/error (N,) str      why, for those images ('' otherwise)
    index/image_id (N,) int64 the row's position in the dataset index
    b<b>/t<t>   (N, C, h, w)  float16, h = w = min(native size, pool); sharded by shard_size images;
                              attrs["compute"]: device kind, GPU, precision, TF32 of its shards
    b<b>/t<t>_flip            the same for the horizontally flipped view (caches written with flip)
    done/b<b>/t<t>[...]       (num_shards,) uint64 completion markers in ONE object:
                              2**32 + the CRC-32 of the shard's values once it is written

Row order: row r holds image ``index/image_id[r]`` of the dataset index, a seeded
class-stratified permutation (``extract.cache.order``, seed ``spec.row_order_seed``) fixed when the cache
is created, so that every shard mixes the classes; the per-image noise still depends on the image id, not the
row (``row_order_seed`` None keeps the index order). Caches of formats 1 and 2 (before 3: one marker
object per shard, no image ids) are refused with one line saying to extract them again (``read_spec``).

An ImageNet cache needs one object per data shard and a handful more per array (``count_objects``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import zarr

from extract.errors import CacheError, CacheMismatchError

__all__ = [
    "FORMAT_VERSION", "INDEX_NAMES", "INDEX_CHUNK_ROWS", "CacheSpec", "cache_path", "array_name",
    "view_suffix", "marker_name", "inner_chunk_rows", "index_chunk_rows", "count_objects", "chunk_rows",
    "index_chunk_count", "chunk_shards", "read_spec", "NOISE_KEY", "noise_split",
]


FORMAT_VERSION = 3
"""The only layout read and written: rows in a seeded order (index/image_id), one marker object per array
carrying shard checksums, every chunk object stored (even all zeros), index chunks of many shards."""
INDEX_NAMES = ("path", "label", "valid", "error", "image_id")
INDEX_CHUNK_ROWS = 1 << 18
"""Rows per index object, rounded to whole shards: five objects per index array for ImageNet."""
_INNER_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True, kw_only=True)
class CacheSpec:
    """Everything that changes the cached numbers (blocks and timesteps excepted: arrays are added one by one).

    Args:
        dataset, split: dataset name and split; subset: ``all``, ``per_class=K`` or ``limit=N`` (which rows).
        num_images: N, rows of every array.
        backbone_id: directory name of the backbone (``extract.backbone.identity.backbone_id``).
        config_name, config_flags: named configuration and its factory flags.
        checkpoint_sha256: sha256 of the weights file ('' for random weights); weight_seed: seed of
            random weights (None with a checkpoint).
        image_size, preprocessing: model input side and how images became tensors.
        noise_schedule, diffusion_steps: the schedule and T; noise_seed: seed of the per-image noise.
        flip: whether a horizontally flipped view is stored too (same noise as view 0).
        pool: stored side is min(native, pool); 0 keeps full maps. precision: fp32, bf16 or fp16 compute.
        dtype: storage dtype (float16); shard_size: images per shard.
        row_order_seed: seed of the row order (``extract.cache.order.row_order``); None keeps the dataset
            index order.
        family: the backbone family (``adm``, ``sd``); conditioning: what the backbone was conditioned on
            (``none``; SD: ``null-text``); latent: what x0 is (``pixels``; SD: ``vae-posterior-mean*0.18215``).
        noise_key: what the seeded noise is keyed on besides seed and t: ``split+index`` (every new cache)
            or ``index`` (caches written before: train and test rows at one index shared their noise).
            (The layout version is kept
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
    family: str = "adm"
    conditioning: str = "none"
    latent: str = "pixels"
    noise_key: str = "index"

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
    "image_size": "pass --image-size {v}",
    "subset": "pass the same --per-class/--limit ({v})",
    "num_images": "pass the same --per-class/--limit (the cache has {v} images)",
    "row_order_seed": "pass --order-seed {v}",
    "noise_key": "this cache was written before the split was part of the noise key (its train and test rows "
                 "at one index share noise): it can be read, not extended",
}

NOISE_KEY = "split+index"  # what every new cache's noise is keyed on (``extract.noise``)


def noise_split(spec: "CacheSpec") -> str:
    """The split to key a cache's seeded noise on: its own, or '' for a cache keyed on the index alone."""
    return spec.split if spec.noise_key == NOISE_KEY else ""


def _mismatch_error(field_name: str, stored: Any, asked: Any) -> CacheMismatchError:
    hint = _HINTS.get(field_name, "pass the settings it was written with").format(
        v=stored, pool=stored or "none", flip="pass --flip" if stored else "leave out --flip"
    )
    return CacheMismatchError(
        f"cache was written with {field_name}={_short(stored)}, asked for {_short(asked)}: {hint} or use a new --cache-dir"
    )


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def cache_path(root: str | os.PathLike, dataset: str, split: str, backbone_id: str) -> str:
    """``<root>/<dataset>/<split>/<backbone-id>``: the Zarr group of one cache."""
    return os.path.join(os.fspath(root), dataset, split, backbone_id)


def array_name(b: int, t: int, view: int = 0) -> str:
    """``b<b>/t<t>`` plus the view's suffix: the array's path in the group."""
    return f"b{int(b)}/t{int(t)}{view_suffix(view)}"


def view_suffix(view: int) -> str:
    """View 2k+f is noise draw k, flipped when f: '' (draw 0), '_flip', '_n1', '_n1_flip', ..."""
    draw, flipped = divmod(int(view), 2)
    return (f"_n{draw}" if draw else "") + ("_flip" if flipped else "")


def marker_name(b: int, t: int, view: int = 0) -> str:
    """``done/`` + ``array_name``: the array's completion markers, one object."""
    return "done/" + array_name(b, t, view)


def inner_chunk_rows(shard_size: int, image_bytes: int) -> int:
    """Largest divisor of shard_size whose chunk stays under _INNER_CHUNK_BYTES (at least 1 image)."""
    best = 1
    for d in range(1, shard_size + 1):
        if shard_size % d == 0 and d * image_bytes <= _INNER_CHUNK_BYTES:
            best = d
    return best


def index_chunk_rows(spec: CacheSpec) -> int:
    """Rows per index object of a new cache: ``INDEX_CHUNK_ROWS`` rounded to whole shards, at most the whole index."""
    per_chunk = spec.shard_size * max(1, INDEX_CHUNK_ROWS // spec.shard_size)
    return min(per_chunk, max(1, spec.num_shards) * spec.shard_size)


def count_objects(spec: CacheSpec, arrays: Iterable[tuple[int, int]]) -> dict[str, int]:
    """How many files a complete cache holds, by kind (every object is stored, zeros included).

    Args:
        spec: the cache's spec; arrays: its (b, t) arrays (each in every view).

    Returns:
        ``{"data", "markers", "index", "metadata", "total"}``: one data object per shard and array view,
        one marker object per array view, index chunks of many shards; metadata: the ``zarr.json`` of the root, the index group and arrays, every
        block group and array, the ``done`` group, its block groups and marker arrays.
    """
    arrays = sorted(set(arrays))
    views, shards = len(arrays) * spec.views, spec.num_shards
    blocks = len({b for b, _ in arrays})
    index_arrays, chunks = len(INDEX_NAMES), -(-spec.num_images // index_chunk_rows(spec))
    counts = {
        "data": views * shards,
        "markers": views,
        "index": index_arrays * chunks,
        "metadata": 2 + index_arrays + (blocks + views) * 2 + (1 if views else 0),
    }
    counts["total"] = sum(counts.values())
    return counts


def chunk_rows(array: zarr.Array) -> int:
    """Rows per object of a 1-D index array (or per shard of a data array)."""
    return int(array.metadata.chunk_grid.chunk_shape[0])


def index_chunk_count(array: zarr.Array) -> int:
    """How many objects an index array has."""
    return -(-int(array.shape[0]) // chunk_rows(array))


def chunk_shards(rows_per_chunk: int, chunk: int, spec: CacheSpec) -> range:
    """Shards whose rows lie (partly) in index chunk ``chunk``."""
    lo = chunk * rows_per_chunk
    hi = min(lo + rows_per_chunk, spec.num_images)
    return range(lo // spec.shard_size, -(-hi // spec.shard_size))


def read_spec(group: zarr.Group, path: str) -> CacheSpec:
    """The spec a cache was written with, after checking that the group is a diffrep cache of ``FORMAT_VERSION``.

    Raises:
        CacheError: not a diffrep cache; CacheMismatchError: another format (names the command that re-extracts it).
    """
    meta = group.attrs.get("diffrep")
    if not meta or "spec" not in meta:
        raise CacheError(f"{path} is not a diffrep cache: point --cache-dir at the folder extract wrote")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        stored = meta["spec"]
        raise CacheMismatchError(
            f"cache at {path} has format {version}, which this diffrep does not read (it reads format {FORMAT_VERSION}): "
            f"delete it and run diffrep extract --dataset {stored.get('dataset')} --split {stored.get('split')} again, "
            f"or extract into a new --cache-dir"
        )
    return CacheSpec.from_attrs(meta["spec"])
