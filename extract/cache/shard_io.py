"""Whole-shard reads and writes of the cache's feature arrays straight between the caller's numpy array and the file.

Zarr (3.1) writes an uncompressed shard by encoding every inner chunk into a new buffer and
concatenating them, and reads one by decoding each inner chunk into a new buffer before copying
it into the result: for float16 features that are only copied, those passes cost more than the
disk (``make bench``: b24 wrote at a third of the raw file speed and read at a fifth). A whole
shard of an uncompressed array on a local disk is simple: its inner chunks back to back (the
last one padded with the fill value), then Zarr's index, ``(offset, nbytes)`` as little-endian
uint64 per inner chunk followed by the CRC-32C of those bytes. These functions write exactly
those bytes (a test compares them with Zarr's own), atomically through a temporary file as
Zarr's local store does, and read a shard with one ``readinto`` per inner chunk. The cache stays
plain Zarr v3. Anything else (a compressed or otherwise encoded array, an index at the start,
a store that is not a local folder, a partial shard) returns False and goes through Zarr.
"""

from __future__ import annotations

import ctypes
import os
import sys
import uuid

import numpy as np
import zarr

from extract.cache.integrity import object_path

__all__ = ["write_shard_object", "read_shard_object"]

_EMPTY = np.uint64(2**64 - 1)


def _layout(array: zarr.Array) -> tuple[int, int, int] | None:
    """(rows per shard, rows per inner chunk, bytes per row) of a sharded array this module can handle, else None."""
    codecs = array.metadata.codecs
    if len(codecs) != 1 or type(codecs[0]).__name__ != "ShardingCodec":
        return None
    sharding = codecs[0]
    if getattr(sharding.index_location, "value", None) != "end":
        return None
    if [type(c).__name__ for c in sharding.index_codecs] != ["BytesCodec", "Crc32cCodec"]:
        return None
    inner_codecs = list(sharding.codecs)
    if len(inner_codecs) != 1 or type(inner_codecs[0]).__name__ != "BytesCodec":
        return None
    dtype = np.dtype(array.dtype)
    if dtype.kind not in "fiub" or (dtype.itemsize > 1 and getattr(inner_codecs[0].endian, "value", "little") != "little"):
        return None
    shard_shape = tuple(int(n) for n in array.metadata.chunk_grid.chunk_shape)
    inner_shape = tuple(int(n) for n in sharding.chunk_shape)
    if shard_shape[1:] != tuple(array.shape[1:]) or inner_shape[1:] != tuple(array.shape[1:]):
        return None  # split along the image axis only
    if shard_shape[0] % inner_shape[0]:
        return None
    return shard_shape[0], inner_shape[0], int(np.prod(array.shape[1:], dtype=np.int64)) * dtype.itemsize


def _crc32c(data: bytes) -> bytes:
    import google_crc32c  # Zarr's own dependency for its crc32c codec

    return np.uint32(google_crc32c.value(data)).astype("<u4").tobytes()


def _place(array: zarr.Array, shard: int):
    """(file, (shard rows, inner rows, bytes per row), rows of this shard), or None where Zarr must do it."""
    layout = _layout(array)
    path = object_path(array, shard) if layout is not None else None
    if path is None:
        return None
    shard_rows = layout[0]
    return path, layout, min(shard_rows, int(array.shape[0]) - shard * shard_rows)


def write_shard_object(array: zarr.Array, shard: int, data: np.ndarray) -> bool:
    """Write all rows of shard ``shard`` as Zarr would, without its copies; False when Zarr must do it.

    Args:
        array: a cache array (uncompressed, sharded along the image axis, in a local folder).
        shard: shard number. data: its rows, ``(stop - start, *array.shape[1:])`` of the array's dtype.
    """
    place = _place(array, shard)
    if place is None:
        return False
    path, (shard_rows, inner_rows, row_bytes), rows = place
    dtype = np.dtype(array.dtype).newbyteorder("<")
    if rows <= 0 or tuple(data.shape) != (rows, *array.shape[1:]):
        return False
    data = np.ascontiguousarray(data, dtype=dtype)
    count = shard_rows // inner_rows
    index = np.full((count, 2), _EMPTY, dtype="<u8")
    pieces = []
    offset = 0
    for j in range(count):
        lo = j * inner_rows
        if lo >= rows:
            break  # wholly past the last row: not stored
        piece = data[lo:lo + inner_rows]
        if piece.shape[0] < inner_rows:  # the edge chunk is stored whole, padded with the fill value
            padded = np.full((inner_rows, *array.shape[1:]), array.fill_value, dtype=dtype)
            padded[: piece.shape[0]] = piece
            piece = padded
        pieces.append(memoryview(piece).cast("B"))
        index[j] = (offset, inner_rows * row_bytes)
        offset += inner_rows * row_bytes
    index_bytes = index.tobytes()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{uuid.uuid4().hex}.partial"
    try:
        with open(partial, "wb", buffering=0) as handle:  # unbuffered: the pieces go to the kernel without a copy
            _reserve(handle.fileno(), offset + len(index_bytes) + 4)
            for piece in (*pieces, memoryview(index_bytes), memoryview(_crc32c(index_bytes))):
                _write_all(handle, piece)
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    return True


