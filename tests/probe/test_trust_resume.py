"""Resuming probe and fuse from the cache: a crafted checkpoint runs nothing, other data is refused, Ctrl-C keeps the checkpoint.

Each case tampers, runs the command through CliRunner, and asserts the exit code, the one line, and
that nothing finished was lost (the checkpoint on disk, the results table).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import probe.train as train_module
from pipeline.cli.main import main
from pipeline.evaluate.probe import INTERRUPTED_UNRECORDED
from pipeline.results import read_results
from tests.probe.test_features import make_cache

torch.set_num_threads(1)
KEYS = ((24, 150), (19, 150))


class Crafted:
    """Unpickles to a call of ``open(marker, "w")``: a checkpoint that runs code creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def write_crafted(path: Path, marker: Path, keys=("head", "optimizer", "scheduler", "epoch", "config")) -> None:
    """A checkpoint with every key diffrep looks for, one of them the crafted object."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({key: Crafted(marker) if i == 0 else {} for i, key in enumerate(keys)}, path)


def test_the_crafted_checkpoint_runs_code_when_unpickled(tmp_path):
    """The fixture is real: an unrestricted load creates the marker (so its absence below means something)."""
    write_crafted(tmp_path / "c.pth", tmp_path / "ran")
    torch.load(tmp_path / "c.pth", weights_only=False)
    assert (tmp_path / "ran").exists()


@pytest.fixture()
def toy(tmp_path):
    make_cache(tmp_path / "cache", n=61, keys=KEYS, split="train", signal=4.0, seed=0)
    make_cache(tmp_path / "cache", n=31, keys=KEYS, split="test", signal=4.0, seed=1)
    return tmp_path


def _run(tmp_path, *args, cache="cache"):
    common = ["--dataset", "toy", "--cache-dir", str(tmp_path / cache), "--config", "32x32_small"]
    return CliRunner().invoke(main, [*args, *common], catch_exceptions=False)


def _sgd(tmp_path, *extra, epochs=4, lr="0.5"):
    return ["probe", "-b", "24", "-t", "150", "--solver", "sgd", "--epochs", str(epochs), "--lr", lr,
            "--batch-size", "8", "--no-progress", "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--results", str(tmp_path / "results.parquet"), *extra]


def _fuse(tmp_path, *extra):
    return ["fuse", "-b", "19,24", "-t", "150", "--dim", "16", "--depth", "1", "--epochs", "2", "--solver", "adam",
            "--lr", "1e-2", "--batch-size", "8", "--no-progress", "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--results", str(tmp_path / "results.parquet"), *extra]


def _one_line(result, code: int) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == code and len(lines) == 1, result.output
    return lines[0]


@pytest.mark.parametrize("command", [_sgd, _fuse])
def test_a_crafted_checkpoint_runs_nothing_on_resume(toy, command):
    path, marker = toy / "ckpt" / "checkpoint.pth", toy / "ran"
    write_crafted(path, marker)
    line = _one_line(_run(toy, *command(toy, "--resume")), 1)
    assert line == (f"Error: checkpoint {path} holds objects that are not tensors or plain values (io.open), "
                    f"so it is not loaded (loading it could run code): delete it to train from the start, or pass "
                    f"another --checkpoint-dir")
    assert not marker.exists() and not (toy / "results.parquet").exists()


def _saved(tmp_path):
    return (tmp_path / "ckpt" / "checkpoint.pth").read_bytes()


def test_resume_against_another_cache_is_refused(toy):
    """Killed-and-resumed against a cache of other images (another folder, fewer rows): refused, nothing lost."""
    assert _run(toy, *_sgd(toy, epochs=2)).exit_code == 0
    before, rows = _saved(toy), read_results(toy / "results.parquet").num_rows
    make_cache(toy / "small", n=30, keys=KEYS, split="train", signal=4.0, seed=5)
    make_cache(toy / "small", n=31, keys=KEYS, split="test", signal=4.0, seed=1)
    line = _one_line(_run(toy, *_sgd(toy, "--resume", epochs=2), cache="small"), 1)
    assert line.startswith(f"Error: checkpoint {toy / 'ckpt' / 'checkpoint.pth'} was trained with other features or "
                           f"head (train_cache.num_images 61 saved, 30 asked)")
    assert line.endswith("pass the same options it was trained with, or another --checkpoint-dir to train anew")
    assert _saved(toy) == before and read_results(toy / "results.parquet").num_rows == rows


def test_the_same_cache_in_another_folder_resumes(toy):
    """The cache's identity is its spec, not its folder: a moved copy resumes."""
    assert _run(toy, *_sgd(toy, epochs=2)).exit_code == 0
    (toy / "cache").rename(toy / "moved")
    result = _run(toy, *_sgd(toy, "--resume", epochs=2), cache="moved")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("field, value", [("row_order_seed", 7), ("subset", "limit=61"), ("noise_seed", 3)])
