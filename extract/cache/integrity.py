"""Whether the objects behind a cache's completion markers are really there: object sizes and shard checksums.

A completion marker says a shard was written; it does not prove that the bytes are still on
disk. Zarr reads a missing object as its fill value (zeros), so a deleted or emptied shard would
pass for data. The cache is uncompressed, so the byte size of every stored object is known from
the array metadata alone: checking existence and size costs one ``stat`` per object and catches
missing, emptied and truncated objects. Bit-level damage needs the data itself: each marker
carries the CRC-32 of its shard's values (``marker_value``), which ``diffrep verify`` recomputes.
Index chunks carry theirs in their array's attributes (``INDEX_CHECKSUMS``, ``index_checksum_problems``),
checked by every reader of the index, since it is small. A cheap scan for Inf/NaN (``all_finite``)
runs on every shard a reader loads and every shard a writer stores.

Zarr 3 lays a sharded array out as one object per shard, ``c/<s>/0/0/0`` (chunk-key encoding
``/``), holding its inner chunks back to back and, at its end, an index of 16 bytes per inner
chunk plus a 4-byte CRC-32C. Inner chunks lying wholly past the last row are not stored; every
other inner chunk is, as long as the writer sets ``write_empty_chunks`` (``WRITE_CONFIG``).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable

import numpy as np
import zarr

__all__ = [
    "WRITE_CONFIG", "MARKER_DONE", "INDEX_CHECKSUMS", "PENDING_CHECKSUMS", "shard_checksum", "marker_value",
    "marker_checksum", "object_path", "object_problems", "remove_objects", "all_finite", "values_checksum",
    "index_checksums", "index_checksum_problems", "marker_problem",
]

WRITE_CONFIG = {"write_empty_chunks": True}
"""Array config for every diffrep write: all-zero chunks (invalid images, class 0 labels) are stored too,
so a missing object always means lost data (Zarr would otherwise skip them and read them back as zeros)."""

MARKER_DONE = 1 << 32
"""A set marker is MARKER_DONE + the CRC-32 of its shard: nonzero whatever the checksum."""


INDEX_CHECKSUMS = "chunk_crc32"
"""Attribute of each index array: the CRC-32 of every chunk's values (``values_checksum``), taken when written."""
PENDING_CHECKSUMS = "chunk_crc32_before"
"""Attribute set only while the one marking process rewrites index chunks: ``{chunk: CRC-32 before}``, so that a
process killed between a chunk and its checksum leaves a chunk that still matches one of the two."""


def shard_checksum(data: np.ndarray) -> int:
    """CRC-32 of a shard's values as stored (little-endian bytes, C order).

    Args:
        data: the shard's rows, e.g. (n, C, h, w) float16.

    Returns:
        An int in [0, 2**32).
    """
    array = np.ascontiguousarray(data)
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)  # a no-op on little-endian machines
    return zlib.crc32(memoryview(array).cast("B")) & 0xFFFFFFFF  # no copy of the shard


def marker_value(data: np.ndarray) -> int:
    """The completion marker to store for a shard: MARKER_DONE + the CRC-32 of its values."""
    return marker_from_checksum(shard_checksum(data))


def marker_from_checksum(checksum: int) -> int:
    """``marker_value`` from a CRC-32 the writer already has (chained over the rows as they were computed)."""
    return MARKER_DONE + (int(checksum) & 0xFFFFFFFF)


def marker_checksum(value: int) -> int | None:
    """The CRC-32 a marker records, or None for an unset marker."""
    value = int(value)
    return value - MARKER_DONE if value >= MARKER_DONE else None


def object_path(array: zarr.Array, index: int) -> str | None:
    """File of chunk (or shard) ``index`` along the first axis, or None for a store that is not a local folder."""
    root = getattr(array.store_path.store, "root", None)
    if root is None:
        return None
    key = array.metadata.encode_chunk_key((int(index),) + (0,) * (array.ndim - 1))
    return os.path.join(os.fspath(root), array.store_path.path, key)


