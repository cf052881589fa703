"""The data manifest: every paper dataset is named, paths resolve against the data root, bad entries are one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from extract.errors import DiffrepError
from pipeline.errors import DatasetError
from pipeline.manifest import FORMATS, default_data_root, default_shared_dir, get_dataset, load_manifest, repo_root

PAPER_DATASETS = [
    "imagenet", "imagenet-1pct", "imagenet-10pct", "imagenet-50",
    "cub", "aircraft", "cars", "dogs", "flowers", "nabirds", "cifar10",
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_default_manifest_names_every_paper_dataset():
    manifest = load_manifest()
    assert manifest.path == repo_root() / "data_manifest.yaml"
    assert set(PAPER_DATASETS) <= set(manifest.names)
    for name in manifest.names:
        spec = get_dataset(name, manifest, {"data_root": "/data"})
        assert spec.splits, name
        assert spec.format in FORMATS
        assert all(split.format in FORMATS for split in spec.splits.values())


def test_default_manifest_paths(monkeypatch):
    monkeypatch.setenv("DIFFREP_DATA", "/mnt/datasets")
    monkeypatch.setenv("DIFFREP_SHARED", "/srv/shared")
    manifest = load_manifest()

    cifar = get_dataset("cifar10", manifest)
    assert cifar.root == Path("/mnt/datasets/cifar10-jpg")
    assert cifar.split("test").path == Path("/mnt/datasets/cifar10-jpg/test")
    assert cifar.source_archive == Path("/srv/shared/data/cifar10-jpg.tar.gz")

    one_pct = get_dataset("imagenet-1pct", manifest)
    assert one_pct.split("train").format == "list"
    assert one_pct.split("train").path == Path("/mnt/datasets/imagenet/train")
    assert one_pct.split("train").list_file == Path("/mnt/datasets/imagenet/lists/1percent.txt")
    assert one_pct.split("val").format == "folder"

    assert get_dataset("imagenet-50", manifest).classes_file == Path("/mnt/datasets/imagenet/lists/imagenet50_classes.txt")
    assert get_dataset("cub", manifest).split("test").key == "0"
    aircraft = get_dataset("aircraft", manifest)
    assert (aircraft.loader, aircraft.split("train").key, dict(aircraft.options)) == ("FGVCAircraft", "trainval", {"annotation_level": "variant"})


def test_defaults_without_environment(monkeypatch):
    monkeypatch.delenv("DIFFREP_DATA", raising=False)
    monkeypatch.delenv("DIFFREP_SHARED", raising=False)
    assert default_data_root() == Path.home() / ".cache" / "diffrep" / "data"
    assert default_shared_dir() == repo_root().parent / "shared"


def test_overrides_win(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFREP_DATA", "/not/used")
    manifest = load_manifest()
    spec = get_dataset("imagenet-1pct", manifest, {
        "data_root": tmp_path,
        "split_dirs": {"val": tmp_path / "my-val"},
        "lists": {"train": tmp_path / "mine.txt"},
        "classes": tmp_path / "classes.txt",
    })
    assert spec.data_root == tmp_path
    assert spec.split("train").path == tmp_path / "imagenet" / "train"
    assert spec.split("train").list_file == tmp_path / "mine.txt"
    assert spec.split("val").path == tmp_path / "my-val"
    assert spec.classes_file == tmp_path / "classes.txt"
    assert get_dataset("cifar10", manifest, {"root": tmp_path / "c"}).split("train").path == tmp_path / "c" / "train"


def test_unknown_dataset_is_one_clear_error():
    with pytest.raises(DatasetError) as info:
        get_dataset("foo", load_manifest())
    message = str(info.value)
    assert message.startswith("unknown dataset 'foo': known datasets are aircraft, cars, cifar10, ")
    assert message.endswith("; add an entry to data_manifest.yaml")
    assert "\n" not in message
    assert isinstance(info.value, DiffrepError) and isinstance(info.value, FileNotFoundError)


def test_unknown_split_and_override():
    spec = get_dataset("cifar10", load_manifest())
    with pytest.raises(DatasetError, match="dataset 'cifar10' has no split 'val': its splits are train, test"):
        spec.split("val")
    with pytest.raises(DatasetError, match="unknown dataset override"):
        get_dataset("cifar10", load_manifest(), {"dataroot": "/x"})


def test_user_entry_for_any_folder_tree(tmp_path):
    path = _write(tmp_path / "m.yaml", "datasets:\n  pets: {format: folder, root: /data/pets, splits: {train: tr, test: te}}\n")
    spec = get_dataset("pets", load_manifest(path))
    assert spec.split("train").path == Path("/data/pets/tr")
    assert spec.split("test").list_file is None


@pytest.mark.parametrize("text, fragment", [
    ("datasets: [1, 2]\n", "no 'datasets' mapping"),
    ("datasets:\n  x: {format: zip, root: x, splits: {train: t}}\n", "unknown format 'zip'"),
    ("datasets:\n  x: {format: folder, root: x}\n", "has no 'splits'"),
    ("datasets:\n  x: {format: folder, root: x, splits: {}}\n", "'splits' must map"),
    ("datasets:\n  x: {format: folder, root: x, split: {train: t}}\n", "unknown key(s) split"),
    ("datasets:\n  x: {format: folder, root: x, splits: {train: {paht: t}}}\n", "unknown key(s) paht"),
    ("datasets:\n  x: {format: folder, root: x, splits: {train: {format: list}}}\n", "no 'list' file"),
    ("datasets:\n  x: {format: torchvision, root: x, splits: {train: {key: train}}}\n", "no 'loader'"),
    ("datasets:\n  x: {format: folder, root: x, splits: {train: [a]\n", "not valid YAML"),
])
def test_bad_manifest_is_one_line_error(tmp_path, text, fragment):
    path = _write(tmp_path / "m.yaml", text)
    with pytest.raises(DatasetError) as info:
        load_manifest(path)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_manifest_file(tmp_path):
    with pytest.raises(DatasetError, match="cannot read data manifest .*DIFFREP_MANIFEST"):
        load_manifest(tmp_path / "nope.yaml")


def test_manifest_from_environment(tmp_path, monkeypatch):
    path = _write(tmp_path / "m.yaml", "datasets:\n  only: {format: folder, root: o, splits: {train: t}}\n")
    monkeypatch.setenv("DIFFREP_MANIFEST", str(path))
    assert load_manifest().names == ["only"]
