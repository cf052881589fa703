"""``diffrep detect``: a few steps on real pet images lower the loss and score COCO AP; errors are one line."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from extract.backbone.configs import bundled_checkpoint
from extract.backbone.registry import create_backbone
from extract.schedule import get_schedule
from pipeline.cli.main import main
from pipeline.detection import DetectRequest, run_detect
from pipeline.instances import DetectionImages, read_instances
from pipeline.results import read_results
from probe.detection import (DetectorConfig, DetectTrainConfig, DiffusionPyramid, PyramidBackbone, create_detector,
                             fit_detector, pyramid_strides)
from probe.errors import ProbeError
from tests.pipeline.test_pets_instances import pets_root  # noqa: F401 - the fixture


@pytest.mark.e2e
def test_a_few_steps_on_real_pets_lower_the_loss_and_score_coco_ap(pets_root):  # noqa: F811
    torch.manual_seed(0)
    train, test = read_instances("pets", "train", limit=8), read_instances("pets", "test", limit=4)
    backbone = create_backbone("32x32_small", checkpoint=bundled_checkpoint("32x32_small"))
    body = DiffusionPyramid(backbone, pyramid_strides("32x32_small", (12, 15)), 25, get_schedule("linear", 1000))
    config = DetectorConfig(image_size=32, detections_per_image=10)
    model = create_detector(PyramidBackbone(body, body.channels, ["b15", "b12"], config.fpn_channels), 3, config)
    result = fit_detector(model, DetectionImages(train, 32, preload=True), DetectionImages(test, 32, masks=False),
                          test.coco, test.category_ids, 32,
                          DetectTrainConfig(epochs=3, batch_size=4, warmup_steps=0, lr=1e-3), progress=False)
    losses = [epoch["loss"] for epoch in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    for kind in ("bbox", "segm"):
        assert set(result.scores[kind]) == {"ap", "ap50", "ap75"}
        assert all(0.0 <= v <= 1.0 for v in result.scores[kind].values())
        assert result.scores[kind]["ap50"] >= result.scores[kind]["ap75"]


@pytest.mark.e2e
def test_detect_records_a_row_and_refuses_to_resume_with_other_settings(pets_root, tmp_path):  # noqa: F811
    results, checkpoints = tmp_path / "results.parquet", tmp_path / "ck"
    request = DetectRequest(backbone="resnet18", image_size=32, limit=6, test_limit=4, steps=1, batch_size=6,
                            masks=False, results_path=str(results), checkpoint_dir=str(checkpoints), progress=False)
    row = run_detect(request)
    (saved,) = read_results(results).to_pylist()
    assert saved["task"] == "detect" and saved["head"] == "fasterrcnn" and saved["image_size"] == 32
    assert saved["backbone_id"] == "resnet18-random0" and saved["mask_ap"] is None
    assert saved["box_ap"] == pytest.approx(row["box_ap"]) and (checkpoints / "checkpoint.pth").is_file()
    other = DetectRequest(**{**vars(request), "lr": 1e-3, "resume": True})
    with pytest.raises(ProbeError, match="trained with other settings .*lr 0.0003 saved, 0.001 asked"):
        run_detect(other)


def test_coco_that_is_not_here_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["detect", "--dataset", "coco", "--data-root", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "dataset 'coco' split 'train' is not here" in result.output


def test_a_classification_dataset_is_refused_in_one_line(tmp_path):
    result = CliRunner().invoke(main, ["detect", "--dataset", "cifar10", "--data-root", str(tmp_path)])
    assert result.exit_code == 1 and "has format folder, not instances" in result.output


def test_an_instance_set_is_refused_by_the_classification_index_in_one_line():
    from pipeline.datasets import build_index
    from pipeline.errors import DatasetError

    with pytest.raises(DatasetError, match="dataset 'pets' holds instances .*use it with diffrep detect"):
        build_index("pets", "train")
