"""DifFeed: feedback pairs and parameters of the paper, two passes on one x_t, zero feedback = plain forward."""

import pytest
import torch

from extract.backbone.configs import get_config
from extract.backbone.registry import create_backbone
from fusion.diffeed import DifFeed, default_readout, feedback_pairs
from probe.errors import ProbeError
from probe.heads import count_parameters, create_head

torch.set_num_threads(1)


def _meta_256():
    with torch.device("meta"):
        return get_config("256x256_uncond").build()


def test_strategies_on_the_256_model_are_the_paper_s_pairs():
    model = _meta_256()
    assert feedback_pairs(model, "bottleneck") == [(21, 17), (24, 14), (27, 11), (30, 8), (33, 5), (36, 2)]
    assert feedback_pairs(model, "all") == [(b, 38 - b) for b in range(20, 38)]
    assert feedback_pairs(model, "windowed") == [(b, 38 - b) for b in range(20, 25)]
    assert feedback_pairs(model, "multi-scale") == [(b, 18) for b in range(20, 25)]
    assert default_readout(model) == 24
    with pytest.raises(ProbeError, match="unknown feedback strategy 'sideways'"):
        feedback_pairs(model, "sideways")


@pytest.mark.parametrize("strategy, millions", [("bottleneck", 2.76), ("all", 7.62), ("windowed", 5.25)])
def test_feedback_parameters_on_the_256_model(strategy, millions):
    with torch.device("meta"):
        model = DifFeed(get_config("256x256_uncond").build(), torch.nn.Identity(), strategy)
    assert abs(count_parameters(model.feedback) - millions * 1e6) < 0.005e6


def test_whole_difffeed_with_the_attention_head_on_50_classes():
    with torch.device("meta"):
        backbone = get_config("256x256_uncond").build()
        head = create_head("attention", {(24, 150): (1024, 16, 16)}, 50)
        model = DifFeed(backbone, head, "bottleneck")
    assert abs(count_parameters(model) - 29.57e6) < 0.005e6  # backbone frozen: feedback + head


def _small(strategy="bottleneck", readout=None):
    backbone = create_backbone("32x32_small", weight_seed=0)
    readout = readout or default_readout(backbone)
    shape = backbone.block_shapes().get(readout, (8, 4))
    head = create_head("linear", {(readout, 50): (shape[0], shape[1], shape[1])}, 10)
    return DifFeed(backbone, head, strategy, readout)


def test_zero_feedback_equals_the_plain_truncated_forward():
    model = _small("all").eval()
    for layer in model.feedback.values():
        torch.nn.init.zeros_(layer[0].weight)  # BatchNorm in eval mode with zero mean and bias maps 0 to 0
    x_t = torch.randn(3, 3, 32, 32)
    t = torch.full((3,), 50)
    with torch.no_grad():
        plain = model.backbone.features(x_t, t, [model.readout])[model.readout]
        torch.testing.assert_close(model.readout_features(x_t, t), plain, rtol=0, atol=0)
        for layer in model.feedback.values():
            torch.nn.init.normal_(layer[0].weight)
        assert not torch.allclose(model.readout_features(x_t, t), plain)


def test_both_passes_see_the_same_noisy_image():
    model = _small()
    seen = []
    model.backbone.input_blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    x_t = torch.randn(2, 3, 32, 32)
    model({(0, 50): x_t}).sum().backward()
    assert len(seen) == 2 and torch.equal(seen[0], seen[1]) and torch.equal(seen[0], x_t)


def test_gradients_reach_the_feedback_and_the_head_but_not_the_frozen_backbone():
    model = _small("multi-scale")
    model({(0, 50): torch.randn(2, 3, 32, 32)}).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.feedback.parameters() if p.ndim > 1)
    assert all(p.grad is not None for p in model.head.parameters())
    assert all(p.grad is None for p in model.backbone.parameters())


def test_bad_readouts_are_one_line_errors():
    with pytest.raises(ProbeError, match="read-out block 40 is out of range"):
        _small(readout=40)
    with pytest.raises(ProbeError, match=r"feedback into block\(s\) \[8\] cannot change read-out block 7"):
        _small("bottleneck", readout=7)


@pytest.mark.e2e
def test_feedback_trains_end_to_end_on_real_images(cifar10_root, tmp_path):
    """DifFeed on 32x32_small (the bundled weights when present) through diffrep feedback, 300 train / 200 test images."""
    from click.testing import CliRunner

    from extract.backbone.configs import bundled_checkpoint
    from pipeline.cli.main import main
    from pipeline.results import read_results

    checkpoint = bundled_checkpoint("32x32_small")
    args = ["feedback", "--dataset", "cifar10", "--config", "32x32_small", "-t", "25", "--strategy", "bottleneck",
            "--per-class", "30", "--test-per-class", "20", "--data-root", str(cifar10_root.parent), "--dim", "64",
            "--depth", "1", "--epochs", "4", "--solver", "adam", "--lr", "1e-3", "--batch-size", "32",
            "--device", "cpu", "--no-progress", "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--results", str(tmp_path / "results.parquet"), *(["--checkpoint", checkpoint] if checkpoint else [])]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "strategy bottleneck: 12->8, 15->5, 18->2" in result.output
    row = read_results(tmp_path / "results.parquet").to_pylist()[-1]
    assert row["head"] == "diffeed" and row["strategy"] == "bottleneck" and row["test_size"] == 200
    assert row["top1"] > 0.17  # chance is 10%; 200 test images put its 99.9% bound near 17%
    resumed = CliRunner().invoke(main, [*args, "--resume"], catch_exceptions=False)  # done: scores again, same weights
    assert resumed.exit_code == 0 and read_results(tmp_path / "results.parquet").to_pylist()[-1]["top1"] == row["top1"]


def test_feedback_command_refuses_bad_readouts_before_reading_images(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli.main import main

    for readout, needle in (("40", "read-out block 40 is out of range for 32x32_small: valid blocks are 1..19"),
                            ("7", "feedback into block(s) [8] cannot change read-out block 7")):
        result = CliRunner().invoke(main, ["feedback", "--dataset", "cifar10", "--config", "32x32_small", "--readout",
                                           readout, "--data-root", str(tmp_path / "nowhere"), "--dry-run"])
        assert result.exit_code == 1 and needle in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "nowhere").exists()  # refused before any image is listed or unpacked


@pytest.mark.e2e
def test_feedback_dry_run_plans_without_writing(shared_dir, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli.main import main

    result = CliRunner().invoke(main, ["feedback", "--dataset", "cifar10", "--config", "32x32_small", "-t", "25",
                                       "--data-root", str(tmp_path / "fresh"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "50000 train / 10000 test images" in result.output and "feedback parameters 9,536" in result.output
    assert not (tmp_path / "fresh").exists()
