"""One extraction job: one truncated forward per (batch, view, t) for all blocks, whole-shard writes, bad images skipped.

A job writes data only; ``_run`` marks its result as the orchestrating process does.
"""

import dataclasses
import os

import numpy as np
import zarr
import pytest
import torch
from PIL import Image

from extract import job as job_module
from extract.cache import CacheSpec, MarkWriter, create_cache, open_cache
from extract.backbone.identity import backbone_id
from extract.backbone.configs import get_config
from extract.errors import CacheMismatchError
from extract.job import ShardJob
from extract.job import run_shard_job as _run_only
from extract.noise import seeded_noise
from extract.pooling import pool_features, pooled_size
from extract.schedule import get_schedule

CONFIG = "32x32_small"
BLOCKS = (4, 10, 12)
TIMESTEPS = (90, 300)
POOL = 4


def _images(folder, count=12, flipped=False):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        if flipped:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = folder / f"{i:03d}.png"
        image.save(path)
        paths.append(str(path))
    return paths


def run_shard_job(job):
    """Run a job, then mark its shard (the orchestrator's part)."""
    result = _run_only(job)
    MarkWriter(job.cache).mark([result.marks()])
    return result


def _cache(root, paths, flip=False, shard_size=12, labels=None, row_order_seed=None, noise_draws=1):
    config = get_config(CONFIG)
    with torch.device("meta"):
        shapes = config.build().block_shapes()
    spec = CacheSpec(
        dataset="toy", split="train", backbone_id=backbone_id(CONFIG, weight_seed=0), config_name=CONFIG,
        config_flags=config.flags, weight_seed=0, image_size=32, num_images=len(paths), shard_size=shard_size,
        pool=POOL, flip=flip, row_order_seed=row_order_seed, noise_draws=noise_draws,
    )
    arrays = {(b, t): (shapes[b][0], pooled_size(shapes[b][1], POOL), pooled_size(shapes[b][1], POOL))
              for b in BLOCKS for t in TIMESTEPS}
    labels = np.zeros(len(paths)) if labels is None else labels
    return create_cache(root, spec, paths, labels, [str(c) for c in range(int(max(labels)) + 1)], arrays=arrays,
                        native_sizes={b: shapes[b][1] for b in BLOCKS})


def _job(cache, paths, todo, **overrides):
    fields = dict(cache=cache.path, spec=cache.spec, shard=0, start=0, paths=tuple(paths), todo=todo, batch_size=5,
                  num_threads=1, decode_threads=1)
    return ShardJob(**{**fields, **overrides})


def _all(views=(0,)):
    return tuple((view, t, BLOCKS) for view in views for t in TIMESTEPS)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _images(tmp_path_factory.mktemp("images"))


def _broken_jpeg(tmp_path, content: bytes) -> str:
    """A file named .jpg that does not decode (the job must zero its row and record why)."""
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(content)
    return str(broken)


def test_one_forward_per_batch_and_timestep_covers_every_block(tmp_path, images, monkeypatch):
    cache = _cache(tmp_path, images)
    run_shard_job(_job(cache, images, ((0, 90, (4,)),)))
    model = next(iter(job_module._BACKBONES.values()))
    calls = []
    original = model.features

    def counting(x_t, timesteps, blocks, y=None):
        calls.append((int(timesteps[0]), tuple(blocks), x_t.shape[0]))
        return original(x_t, timesteps, blocks, y)

    monkeypatch.setattr(model, "features", counting)
    result = run_shard_job(_job(cache, images, _all()))
    assert calls == [(t, BLOCKS, n) for t in TIMESTEPS for n in (5, 5, 2)], "3 batches x 2 timesteps, all blocks each"
    assert result.images == 12 and result.forwards == 24 and not result.invalid
    reader = open_cache(tmp_path, "toy", "train", cache.spec.backbone_id)
    assert all(reader.is_complete(b, t) for b in BLOCKS for t in TIMESTEPS)
    assert reader.load(12, 300).shape == (12, 64, 4, 4) and reader.load(4, 90).shape == (12, 32, 4, 4)


def test_missing_blocks_only_with_the_same_bits(tmp_path, images):
    full = _cache(tmp_path / "full", images)
    run_shard_job(_job(full, images, _all()))
    part = _cache(tmp_path / "part", images)
    run_shard_job(_job(part, images, ((0, 300, (10,)),), num_threads=1, batch_size=5))
    reader = open_cache(tmp_path / "part", "toy", "train", part.spec.backbone_id)
    assert [(b, t) for b in BLOCKS for t in TIMESTEPS if reader.is_complete(b, t)] == [(10, 300)]
    reference = open_cache(tmp_path / "full", "toy", "train", full.spec.backbone_id)
    np.testing.assert_array_equal(reader.load(10, 300), reference.load(10, 300))


