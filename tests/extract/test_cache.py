"""The Zarr cache: metadata first, whole-shard writes with markers, the reader's checks, plain-Zarr readability."""

import os
import threading

import numpy as np
import pytest
import zarr

from extract.cache import CacheSpec, cache_path, create_cache, make_backbone_id, open_cache, record_run, write_shard
from extract.errors import CacheError, CacheIncompleteError, CacheMismatchError

N, SHARD = 10, 4
SHAPES = {(4, 90): (3, 8, 8), (12, 90): (5, 2, 2), (12, 300): (5, 2, 2)}
NATIVE = {4: 16, 12: 2}


def _spec(**overrides):
    fields = dict(
        dataset="toy", split="train", backbone_id=make_backbone_id("32x32_small", weight_seed=0),
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
            write_shard(cache.path, shard, {key: _data(*key, start, stop, view) for key in arrays}, view=view,
                        valid=np.ones(stop - start, bool), errors=[""] * (stop - start))


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
    write_shard(cache.path, 1, {(4, 90): _data(4, 90, 4, 8)})
    assert not cache.is_complete(4, 90) and cache.missing_shards(4, 90) == [0, 2]
    with pytest.raises(CacheIncompleteError, match=r"array b4/t90 is missing 2 of 3 shards: run diffrep extract --dataset toy --timesteps 90 --blocks 4"):
        cache.load(4, 90)
    with pytest.raises(CacheIncompleteError):
        next(cache.iter_shards(4, 90))
    partial = cache.load(4, 90, allow_incomplete=True)
    np.testing.assert_array_equal(partial[4:8], _data(4, 90, 4, 8))
    assert not partial[:4].any()
    with pytest.raises(CacheError, match=r"^cache has no array b30/t300: run diffrep extract --dataset toy --timesteps 300 --blocks 30$"):
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
    threads = [threading.Thread(target=lambda s=s: write_shard(cache.path, s, {
        key: _data(*key, *cache.shard_bounds(s)) for key in SHAPES})) for s in range(cache.num_shards)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for key in SHAPES:
        np.testing.assert_array_equal(cache.load(*key), _data(*key, 0, N))


def test_flipped_view_and_invalid_rows(tmp_path):
    cache = _create(tmp_path, spec=_spec(flip=True))
    _fill(cache, views=(0, 1))
    assert cache.is_complete(4, 90)
    np.testing.assert_array_equal(cache.load(4, 90, view=1), _data(4, 90, 0, N, view=1))
    write_shard(cache.path, 0, {(4, 90): _data(4, 90, 0, 4)}, valid=np.array([1, 0, 1, 1], bool),
                errors=["", "OSError: truncated", "", ""])
    record_run(cache.path, {1: (cache.paths[1], "OSError: truncated")}, {"images": 4})
    cache = open_cache(tmp_path, "toy", "train", "32x32_small-random0")
    assert list(np.flatnonzero(~cache.valid)) == [1] and cache.errors[1] == "OSError: truncated"
    assert cache.invalid_images == [{"index": 1, "path": cache.paths[1], "reason": "OSError: truncated"}]
    assert zarr.open_group(cache.path).attrs["runs"][-1]["images"] == 4
