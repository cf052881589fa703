"""Probe-side faults get one line and a non-zero exit, never a wrong number with exit code 0, and lose nothing."""

import logging

import pytest
import torch
from click.testing import CliRunner

from pipeline.cli.main import main
from pipeline.results import read_results
from tests.probe.test_features import make_cache

torch.set_num_threads(1)
KEYS = ((24, 150), (19, 150))


@pytest.fixture()
def toy(tmp_path):
    make_cache(tmp_path / "cache", n=61, keys=KEYS, split="train", signal=4.0, seed=0)
    make_cache(tmp_path / "cache", n=31, keys=KEYS, split="test", signal=4.0, seed=1)
    return tmp_path


def _run(tmp_path, *args, dataset="toy"):
    common = ["--dataset", dataset, "--cache-dir", str(tmp_path / "cache"), "--config", "32x32_small"]
    return CliRunner().invoke(main, [*args, *common], catch_exceptions=False)


def _table(tmp_path):
    return tmp_path / "results" / "results.parquet"


def _sgd(tmp_path, *extra):
    return ["probe", "-b", "24", "-t", "150", "--solver", "sgd", "--epochs", "2", "--lr", "0.5", "--batch-size", "8",
            "--no-progress", "--checkpoint-dir", str(tmp_path / "ckpt"), "--results", str(_table(tmp_path)), *extra]


def _one_line_error(result, *needles):
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error:"), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_resume_on_other_blocks_or_head_is_refused(toy):
    assert _run(toy, *_sgd(toy)).exit_code == 0
    finished = read_results(_table(toy)).num_rows
    other_block = [a if a != "24" else "19" for a in _sgd(toy, "--resume")]
    _one_line_error(_run(toy, *other_block), "trained with other features or head", "blocks")
    _one_line_error(_run(toy, *_sgd(toy, "--resume", "--head", "mlp")), "head")
    _one_line_error(_run(toy, *_sgd(toy, "--resume", "--lr", "0.1")), "other settings")
    assert read_results(_table(toy)).num_rows == finished  # no row recorded for a refused run
    assert (toy / "ckpt" / "checkpoint.pth").exists()  # and the finished checkpoint is kept


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_checkpoint_on_resume_is_one_line(toy, damage):
    assert _run(toy, *_sgd(toy)).exit_code == 0
    path = toy / "ckpt" / "checkpoint.pth"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a checkpoint at all\n" * 10)
    _one_line_error(_run(toy, *_sgd(toy, "--resume")), "not a readable PyTorch file", "delete it")


def test_resume_without_a_checkpoint_says_so(toy, caplog):
    with caplog.at_level(logging.WARNING):
        result = _run(toy, *_sgd(toy, "--resume"))
    assert result.exit_code == 0
    assert any("no checkpoint" in r.getMessage() and "epoch 1" in r.getMessage() for r in caplog.records)


def test_same_split_is_refused_unless_asked(toy):
    _one_line_error(_run(toy, "probe", "-b", "24", "-t", "150", "--test-split", "train"), "--allow-same-split")
    result = _run(toy, "probe", "-b", "24", "-t", "150", "--test-split", "train", "--allow-same-split",
                  "--results", str(_table(toy)))
    assert result.exit_code == 0, result.output
    row = read_results(_table(toy)).to_pylist()[-1]
    assert (row["train_split"], row["test_split"]) == ("train", "train")


def test_caches_from_different_noise_seeds_are_not_compared(tmp_path):
    make_cache(tmp_path / "cache", n=30, keys=KEYS, split="train", signal=4.0)
    make_cache(tmp_path / "cache", n=30, keys=KEYS, split="test", signal=4.0, noise_seed=1)
    for command in (["probe"], ["knn"], ["sweep"]):
        _one_line_error(_run(tmp_path, *command, "-b", "24", "-t", "150"), "noise_seed", "same settings")


def test_rows_record_splits_backbone_noise_seed_and_cache_pool(toy):
    assert _run(toy, "probe", "-b", "24", "-t", "150", "--results", str(_table(toy))).exit_code == 0
    assert _run(toy, "knn", "-b", "24", "-t", "150", "--k", "5", "--results", str(_table(toy))).exit_code == 0
    for row in read_results(_table(toy)).to_pylist():
        assert (row["train_split"], row["test_split"], row["backbone_id"]) == ("train", "test", "32x32_small-random0")
        assert row["noise_seed"] == 0 and row["cache_pool"] == 4
    linear, knn = read_results(_table(toy)).to_pylist()
    assert (linear["protocol"], linear["solver"], linear["heldout_size"]) == ("converged", "lbfgs", 12)
    assert linear["l2"] in (1e-4, 1e-3, 1e-2)
    assert (knn["protocol"], knn["standardize"]) == ("knn", True)


