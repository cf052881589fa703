"""Messages that say what a file is: a .pt holding non-tensor objects, a --checkpoint that is no regular file, an unsafe tar member."""

from __future__ import annotations

import argparse
import io
import os
import tarfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from extract.backbone.checkpoint import read_state_dict
from extract.errors import CheckpointError
from pipeline.archives import ensure_unpacked, list_archive
from pipeline.cli.main import main
from pipeline.errors import DatasetError


def _one_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    return lines[0]


def test_an_intact_file_with_objects_that_are_not_tensors_is_called_what_it_is(tmp_path):
    path = tmp_path / "with_args.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=0.1)}, path)
    line = _one_line(CliRunner().invoke(main, ["info", "--config", "32x32_small", "--checkpoint", str(path)]))
    assert line == (f"Error: checkpoint {path} holds objects that are not tensors or plain values (argparse.Namespace), "
                    f"so it is not loaded (loading it could run code): pass the official .pt file (download it again "
                    f"if it was cut short)")
    assert "truncated" not in line and "damaged" not in line


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_device_as_checkpoint_is_not_a_regular_file():
    expected = ("Error: checkpoint /dev/zero is not a regular file (a character device): pass the .pt file itself "
                "to --checkpoint")
    info = CliRunner().invoke(main, ["info", "--config", "32x32_small", "--checkpoint", "/dev/zero"])
    assert _one_line(info) == expected
    extract = CliRunner().invoke(main, ["extract", "--dataset", "cifar10", "--config", "32x32_small", "--checkpoint",
                                        "/dev/zero", "-t", "50", "-b", "3", "--dry-run"])
    assert _one_line(extract) == expected


def test_a_pipe_as_checkpoint_is_refused_before_it_is_read(tmp_path):
    fifo = tmp_path / "weights.pt"
    os.mkfifo(fifo)  # reading it would block forever
    with pytest.raises(CheckpointError, match=r"is not a regular file \(a pipe\)"):
        read_state_dict(fifo)


def _tar(tmp_path: Path, *members: tarfile.TarInfo) -> Path:
    path = tmp_path / "src" / "toy.tar"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        good = tarfile.TarInfo("toy/train/a/1.png")
        good.size = 3
        tar.addfile(good, io.BytesIO(b"abc"))
        for member in members:
            tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
    return path


def _file(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 1
    return info


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize("member, why", [
    (_file("/etc/diffrep-owned"), "has an absolute path"),
    (_file("toy/../../escaped"), "would be written outside the data root (a '..' in its path)"),
    (_link("toy/train/a/up", "../../../../outside"), "is a link that points outside the data root"),
    (_link("toy/train/a/abs", "/etc/passwd"), "is a link to an absolute path"),
    (_link("toy/train/a/hard", "/etc/passwd", tarfile.LNKTYPE), "is a link to an absolute path"),
])
def test_an_unsafe_member_is_named_and_nothing_is_unpacked(tmp_path, member, why):
    archive = _tar(tmp_path, member)
    data_root = tmp_path / "data"
    with pytest.raises(DatasetError) as unpacking:
        ensure_unpacked(archive, data_root, "toy")
    expected = (f"refusing to unpack {archive}: member {member.name!r} {why}, so nothing is unpacked; get the "
                f"archive from a source you trust, or unpack it yourself and pass --data-root")
    assert str(unpacking.value) == expected
    assert not (data_root / "toy").exists() and [p.name for p in data_root.iterdir() if "unpacking" in p.name] == []
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "outside").exists()
    with pytest.raises(DatasetError) as listing:  # a dry run refuses the same archive the same way
        list_archive(archive, "toy")
    assert str(listing.value) == expected


def test_a_safe_archive_still_lists_and_unpacks(tmp_path):
    archive = _tar(tmp_path, _link("toy/train/a/same", "1.png"))  # a link inside the folder is fine
    assert list_archive(archive, "toy") == (["toy/train/a/1.png"], 3)
    assert (ensure_unpacked(archive, tmp_path / "data", "toy") / "train" / "a" / "1.png").read_bytes() == b"abc"