def test_unreadable_image_is_reported_and_zeroed(tmp_path, images):
    paths = list(images)
    paths[3] = _broken_jpeg(tmp_path, b"\xff\xd8\xff\xe0 not really a jpeg")
    cache = _cache(tmp_path, paths)
    result = run_shard_job(_job(cache, paths, _all()))
    assert list(result.invalid) == [3] and result.invalid[3]
    reader = open_cache(tmp_path, "toy", "train", cache.spec.backbone_id)
    assert list(np.flatnonzero(~reader.valid)) == [3] and reader.errors[3] == result.invalid[3]
    features = reader.load(12, 90)
    assert not features[3].any() and all(features[i].any() for i in range(12) if i != 3)


def test_flipped_view_is_the_forward_of_the_flipped_image(tmp_path, images):
    both = _cache(tmp_path / "both", images, flip=True)
    run_shard_job(_job(both, images, _all(views=(0, 1))))
    mirrored = _images(tmp_path, flipped=True)
    single = _cache(tmp_path / "mirrored", mirrored)
    run_shard_job(_job(single, mirrored, _all()))
    flipped_view = open_cache(tmp_path / "both", "toy", "train", both.spec.backbone_id).load(10, 90, view=1)
    np.testing.assert_array_equal(
        flipped_view, open_cache(tmp_path / "mirrored", "toy", "train", single.spec.backbone_id).load(10, 90))


def test_a_cached_row_is_the_forward_of_its_own_image_in_a_seeded_order(tmp_path, images):
    """Rows are permuted (class-sorted index -> mixed rows); each row's noise is keyed by its image id, not its row."""
    labels = np.repeat(np.arange(3), 4)  # class-sorted, as every dataset index
    cache = _cache(tmp_path, images, labels=labels, shard_size=5, row_order_seed=7)
    ids = cache.image_ids
    assert sorted(ids) == list(range(12)) and list(ids) != list(range(12))
    for shard in range(cache.num_shards):
        start, stop = cache.shard_bounds(shard)
        run_shard_job(_job(cache, [images[i] for i in ids[start:stop]], _all(), shard=shard, start=start,
                           image_ids=tuple(int(i) for i in ids[start:stop])))
    reader = open_cache(tmp_path, "toy", "train", cache.spec.backbone_id)
    np.testing.assert_array_equal(reader.labels, labels[ids])
    cached = reader.load(10, 300)
    model = next(iter(job_module._BACKBONES.values()))
    from extract.inputs.images import load_batch

    for row in (0, 6, 11):  # recomputed alone, from the image file, with the noise of its image id
        image_id = int(ids[row])
        x0, ok, _ = load_batch([images[image_id]], 32)
        steps = torch.full((1,), 300)
        x_t = get_schedule("linear").q_sample(x0, steps, seeded_noise(0, [image_id], 300, (3, 32, 32)))
        with torch.no_grad():
            direct = pool_features(model.features(x_t, steps, [10])[10], POOL).numpy().astype(np.float16)
        np.testing.assert_allclose(cached[row].astype(np.float32), direct[0].astype(np.float32), atol=2e-3, rtol=2e-3)
        assert reader.paths[row] == images[image_id]
    wrong = _cache(tmp_path / "wrong", images, labels=labels, shard_size=12, row_order_seed=7)
    run_shard_job(_job(wrong, [images[i] for i in ids], ((0, 300, (10,)),)))  # noise keyed by row: not the same
    assert not np.allclose(open_cache(tmp_path / "wrong", "toy", "train", wrong.spec.backbone_id).load(10, 300)[0],
                           cached[0], atol=2e-3), "the check above can fail"


def test_a_worker_refuses_to_mix_device_kinds_before_computing(tmp_path, images):
    cache = _cache(tmp_path, images)
    recorded = {"device": "cuda", "gpu": "NVIDIA H200", "precision": "bf16", "tf32": {"matmul": False, "cudnn": True}}
    with pytest.raises(CacheMismatchError) as info:
        _run_only(_job(cache, images, _all(), device="cpu", recorded_compute=(("b10/t90", recorded),)))
    assert str(info.value) == (
        "array b10/t90 was computed on cuda (NVIDIA H200, bf16, TF32 matmul off / cudnn on), this run computes on "
        "cpu (fp32): one array must not mix them; resume with --device cuda --precision bf16, or extract into a "
        "new --cache-dir")
    assert not any(open_cache(tmp_path, "toy", "train", cache.spec.backbone_id).load(10, 90, allow_incomplete=True).ravel())
    result = _run_only(_job(cache, images, ((0, 90, (10,)),), device="cpu"))
    assert result.compute == {"device": "cpu", "gpu": "", "precision": "fp32", "tf32": None}
    assert set(result.markers) == {(10, 90, 0)} and result.markers[(10, 90, 0)] >= 2**32


