"""Training commands on images (probe --live, feedback, pretrain): crafted checkpoints, other data, Ctrl-C.

A tiny manifest dataset of synthetic 32x32 PNGs (two classes) keeps these off the real images. Each
case runs the command through CliRunner and asserts the exit code, the one line, and that the
checkpoint on disk is kept (and resumes).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import extract.backbone.pretrain as pretrain_module
import probe.train as train_module
from pipeline.cli.main import main
from tests.probe.test_trust_resume import write_crafted

torch.set_num_threads(1)


@pytest.fixture()
def tiny(tmp_path, monkeypatch):
    """Dataset ``tiny``: train 2 classes x 6 images, test 2 x 3, 32x32 PNG noise with a class-coloured square."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 6), ("test", 3)):
        for c, name in enumerate(("red", "blue")):
            folder = tmp_path / "data" / "tiny" / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                pixels[8:24, 8:24, 2 * c] = 255
                Image.fromarray(pixels).save(folder / f"{i}.png")
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text("datasets:\n  tiny: {format: folder, root: tiny, splits: {train: train, test: test}}\n")
    monkeypatch.setenv("DIFFREP_MANIFEST", str(manifest))
    return tmp_path


def _data(tmp_path):
    return ["--dataset", "tiny", "--config", "32x32_small", "--data-root", str(tmp_path / "data"), "--device", "cpu",
            "--no-progress"]


def _live(tmp_path, *extra, epochs=3):
    return ["probe", "--live", *_data(tmp_path), "-b", "5", "-t", "10", "--cache-pool", "2", "--solver", "sgd",
            "--lr", "0.1", "--batch-size", "4", "--epochs", str(epochs), "--decode-threads", "1",
            "--checkpoint-dir", str(tmp_path / "ckpt"), "--results", str(tmp_path / "r.parquet"), *extra]


def _feedback(tmp_path, *extra, epochs=3):
    return ["feedback", *_data(tmp_path), "-t", "10", "--pass1", "live", "--dim", "8", "--depth", "1", "--pool", "2",
            "--batch-size", "4", "--epochs", str(epochs), "--decode-threads", "1",
            "--checkpoint-dir", str(tmp_path / "ckpt"), "--results", str(tmp_path / "r.parquet"), *extra]


def _pretrain(tmp_path, *extra, steps=4):
    return ["pretrain", *_data(tmp_path), "--out", str(tmp_path / "run"), "--steps", str(steps), "--batch-size", "2",
            "--warmup", "1", "--checkpoint-every", "2", "--threads", "1", "--decode-threads", "1", "--no-probe", *extra]


def _invoke(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _one_line(result, code: int) -> str:
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == code, result.output
    return lines[-1]


@pytest.mark.parametrize("command, name", [(_live, "ckpt/checkpoint.pth"), (_feedback, "ckpt/checkpoint.pth"),
                                           (_pretrain, "run/train_state.pt")])
def test_a_crafted_checkpoint_runs_nothing_on_resume(tiny, command, name):
    path, marker = tiny / name, tiny / "ran"
    write_crafted(path, marker, keys=("model", "ema", "optimizer", "scheduler", "step") if "train_state" in name
                  else ("head", "optimizer", "scheduler", "epoch", "config"))
    result = _invoke(command(tiny, "--resume"))
    line = _one_line(result, 1)
    what = "pretraining checkpoint" if "train_state" in name else "checkpoint"
    assert line.startswith(f"Error: {what} {path} holds objects that are not tensors or plain values (io.open), "
                           f"so it is not loaded"), line
    assert not marker.exists() and not (tiny / "r.parquet").exists()


def _dies(monkeypatch, module, name: str, call: int):
    """Ctrl-C from inside ``module.name`` at its ``call``-th call; returns the real function to put back."""
    real, calls = getattr(module, name), {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, dying)
    return real


@pytest.mark.parametrize("command", [_live, _feedback])
def test_ctrl_c_while_training_live_keeps_the_checkpoint_and_resumes(tiny, monkeypatch, command):
    real = _dies(monkeypatch, train_module, "train_one_epoch", 2)
    line = _one_line(_invoke(command(tiny)), 130)
    assert line == (f"interrupted in epoch 2 of 3: the checkpoint of epoch 1 is in {tiny / 'ckpt'}; "
                    f"the same command with --resume continues from it")
    assert torch.load(tiny / "ckpt" / "checkpoint.pth", weights_only=True)["epoch"] == 0
    monkeypatch.setattr(train_module, "train_one_epoch", real)
    resumed = _invoke(command(tiny, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    state = torch.load(tiny / "ckpt" / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 2 and [h["epoch"] for h in state["history"]] == [1, 2, 3]


@pytest.mark.parametrize("command, extra, named", [
    (_live, ["--per-class", "3"], "per_class None saved, 3 asked"),
    (_feedback, ["--label-fraction", "0.5"], "label_fraction None saved, 0.5 asked"),
])
def test_live_resume_on_other_images_is_refused(tiny, command, extra, named):
    assert _invoke(command(tiny, epochs=1)).exit_code == 0
    before = (tiny / "ckpt" / "checkpoint.pth").read_bytes()
    line = _one_line(_invoke(command(tiny, "--resume", *extra, epochs=1)), 1)
    assert named in line and "another --checkpoint-dir" in line
    assert (tiny / "ckpt" / "checkpoint.pth").read_bytes() == before


def test_ctrl_c_in_pretraining_keeps_the_checkpoint_and_resumes_bit_identically(tiny, monkeypatch):
    straight = [a if a != str(tiny / "run") else str(tiny / "straight") for a in _pretrain(tiny)]
    assert _invoke(straight).exit_code == 0
    real = _dies(monkeypatch, pretrain_module, "diffusion_loss", 4)  # step 4: the checkpoint of step 2 is on disk
    line = _one_line(_invoke(_pretrain(tiny)), 130)
    assert line == (f"interrupted at step 3 of 4: the checkpoint of step 2 is in {tiny / 'run'}; "
                    f"the same command with --resume continues from it")
    monkeypatch.setattr(pretrain_module, "diffusion_loss", real)
    assert _invoke(_pretrain(tiny, "--resume")).exit_code == 0
    for name in ("ema.pt", "model.pt"):
        a = torch.load(tiny / "straight" / name, weights_only=True)
        b = torch.load(tiny / "run" / name, weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_ctrl_c_before_the_first_pretraining_checkpoint_says_nothing_is_kept(tiny, monkeypatch):
    _dies(monkeypatch, pretrain_module, "diffusion_loss", 1)
    line = _one_line(_invoke(_pretrain(tiny)), 130)
    assert line == ("interrupted at step 0 of 4, before the first checkpoint (every 2 steps): nothing is kept; "
                    "the same command starts again")


@pytest.mark.parametrize("extra, named", [(["--split", "test"], "split 'train' saved, 'test' asked"),
                                          (["--limit", "4"], "limit None saved, 4 asked")])
def test_pretraining_resumed_on_other_data_is_refused(tiny, extra, named):
    assert _invoke(_pretrain(tiny, steps=2)).exit_code == 0
    state = tiny / "run" / "train_state.pt"
    before = state.read_bytes()
    line = _one_line(_invoke(_pretrain(tiny, "--resume", *extra, steps=4)), 1)
    assert line.startswith(f"Error: {state} was trained with other data (") and named in line
    assert line.endswith("pass the same --dataset/--split/--limit, or another --out to train anew")
    assert state.read_bytes() == before
