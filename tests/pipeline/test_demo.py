"""``diffrep demo`` end to end on a tiny CIFAR-10 subset: extract, probes, floors, report; a rerun only probes."""

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from extract.backbone.configs import bundled_checkpoint
from pipeline.cli.main import main


@pytest.mark.e2e
def test_demo_extracts_probes_reports_and_reuses_its_cache(cifar10_root, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFREP_DATA", str(cifar10_root.parent))
    out = tmp_path / "out"
    args = ["demo", "--per-class", "12", "--test-per-class", "6", "-t", "10,50,150", "-b", "8,10,12",
            "--pools", "2", "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--synchronous", "--no-progress"]
    first = CliRunner().invoke(main, args, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    assert "120 images (per_class=12)" in first.output and "60 images (per_class=6)" in first.output
    trained = bundled_checkpoint("32x32_small") is not None
    table = pq.read_table(out / "results.parquet").to_pylist()
    backbone = next(r["backbone_id"] for r in table if r["head"] == "linear")
    assert backbone.startswith("32x32_small-") and (backbone != "32x32_small-random0") == trained
    linear = pq.read_table(out / f"sweep_cifar10_{backbone}_linear.parquet")
    assert sorted(zip(linear["blocks"].to_pylist(), linear["timesteps"].to_pylist())) == sorted(
        (b, t) for b in ("8", "10", "12") for t in ("10", "50", "150"))
    assert set(linear["protocol"].to_pylist()) == {"converged"}
    report = (out / "report.md").read_text()
    for needle in ("## What held", "Mid timesteps best:", "Middle blocks best:", "Attention head over linear:",
                   "DifFormer over the attention head: ", "DifFeed over the attention head: not measured (DifFeed runs",
                   "## Stage times", "linear probes (converged):", "DifFormer:"):
        assert needle in report, needle
    if trained:  # floors: two random inits and raw pixels, on the same probe
        assert "floor, random init (fan-in, seed 0)" in report and "floor, raw pixels" in report
        assert "Pretrained over random init:" in report and "not measured" not in report.split("Pretrained over random init:")[1][:20]
    rows = pq.read_table(out / "results.parquet").num_rows
    assert rows == 9 + 9 + 2 + (2 if trained else 0)  # linear sweep, kNN sweep, attention head, DifFormer, floors
    difformer = [r for r in pq.read_table(out / "results.parquet").to_pylist() if r["head"] == "difformer"]
    assert len(difformer) == 1 and len(difformer[0]["blocks"].split(",")) == 2 and len(difformer[0]["timesteps"].split(",")) == 3
    assert (out / f"sweep_cifar10_{backbone}_linear_top1.png").stat().st_size > 0
    assert len(list(out.glob("cka_*.png"))) == 2

    second = CliRunner().invoke(main, args, catch_exceptions=False)
    assert second.exit_code == 0, second.output
    assert second.output.count("nothing to do: every requested array is complete") == (3 if trained else 1)
    assert pq.read_table(out / "results.parquet").num_rows == 2 * rows
