"""The Zarr cache: metadata first, whole-shard writes with markers, the reader's checks, plain-Zarr readability."""

import json
import os
import threading
import zlib

import numpy as np
import pytest
import zarr

import extract.cache.spec as cache_spec
from extract.cache import (
    CacheSpec, FeatureCache, MarkWriter, ShardMarks, cache_path, count_objects, create_cache, open_cache,
    record_run, reset_shards, write_shard_data,
)
from extract.backbone.identity import backbone_id
from extract.errors import CacheError, CacheIncompleteError, CacheMismatchError
from tests.extract.shard_writes import write_and_mark

N, SHARD = 10, 4
SHAPES = {(4, 90): (3, 8, 8), (12, 90): (5, 2, 2), (12, 300): (5, 2, 2)}
NATIVE = {4: 16, 12: 2}


def _spec(**overrides):
    fields = dict(
        dataset="toy", split="train", backbone_id=backbone_id("32x32_small", weight_seed=0),
        config_name="32x32_small", config_flags={"image_size": 32, "channel_mult": "1,2,2"}, weight_seed=0,
        image_size=32, num_images=N, shard_size=SHARD, pool=8,
    )
    return CacheSpec(**{**fields, **overrides})


def _data(b, t, start, stop, view=0):
    c, h, w = SHAPES[(b, t)]
    rows = np.arange(start, stop, dtype=np.float32).reshape(-1, 1, 1, 1)
    return (rows + b / 100 + t / 1000 + view / 10 + np.zeros((1, c, h, w), np.float32)).astype(np.float16)


def _create(root, spec=None, arrays=SHAPES):
    spec = spec or _spec()
    paths = [f"/data/toy/train/c{i % 3}/{i:04d}.jpg" for i in range(N)]
    return create_cache(root, spec, paths, np.arange(N) % 3, ["c0", "c1", "c2"], arrays=arrays, native_sizes=NATIVE)


def _fill(cache, arrays=SHAPES, views=(0,)):
    for shard in range(cache.num_shards):
        start, stop = cache.shard_bounds(shard)
        for view in views:
            write_and_mark(cache.path, shard, {key: _data(*key, start, stop, view) for key in arrays}, view=view)


def test_layout_index_and_roundtrip(tmp_path):
    cache = _create(tmp_path)
    assert cache.path == cache_path(tmp_path, "toy", "train", "32x32_small-random0")
    assert cache.path.endswith(os.path.join("toy", "train", "32x32_small-random0"))
    assert cache.num_shards == 3 and cache.shard_bounds(2) == (8, 10)
    _fill(cache)
    cache = open_cache(tmp_path, "toy", "train", "32x32_small-random0", expect=_spec())
    assert cache.arrays() == [(4, 90), (12, 90), (12, 300)]
    assert cache.shape(4, 90) == (N, 3, 8, 8)
    assert cache.labels.dtype == np.int64 and list(cache.labels) == [i % 3 for i in range(N)]
    assert cache.class_names == ["c0", "c1", "c2"] and cache.paths[3].endswith("c0/0003.jpg")
    assert cache.valid.all() and cache.spec == _spec()
    for key in SHAPES:
        assert cache.is_complete(*key)
        full = cache.load(*key)
        assert full.dtype == np.float16 and full.shape == (N, *SHAPES[key])
        np.testing.assert_array_equal(full, _data(*key, 0, N))
        pieces = list(cache.iter_shards(*key))
        assert [(a, b) for a, b, _ in pieces] == [(0, 4), (4, 8), (8, 10)]
        np.testing.assert_array_equal(np.concatenate([x for _, _, x in pieces]), full)


def test_coarser_pool_at_read_time_and_finer_refused(tmp_path):
    cache = _create(tmp_path)
    _fill(cache)
    assert cache.load(4, 90, pool=2).shape == (N, 3, 2, 2)
    assert cache.shape(4, 90, pool=2) == (N, 3, 2, 2)
    np.testing.assert_allclose(cache.load(4, 90, pool=1)[:, :, 0, 0], cache.load(4, 90)[:, :, 0, 0])
    assert cache.load(12, 90, pool=16).shape == (N, 5, 2, 2), "pool above the native size is the native map"
    with pytest.raises(CacheError, match="needs 16x16 maps but the cache stores 8x8"):
        cache.load(4, 90, pool=16)


