"""One extraction job: one truncated forward per (batch, view, t) for all blocks, whole-shard writes, bad images skipped."""

import numpy as np
import pytest
import torch
from PIL import Image

from extract import job as job_module
from extract.cache import CacheSpec, create_cache, make_backbone_id, open_cache
from extract.configs import get_config
from extract.job import ShardJob, run_shard_job
from extract.pooling import pooled_size

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


def _cache(root, paths, flip=False, shard_size=12):
    config = get_config(CONFIG)
    with torch.device("meta"):
        shapes = config.build().block_shapes()
    spec = CacheSpec(
        dataset="toy", split="train", backbone_id=make_backbone_id(CONFIG, weight_seed=0), config_name=CONFIG,
        config_flags=config.flags, weight_seed=0, image_size=32, num_images=len(paths), shard_size=shard_size,
        pool=POOL, flip=flip,
    )
    arrays = {(b, t): (shapes[b][0], pooled_size(shapes[b][1], POOL), pooled_size(shapes[b][1], POOL))
              for b in BLOCKS for t in TIMESTEPS}
    return create_cache(root, spec, paths, np.zeros(len(paths)), ["x"], arrays=arrays,
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
