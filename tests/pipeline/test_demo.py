"""``diffrep demo`` end to end on a tiny CIFAR-10 subset: extract, sweep, report; a rerun only probes."""

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import main


@pytest.mark.e2e
def test_demo_extracts_probes_and_reuses_its_cache(cifar10_root, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFREP_DATA", str(cifar10_root.parent))
    args = ["demo", "--per-class", "12", "--test-per-class", "6", "--timesteps", "10", "--blocks", "9,12",
            "--pools", "2", "--epochs", "3", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
            "--synchronous", "--no-progress"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "120 images (per_class=12)" in first.output and "60 images (per_class=6)" in first.output
    assert "best linear: b=" in first.output and "best knn: b=" in first.output
    linear = pq.read_table(tmp_path / "out" / "sweep_cifar10_32x32_small-random0_linear.parquet")
    assert sorted(zip(linear["blocks"].to_pylist(), linear["pool"].to_pylist())) == [("12", 2), ("9", 2)]
    assert (tmp_path / "out" / "sweep_cifar10_32x32_small-random0_knn_top1.png").stat().st_size > 0
    assert pq.read_table(tmp_path / "out" / "results.parquet").num_rows == 4

    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0, second.output
    assert "the demo cache is complete: probing only" in second.output
    assert pq.read_table(tmp_path / "out" / "results.parquet").num_rows == 8
