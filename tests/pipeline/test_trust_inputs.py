"""Inputs that could write outside their folders, run arbitrary code or read as nonsense are refused in one line:
dataset, split and backbone names that are paths, unknown torchvision loaders, download options, RAM caps that
are not positive numbers; and a results table that cannot be written never loses the printed result."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli.main import main
from pipeline.errors import BadNameError, DatasetError
from pipeline.manifest import load_manifest
from tests.probe.test_features import make_cache

BAD_NAMES = ["../../x", "..", ".", "", "/abs", "a/b", "a\\b", "tab\there", "new\nline", "-rf", "x" * 129]
ENTRY = "{format: folder, root: imgs, splits: {train: train, test: test}}"


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _error_line(result) -> str:
    """The output's one ``Error:`` line (click adds Usage lines before it for a bad option value)."""
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_manifest_dataset_or_split_name_that_is_not_one_folder_is_refused_at_load(tmp_path, name):
    for text in (f"datasets:\n  {json.dumps(name)}: {ENTRY}\n",
                 f"datasets:\n  ok: {{format: folder, root: imgs, splits: {{{json.dumps(name)}: train}}}}\n"):
        manifest = tmp_path / "manifest.yaml"
        manifest.write_text(text)
        with pytest.raises(BadNameError) as info:
            load_manifest(manifest)
        message = str(info.value)
        assert "\n" not in message and "cannot be a folder name: use letters, digits" in message


def test_extract_with_a_manifest_dataset_named_dot_dot_creates_nothing_outside_the_cache_dir(tmp_path, monkeypatch):
    (tmp_path / "data" / "imgs" / "train" / "a").mkdir(parents=True)
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(f'datasets:\n  "../../x": {ENTRY}\n')
    monkeypatch.setenv("DIFFREP_MANIFEST", str(manifest))
    cache_dir = tmp_path / "deep" / "er" / "cache"
    before = _tree(tmp_path)
    result = CliRunner().invoke(main, ["extract", "--dataset", "../../x", "--split", "train", "--config", "32x32_small",
                                       "-b", "4", "-t", "10", "--data-root", str(tmp_path / "data"),
                                       "--cache-dir", str(cache_dir), "--synchronous", "--no-progress"])
    assert result.exit_code != 0
    assert "dataset name '../../x' cannot be a folder name" in _error_line(result)
    assert _tree(tmp_path) == before, "nothing was created, inside or outside the cache dir"


@pytest.mark.parametrize("args", [
    ["extract", "--dataset", "../x", "-b", "4", "-t", "10"],
    ["extract", "--dataset", "cifar10", "--split", "train,../../up", "-b", "4", "-t", "10"],
    ["probe", "--dataset", "toy", "--train-split", "/etc", "-b", "24", "-t", "150"],
    ["knn", "--dataset", "toy", "--backbone-id", "../../elsewhere", "-b", "24", "-t", "150"],
    ["sweep", "--dataset", "toy", "--test-split", "..", "--config", "32x32_small"],
    ["cka", "--dataset", "toy", "--split", "a/b", "-b", "24", "-t", "150"],
    ["verify", "--dataset", "..", "--split", "train"],
    ["pretrain", "--split", "../../train", "--steps", "1"],
    ["feedback", "--dataset", "toy", "--train-split", "\x1b[2J", "--dry-run"],
])
def test_every_command_refuses_a_name_that_is_a_path_before_touching_anything(tmp_path, args):
    before = _tree(tmp_path)
    result = CliRunner().invoke(main, [*args, "--cache-dir", str(tmp_path / "cache")] if args[0] not in ("pretrain", "feedback")
                                else args)
    assert result.exit_code == 2
    assert "name" in _error_line(result) and "cannot be a folder name: use letters, digits" in _error_line(result)
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("options, message", [
    ("{loader: __class__}", "unknown loader '__class__': use one of Country211, DTD, FGVCAircraft"),
    ("{loader: Compose}", "unknown loader 'Compose': use one of"),
    ("{loader: FGVCAircraft, options: {download: true}}", "diffrep never downloads at run time; download the data yourself"),
    ("{loader: FGVCAircraft, options: {download: false}}", "remove 'download' from its options"),
    ("{loader: Flowers102, options: {root: /tmp}}", "sets options.root, which diffrep passes itself"),
])
def test_torchvision_entries_name_a_known_loader_and_never_download(tmp_path, options, message):
    entry = options[:-1] + ", format: torchvision, root: x, splits: {train: {path: ., key: train}}}"
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(f"datasets:\n  tv: {entry}\n")
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(".", r"\.")) as info:
        load_manifest(manifest)
    assert "\n" not in str(info.value)