def _layout(array: zarr.Array) -> tuple[int, int, int, int | None, bool]:
    """(rows per object, rows per inner chunk, bytes per inner chunk, index bytes or None, fixed size).

    ``fixed size`` is False for variable-length strings, whose objects only have a minimum size.
    """
    codec = array.metadata.codecs[0]
    outer = int(array.metadata.chunk_grid.chunk_shape[0])
    fixed = array.dtype.kind not in "OTU"  # T: numpy 2 variable-length strings
    if type(codec).__name__ == "ShardingCodec":
        inner_shape = tuple(int(n) for n in codec.chunk_shape)
        per_shard = int(np.prod([o // i for o, i in zip(array.metadata.chunk_grid.chunk_shape, inner_shape)]))
        crc = any(type(c).__name__ == "Crc32cCodec" for c in codec.index_codecs)
        inner_bytes = int(np.prod(inner_shape)) * array.dtype.itemsize
        return outer, inner_shape[0], inner_bytes, 16 * per_shard + (4 if crc else 0), fixed
    row_bytes = int(np.prod(array.metadata.chunk_grid.chunk_shape[1:])) * (array.dtype.itemsize if fixed else 0)
    return outer, outer, outer * row_bytes, None, fixed


def object_problems(array: zarr.Array, indexes: Iterable[int]) -> dict[int, str]:
    """Objects (shards of a sharded array, chunks otherwise) along the first axis that are missing or short.

    Args:
        array: an uncompressed array of a local cache, chunked or sharded along its first axis only.
        indexes: which objects must hold data (e.g. the shards whose markers are set). Every object
            was written with ``WRITE_CONFIG``, so each must exist with its exact size.

    Returns:
        ``{index: why}`` for each bad object, e.g. ``{3: "missing"}``, ``{5: "778 bytes, expected 1556"}``.
    """
    problems: dict[int, str] = {}
    rows_per_object, inner_rows, inner_bytes, index_bytes, fixed = _layout(array)
    rows = int(array.shape[0])
    for index in indexes:
        path = object_path(array, index)
        if path is None:
            return {}
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            problems[int(index)] = "missing"
            continue
        stored_rows = min(rows_per_object, rows - index * rows_per_object)
        if index_bytes is not None:  # a shard: its in-bounds inner chunks, then its index
            full = -(-stored_rows // inner_rows) * inner_bytes + index_bytes
            ok, expected = size == full, f"{full}"
        elif fixed:
            ok, expected = size == inner_bytes, f"{inner_bytes}"
        else:  # variable-length strings: a count, then one length per row
            floor = 4 + 4 * rows_per_object
            ok, expected = size >= floor, f"at least {floor}"
        if not ok:
            problems[int(index)] = f"{size} bytes, expected {expected}" if size else "empty (0 bytes)"
    return problems


def remove_objects(array: zarr.Array, indexes: Iterable[int]) -> None:
    """Delete damaged objects so that rewriting them does not first read (and choke on) their remains."""
    for index in indexes:
        path = object_path(array, index)
        if path is not None and os.path.lexists(path):
            os.remove(path)


_FINITE_BLOCK = 1 << 18


def all_finite(data: np.ndarray) -> bool:
    """Whether an array holds no Inf or NaN.

    float16 (every cache array) is checked by its bits, 256K values at a time through one small
    buffer: a value is Inf or NaN when its exponent bits are all set (``abs bits >= 0x7C00``). About
    16 GB/s on one core here, against 1.5 GB/s for reading a shard from disk and 1.4 GB/s for
    ``np.isfinite`` on float16; other dtypes go through ``np.isfinite``.
    """
    data = np.asarray(data)
    if data.dtype != np.float16:
        return bool(np.isfinite(data).all()) if data.dtype.kind == "f" else True
    bits = np.ascontiguousarray(data).reshape(-1).view(np.uint16)
    scratch = np.empty(min(_FINITE_BLOCK, bits.size), dtype=np.uint16)
    for start in range(0, bits.size, _FINITE_BLOCK):
        part = bits[start:start + _FINITE_BLOCK]
        masked = scratch[:part.size]
        np.bitwise_and(part, 0x7FFF, out=masked)
        if masked.max() >= 0x7C00:
            return False
    return True


def values_checksum(values: np.ndarray) -> int:
    """CRC-32 of an index chunk's values: numbers as little-endian bytes, strings as UTF-8 joined by NUL.

    The same for the values whatever dtype they were read back as (numpy ``U``, ``StringDType`` or objects).
    """
    values = np.asarray(values)
    if values.dtype.kind in "OTU":
        text = "\0".join(str(v) for v in values.tolist()) if values.dtype.kind == "O" else "\0".join(values.tolist())
        head = zlib.crc32(int(values.shape[0]).to_bytes(8, "little"))
        return zlib.crc32(text.encode("utf-8", "surrogatepass"), head) & 0xFFFFFFFF
    return shard_checksum(values)


def index_checksums(values: np.ndarray, rows_per_chunk: int) -> list[int]:
    """``values_checksum`` of every chunk of a 1-D index array's values (``rows_per_chunk`` rows each)."""
    return [values_checksum(values[lo:lo + rows_per_chunk]) for lo in range(0, int(values.shape[0]), rows_per_chunk)]


def index_checksum_problems(array: zarr.Array, values: np.ndarray, skip: Iterable[int] = ()) -> dict[int, str]:
    """Chunks of an index array whose values (as read, ``values``) do not match the checksums recorded for them.

    Returns ``{}`` when the array records none (a cache written before they were): nothing to compare.
    Chunks in ``skip`` (already known bad) are not compared.
    """
    recorded = array.attrs.get(INDEX_CHECKSUMS)
    rows = int(array.metadata.chunk_grid.chunk_shape[0])
    count = -(-int(array.shape[0]) // rows)
    if not isinstance(recorded, list) or len(recorded) != count:
        return {}
    before = array.attrs.get(PENDING_CHECKSUMS) or {}
    skip = set(skip)
    problems = {}
    for chunk in range(count):
        if chunk in skip:
            continue
        found = values_checksum(values[chunk * rows:(chunk + 1) * rows])
        if found != recorded[chunk] and found != before.get(str(chunk)):
            problems[chunk] = "checksum mismatch (the values changed after they were written)"
    return problems


def marker_problem(array: zarr.Array) -> str | None:
    """Why the one object of a completion-marker array is damaged (e.g. ``20 bytes, expected 32``), else None.

    A missing object is sound: every marker unset (Zarr stores no all-zero chunk of a marker array).
    """
    path = object_path(array, 0)
    if path is None or not os.path.exists(path):
        return None
    size = os.stat(path).st_size
    expected = int(array.shape[0]) * array.dtype.itemsize
    return None if size == expected else (f"{size} bytes, expected {expected}" if size else "empty (0 bytes)")