def _recomputed(paths, start, t, blocks, batch_size, flip=False, draw=0):
    """Features computed the plain way, independently of the job's pipeline: float images, noise, q_sample, forward, pool."""
    from extract.inputs.images import load_batch
    from extract.noise import seeded_noise
    from extract.pooling import pool_features
    from extract.schedule import get_schedule

    model = job_module.build_backbone(CONFIG, None, 0)
    schedule = get_schedule("linear", 1000)
    out = {b: [] for b in blocks}
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for lo in range(0, len(paths), batch_size):
            hi = min(lo + batch_size, len(paths))
            x0, ok, _ = load_batch(paths[lo:hi], 32, flip=flip, num_threads=1)
            steps = torch.full((hi - lo,), t, dtype=torch.long)
            x_t = schedule.q_sample(x0, steps, seeded_noise(0, range(start + lo, start + hi), t, (3, 32, 32), draw=draw))
            with torch.no_grad():
                feats = model.features(x_t, steps, list(blocks))
            for b in blocks:
                pooled = pool_features(feats[b], POOL).numpy()
                pooled[~ok] = 0
                out[b].append(pooled)
    finally:
        torch.set_num_threads(previous)
    return {b: np.concatenate(v) for b, v in out.items()}


def test_cached_rows_are_the_plain_forward_bit_for_bit_with_many_decode_threads(tmp_path, images):
    paths = list(images)
    paths[7] = _broken_jpeg(tmp_path, b"\xff\xd8\xff\xe0 not really a jpeg")
    cache = _cache(tmp_path, paths, flip=True)
    run_shard_job(_job(cache, paths, _all(views=(0, 1)), decode_threads=3))
    reader = open_cache(tmp_path, "toy", "train", cache.spec.backbone_id)
    for view in (0, 1):
        for t in TIMESTEPS:
            expected = _recomputed(paths, 0, t, BLOCKS, 5, flip=bool(view))
            for b in BLOCKS:
                got = reader.load(b, t, view=view)
                assert np.array_equal(got.view(np.uint16), expected[b].view(np.uint16)), f"b{b}/t{t} view {view}"


def _two_shards(tmp_path, images):
    config = get_config(CONFIG)
    with torch.device("meta"):
        shapes = config.build().block_shapes()
    spec = CacheSpec(
        dataset="toy", split="train", backbone_id=backbone_id(CONFIG, weight_seed=0), config_name=CONFIG,
        config_flags=config.flags, weight_seed=0, image_size=32, num_images=len(images), shard_size=6, pool=POOL,
    )
    cache = create_cache(tmp_path, spec, images, np.zeros(len(images)), ["x"],
                         arrays={(10, t): (shapes[10][0], POOL, POOL) for t in TIMESTEPS}, native_sizes={10: shapes[10][1]})
    todo = tuple((0, t, (10,)) for t in TIMESTEPS)
    return cache, [_job(cache, images[s * 6:(s + 1) * 6], todo, shard=s, start=s * 6) for s in (0, 1)]


def test_the_next_shard_decodes_ahead_and_is_taken_by_its_job(tmp_path, images, monkeypatch):
    from extract.inputs import prefetch
    cache, jobs = _two_shards(tmp_path, images)
    linked = job_module.link_next_shards(jobs)
    assert linked[0].next_shard.paths == tuple(images[6:12]) and linked[0].next_shard.start == 6
    assert linked[1].next_shard is None
    prefetch.PREFETCHER.drop_queued()
    run_shard_job(linked[0])
    # 6 images to decode and 2 batches (5 + 1) of noise for the next shard's first timestep
    assert prefetch.PREFETCHER.queued == 6 + 2
    decoded = []
    monkeypatch.setattr(job_module, "load_pixels", lambda path, size: decoded.append(path))
    run_shard_job(linked[1])
    assert decoded == [] and prefetch.PREFETCHER.queued == 0, "the second job took what was decoded ahead"
    reader = open_cache(tmp_path, "toy", "train", cache.spec.backbone_id)
    for t in TIMESTEPS:
        expected_by_shard = np.concatenate([_recomputed(list(images[:6]), 0, t, (10,), 5)[10],  # batches 5 + 1
                                            _recomputed(list(images[6:]), 6, t, (10,), 5)[10]])
        assert np.array_equal(reader.load(10, t).view(np.uint16), expected_by_shard.view(np.uint16))