def test_plain_zarr_and_dask_read_the_cache(tmp_path):
    cache = _create(tmp_path)
    _fill(cache)
    group = zarr.open_group(cache.path, mode="r")
    np.testing.assert_array_equal(group["b4/t90"][:], _data(4, 90, 0, N))
    assert group["b4/t90"].metadata.dimension_names == ("image", "channel", "y", "x")
    assert group.attrs["diffrep"]["spec"]["noise_seed"] == 0
    assert list(group["index/label"][:]) == [i % 3 for i in range(N)]
    import dask.array as da

    lazy = da.from_zarr(cache.path, component="b12/t300")
    np.testing.assert_array_equal(lazy.mean(axis=(2, 3)).compute(), _data(12, 300, 0, N).mean(axis=(2, 3)))


def test_xarray_opens_a_block_group_as_a_dataset(tmp_path):
    xr = pytest.importorskip("xarray")
    cache = _create(tmp_path)
    _fill(cache)
    block = xr.open_zarr(cache.path, group="b4", consolidated=False, zarr_format=3)
    assert block["t90"].dims == ("image", "channel", "y", "x")
    np.testing.assert_array_equal(block["t90"].values, _data(4, 90, 0, N))
    labels = xr.open_zarr(cache.path, group="index", consolidated=False, zarr_format=3)["label"].values
    assert list(labels) == [i % 3 for i in range(N)]


def test_incomplete_and_missing_arrays_are_named(tmp_path):
    cache = _create(tmp_path)
    write_and_mark(cache.path, 1, {(4, 90): _data(4, 90, 4, 8)})
    assert not cache.is_complete(4, 90) and cache.missing_shards(4, 90) == [0, 2]
    with pytest.raises(CacheIncompleteError, match=r"^array b4/t90 of .* is missing 2 of 3 shards: run the diffrep extract "
                                                   r"command that wrote this cache again with --blocks 4 --timesteps 90") as info:
        cache.load(4, 90)
    assert (info.value.spec, info.value.arrays) == (cache.spec, ((4, 90),))  # the CLI prints the exact command from these
    with pytest.raises(CacheIncompleteError):
        next(cache.iter_shards(4, 90))
    partial = cache.load(4, 90, allow_incomplete=True)
    np.testing.assert_array_equal(partial[4:8], _data(4, 90, 4, 8))
    assert not partial[:4].any()
    with pytest.raises(CacheIncompleteError, match=r"^cache .* has no array b30/t300: run the diffrep extract command "
                                                   r"that wrote this cache again with --blocks 30 --timesteps 300"):
        cache.load(30, 300)
    with pytest.raises(CacheError, match="no flipped view"):
        cache.load(4, 90, view=1)


def test_ram_cap_points_to_streaming(tmp_path):
    _fill(_create(tmp_path))
    cache = open_cache(tmp_path, "toy", "train", "32x32_small-random0", ram_cap_bytes=100)
    with pytest.raises(CacheError, match="over the .* cap: stream it with iter_shards"):
        cache.load(4, 90)
    assert sum(x.shape[0] for _, _, x in cache.iter_shards(4, 90)) == N


@pytest.mark.parametrize("field,value,message", [
    ("noise_seed", 1, "cache was written with noise_seed=0, asked for 1: pass --noise-seed 0 or use a new --cache-dir"),
    ("precision", "bf16", "cache was written with precision=fp32, asked for bf16: pass --precision fp32 or use a new --cache-dir"),
    ("flip", True, "cache was written with flip=False, asked for True: leave out --flip or use a new --cache-dir"),
])
def test_reader_refuses_other_settings(tmp_path, field, value, message):
    _create(tmp_path)
    with pytest.raises(CacheMismatchError) as info:
        open_cache(tmp_path, "toy", "train", "32x32_small-random0", expect=_spec(**{field: value}))
    assert str(info.value) == message
    open_cache(tmp_path, "toy", "train", "32x32_small-random0", expect=_spec(pool=4, shard_size=2))


