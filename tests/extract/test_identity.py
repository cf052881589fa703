"""The weights' identity: one backbone_id for cache folders and results rows, the cache's own strings, one per file."""

import hashlib
import os

import pytest
import torch

from extract.backbone.identity import backbone_id
from extract.backbone.registry import create_backbone
from extract.errors import CheckpointError


@pytest.mark.parametrize("sha256, weight_seed", [
    ("", None), ("", 0), ("", 7), ("0123456789abcdef" * 4, None), ("fedcba9876543210" * 4, 3),
])
def test_the_id_is_the_config_and_the_digest_or_the_seed(sha256, weight_seed):
    """The cache folders written before this function existed used these exact strings: they must not move."""
    ours = backbone_id("32x32_small", weight_seed=weight_seed, sha256=sha256)
    assert ours == (f"32x32_small-{sha256[:12]}" if sha256 else f"32x32_small-random{weight_seed or 0}")


def _save(path, seed):
    torch.save(create_backbone("32x32_small", weight_seed=seed).state_dict(), path)
    return path


def test_a_checkpoint_is_named_by_its_content(tmp_path):
    first, second = _save(tmp_path / "a.pt", 1), _save(tmp_path / "b.pt", 2)
    digest = hashlib.sha256(first.read_bytes()).hexdigest()
    assert backbone_id("32x32_small", str(first)) == f"32x32_small-{digest[:12]}"
    assert backbone_id("32x32_small", str(first)) == backbone_id("32x32_small", sha256=digest)
    assert backbone_id("32x32_small", str(first)) != backbone_id("32x32_small", str(second))
    copy = tmp_path / "copy.pt"
    copy.write_bytes(first.read_bytes())
    assert backbone_id("32x32_small", str(copy)) == backbone_id("32x32_small", str(first))  # path does not matter
    assert backbone_id("32x32_small", str(first), weight_seed=5) == backbone_id("32x32_small", str(first))


def test_a_rewritten_file_gets_its_new_id(tmp_path):
    """The hash is kept per file version: overwriting the file (new size or time) hashes it again."""
    path = _save(tmp_path / "w.pt", 1)
    before = backbone_id("32x32_small", str(path))
    stat = os.stat(path)
    _save(path, 2)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = backbone_id("32x32_small", str(path))
    assert after != before and after == f"32x32_small-{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"


def test_a_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint .*nope\.pt does not exist: check the path given to --checkpoint"):
        backbone_id("32x32_small", str(tmp_path / "nope.pt"))
