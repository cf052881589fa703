"""``diffrep segment`` end to end on real CamVid frames: extract unpooled maps, train, beat a constant class; errors in one line."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from extract.backbone.configs import bundled_checkpoint
from extract.cache import FeatureCache
from extract.inputs.dense_geometry import source_box
from pipeline.cli.main import main
from pipeline.results import read_results
from pipeline.segmentation import SegmentRequest, run_segment
from tests.pipeline.test_dense_data import dense
from tests.probe.test_seg_metrics import brute_force


@pytest.mark.e2e
def test_camvid_heads_beat_a_constant_class(tmp_path):
    train, val = dense("camvid", "train").limited(32), dense("camvid", "val").limited(16)
    size = 32
    counts = np.bincount(np.concatenate([train.read_label(r).ravel() for r in range(len(train))]), minlength=256)[:11]
    constant = int(counts.argmax())  # the training split's most frequent class, everywhere
    truths = []
    for r in range(len(val)):
        label = val.read_label(r)
        x0, y0, x1, y1 = source_box(label.shape[1], label.shape[0], size)
        truths.append(label[y0:y1, x0:x1])
    floor, *_ = brute_force(truths, [np.full_like(t, constant) for t in truths], 11)
    request = SegmentRequest(dataset="camvid", blocks=(8,), timesteps=(25,), config_name="32x32_small",
                             checkpoint=bundled_checkpoint("32x32_small"), image_size=size, cache_dir=str(tmp_path / "cache"),
                             limit=32, test_limit=16, epochs=8, lr=1e-2, batch_size=8, synchronous=True, progress=False,
                             results_path=str(tmp_path / "results.parquet"), figures=2, out_dir=str(tmp_path / "fig"),
                             device="cpu")
    pixel = run_segment(request)
    assert pixel.row["top1"] > floor + 0.05 and pixel.row["metric"] == "miou" and pixel.row["image_size"] == size
    assert len(pixel.written) == 1 and pixel.written[0].endswith(".png")
    cache = FeatureCache(str(tmp_path / "cache" / "camvid" / "train" / pixel.row["backbone_id"]))
    assert cache.spec.pool == 0 and cache.spec.image_size == size and cache.shape(8, 25) == (32, 64, 8, 8)
    live = _live_test_source(request, train.image_paths, "train")  # --live scoring reads what the cache holds
    ids = cache.image_ids
    rows = [int(np.flatnonzero(ids == i)[0]) for i in range(4)]
    cached = np.stack([cache.row_reader(8, 25)(r, r + 1)[0] for r in rows]).astype(np.float32)
    assert np.allclose(live.read(0, 4)[(8, 25)].float().numpy(), cached, atol=2e-2)
    upernet = run_segment(SegmentRequest(**{**request.__dict__, "head": "upernet", "channels": 32, "epochs": 4, "figures": 0}))
    assert upernet.row["top1"] > floor
    rows = read_results(tmp_path / "results.parquet").to_pylist()
    assert [r["head"] for r in rows] == ["pixel", "upernet"] and all(r["task"] == "segmentation" for r in rows)


def _live_test_source(request, paths, split):
    import torch

    from extract.backbone.configs import get_config
    from extract.job import build_backbone
    from extract.schedule import get_schedule
    from pipeline.dense_live import LiveDenseSource

    config = get_config(request.config_name)
    model = build_backbone(config.name, request.checkpoint).eval()
    return LiveDenseSource(model, paths, None, request.blocks, request.timesteps,
                           get_schedule(config.noise_schedule, config.diffusion_steps), request.image_size, torch.device("cpu"),
                           noise_split=split)


def test_errors_are_one_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["segment", "--dataset", "ade20k", "-b", "8", "-t", "25", "--data-root", str(tmp_path)])
    assert result.exit_code == 1 and "ade20k' is not here" in result.output and len(result.output.strip().splitlines()) == 1
    result = runner.invoke(main, ["segment", "--dataset", "camvid", "-b", "8", "-t", "25", "--config", "32x32_small",
                                  "--image-size", "30", "--cache-dir", str(tmp_path), "--limit", "2", "--synchronous"])
    assert result.exit_code == 1 and "--image-size 30 does not divide by 32x32_small's deepest stride 4" in result.output