def test_no_cache_there(tmp_path):
    with pytest.raises(CacheError, match="no feature cache at .*: run diffrep extract --dataset toy --split train"):
        open_cache(tmp_path, "toy", "train", "32x32_small-random0")


def test_reopen_adds_arrays_and_refuses_other_writers(tmp_path):
    cache = _create(tmp_path)
    _fill(cache)
    before = cache.load(4, 90)
    cache = _create(tmp_path, arrays={**SHAPES, (19, 90): (2, 4, 4)})
    assert (19, 90) in cache.arrays() and not cache.is_complete(19, 90)
    np.testing.assert_array_equal(cache.load(4, 90), before)
    with pytest.raises(CacheMismatchError, match="pool=8, asked for 4: pass --pool 8"):
        _create(tmp_path, spec=_spec(pool=4))
    with pytest.raises(CacheMismatchError, match="indexes other images"):
        create_cache(tmp_path, _spec(), [f"/x/{i}.jpg" for i in range(N)], np.zeros(N), ["c0"], arrays=SHAPES)


def test_concurrent_writers_of_distinct_shards_lose_nothing(tmp_path):
    cache = _create(tmp_path)
    values = {}
    threads = [threading.Thread(target=lambda s=s: values.__setitem__(s, write_shard_data(cache.path, s, {
        key: _data(*key, *cache.shard_bounds(s)) for key in SHAPES}))) for s in range(cache.num_shards)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.missing_shards(4, 90) == [0, 1, 2], "workers write data only: unmarked until the orchestrator marks"
    MarkWriter(cache.path).mark(
        [ShardMarks(s, {(b, t, 0): v for (b, t), v in values[s].items()}) for s in (2, 0, 1)])
    for key in SHAPES:
        np.testing.assert_array_equal(cache.load(*key), _data(*key, 0, N))
    assert os.listdir(os.path.join(cache.path, "done", "b4", "t90", "c")) == ["0"], "one marker object per array"


def test_flipped_view_and_invalid_rows(tmp_path):
    cache = _create(tmp_path, spec=_spec(flip=True))
    _fill(cache, views=(0, 1))
    assert cache.is_complete(4, 90)
    np.testing.assert_array_equal(cache.load(4, 90, view=1), _data(4, 90, 0, N, view=1))
    write_and_mark(cache.path, 0, {(4, 90): _data(4, 90, 0, 4)}, invalid={1: "OSError: truncated"})
    record_run(cache.path, {1: (cache.paths[1], "OSError: truncated")}, {"images": 4})
    cache = open_cache(tmp_path, "toy", "train", "32x32_small-random0")
    assert list(np.flatnonzero(~cache.valid)) == [1] and cache.errors[1] == "OSError: truncated"
    attrs = zarr.open_group(cache.path).attrs
    assert attrs["invalid_images"] == [{"index": 1, "path": cache.paths[1], "reason": "OSError: truncated"}]
    assert attrs["runs"][-1]["images"] == 4 and cache.runs == attrs["runs"]


# -- a marker is not proof: lost objects are found, named, and redone ------------------------

def _shard_file(cache, name, shard):
    return os.path.join(cache.path, name, "c", str(shard), "0", "0", "0")


def _full_shard_bytes(rows=SHARD, c=3, h=8, w=8, inner_chunks=1):
    """An uncompressed shard of b4/t90: its rows' float16 values, then 16 index bytes per inner chunk and a CRC-32C."""
    return rows * c * h * w * 2 + 16 * inner_chunks + 4


@pytest.mark.parametrize("tamper,why", [
    ("delete", "missing"),
    ("empty", "empty (0 bytes)"),
    ("half", f"{_full_shard_bytes() // 2} bytes, expected {_full_shard_bytes()}"),
])
def test_a_marked_shard_whose_object_is_lost_is_not_complete(tmp_path, tamper, why):
    cache = _create(tmp_path)
    _fill(cache)
    target = _shard_file(cache, "b4/t90", 1)
    assert os.path.getsize(target) == _full_shard_bytes(), "the layout this check relies on"
    if tamper == "delete":
        os.remove(target)
    else:
        with open(target, "r+b") as handle:
            handle.truncate(0 if tamper == "empty" else _full_shard_bytes() // 2)
    cache = open_cache(tmp_path, "toy", "train", "32x32_small-random0")
    assert cache.damaged_shards(4, 90) == {1: why}
    assert cache.missing_shards(4, 90) == [1] and not cache.is_complete(4, 90)
    assert cache.is_complete(12, 90), "other arrays are untouched"
    message = (f"array b4/t90 of {cache.path} has 1 damaged shard(s) 1 (data object {why}): "
               "run the same diffrep extract command again: it re-runs exactly those shards")
    with pytest.raises(CacheIncompleteError) as info:
        cache.load(4, 90)
    assert str(info.value) == message
    with pytest.raises(CacheIncompleteError, match="damaged shard"):
        next(cache.iter_shards(4, 90))
    partial = cache.load(4, 90, allow_incomplete=True)
    np.testing.assert_array_equal(partial[:4], _data(4, 90, 0, 4))
    assert not partial[4:8].any(), "a lost shard reads as zeros only when asked for"
    reset_shards(cache.path, {(4, 90, 0): [1]})
    assert not os.path.exists(target) and cache.damaged_shards(4, 90) == {} and cache.missing_shards(4, 90) == [1]
    write_and_mark(cache.path, 1, {(4, 90): _data(4, 90, 4, 8)})
    np.testing.assert_array_equal(cache.load(4, 90), _data(4, 90, 0, N))


def test_the_last_shard_and_all_zero_shards_are_stored_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_spec, "INDEX_CHUNK_ROWS", SHARD)  # one index chunk per shard
    cache = _create(tmp_path)
    _fill(cache)
    zeros = np.zeros((2, 3, 8, 8), np.float16)  # e.g. two images that could not be decoded
    write_and_mark(cache.path, 2, {(4, 90): zeros}, invalid={8: "bad", 9: "bad"})
    assert os.path.getsize(_shard_file(cache, "b4/t90", 2)) == _full_shard_bytes(), "zeros are stored, not skipped"
    assert os.path.getsize(os.path.join(cache.path, "index", "valid", "c", "2")) == SHARD
    assert cache.damaged_shards(4, 90) == {} and cache.index_damage() == {}
    np.testing.assert_array_equal(cache.load(4, 90)[8:], zeros)


def test_lost_index_chunks_are_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_spec, "INDEX_CHUNK_ROWS", SHARD)  # one index chunk per shard
    cache = _create(tmp_path)
    _fill(cache)
    for chunk in range(3):
        os.remove(os.path.join(cache.path, "index", "label", "c", str(chunk)))
    with open(os.path.join(cache.path, "index", "valid", "c", "1"), "r+b") as handle:
        handle.truncate(1)
    cache = open_cache(tmp_path, "toy", "train", "32x32_small-random0")
    assert cache.index_damage() == {"label": {0: "missing", 1: "missing", 2: "missing"}, "valid": {1: "1 bytes, expected 4"}}
    with pytest.raises(CacheError, match=r"^index/label of cache .* has damaged chunks 0, 1, 2 \(missing\): "
                                         r"run the same diffrep extract command again: it rewrites them$"):
        cache.labels
    with pytest.raises(CacheError, match=r"index/valid of cache .* has damaged chunks 1 \(1 bytes, expected 4\)"):
        cache.valid
    assert cache.paths[0].endswith("c0/0000.jpg"), "sound index arrays still read"