def test_resume_against_a_cache_of_another_subset_or_seed_is_refused(toy, field, value):
    assert _run(toy, *_sgd(toy, epochs=2)).exit_code == 0
    before = _saved(toy)
    for split, n, seed in (("train", 61, 0), ("test", 31, 1)):
        make_cache(toy / "other", n=n, keys=KEYS, split=split, signal=4.0, seed=seed, **{field: value})
    line = _one_line(_run(toy, *_sgd(toy, "--resume", epochs=2), cache="other"), 1)
    assert f"train_cache.{field} " in line and "--checkpoint-dir" in line
    assert _saved(toy) == before


@pytest.mark.parametrize("extra, named", [(["--label-fraction", "0.5"], "label_fraction None saved, 0.5 asked"),
                                          (["--seed", "3"], "seed 0 saved, 3 asked")])
def test_resume_with_another_subset_or_order_seed_is_refused(toy, extra, named):
    assert _run(toy, *_sgd(toy, epochs=2)).exit_code == 0
    before = _saved(toy)
    line = _one_line(_run(toy, *_sgd(toy, "--resume", *extra, epochs=2)), 1)
    assert named in line and "another --checkpoint-dir" in line
    assert _saved(toy) == before


def test_resume_of_a_grid_with_another_held_out_share_is_refused(toy):
    assert _run(toy, *_sgd(toy, epochs=2, lr="0.5,0.1")).exit_code == 0
    line = _one_line(_run(toy, *_sgd(toy, "--resume", "--heldout-fraction", "0.3", epochs=2, lr="0.5,0.1")), 1)
    assert "heldout_fraction 0.2 saved, 0.3 asked" in line


def _dies_in_epoch(monkeypatch, epoch: int) -> None:
    """Ctrl-C at the start of the given epoch (1-based), from inside fit's loop."""
    real, calls = train_module.train_one_epoch, {"n": 0}

    def train_one_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == epoch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", train_one_epoch)


def test_ctrl_c_says_which_checkpoint_is_kept_and_the_same_command_resumes(toy, monkeypatch):
    straight = toy / "straight"
    assert _run(toy, *[a if a != str(toy / "ckpt") else str(straight) for a in _sgd(toy)]).exit_code == 0
    _dies_in_epoch(monkeypatch, 3)
    line = _one_line(_run(toy, *_sgd(toy)), 130)
    assert line == (f"interrupted in epoch 3 of 4: the checkpoint of epoch 2 is in {toy / 'ckpt'}; "
                    f"the same command with --resume continues from it")
    assert torch.load(toy / "ckpt" / "checkpoint.pth", weights_only=True)["epoch"] == 1  # 0-based: epoch 2 kept
    assert read_results(toy / "results.parquet").num_rows == 1  # only the straight run's row
    monkeypatch.undo()
    assert _run(toy, *_sgd(toy, "--resume")).exit_code == 0
    a = torch.load(straight / "checkpoint.pth", weights_only=True)
    b = torch.load(toy / "ckpt" / "checkpoint.pth", weights_only=True)
    assert all(torch.equal(a["head"][k], b["head"][k]) for k in a["head"])  # bit-identical to the straight run
    top1 = read_results(toy / "results.parquet").column("top1").to_pylist()
    assert top1[0] == top1[1]


def test_ctrl_c_in_the_first_epoch_says_nothing_is_kept(toy, monkeypatch):
    _dies_in_epoch(monkeypatch, 1)
    line = _one_line(_run(toy, *_fuse(toy)), 130)
    assert line == "interrupted in epoch 1 of 2, before the first checkpoint: nothing is kept; the same command starts again"


def test_ctrl_c_in_the_converged_probe_says_no_row_was_recorded(toy, monkeypatch):
    import pipeline.evaluate.probe as probe_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(probe_module, "converged_linear_probe", interrupted)
    line = _one_line(_run(toy, "probe", "-b", "24", "-t", "150", "--results", str(toy / "results.parquet")), 130)
    assert line == INTERRUPTED_UNRECORDED and not (toy / "results.parquet").exists()


def test_a_block_the_configuration_lacks_names_the_range(toy):
    line = _one_line(_run(toy, "probe", "-b", "99", "-t", "150"), 1)
    assert line == "Error: block 99 is out of range for 32x32_small: valid blocks are 1..19"
    line = _one_line(_run(toy, "probe", "-b", "24", "-t", "1000"), 1)
    assert line == "Error: timestep 1000 is out of range for the linear schedule: valid timesteps are 0..999"


def test_every_torch_load_in_the_tree_is_weights_only():
    """The one loader is ``extract.backbone.checkpoint.load_tensors``; no other module unpickles a file."""
    root = Path(__file__).resolve().parents[2]
    calls = [(path.relative_to(root).as_posix(), line.strip()) for package in ("extract", "probe", "fusion", "pipeline")
             for path in sorted((root / package).rglob("*.py"))
             for line in path.read_text(encoding="utf-8").splitlines() if "torch.load(" in line or "pickle.load" in line]
    code = [(name, line) for name, line in calls if not line.startswith(("#", '"""', "``"))]
    assert code == [("extract/backbone/checkpoint.py",
                     'return torch.load(path, map_location="cpu", weights_only=True)')], code