def test_work_queued_for_a_shard_that_went_elsewhere_is_dropped(tmp_path, images):
    from extract.inputs import prefetch
    cache, jobs = _two_shards(tmp_path, images)
    wrong = job_module.NextShard(start=100, paths=tuple(images[:2]), t=90)
    prefetch.PREFETCHER.drop_queued()
    run_shard_job(dataclasses.replace(jobs[0], next_shard=wrong))
    assert prefetch.PREFETCHER.queued == 2 + 1
    run_shard_job(jobs[1])
    assert prefetch.PREFETCHER.queued == 0


def test_a_failed_write_surfaces_and_the_passes_written_before_it_are_on_disk(tmp_path, images, monkeypatch):
    """The job raises the write's error; nothing is marked (the orchestrator marks whole results only), so the
    shard is redone, but the pass written before the failure is on disk with the right values."""
    cache = _cache(tmp_path, images)
    real = job_module.write_shard_data
    calls = []

    def failing(path, shard, features, view=0, checksums=None):
        calls.append(sorted(features))
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real(path, shard, features, view=view, checksums=checksums)

    monkeypatch.setattr(job_module, "write_shard_data", failing)
    with pytest.raises(OSError, match="Input/output error"):
        run_shard_job(_job(cache, images, _all()))
    reader = open_cache(tmp_path, "toy", "train", cache.spec.backbone_id)
    assert not any(reader.is_complete(b, t) for b in BLOCKS for t in TIMESTEPS)
    first = reader.load(10, 90, allow_incomplete=True)
    assert not first.any(), "unmarked shards read as zeros"
    raw = zarr.open_group(str(tmp_path / "toy" / "train" / cache.spec.backbone_id), mode="r")["b10/t90"][:]
    assert np.array_equal(raw.view(np.uint16), _recomputed(images, 0, 90, (10,), 5)[10].view(np.uint16))


def test_default_decode_threads_share_the_cpus():
    cpus = os.cpu_count() or 1
    assert job_module.default_decode_threads(1, "cuda") == max(1, min(32, cpus - 1))
    assert job_module.default_decode_threads(1, "cpu", torch_threads=2) == max(1, cpus - 2)
    assert job_module.default_decode_threads(10 * cpus, "cuda") == 1


def test_noise_draws_are_views_of_independent_seeded_noise(tmp_path, images):
    """--noise-draws 2 --flip: four views per (b, t); view 2k+f is draw k's noise on the (flipped) image, bit for bit."""
    cache = _cache(tmp_path, images, flip=True, noise_draws=2)
    assert cache.spec.view_ids == [0, 1, 2, 3]
    run_shard_job(_job(cache, images, _all(views=(0, 1, 2, 3))))
    reader = open_cache(tmp_path, "toy", "train", cache.spec.backbone_id)
    group = zarr.open_group(reader.path, mode="r")
    assert {"t90", "t90_flip", "t90_n1", "t90_n1_flip"} <= set(group["b10"].keys())
    for view in (0, 1, 2, 3):
        expected = _recomputed(images, 0, 90, (10,), 5, flip=bool(view % 2), draw=view // 2)[10]
        assert np.array_equal(reader.load(10, 90, view=view).view(np.uint16), expected.view(np.uint16)), view
    assert not np.allclose(reader.load(10, 90, view=0), reader.load(10, 90, view=2), atol=1e-2)
    with pytest.raises(Exception, match="view 4 is not in this cache"):
        reader.load(10, 90, view=4)


def test_the_markers_a_job_chains_batch_by_batch_are_the_checksums_of_what_is_stored(tmp_path, images):
    """Invalid rows zeroed, flipped view, batches of 5 over 12 rows: each marker is the CRC of the stored shard."""
    from extract.cache.integrity import marker_value

    paths = list(images)
    paths[6] = _broken_jpeg(tmp_path, b"not a jpeg at all")
    cache = _cache(tmp_path, paths, flip=True)
    result = run_shard_job(_job(cache, paths, _all(views=(0, 1))))
    reader = open_cache(tmp_path, "toy", "train", cache.spec.backbone_id)
    assert len(result.markers) == len(BLOCKS) * len(TIMESTEPS) * 2
    for (b, t, view), value in result.markers.items():
        stored = reader.load(b, t, view=view)
        assert not stored[6].any() and value == marker_value(stored), (b, t, view)
    assert not any(reader.verify_shards(b, t, v) for b in BLOCKS for t in TIMESTEPS for v in (0, 1))