def test_reopening_with_the_same_index_rewrites_lost_label_and_path_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_spec, "INDEX_CHUNK_ROWS", SHARD)  # one index chunk per shard
    cache = _create(tmp_path)
    _fill(cache)
    os.remove(os.path.join(cache.path, "index", "label", "c", "0"))
    with open(os.path.join(cache.path, "index", "path", "c", "2"), "r+b") as handle:
        handle.truncate(3)
    cache = _create(tmp_path)
    assert cache.index_damage() == {}
    assert list(cache.labels) == [i % 3 for i in range(N)] and cache.paths[9].endswith("c0/0009.jpg")
    os.remove(os.path.join(cache.path, "index", "label", "c", "1"))
    with pytest.raises(CacheMismatchError, match="indexes other images"):  # the sound chunks still have to match
        create_cache(tmp_path, _spec(), [f"/data/toy/train/c{i % 3}/{i:04d}.jpg" for i in range(N)],
                     (np.arange(N) + 1) % 3, ["c0", "c1", "c2"], arrays=SHAPES)
    assert os.path.exists(os.path.join(cache.path, "index", "label", "c", "1")) is False, "nothing written on a mismatch"


def test_markers_carry_the_crc32_of_their_shard_and_verify_finds_flipped_bits(tmp_path):
    cache = _create(tmp_path)
    _fill(cache)
    markers = zarr.open_group(cache.path)["done/b4/t90"][:]
    expected = [zlib.crc32(_data(4, 90, *cache.shard_bounds(s)).astype("<f2").tobytes()) for s in range(3)]
    assert [int(m) - 2**32 for m in markers] == expected
    assert cache.verify_shards(4, 90) == {} and cache.verify_index() == {}
    target = _shard_file(cache, "b4/t90", 2)
    with open(target, "r+b") as handle:  # one byte of shard 2's values; size and zarr's index stay valid
        handle.seek(10)
        byte = handle.read(1)
        handle.seek(10)
        handle.write(bytes([byte[0] ^ 0x40]))
    assert cache.damaged_shards(4, 90) == {}, "the cheap check cannot see this"
    assert cache.verify_shards(4, 90) == {2: "checksum mismatch (the data changed after it was written)"}
    with open(target, "r+b") as handle:  # now the shard index at the end: zarr's own CRC-32C fails
        handle.seek(-2, os.SEEK_END)
        handle.write(b"\xff\xff")
    assert cache.verify_shards(4, 90)[2].startswith("cannot be decoded: ")
    with pytest.raises(CacheError, match=r"shard 2 of b4/t90 in .* cannot be decoded .*: run diffrep verify --cache-dir "
                                         r".* --dataset toy --split train --repair, then the same diffrep extract command"):
        cache.load(4, 90)


