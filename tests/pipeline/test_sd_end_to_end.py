"""Stable Diffusion end to end on real CIFAR-10 images through the CLI: extract, probe, report, and the live path.

A tiny random SD saved as a diffusers folder stands in for a real one (no SD weights exist here):
the pipeline downstream of the cache is family-blind, so the same commands serve ``--config sd15``.
The live path (``probe --live``) with the cache's seeded noise gives the cached features bit for bit
(they are the same code), and learnable conditioning trains with the head.
"""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from extract.cache import open_cache
from extract.backbone.registry import create_backbone, family_of
from pipeline.cli.main import main
from pipeline.results import read_results
from probe.live_head import LiveHead
from probe.live_images import LiveImages
from tests.extract.sd_tiny import save_tiny_sd

torch.set_num_threads(1)


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_sd_extract_probe_report_and_live(cifar10_root, tmp_path):
    folder = save_tiny_sd(tmp_path / "tiny-sd", seed=1)
    cache, results = tmp_path / "cache", tmp_path / "results.parquet"
    common = ["--dataset", "cifar10", "--config", "sd-tiny", "--cache-dir", cache]
    plan = _cli("extract", *common, "--data-root", cifar10_root, "--checkpoint", folder, "--image-size", 64,
                "--per-class", 4, "--timesteps", "100,300", "--blocks", "15,18", "--shard-size", 20, "--synchronous",
                "--no-progress")
    assert "b18/t100: (40, 16, 2, 2) float16" in plan  # 64 px -> latent 8 -> b18 at stride 4
    backbone_id = family_of("sd-tiny").backbone_id("sd-tiny", str(folder))
    reader = open_cache(cache, "cifar10", "test", backbone_id)
    spec = reader.spec
    assert (spec.family, spec.conditioning, spec.latent) == ("sd", "null-text", "vae-posterior-mean*0.18215")
    assert (spec.image_size, spec.noise_schedule, spec.diffusion_steps) == (64, "scaled_linear", 1000)

    out = _cli("probe", *common, "--blocks", 18, "--timesteps", 100, "--results", results)
    assert "on cifar10 b=18 t=100" in out
    _cli("knn", *common, "--blocks", 15, "--timesteps", 100, "--results", results)
    report = _cli("report", "--results", results, "--out", tmp_path / "report")
    assert backbone_id in report and (tmp_path / "report" / "results.md").exists()
    rows = read_results(results).to_pylist()
    assert {row["backbone_id"] for row in rows} == {backbone_id} and all(0 <= row["top1"] <= 1 for row in rows)

    # the live path's x_t and features are the cache's (seeded noise, no augmentation)
    backbone = create_backbone("sd-tiny", checkpoint=str(folder))
    backbone.image_size = 64
    rows = 20  # shard 0, one batch, with the job's thread count: the same arithmetic, the same bits
    paths, ids = list(reader.paths)[:rows], np.asarray(reader.image_ids)[:rows]
    images = LiveImages(paths, np.zeros(rows, dtype=np.int64), 64, (100, 300), family_of("sd-tiny").schedule("sd-tiny"),
                        image_ids=ids, decode_threads=1, latent_shape=(4, 8, 8), noise_split=reader.spec.split)
    model = LiveHead(backbone, torch.nn.Identity(), [18], [100, 300], pool=16, schedule=images.schedule)
    batch, _ = next(iter(images.batches(rows)))
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            live = model.block_features(batch)
    finally:
        torch.set_num_threads(1)
    for t in (100, 300):  # t=300 reuses the job's latent of t=100: still the live path's bits
        cached = torch.from_numpy(np.asarray(reader.load(18, t))[:rows])
        torch.testing.assert_close(live[(18, t)].float(), cached.float(), rtol=0, atol=0)

    out = _cli("probe", *common, "--blocks", 18, "--timesteps", 100, "--live", "--conditioning", "learnable",
               "--checkpoint", folder, "--image-size", 64, "--data-root", cifar10_root, "--per-class", 2,
               "--test-per-class", 2, "--epochs", 1, "--solver", "adam", "--lr", "0.01", "--batch-size", 10,
               "--no-progress", "--results", results, "--checkpoint-dir", tmp_path / "live")
    state = torch.load(tmp_path / "live" / "checkpoint.pth", weights_only=False)
    learned = [v for k, v in _flatten(state).items() if k.endswith("cond")]
    assert learned and learned[0].shape == (1, 77, 16)
    assert not torch.equal(learned[0], backbone.null_text)  # it trained
    assert read_results(results).to_pylist()[-1]["protocol"] == "live"


def _flatten(state, prefix=""):
    out = {}
    for key, value in state.items() if isinstance(state, dict) else []:
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif torch.is_tensor(value):
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("size, side", [(512, 16), (256, 8)])
def test_sd15_plan_needs_no_weights(size, side, tmp_path):
    """The plan of a real SD 1.5 run (dry run) has the latent's block sizes at 512 and 256 px, and SD's spec."""
    from pipeline.datasets import ImageIndex
    from pipeline.extraction import ExtractionRequest, plan_extraction

    index = ImageIndex(dataset="toy", split="train", root="/nowhere", paths=[f"/nowhere/{i}.jpg" for i in range(4)],
                       labels=np.array([0, 0, 1, 1]), class_names=["a", "b"])
    request = ExtractionRequest(dataset="toy", split="train", timesteps=(100,), blocks=(15, 18), config_name="sd15",
                                cache_dir=str(tmp_path), image_size=size)
    plan = plan_extraction(request, dry_run=True, index=index)
    assert plan.shapes[(18, 100)] == (1280, side, side) and plan.native_sizes[18] == side
    assert (plan.spec.image_size, plan.spec.family, plan.spec.noise_schedule) == (size, "sd", "scaled_linear")
