"""One extraction job: one truncated forward per (batch, view, t) for all blocks, whole-shard writes, bad images skipped.

A job writes data only; ``_run`` marks its result as the orchestrating process does.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from extract import job as job_module
from extract.cache import CacheSpec, MarkWriter, create_cache, make_backbone_id, open_cache
from extract.configs import get_config
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


def _cache(root, paths, flip=False, shard_size=12, labels=None, row_order_seed=None):
    config = get_config(CONFIG)
    with torch.device("meta"):
        shapes = config.build().block_shapes()
    spec = CacheSpec(
        dataset="toy", split="train", backbone_id=make_backbone_id(CONFIG, weight_seed=0), config_name=CONFIG,
        config_flags=config.flags, weight_seed=0, image_size=32, num_images=len(paths), shard_size=shard_size,
        pool=POOL, flip=flip, row_order_seed=row_order_seed,
    )
    arrays = {(b, t): (shapes[b][0], pooled_size(shapes[b][1], POOL), pooled_size(shapes[b][1], POOL))
              for b in BLOCKS for t in TIMESTEPS}
    labels = np.zeros(len(paths)) if labels is None else labels
    return create_cache(root, spec, paths, labels, [str(c) for c in range(int(max(labels)) + 1)], arrays=arrays,
                        native_sizes={b: shapes[b][1] for b in BLOCKS})


def _job(cache, paths, todo, **overrides):
    fields = dict(cache=cache.path, shard=0, start=0, paths=tuple(paths), todo=todo, config_name=CONFIG,
                  image_size=32, noise_schedule="linear", diffusion_steps=1000, pool=POOL, batch_size=5,
                  num_threads=1, decode_threads=1)
    return ShardJob(**{**fields, **overrides})


def _all(views=(0,)):
    return tuple((view, t, BLOCKS) for view in views for t in TIMESTEPS)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _images(tmp_path_factory.mktemp("images"))


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
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    paths[3] = str(broken)
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
    from extract.images import load_batch

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
