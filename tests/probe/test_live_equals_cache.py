"""The two protocols see the same features: the rows ``diffrep extract`` wrote equal the live head's, image by image."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from extract.backbone.configs import bundled_checkpoint, get_config
from extract.backbone.registry import create_backbone
from extract.cache import open_cache
from extract.schedule import get_schedule
from pipeline.live_probe import LiveSelection, live_splits
from probe.features import resolve_backbone_id
from probe.live_head import LiveHead

from tests.extract.reference import equal_to_float16_rounding

CONFIG = "32x32_small"
BLOCKS, TIMESTEPS, POOL = [4, 10, 15], [25, 150], 4


@pytest.fixture(scope="module")
def data_root(cifar10_root, tmp_path_factory):
    """Two train and two test images of each class (20 test images, the ones compared)."""
    root = tmp_path_factory.mktemp("data")
    for split in ("train", "test"):
        for folder in sorted((Path(cifar10_root) / split).iterdir()):
            (root / "cifar10-jpg" / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:2]:
                shutil.copyfile(image, root / "cifar10-jpg" / split / folder.name / image.name)
    return root


@pytest.mark.e2e
def test_cached_rows_equal_the_live_heads_features(data_root, tmp_path):
    from pipeline.cli.main import main

    checkpoint = bundled_checkpoint(CONFIG)
    weights = ["--checkpoint", checkpoint] if checkpoint else ["--weight-seed", "2"]
    cache_dir = tmp_path / "cache"
    result = CliRunner().invoke(main, [
        "extract", "--dataset", "cifar10", "--split", "test", "--config", CONFIG, *weights,
        "-b", ",".join(map(str, BLOCKS)), "-t", ",".join(map(str, TIMESTEPS)), "--pool", str(POOL),
        "--shard-size", "8", "--data-root", str(data_root), "--cache-dir", str(cache_dir), "--device", "cpu",
        "--no-progress", "--synchronous"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    cache = open_cache(cache_dir, "cifar10", "test", resolve_backbone_id(cache_dir, "cifar10", "test", CONFIG))

    # the live path of `diffrep probe --live`: its test split has seeded noise and no augmentation
    cfg = get_config(CONFIG)
    schedule = get_schedule(cfg.noise_schedule, cfg.diffusion_steps)
    selection = LiveSelection("cifar10", "train", "test", data_root=str(data_root), decode_threads=1)
    _, live_images, _ = live_splits(selection, cfg.image_size, TIMESTEPS, schedule)
    backbone = create_backbone(CONFIG, checkpoint=checkpoint) if checkpoint else create_backbone(CONFIG, weight_seed=2)
    model = LiveHead(backbone, torch.nn.Identity(), BLOCKS, TIMESTEPS, POOL).eval()
    rows = {key: [] for key in ((b, t) for b in BLOCKS for t in TIMESTEPS)}
    with torch.no_grad():
        for batch, _ in live_images.batches(6):  # no seed: the live source's own row order
            for key, value in model.block_features(batch).items():
                rows[key].append(value)
    live = {key: torch.cat(parts).numpy() for key, parts in rows.items()}

    # cache row r holds image image_ids[r] of the dataset index, the live source's row of that id
    ids = cache.image_ids
    assert cache.num_images == live_images.num_images == 20 and sorted(ids.tolist()) == list(range(20))
    assert not np.array_equal(ids, np.arange(20)), "the cache's rows are a class-mixed order: rows are matched by id"
    assert cache.paths == [live_images.paths[i] for i in ids] and cache.valid.all()
    for (b, t), live_rows in live.items():
        stored = cache.load(b, t)
        assert stored.shape == live_rows.shape and stored.dtype == np.float16, (b, t)
        for row, image_id in enumerate(ids):
            assert equal_to_float16_rounding(stored[row], live_rows[image_id]), (b, t, row, cache.paths[row])
        assert not equal_to_float16_rounding(stored, live_rows), "a row order that is not matched would not pass"