def test_the_shipped_manifest_uses_only_known_loaders():
    manifest = load_manifest()
    assert {entry.get("loader") for entry in manifest.datasets.values()} - {None} == {"FGVCAircraft", "StanfordCars", "Flowers102"}


# ---- results that cannot be written, RAM caps, advice in CLI terms (on a small synthetic cache) ----------------

@pytest.fixture()
def toy(tmp_path):
    keys = ((24, 150), (19, 90), (24, 90), (19, 150))
    make_cache(tmp_path / "cache", n=61, keys=keys, split="train", signal=4.0, seed=0)
    make_cache(tmp_path / "cache", n=31, keys=keys, split="test", signal=4.0, seed=1, invalid=(5,))
    return tmp_path


def _invoke(toy, *args):
    results = ["--results", str(toy / "results" / "results.parquet")] if args[0] != "cka" else []
    return CliRunner().invoke(main, [*args, "--dataset", "toy", "--cache-dir", str(toy / "cache"), "--config", "32x32_small",
                                     *results])


@pytest.mark.parametrize("cap", ["nan", "inf", "-inf", "-1", "0", "lots"])
@pytest.mark.parametrize("command", ["probe", "knn", "cka"])
def test_a_ram_cap_that_is_not_a_positive_number_is_refused_in_one_line(toy, command, cap):
    result = _invoke(toy, command, "-b", "24", "-t", "150", "--ram-cap-gb", cap)
    assert result.exit_code == 2
    assert "--ram-cap-gb" in _error_line(result) and "GiB" in _error_line(result)
    assert not (toy / "results").exists()


@pytest.mark.parametrize("command", [["knn", "--pool", "4", "-b", "24", "-t", "150"],
                                     ["sweep", "--pools", "4", "-b", "24", "-t", "150"],
                                     ["probe", "--pool", "4", "-b", "24", "-t", "150"],
                                     ["cka", "-b", "19,24", "-t", "90", "--estimator", "linear"]])
def test_over_the_ram_cap_the_advice_names_command_line_flags(toy, command):
    result = _invoke(toy, *command, "--ram-cap-gb", "1e-7")
    assert result.exit_code == 1
    line = _error_line(result)
    assert "--ram-cap-gb" in line and "--pool" in line
    assert "iter_shards" not in line and "ram_cap_bytes" not in line and "0.0 GiB" not in line
    assert not (toy / "results").exists()


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES])
@pytest.mark.parametrize("command", [["probe"], ["knn", "--k", "5"], ["sweep", "--pools", "2"]])
def test_a_results_table_that_cannot_be_written_keeps_the_printed_result(toy, monkeypatch, command, error):
    spare = toy / "spare"
    spare.mkdir()
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(spare))

    def refuse(table, where, **kwargs):
        if Path(where).name.endswith(".tmp"):  # the results table only: the sweep's own table still writes
            Path(where).write_bytes(b"PAR1")
            raise OSError(error, os.strerror(error), str(where))
        return real(table, where, **kwargs)

    real = pq.write_table
    monkeypatch.setattr(pq, "write_table", refuse)
    real_fsync = os.fsync

    def fsync(fd):  # the results folder is as full (or read-only) as the table
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(toy / "results")):
            raise OSError(error, os.strerror(error))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    extra = ["--out", str(toy / "sweeps")] if command[0] == "sweep" else []
    result = _invoke(toy, *command, "-b", "24", "-t", "150", *extra)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    error_at = next(i for i, line in enumerate(lines) if line.startswith("Error:"))
    shown = [line for line in lines[:error_at] if "top-1" in line]
    assert shown, "the accuracy is printed before the error"
    kept = list(spare.glob("results.parquet.unsaved-*.json"))
    assert len(kept) == 1 and f"the rows are in {kept[0]}" in lines[error_at] and os.strerror(error) in lines[error_at]
    row = json.loads(kept[0].read_text())[0]
    assert f"top-1 {100 * row['top1']:.2f}%" in shown[0]
    assert sorted(p.name for p in (toy / "results").iterdir()) == ["results.parquet.lock"], "nothing empty is left"