def _fallocate():
    """libc's ``fallocate`` (Linux), or None: Python only offers ``posix_fallocate``, which writes zeros where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    function.restype = ctypes.c_int
    return function


_FALLOCATE = _fallocate() if sys.platform.startswith("linux") else None
_KEEP_SIZE = 1  # FALLOC_FL_KEEP_SIZE: reserve the blocks, leave the size to the writes


def _reserve(fd: int, nbytes: int) -> None:
    """Reserve a new file's blocks before writing it (as numpy's ``tofile`` does).

    Allocating the extents once up front, instead of block by block as the writes land, made a
    134 MB shard write into the page cache about 25% faster here (ext4). A file system without
    it (the call fails) is simply written as before.
    """
    if _FALLOCATE is not None and nbytes > 0:
        _FALLOCATE(fd, _KEEP_SIZE, 0, nbytes)  # best effort: the return value only says whether it helped


def _write_all(handle, view: memoryview) -> None:
    """``handle.write`` until every byte is written (a raw file may take fewer at a time)."""
    view = view.cast("B") if view.format != "B" else view
    done = 0
    while done < len(view):
        done += handle.write(view[done:])


def _read_exactly(handle, view: memoryview, offset: int) -> bool:
    handle.seek(offset)
    done = 0
    while done < len(view):
        got = handle.readinto(view[done:])
        if not got:
            return False
        done += got
    return True


def read_shard_object(array: zarr.Array, shard: int, out: np.ndarray) -> bool:
    """Read all rows of shard ``shard`` into ``out``; False (``out`` undefined) when Zarr must read it.

    False also for a missing shard object, an index that fails its CRC-32C or points outside the
    object, or a short object, so that Zarr's reading (fill values, or its error) stays the one
    behaviour callers see for those.

    Args:
        array: a cache array. shard: shard number. out: C-contiguous ``(rows, *array.shape[1:])`` of the array's dtype.
    """
    place = _place(array, shard)
    if place is None:
        return False
    path, (shard_rows, inner_rows, row_bytes), rows = place
    if (rows <= 0 or tuple(out.shape) != (rows, *array.shape[1:]) or out.dtype != np.dtype(array.dtype)
            or not out.flags.c_contiguous):
        return False
    count = shard_rows // inner_rows
    index_size = 16 * count + 4
    view = memoryview(out.reshape(-1).view(np.uint8))
    try:
        handle = open(path, "rb", buffering=0)
    except FileNotFoundError:
        return False
    with handle:
        size = os.fstat(handle.fileno()).st_size
        if size < index_size:
            return False
        stored = min(count, -(-rows // inner_rows))
        inner_bytes = inner_rows * row_bytes
        if size == stored * inner_bytes + index_size and _read_exactly(handle, view[:rows * row_bytes], 0):
            # the layout write_shard_object makes: read front to back (the kernel reads ahead), then the index,
            # which must describe exactly that layout; anything else is read again by its index below
            raw = handle.read(index_size) if rows * row_bytes == size - index_size else None
            if raw is None:
                handle.seek(size - index_size)
                raw = handle.read(index_size)
            if len(raw) == index_size and _crc32c(raw[:-4]) == raw[-4:]:
                expected = np.full((count, 2), _EMPTY, dtype="<u8")
                expected[:stored, 0] = np.arange(stored, dtype="<u8") * inner_bytes
                expected[:stored, 1] = inner_bytes
                if np.array_equal(np.frombuffer(raw[:-4], dtype="<u8").reshape(count, 2), expected):
                    return True
        handle.seek(size - index_size)
        raw = handle.read(index_size)
        if len(raw) != index_size or _crc32c(raw[:-4]) != raw[-4:]:
            return False
        index = np.frombuffer(raw[:-4], dtype="<u8").reshape(count, 2)
        for j in range(count):
            lo = j * inner_rows
            if lo >= rows:
                break
            hi = min(lo + inner_rows, rows)
            start, length = index[j]
            if start == _EMPTY:
                out[lo:hi] = array.fill_value
                continue
            if int(length) != inner_rows * row_bytes or int(start) + int(length) > size - index_size:
                return False
            if not _read_exactly(handle, view[lo * row_bytes: hi * row_bytes], int(start)):
                return False
    return True
