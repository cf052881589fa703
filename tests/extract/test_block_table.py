"""The block table computed by the project against the reference FLOP and parameter columns."""

import json

import pytest
from click.testing import CliRunner

from extract.backbone.block_table import block_table
from pipeline.cli.main import main

from .reference import load_manifest, reference_path


@pytest.fixture(scope="module")
def reference_blocks():
    return json.loads(reference_path("adm_blocks_256_uncond.json").read_text())


@pytest.fixture(scope="module")
def table():
    return block_table("256x256_uncond")


def test_every_block_matches_the_reference_within_one_percent(table, reference_blocks):
    rows = {r.b: r for r in table[:-1]}
    assert len(rows) == 37
    for ref in reference_blocks["blocks"]:
        row = rows[ref["b"]]
        assert row.module == ref["module"]
        assert row.channels == ref["out_channels"] and row.size == ref["out_hw"][0]
        assert row.params == ref["params_block"]
        assert row.flops_cum == pytest.approx(ref["flops_cum"], rel=0.01), f"b={ref['b']}"
    assert table[-1].flops_cum == pytest.approx(reference_blocks["total_forward_flops"], rel=0.01)
    assert table[-1].params == reference_blocks["total_params"]


def test_truncation_costs_follow_the_design(table):
    total = table[-1].flops_cum
    share = {r.b: r.flops_cum / total for r in table[:-1]}
    assert share[19] == pytest.approx(0.26, abs=0.01)
    assert share[24] == pytest.approx(0.29, abs=0.01)
    assert share[30] == pytest.approx(0.41, abs=0.01)


@pytest.mark.parametrize("name", ["64x64_cond", "256x256_classifier"])
def test_total_flops_of_other_configurations(name):
    assert block_table(name)[-1].flops_cum == pytest.approx(load_manifest(name)["forward_flops_batch1"], rel=0.01)


def test_info_command_prints_the_table(reference_blocks):
    result = CliRunner().invoke(main, ["info", "--config", "256x256_uncond"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    row24 = next(line for line in lines if line.split()[:2] == ["24", "output_blocks.4"])
    assert row24.split()[2:4] == ["1024", "16"]
    assert "552,814,086" in lines[-1]


def test_info_errors_are_one_line(tmp_path):
    result = CliRunner().invoke(main, ["info", "--config", "300x300"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["Error: unknown configuration '300x300': choose one of " + result.output.split("choose one of ")[1].strip()]
    (tmp_path / "bad.pt").write_text("nope")
    result = CliRunner().invoke(main, ["info", "--config", "32x32_small", "--checkpoint", str(tmp_path / "bad.pt")])
    assert result.exit_code == 1 and "not a readable PyTorch file" in result.output
    assert len(result.output.strip().splitlines()) == 1