def test_corrupt_results_table_keeps_the_finished_run(toy, caplog):
    table = _table(toy)
    table.parent.mkdir(parents=True)
    table.write_bytes(b"PAR1 this is not parquet")
    with caplog.at_level(logging.WARNING):
        result = _run(toy, "probe", "-b", "24", "-t", "150", "--results", str(table))
    assert result.exit_code == 0, result.output
    assert "top-1" in result.output
    aside = list(table.parent.glob("results.parquet.unreadable-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == b"PAR1 this is not parquet"  # the old bytes are kept
    assert read_results(table).num_rows == 1  # the new table holds the finished run
    assert any("moved it to" in r.getMessage() for r in caplog.records)
    aside[0].rename(table)
    report = CliRunner().invoke(main, ["report", "--results", str(table), "--out", str(toy / "report")])
    _one_line_error(report, "not readable Parquet")


def test_unknown_test_split_lists_the_manifest_splits(tmp_path):
    names = [f"class{i}" for i in range(3)]
    make_cache(tmp_path / "cache", n=30, keys=KEYS, split="train", dataset="cifar10", class_names=names)
    _one_line_error(_run(tmp_path, "probe", "-b", "24", "-t", "150", "--test-split", "nope", dataset="cifar10"),
                    "has no split 'nope'", "train, test")


def test_missing_classes_are_named(tmp_path):
    make_cache(tmp_path / "cache", n=30, keys=KEYS, split="train", class_names=("cat", "dog", "emu"))
    make_cache(tmp_path / "cache", n=30, keys=KEYS, split="test", class_names=("cat", "dog", "fox"))
    _one_line_error(_run(tmp_path, "probe", "-b", "24", "-t", "150"), "missing from test: emu", "missing from train: fox")


def test_knn_says_when_k_is_capped(toy, caplog):
    with caplog.at_level(logging.WARNING):
        result = _run(toy, "knn", "-b", "24", "-t", "150", "--k", "5,500", "--results", str(_table(toy)))
    assert result.exit_code == 0
    assert any("k=500 exceeds the 59 training rows" in r.getMessage() for r in caplog.records)
    assert [r["k"] for r in read_results(_table(toy)).to_pylist()] == [5, 59]


def test_every_evaluation_command_takes_short_block_and_timestep_options(toy):
    out = toy / "out"
    for args in (["probe", "-b", "24", "-t", "150"], ["knn", "-b", "24", "-t", "150", "--k", "3"],
                 ["cka", "-b", "19,24", "-t", "150", "--out", str(out)],
                 ["sweep", "-b", "24", "-t", "150", "--pools", "2", "--out", str(out)]):
        result = _run(toy, *args, *([] if args[0] == "cka" else ["--results", str(_table(toy))]))
        assert result.exit_code == 0, (args, result.output)


def test_converged_probe_without_room_in_ram_says_what_to_do(toy):
    _one_line_error(_run(toy, "probe", "-b", "24", "-t", "150", "--ram-cap-gb", "1e-9"), "--solver sgd")


def test_lbfgs_on_a_non_linear_head_is_refused(toy):
    _one_line_error(_run(toy, "probe", "-b", "24", "-t", "150", "--head", "mlp", "--solver", "lbfgs"), "linear probe only")


def test_cli_literals_equal_the_library_constants():
    from pipeline.cli.options import L2_DEFAULT, SOLVER_CHOICES
    from pipeline.evaluate import SOLVERS
    from probe.logistic import DEFAULT_L2_GRID

    assert SOLVER_CHOICES == SOLVERS
    assert tuple(float(v) for v in L2_DEFAULT.split(",")) == DEFAULT_L2_GRID


def test_cka_limit_draws_every_class_from_a_class_sorted_split():
    import numpy as np

    from pipeline.evaluate import cka_rows

    labels = np.repeat(np.arange(100), 30)  # sorted by class, as every dataset index is
    rows = cka_rows(labels, 500, seed=0)
    assert len(rows) == 500 and len(np.unique(labels[rows])) == 100  # the first 500 rows would hold 17 classes
    assert (np.diff(rows) > 0).all() and (cka_rows(labels, 500, seed=0) == rows).all()
    assert cka_rows(labels, None, seed=0) is None and cka_rows(labels, 5000, seed=0) is None


def test_label_fractions_are_class_balanced_seeded_and_recorded(toy):
    import numpy as np

    from probe.subsets import label_fraction_rows

    labels = np.repeat(np.arange(1000), 13)  # ImageNet-like: class-sorted, 1,000 classes
    rows = label_fraction_rows(labels, 0.1, seed=0)
    assert (np.bincount(labels[rows], minlength=1000) == 1).all()  # 10% of 13 rounds to 1 per class
    assert not (label_fraction_rows(labels, 0.5, seed=0) == label_fraction_rows(labels, 0.5, seed=1)).all()
    result = _run(toy, "probe", "-b", "24", "-t", "150", "--label-fraction", "0.5", "--results", str(_table(toy)))
    assert result.exit_code == 0, result.output
    row = read_results(_table(toy)).to_pylist()[-1]
    assert row["label_fraction"] == 0.5 and row["train_size"] == 30  # 59 valid rows: 20 + 20 + 19 halved, rounded
