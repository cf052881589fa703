"""Source archives: unpacked once and atomically, checked, refused inside the repository; listed without unpacking."""

from __future__ import annotations

import io
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from pipeline.archives import ArchiveTree, DiskTree, ensure_unpacked, list_archive
from pipeline.datasets import build_index
from pipeline.errors import DatasetError
from pipeline.manifest import load_manifest, repo_root


def _manifest(tmp_path: Path, entries: str):
    path = tmp_path / "manifest.yaml"
    path.write_text("datasets:\n" + entries, encoding="utf-8")
    return load_manifest(path)

def _archive(tmp_path: Path, folder: str = "toy") -> Path:
    path = tmp_path / "src" / "toy.tar.gz"
    path.parent.mkdir(parents=True)
    with tarfile.open(path, "w:gz") as tar:
        for split, class_name, name in [("train", "a", "1.png"), ("train", "b", "1.png"), ("test", "a", "2.png")]:
            buffer = io.BytesIO()
            Image.new("L", (3, 3), 128).save(buffer, format="PNG")
            info = tarfile.TarInfo(f"{folder}/{split}/{class_name}/{name}")
            info.size = len(buffer.getvalue())
            tar.addfile(info, io.BytesIO(buffer.getvalue()))
    return path


def test_ensure_unpacked_once_and_atomically(tmp_path):
    archive = _archive(tmp_path)
    data_root = tmp_path / "data"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: ensure_unpacked(archive, data_root, "toy"), range(4)))
    assert results == [data_root / "toy"] * 4
    assert sorted(p.relative_to(data_root / "toy").as_posix() for p in (data_root / "toy").rglob("*.png")) == [
        "test/a/2.png", "train/a/1.png", "train/b/1.png",
    ]
    assert [p.name for p in data_root.iterdir() if "unpacking" in p.name] == []
    archive.unlink()
    assert ensure_unpacked(archive, data_root, "toy") == data_root / "toy"


def test_build_index_unpacks_source_archive(tmp_path):
    archive = _archive(tmp_path)
    entry = f"  toy: {{format: folder, root: toy, source_archive: {archive}, splits: {{train: train, test: test}}}}\n"
    index = build_index("toy", "train", manifest=_manifest(tmp_path, entry), root=tmp_path / "data")
    assert index.class_names == ["a", "b"] and index.num_images == 2
    assert (tmp_path / "data" / "toy" / "test" / "a" / "2.png").is_file()


def test_build_index_uses_shared_dir_from_environment(tmp_path, monkeypatch):
    archive = _archive(tmp_path)
    monkeypatch.setenv("DIFFREP_SHARED", str(archive.parent))
    entry = f"  toy: {{format: folder, root: toy, source_archive: {archive.name}, splits: {{train: train}}}}\n"
    assert build_index("toy", "train", manifest=_manifest(tmp_path, entry), root=tmp_path / "d").num_images == 2


def test_checksum_mismatch_and_bad_archives(tmp_path):
    archive = _archive(tmp_path)
    (archive.parent / "SHA256SUMS").write_text(f"{'0' * 64}  {archive.name}\n")
    with pytest.raises(DatasetError, match="has sha256 .* but .*SHA256SUMS says 0+: the archive is damaged"):
        ensure_unpacked(archive, tmp_path / "data", "toy")
    assert not (tmp_path / "data" / "toy").exists()
    no_line = tmp_path / "no-line-for-it.txt"
    no_line.write_text(f"{'0' * 64}  another.tar.gz\n")
    with pytest.raises(DatasetError, match="has no top-level folder 'other'"):
        ensure_unpacked(archive, tmp_path / "data", "other", checksums=no_line)
    with pytest.raises(DatasetError, match=r"source archive .*missing.tar.gz is missing"):
        ensure_unpacked(tmp_path / "missing.tar.gz", tmp_path / "data", "toy")
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"not a tarball")
    with pytest.raises(DatasetError, match="cannot unpack .*garbage.tar.gz"):
        ensure_unpacked(garbage, tmp_path / "data", "toy")
    assert [p.name for p in (tmp_path / "data").iterdir() if "unpacking" in p.name] == []


def test_refuses_to_unpack_into_the_repository(tmp_path):
    archive = _archive(tmp_path)
    inside = repo_root() / "data-that-must-not-exist"
    with pytest.raises(DatasetError, match="refusing to unpack toy.tar.gz into the repository"):
        ensure_unpacked(archive, inside, "toy")
    assert not inside.exists()


def test_the_archive_listing_is_the_tree_unpacking_gives(tmp_path):
    """A dry run's index, read from the listing, names exactly the files the unpacked tree holds."""
    path = tmp_path / "src" / "toy.tar.gz"
    path.parent.mkdir(parents=True)
    members = ["toy/train/b/2.png", "toy/train/a/x/3.JPG", "toy/train/a/1.png", "toy/train/a/notes.txt",
               "toy/train/a/.hidden.png", "toy/train/.cache/4.png", "toy/test/a/5.png", "other/train/a/6.png"]
    with tarfile.open(path, "w:gz") as tar:
        for name in members:
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    names, size = list_archive(path, "toy")
    assert sorted(names) == sorted(m for m in members if m.startswith("toy/")) and size == 3 * 7

    entry = f"  toy: {{format: folder, root: toy, source_archive: {path}, splits: {{train: train, test: test}}}}\n"
    manifest = _manifest(tmp_path, entry)
    listed = build_index("toy", "train", manifest=manifest, root=tmp_path / "data", unpack=False)
    assert not (tmp_path / "data").exists(), "a dry run writes nothing"
    assert listed.pending_unpack == (str(path), str(tmp_path / "data" / "toy"), 3 * 7)
    unpacked = build_index("toy", "train", manifest=manifest, root=tmp_path / "data")
    assert unpacked.pending_unpack is None
    assert listed.paths == unpacked.paths and listed.labels.tolist() == unpacked.labels.tolist()
    assert unpacked.relative_paths() == ["a/1.png", "a/x/3.JPG", "b/2.png"]
    train = tmp_path / "data" / "toy" / "train"
    tree = ArchiveTree(tmp_path / "data", names)
    for folder in (train, train / "a"):
        assert tree.subfolders(folder) == DiskTree.subfolders(folder)
        assert tree.images_under(folder) == DiskTree.images_under(folder)