@pytest.mark.parametrize("node,fix", [
    ("", "it holds the cache's settings and cannot be rebuilt: restore it from a backup or extract into a new --cache-dir"),
    ("b4/t90", "delete the folders b4/t90 and done/b4/t90 of the cache and run the same diffrep extract command "
               "again: it writes that array again"),
    ("done/b4/t90", "delete the folders b4/t90 and done/b4/t90 of the cache and run the same diffrep extract "
                    "command again: it writes that array again"),
    ("b4", 'replace its content with {"zarr_format": 3, "node_type": "group", "attributes": {}}'),
    ("index/label", "the image index cannot be rebuilt in place: extract into a new --cache-dir"),
])
def test_garbage_metadata_is_named_with_its_fix(tmp_path, node, fix):
    cache = _create(tmp_path)
    _fill(cache)
    target = os.path.join(cache.path, node, "zarr.json")
    with open(target, "w") as handle:
        handle.write("{garbage")
    with pytest.raises(CacheError) as info:
        cache = open_cache(tmp_path, "toy", "train", "32x32_small-random0")
        cache.arrays(), cache.labels, cache.load(4, 90)
    assert str(info.value).startswith(f"cache metadata {os.path.normpath(target)} is damaged (not JSON: ")
    assert str(info.value).endswith(f"): {fix}")
    if not node:
        return  # a root that parses but holds no settings is "not a diffrep cache" (see test_no_cache_there)
    with open(target, "w") as handle:
        json.dump({"zarr_format": 3}, handle)
    with pytest.raises(CacheError, match=r"is damaged \(no zarr_format 3 / node_type\)"):
        cache = open_cache(tmp_path, "toy", "train", "32x32_small-random0")
        cache.arrays(), cache.labels, cache.load(4, 90)


# -- row order, object counts, provenance, other layouts --------------------------------

