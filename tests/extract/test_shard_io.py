"""Whole-shard file I/O: the bytes Zarr itself writes, read back by Zarr and by the fast path alike, Zarr kept for the rest."""

import os

import numpy as np
import pytest
import zarr

from extract.cache.integrity import WRITE_CONFIG, object_path, object_problems
from extract.cache.shard_io import read_shard_object, write_shard_object

ROWS, SHARD, INNER, SHAPE = 23, 8, 4, (3, 2, 2)  # 3 shards, the last one of 7 rows: one padded inner chunk


def _array(root, name, rows=ROWS, **extra):
    group = zarr.open_group(root, mode="a", zarr_format=3)
    kwargs = dict(chunks=(INNER, *SHAPE), shards=(SHARD, *SHAPE), compressors=None)
    kwargs.update(extra)
    return group.create_array(name, shape=(rows, *SHAPE), dtype="float16", fill_value=0, **kwargs).with_config(WRITE_CONFIG)


def _data(rows=ROWS):
    return np.random.default_rng(0).standard_normal((rows, *SHAPE)).astype(np.float16)


@pytest.mark.parametrize("rows", [ROWS, 20, 17])  # last shard of 7 rows (padded inner chunk), 4 rows (one whole), 1 row
def test_written_objects_are_byte_for_byte_zarrs(tmp_path, rows):
    data = _data(rows)
    by_zarr, fast = _array(tmp_path, "zarr", rows), _array(tmp_path, "fast", rows)
    for shard in range(-(-rows // SHARD)):
        lo, hi = shard * SHARD, min((shard + 1) * SHARD, rows)
        by_zarr[lo:hi] = data[lo:hi]
        assert write_shard_object(fast, shard, data[lo:hi])
    for shard in range(-(-rows // SHARD)):
        with open(object_path(by_zarr, shard), "rb") as a, open(object_path(fast, shard), "rb") as b:
            assert a.read() == b.read(), f"shard {shard}"
    reopened = zarr.open_array(os.path.join(tmp_path, "fast"), mode="r")
    np.testing.assert_array_equal(reopened[:], data)
    assert object_problems(fast, range(-(-rows // SHARD))) == {}
    assert not [f for f in os.listdir(os.path.dirname(object_path(fast, 0))) if f.endswith(".partial")]


def test_reads_give_what_zarr_reads(tmp_path):
    data = _data()
    array = _array(tmp_path, "a")
    array[:] = data  # written by Zarr, read by the fast path
    for shard in range(3):
        lo, hi = shard * SHARD, min((shard + 1) * SHARD, ROWS)
        out = np.full((hi - lo, *SHAPE), np.nan, dtype=np.float16)
        assert read_shard_object(array, shard, out)
        np.testing.assert_array_equal(out, data[lo:hi])


def test_anything_unusual_goes_through_zarr(tmp_path):
    data = _data()
    compressed = _array(tmp_path, "compressed", compressors=zarr.codecs.ZstdCodec())
    assert not write_shard_object(compressed, 0, data[:SHARD])
    compressed[:SHARD] = data[:SHARD]
    assert not read_shard_object(compressed, 0, np.empty((SHARD, *SHAPE), np.float16))
    plain = zarr.open_group(tmp_path, mode="a").create_array(
        "plain", shape=(ROWS, *SHAPE), dtype="float16", chunks=(SHARD, *SHAPE), compressors=None)
    assert not write_shard_object(plain, 0, data[:SHARD])
    array = _array(tmp_path, "a")
    assert not write_shard_object(array, 0, data[:SHARD - 1]), "a partial shard is Zarr's"
    out = np.empty((SHARD, *SHAPE), np.float16)
    assert not read_shard_object(array, 0, out), "a missing object reads as fill values through Zarr"
    assert write_shard_object(array, 0, data[:SHARD])
    path = object_path(array, 0)
    raw = bytearray(open(path, "rb").read())
    raw[-10] ^= 0xFF  # the index no longer matches its CRC-32C: Zarr raises, the caller names the damage
    open(path, "wb").write(bytes(raw))
    assert not read_shard_object(array, 0, out)
    with pytest.raises(ValueError, match="checksum"):
        array[:SHARD]
    open(path, "wb").write(bytes(raw[:100]))  # short
    assert not read_shard_object(array, 0, out)


def test_a_valid_index_of_another_layout_is_followed(tmp_path):
    """The front-to-back read is only for the layout diffrep writes; any other valid index is read by its entries."""
    import google_crc32c  # the shard index's CRC-32C, as Zarr's codec writes it (little-endian)

    data = _data()
    array = _array(tmp_path, "a")
    assert write_shard_object(array, 0, data[:SHARD])
    path = object_path(array, 0)
    raw = open(path, "rb").read()
    piece = INNER * int(np.prod(SHAPE)) * 2
    index = np.array([[piece, piece], [0, piece]], dtype="<u8").tobytes()  # the two inner chunks stored swapped
    open(path, "wb").write(raw[piece:2 * piece] + raw[:piece] + index + google_crc32c.value(index).to_bytes(4, "little"))
    out = np.empty((SHARD, *SHAPE), np.float16)
    assert read_shard_object(array, 0, out)
    np.testing.assert_array_equal(out, data[:SHARD])
    np.testing.assert_array_equal(array[:SHARD], data[:SHARD])  # Zarr reads the same


def test_block_reservation_is_only_a_hint(tmp_path, monkeypatch):
    """Where the file system refuses fallocate (or libc has none) the shard is written all the same."""
    from extract.cache import shard_io
    calls = []
    monkeypatch.setattr(shard_io, "_FALLOCATE", lambda fd, mode, offset, size: calls.append((mode, size)) or -1)
    data = _data()
    refused, plain = _array(tmp_path, "refused"), _array(tmp_path, "plain")
    assert write_shard_object(refused, 0, data[:SHARD])
    monkeypatch.setattr(shard_io, "_FALLOCATE", None)
    assert write_shard_object(plain, 0, data[:SHARD])
    with open(object_path(refused, 0), "rb") as a, open(object_path(plain, 0), "rb") as b:
        written = a.read()
        assert written == b.read()
    assert calls == [(1, len(written))]  # asked for exactly the object's size, the size left to the writes
