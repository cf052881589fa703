"""Advice is a command that does exactly the missing work, and a sweep never silently misses a cell.

A small folder dataset (3 classes, PNGs) is extracted once with non-default settings (subset, shard size,
pool, noise and order seeds); each test tampers with a copy. The command a refusal advises is then run
through the CLI with --dry-run: it must plan that very cache (same backbone id and folder, same images) and
exactly the missing arrays or shards.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from extract.cache import open_cache, reset_shards
from pipeline.cli.main import main

BACKBONE = "32x32_small-random0"
SETTINGS = ["--config", "32x32_small", "-b", "4,6", "-t", "10", "--pool", "none", "--shard-size", "4", "--limit", "10",
            "--noise-seed", "3", "--order-seed", "2", "--batch-size", "5", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """(data root, manifest, cache dir): both splits of 'tiny' (12 images each, 10 kept, 3 shards) extracted once."""
    root = tmp_path_factory.mktemp("advice")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("ant", "bee", "cat"):
            folder = root / "data" / "tiny" / split / name
            folder.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    manifest = root / "manifest.yaml"
    manifest.write_text("datasets:\n  tiny: {format: folder, root: tiny, splits: {train: train, test: test}}\n")
    cache_dir = root / "cache"
    result = CliRunner().invoke(main, ["extract", "--dataset", "tiny", "--split", "train,test", *SETTINGS, "--data-root",
                                       str(root / "data"), "--cache-dir", str(cache_dir), "--synchronous"],
                                env={"DIFFREP_MANIFEST": str(manifest)}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return root / "data", manifest, cache_dir


@pytest.fixture()
def copy(extracted, tmp_path, monkeypatch):
    data, manifest, cache_dir = extracted
    monkeypatch.setenv("DIFFREP_MANIFEST", str(manifest))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(cache_dir, tmp_path / "cache")
    return tmp_path / "cache"


def _run(*args):
    return CliRunner().invoke(main, list(args))


def _error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    return lines[0]


def _dry_run_of_advice(line: str) -> str:
    """Run the command the error line advises (everything after its last ': run ') with --dry-run; its plan."""
    command = shlex.split(line.rsplit(": run ", 1)[1])
    assert command[:2] == ["diffrep", "extract"], line
    result = CliRunner().invoke(main, [*command[1:], "--dry-run"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _planned(plan: str, cache: Path) -> dict:
    """{array: state} and the work the plan of one cache lists; it must be that very cache."""
    assert f"  cache {cache}\n" in plan, plan
    assert re.search(r"extract tiny/\w+: 10 images \(limit=10\), 3 shards of 4", plan), plan
    states = dict(re.findall(r"  (b\d+/t\d+): .*\[([a-z, ]+)\]", plan))
    tasks, images = map(int, re.search(r"to do: (\d+) shard tasks, (\d+) images", plan).groups())
    return {"states": states, "tasks": tasks, "images": images}


def _probe(cache_dir, *args):
    return _run("probe", "--dataset", "tiny", "--config", "32x32_small", "--cache-dir", str(cache_dir),
                "--results", "results.parquet", *args)


def test_missing_shards_advise_the_command_that_writes_just_them(copy):
    train = copy / "tiny" / "train" / BACKBONE
    reset_shards(str(train), {(4, 10, 0): [1, 2]})
    line = _error(_probe(copy, "-b", "4", "-t", "10"))
    assert "array b4/t10 of" in line and "is missing 2 of 3 shards" in line
    for flag in ("--limit 10", "--shard-size 4", "--pool none", "--noise-seed 3", "--order-seed 2", "--split train"):
        assert flag in line, flag
    plan = _planned(_dry_run_of_advice(line), train)
    assert plan["states"] == {"b4/t10": "resume"} and plan["tasks"] == 2
    assert plan["images"] == 6  # shards 1 and 2 of 4 + 2 images: exactly the missing work
    assert not Path("results.parquet").exists()


def test_a_missing_array_advises_the_command_that_adds_it_to_the_same_cache(copy):
    line = _error(_probe(copy, "-b", "8", "-t", "10"))
    assert line.startswith("Error: the train cache has no array b8/t10: run diffrep extract --dataset tiny --split train")
    plan = _planned(_dry_run_of_advice(line), copy / "tiny" / "train" / BACKBONE)
    assert plan["states"] == {"b8/t10": "new"}
    assert (plan["tasks"], plan["images"]) == (3, 10)


def test_a_lost_shard_object_advises_the_command_that_redoes_it(copy):
    test = copy / "tiny" / "test" / BACKBONE
    shutil.rmtree(test / "b6" / "t10" / "c" / "2")
    line = _error(_run("knn", "--dataset", "tiny", "--config", "32x32_small", "--cache-dir", str(copy), "-b", "6",
                       "-t", "10", "--k", "3", "--results", "results.parquet"))
    assert "has 1 damaged shard(s) 2" in line and "--split test" in line
    plan = _planned(_dry_run_of_advice(line), test)
    assert plan["states"]["b6/t10"] == "resume" and (plan["tasks"], plan["images"]) == (1, 2)


def test_feedback_s_pass_1_fallback_advises_the_command_that_fills_that_cache(copy, extracted):
    data = extracted[0]
    result = _run("feedback", "--dataset", "tiny", "--config", "32x32_small", "-t", "10", "--strategy", "bottleneck",
                  "--noise-seed", "3", "--cache-dir", str(copy), "--data-root", str(data), "--dry-run")
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if "pass 1 (train)" in line)
    assert "lacks complete b12,15,18 at t=10: run diffrep extract" in line
    plan = _planned(_dry_run_of_advice(line.rstrip(")")), copy / "tiny" / "train" / BACKBONE)
    assert plan["states"] == {"b12/t10": "new", "b15/t10": "new", "b18/t10": "new"} and plan["images"] == 10


def _sweep(cache_dir, *args):
    return _run("sweep", "--dataset", "tiny", "--config", "32x32_small", "--cache-dir", str(cache_dir), "--pools", "1",
                "--results", "results.parquet", "--out", "sweeps", *args)


def test_a_sweep_over_a_damaged_cell_names_it_and_trains_nothing(copy):
    shutil.rmtree(copy / "tiny" / "test" / BACKBONE / "b4" / "t10" / "c" / "0")
    line = _error(_sweep(copy))
    assert "the sweep's grid is incomplete: b4/t10 of the test split has 1 damaged shard(s) 0" in line
    assert "--skip-incomplete" in line and "run diffrep extract --dataset tiny --split test" in line
    assert not Path("results.parquet").exists() and not Path("sweeps").exists()
    plan = _planned(_dry_run_of_advice(line), copy / "tiny" / "test" / BACKBONE)
    assert plan["states"]["b4/t10"] == "resume" and (plan["tasks"], plan["images"]) == (1, 4)


def test_a_cell_missing_from_one_split_stops_the_sweep_or_is_named_with_skip_incomplete(copy):
    test = copy / "tiny" / "test" / BACKBONE
    shutil.rmtree(test / "b6")
    shutil.rmtree(test / "done" / "b6")
    line = _error(_sweep(copy))
    assert "b6/t10 of the test split is not extracted" in line
    result = _sweep(copy, "--skip-incomplete")
    assert result.exit_code == 0, result.output
    assert "not measured (--skip-incomplete): b6/t10 of the test split is not extracted" in result.output
    report = next(Path("sweeps").glob("*.md")).read_text()
    assert "Cells not measured" in report and "b6/t10 of the test split is not extracted" in report
    rows = pq.read_table("results.parquet").to_pylist()
    assert [(r["blocks"], r["timesteps"]) for r in rows] == [("4", "10")]
    assert open_cache(copy, "tiny", "train", BACKBONE).is_complete(6, 10), "the train split was not touched"
