"""Results rows of the same weights join whichever path wrote them: cache probe, probe --live, feedback."""

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from extract.backbone.configs import bundled_checkpoint
from extract.backbone.identity import backbone_id
from extract.backbone.registry import create_backbone
from pipeline.cli.main import main
from pipeline.feedback import FeedbackRequest, _backbone_id
from pipeline.results import read_results

CONFIG = "32x32_small"


@pytest.fixture(scope="module")
def tiny_root(cifar10_root, tmp_path_factory):
    """Two train and two test images of each CIFAR-10 class, in a data root of their own."""
    root = tmp_path_factory.mktemp("data")
    for split in ("train", "test"):
        for folder in sorted((Path(cifar10_root) / split).iterdir()):
            (root / "cifar10-jpg" / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:2]:
                shutil.copyfile(image, root / "cifar10-jpg" / split / folder.name / image.name)
    return root


def _invoke(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _live_row(root, checkpoint, results):
    _invoke(["probe", "--live", "--dataset", "cifar10", "--config", CONFIG, "-b", "10", "-t", "5",
             "--checkpoint", checkpoint, "--data-root", str(root), "--cache-pool", "4", "--solver", "adam",
             "--lr", "1e-3", "--batch-size", "10", "--epochs", "1", "--steps", "1", "--device", "cpu",
             "--no-progress", "--results", str(results), "--checkpoint-dir", str(results.parent / "live")])
    return read_results(results).to_pylist()[-1]


def test_live_and_cache_rows_of_one_checkpoint_join_and_other_weights_do_not(tiny_root, tmp_path):
    checkpoint = bundled_checkpoint(CONFIG)
    assert checkpoint, "the bundled 32x32_small checkpoint ships with diffrep"
    results = tmp_path / "results.parquet"
    cache = tmp_path / "cache"
    _invoke(["extract", "--dataset", "cifar10", "--config", CONFIG, "--checkpoint", checkpoint, "-t", "5", "-b", "10",
             "--pool", "4", "--synchronous", "--threads", "1", "--no-progress", "-y", "--data-root", str(tiny_root),
             "--cache-dir", str(cache)])
    _invoke(["probe", "--dataset", "cifar10", "--config", CONFIG, "--cache-dir", str(cache), "-b", "10", "-t", "5",
             "--results", str(results), "--no-progress", "--checkpoint-dir", str(tmp_path / "probe")])
    cached = read_results(results).to_pylist()[-1]
    live = _live_row(tiny_root, checkpoint, results)
    assert live["protocol"] == "live" and cached["protocol"] != "live"
    assert live["backbone_id"] == cached["backbone_id"] == backbone_id(CONFIG, checkpoint)
    assert [p.name for p in (cache / "cifar10" / "train").iterdir() if p.is_dir()] == [cached["backbone_id"]]
    feedback = FeedbackRequest(dataset="cifar10", config_name=CONFIG, checkpoint=checkpoint)
    assert _backbone_id(feedback) == cached["backbone_id"]  # the id diffrep feedback records and looks up pass 1 by

    other = tmp_path / "other.pt"
    torch.save(create_backbone(CONFIG, weight_seed=3).state_dict(), other)
    assert _live_row(tiny_root, str(other), results)["backbone_id"] not in (cached["backbone_id"], f"{CONFIG}-checkpoint")