def _class_sorted(classes=100, per_class=20):
    labels = np.repeat(np.arange(classes), per_class)
    paths = [f"/data/big/train/n{label:03d}/{i:05d}.jpg" for i, label in enumerate(labels)]
    return paths, labels, [f"n{c:03d}" for c in range(classes)]


def test_rows_are_a_seeded_permutation_that_mixes_the_classes(tmp_path):
    paths, labels, names = _class_sorted()
    n = len(labels)
    spec = _spec(num_images=n, shard_size=50, row_order_seed=0)
    cache = create_cache(tmp_path, spec, paths, labels, names, arrays={(4, 90): (3, 8, 8)})
    ids = cache.image_ids
    assert sorted(ids) == list(range(n)) and list(ids) != list(range(n))
    assert list(cache.labels) == list(labels[ids]) and cache.paths == [paths[i] for i in ids]
    first_tenth = set(cache.labels[: n // 10])
    assert len(first_tenth) >= 90, f"the first 10% of rows cover only {len(first_tenth)} of 100 classes"
    first_shard = set(cache.labels[:50])
    assert len(first_shard) >= 30, "one shard already mixes many classes"
    assert len(set(labels[: n // 10])) == 10, "the index order this replaces: 10 classes in the first 10%"
    again = create_cache(tmp_path / "again", spec, paths, labels, names)
    np.testing.assert_array_equal(again.image_ids, ids)  # a pure function of (N, seed)
    other = create_cache(tmp_path / "other", _spec(num_images=n, shard_size=50, row_order_seed=1), paths, labels, names)
    assert list(other.image_ids) != list(ids)
    with pytest.raises(CacheMismatchError, match=r"row_order_seed=0, asked for 1: pass --order-seed 0 or use a new"):
        create_cache(tmp_path, _spec(num_images=n, shard_size=50, row_order_seed=1), paths, labels, names)
    open_cache(tmp_path, "toy", "train", spec.backbone_id, expect=_spec(num_images=n, shard_size=50))  # readers: any order


def _files_below(path):
    return sorted(os.path.relpath(os.path.join(folder, name), path) for folder, _, names in os.walk(path) for name in names)


@pytest.mark.parametrize("index_rows", [SHARD, 2 * SHARD, 1 << 18])
def test_the_object_count_is_the_files_on_disk(tmp_path, monkeypatch, index_rows):
    monkeypatch.setattr(cache_spec, "INDEX_CHUNK_ROWS", index_rows)
    spec = _spec(flip=True, row_order_seed=3)
    cache = _create(tmp_path, spec=spec)
    _fill(cache, views=(0, 1))
    files = _files_below(cache.path)
    counts = count_objects(spec, SHAPES)
    index_chunks = -(-N // min(index_rows, 3 * SHARD))  # chunks of whole shards, at most the whole index
    assert counts["data"] == 3 * 2 * 3 and counts["markers"] == 3 * 2 and counts["index"] == 5 * index_chunks
    assert sum(f.endswith("zarr.json") for f in files) == counts["metadata"]
    assert len([f for f in files if f.startswith("done")]) == counts["markers"] + (1 + 2 + 6)  # + zarr.json
    assert len(files) == counts["total"], files


@pytest.mark.parametrize("version", [1, 2, 4])
def test_other_formats_are_refused_in_one_line_naming_the_command(tmp_path, version):
    cache = _create(tmp_path)
    _fill(cache)
    group = zarr.open_group(cache.path, mode="r+")
    group.attrs["diffrep"] = {**group.attrs["diffrep"], "format_version": version}
    message = (f"cache at {cache.path} has format {version}, which this diffrep does not read (it reads format 3): "
               f"delete it and run diffrep extract --dataset toy --split train again, or extract into a new --cache-dir")
    for read in (lambda: open_cache(tmp_path, "toy", "train", cache.spec.backbone_id),  # probe, fusion
                 lambda: FeatureCache(cache.path),  # verify, the extraction plan
                 lambda: _create(tmp_path),  # extract (create_cache on the existing cache)
                 lambda: MarkWriter(cache.path),
                 lambda: reset_shards(cache.path, {(4, 90, 0): [1]})):
        with pytest.raises(CacheMismatchError) as info:
            read()
        assert str(info.value) == message
    assert os.path.exists(_shard_file(cache, "b4/t90", 1)), "nothing was reset"


def test_a_lost_validity_chunk_of_many_shards_reruns_all_of_them(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_spec, "INDEX_CHUNK_ROWS", 2 * SHARD)  # chunk 0 holds shards 0 and 1
    cache = _create(tmp_path)
    _fill(cache)
    assert cache.index_chunk_shards("valid", 0) == [0, 1] and cache.index_chunk_shards("valid", 1) == [2]
    os.remove(os.path.join(cache.path, "index", "valid", "c", "0"))
    cache = open_cache(tmp_path, "toy", "train", cache.spec.backbone_id)
    assert cache.index_damage() == {"valid": {0: "missing"}}
    reset_shards(cache.path, index_chunks={"valid": [0]})
    assert all(cache.missing_shards(*key) == [0, 1] for key in SHAPES), "their rows come back with their shards"
    write_and_mark(cache.path, 1, {key: _data(*key, 4, 8) for key in SHAPES}, invalid={6: "bad"})
    write_and_mark(cache.path, 0, {key: _data(*key, 0, 4) for key in SHAPES})
    cache = open_cache(tmp_path, "toy", "train", cache.spec.backbone_id)
    assert cache.index_damage() == {} and list(np.flatnonzero(~cache.valid)) == [6] and cache.errors[6] == "bad"
    assert all(cache.is_complete(*key) for key in SHAPES)


CPU = {"device": "cpu", "gpu": "", "precision": "fp32", "tf32": None}
H200 = {"device": "cuda", "gpu": "NVIDIA H200", "precision": "bf16", "tf32": {"matmul": False, "cudnn": True}}


def test_an_array_never_mixes_device_kinds_or_precisions(tmp_path):
    cache = _create(tmp_path)
    values = write_shard_data(cache.path, 0, {(4, 90): _data(4, 90, 0, 4)})
    writer = MarkWriter(cache.path)
    writer.mark([ShardMarks(0, {(4, 90, 0): values[(4, 90)]}, compute=H200)])
    assert open_cache(tmp_path, "toy", "train", cache.spec.backbone_id).compute(4, 90) == H200
    values = write_shard_data(cache.path, 1, {(4, 90): _data(4, 90, 4, 8)})
    for other in (CPU, {**H200, "precision": "fp32"}):
        with pytest.raises(CacheMismatchError) as info:
            MarkWriter(cache.path).mark([ShardMarks(1, {(4, 90, 0): values[(4, 90)]}, compute=other)])
        assert "\n" not in str(info.value) and str(info.value).startswith(
            "array b4/t90 was computed on cuda (NVIDIA H200, bf16, TF32 matmul off / cudnn on), this run computes on ")
        assert str(info.value).endswith(
            ": one array must not mix them; resume with --device cuda --precision bf16, or extract into a new --cache-dir")
    assert cache.missing_shards(4, 90) == [1, 2], "a refused shard stays unwritten"
    MarkWriter(cache.path).mark([ShardMarks(1, {(4, 90, 0): values[(4, 90)]}, compute={**H200, "gpu": "NVIDIA A100"})])
    assert cache.missing_shards(4, 90) == [2], "another GPU model at the same precision may resume"
    assert open_cache(tmp_path, "toy", "train", cache.spec.backbone_id).compute(4, 90) == H200
    fresh = _create(tmp_path / "fresh")
    values = [write_shard_data(fresh.path, s, {(4, 90): _data(4, 90, *fresh.shard_bounds(s))}) for s in (0, 1)]
    with pytest.raises(CacheMismatchError, match=r"^array b4/t90 was computed on cpu \(fp32\), this run computes on cuda"):
        MarkWriter(fresh.path).mark([ShardMarks(s, {(4, 90, 0): values[s][(4, 90)]}, compute=c)
                                     for s, c in ((0, CPU), (1, H200))])  # one batch may not mix them either
    assert fresh.missing_shards(4, 90) == [0, 1, 2] and fresh.compute(4, 90) is None
