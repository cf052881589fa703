"""Two gloo processes train the same run as one process with the same global batch (extract.distributed).

Real CIFAR-10 features cached by ``diffrep extract`` (the bundled 32x32 model, 10 + 10 images a class).
The one-process side runs in the test's own process; the two-process side is one spawn that runs every
head in turn. Equal "to float tolerance": DDP averages the ranks' gradients, so sums are added in
another order; the tolerances below are a few times what was measured (see NOTES-dist.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from extract import distributed
from probe.features import flatten_features, load_features, open_split, resolve_backbone_id
from probe.heads import create_head
from probe.logistic import converged_linear_probe
from probe.train import TrainConfig, fit

from tests.probe.ranks import run_ranks

ROOT = Path(__file__).resolve().parents[2]
KEY = (9, 50)
#: (head, solver, lr, options, steps): sgd and adam linear heads for whole epochs; attention and DifFormer a few steps.
RUNS = [
    ("linear", "sgd", 0.1, {}, None),
    ("linear", "adam", 1e-3, {}, None),
    ("attention", "sgd", 5e-2, dict(dim=32, depth=1, num_heads=2, token_pool=4), 3),
    ("difformer", "adam", 1e-3, dict(dim=32, depth=1, num_heads=2, token_pool=4), 3),
]
#: Measured worst differences, 2 processes vs 1 (float32): linear weights ~1e-7, attention/DifFormer ~1e-6.
WEIGHT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def cache_dir(cifar10_root, tmp_path_factory) -> Path:
    import fusion  # noqa: F401 - registers the difformer head
    from pipeline.cli.main import main

    cache = tmp_path_factory.mktemp("dist") / "cache"
    result = CliRunner().invoke(main, [
        "extract", "--dataset", "cifar10", "--config", "32x32_small", "-t", "50", "-b", "9", "--pool", "4",
        "--per-class", "10", "--synchronous", "--threads", "1", "--no-progress", "-y",
        "--data-root", str(cifar10_root.parent), "--cache-dir", str(cache)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return cache


def _splits(cache_dir):
    backbone = resolve_backbone_id(cache_dir, "cifar10", "train", "32x32_small")
    return [load_features(open_split(cache_dir, "cifar10", split, backbone), [KEY]) for split in ("train", "test")]


def train_heads(cache_dir) -> list[tuple[dict, float]]:
    """Every head of RUNS trained on the cached features: (weights, test top-1) each (on every rank)."""
    import fusion  # noqa: F401

    train, test = _splits(cache_dir)
    shapes = {KEY: tuple(train.features[KEY].shape[1:])}
    out = []
    for head, solver, lr, options, steps in RUNS:
        torch.manual_seed(0)
        module = create_head(head, shapes, 10, **options)
        config = TrainConfig(epochs=2, lr=lr, optimizer=solver, batch_size=32, seed=0, steps=steps)
        result = fit(module, train.features, train.labels, test.features, test.labels, config, progress=False)
        out.append(({k: v.detach().clone() for k, v in module.state_dict().items()}, result.top1))
    return out


def converged(cache_dir):
    """The converged linear probe (L2 chosen on held-out rows, then refitted), sharded by rows when distributed."""
    train, test = _splits(cache_dir)
    result = converged_linear_probe(flatten_features(train.features, [KEY], 2), train.labels,
                                    flatten_features(test.features, [KEY], 2), test.labels, 10,
                                    l2_grid=(1.0, 0.1), across_ranks=distributed.active())
    return result.model.weight, result.model.bias, result.l2, result.top1, result.train_loss


def live_steps(data_root) -> list[tuple[dict, float]]:
    """Two steps through the live backbone (32x32, random weights): DifFeed (BatchNorm in its feedback layers,
    global-batch statistics on several ranks), and a linear ``probe --live`` head with the official fresh
    noise, random resized crop and flip, drawn per global batch. (weights, test top-1) each."""
    from extract.backbone.configs import get_config
    from extract.backbone.registry import create_backbone
    from extract.schedule import get_schedule
    from fusion.diffeed import DifFeed, default_readout
    from pipeline.live_probe import LiveSelection, live_splits
    from probe.live_head import LiveHead

    cfg = get_config("32x32_small")
    schedule = get_schedule(cfg.noise_schedule, cfg.diffusion_steps)
    out = []
    for kind in ("diffeed", "live"):
        selection = LiveSelection("cifar10", data_root=str(data_root),
                                  decode_threads=1, fresh_noise=kind == "live", augment=kind == "live")
        train, test, classes = live_splits(selection, cfg.image_size, [50], schedule)
        backbone = create_backbone("32x32_small", weight_seed=0)
        torch.manual_seed(0)
        if kind == "diffeed":
            readout = default_readout(backbone)
            channels, side = backbone.block_shapes()[readout]
            head = create_head("attention", {(readout, 50): (channels, side, side)}, classes,
                               dim=32, depth=1, num_heads=2, token_pool=4)
            model = DifFeed(backbone, head, "bottleneck", readout)
        else:
            head = create_head("linear", {(9, 50): (backbone.block_shapes()[9][0], 4, 4)}, classes)
            model = LiveHead(backbone, head, [9], [50], pool=4)
        config = TrainConfig(epochs=1, lr=0.1, optimizer="sgd", batch_size=9, seed=0)  # shares of 4 and 5, 2 steps
        result = fit(model, train, None, test, None, config, progress=False)
        out.append(({k: v.detach().clone() for k, v in model.state_dict().items()}, result.top1))
    return out


def pretrain_steps(data_root, out_dir) -> dict:
    """Two steps of diffusion pretraining (global batch 9: shares of 4 and 5); the model rank 0 wrote."""
    from extract.backbone.pretrain import MODEL_NAME, PretrainConfig, pretrain

    paths = sorted(str(p) for p in (Path(data_root) / "cifar10-jpg" / "train").glob("*/*.jpg"))
    config = PretrainConfig(batch_size=9, warmup_steps=1, threads=1)
    pretrain(config, paths, out_dir, steps=2, checkpoint_every=2, log_every=1, progress=False)
    return torch.load(Path(out_dir) / MODEL_NAME, weights_only=True)


def streamed(cache_dir) -> tuple[dict, float]:
    """A linear head streamed from the cache in windows of a fifth of the split (several windows an epoch;
    on several ranks each reads its share of every window's pieces). (weights, test top-1)."""
    from probe.features import StreamedFeatures

    backbone = resolve_backbone_id(cache_dir, "cifar10", "train", "32x32_small")
    train, test = (StreamedFeatures(open_split(cache_dir, "cifar10", split, backbone), [KEY], 2, window_bytes=20 * 1024)
                   for split in ("train", "test"))
    torch.manual_seed(0)
    module = create_head("linear", {KEY: (64, 2, 2)}, 10)
    result = fit(module, train, None, test, None, TrainConfig(epochs=2, lr=0.1, batch_size=32, seed=0), progress=False)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, result.top1


def everything(cache_dir, data_root, out_dir):
    return (train_heads(cache_dir), converged(cache_dir), live_steps(data_root), pretrain_steps(data_root, out_dir),
            streamed(cache_dir))


@pytest.fixture(scope="module")
def live_root(cifar10_root, tmp_path_factory) -> Path:
    """A data root of 18 train images (not 10 a class: 18 keeps the ranks' shares unequal) and 10 test images."""
    root = tmp_path_factory.mktemp("live")
    for split, count in (("train", 2), ("test", 1)):
        for number, folder in enumerate(sorted((Path(cifar10_root) / split).iterdir())):
            (root / "cifar10-jpg" / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:count if split == "test" or number < 8 else 1]:
                shutil.copyfile(image, root / "cifar10-jpg" / split / folder.name / image.name)
    return root


@pytest.fixture(scope="module")
def two_processes(cache_dir, live_root, tmp_path_factory):
    """Every distributed run of this module, in one spawn of two gloo processes (rank 0's results)."""
    return run_ranks(2, everything, cache_dir, live_root, tmp_path_factory.mktemp("pretrain2"))


def _worst(one: dict, two: dict) -> float:
    assert one.keys() == two.keys()
    return max((one[k].double() - two[k].double()).abs().max().item() for k in one)


@pytest.mark.e2e
def test_two_processes_train_every_cached_head_as_one(cache_dir, two_processes):
    heads2 = two_processes[0]
    heads1 = train_heads(cache_dir)
    for (name, solver, *_), (one, top1), (two, top1_two) in zip(RUNS, heads1, heads2):
        worst = _worst(one, two)
        assert worst < WEIGHT_TOLERANCE, f"{name}/{solver}: weights differ by {worst:g}"
        assert top1 == top1_two, f"{name}/{solver}: top-1 {top1} on one process, {top1_two} on two"


@pytest.mark.e2e
def test_sharded_lbfgs_equals_the_single_process_fit(cache_dir, two_processes):
    w2, b2, l2_2, top1_2, loss2 = two_processes[1]
    w1, b1, l2_1, top1_1, loss1 = converged(cache_dir)
    assert l2_1 == l2_2 and top1_1 == top1_2
    assert abs(loss1 - loss2) < 1e-6
    assert (w1 - w2).abs().max().item() < 1e-3 * max(1.0, w1.abs().max().item())


@pytest.mark.e2e
def test_live_steps_on_two_processes_equal_one(live_root, two_processes):
    """DifFeed's feedback BatchNorm sees the global batch (running statistics included), and the live probe's
    crops, flips and fresh noise are drawn per global batch, so the ranks' shares make the same step."""
    for (one, top1), (two, top1_two), name in zip(live_steps(live_root), two_processes[2], ("diffeed", "live")):
        assert any("running_var" in k for k in one) or name == "live"
        worst = _worst(one, two)
        assert worst < WEIGHT_TOLERANCE, f"{name}: weights differ by {worst:g}"
        assert top1 == top1_two, f"{name}: top-1 {top1} on one process, {top1_two} on two"


def _probe_args(cache_dir, results: Path, checkpoints: Path) -> list[str]:
    return ["probe", "--dataset", "cifar10", "--config", "32x32_small", "--cache-dir", str(cache_dir),
            "--blocks", "9", "--timesteps", "50", "--pool", "2", "--solver", "sgd", "--lr", "0.1",
            "--batch-size", "32", "--epochs", "3", "--no-progress", "--results", str(results),
            "--checkpoint-dir", str(checkpoints)]


@pytest.mark.e2e
def test_a_two_process_run_killed_mid_epoch_resumes_on_one_process(cache_dir, tmp_path):
    """torchrun, 2 ranks; rank 1 is killed in epoch 2 (after epoch 1's checkpoint). The same command with
    --resume on ONE process finishes the run: the weights of an uninterrupted run, one results row.

    Streamed from the cache (``--stream``: each rank cuts its share from every streamed batch); the split
    fits one window, so its batches are the in-RAM epoch's and the straight run reads the split in RAM."""
    from pipeline.cli.main import main
    from pipeline.results import read_results

    results, checkpoints = tmp_path / "killed" / "results.parquet", tmp_path / "killed" / "ckpt"
    env = dict(os.environ, DIFFREP_TEST_DIE="1:2:2", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    killed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "tests.probe.dist_entry", *_probe_args(cache_dir, results, checkpoints), "--stream"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0, killed.stdout + killed.stderr
    assert "rank      : 1" in killed.stderr  # torchrun names the rank that died
    assert torch.load(checkpoints / "checkpoint.pth", weights_only=False)["epoch"] == 0  # epoch 1 kept
    assert not results.exists()  # nothing recorded by a run that did not finish

    runner = CliRunner()
    resumed = runner.invoke(main, [*_probe_args(cache_dir, results, checkpoints), "--stream", "--resume"],
                            catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    straight_results = tmp_path / "straight" / "results.parquet"
    straight = runner.invoke(main, _probe_args(cache_dir, straight_results, tmp_path / "straight" / "ckpt"),
                             catch_exceptions=False)
    assert straight.exit_code == 0, straight.output

    rows, reference = read_results(results).to_pylist(), read_results(straight_results).to_pylist()
    assert len(rows) == 1 and rows[0]["top1"] == reference[0]["top1"]
    one = torch.load(tmp_path / "straight" / "ckpt" / "checkpoint.pth", weights_only=False)["head"]
    two = torch.load(checkpoints / "checkpoint.pth", weights_only=False)["head"]
    assert _worst(one, two) < WEIGHT_TOLERANCE


def test_nproc_starts_torchrun_and_names_the_rank_that_died(monkeypatch):
    """``diffrep --nproc 2 <command>`` hands the command to torchrun; a dead rank comes back as one line."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from pipeline.cli.main import main

    seen = {}

    def fake_run(args):
        seen.update(nproc=args.nproc_per_node, module=args.module, script=args.training_script,
                    argv=list(args.training_script_args))
        failure = ProcessFailure(local_rank=1, pid=4242, exitcode=-9, error_file="<N/A>")
        raise ChildFailedError("pipeline.cli.main", {1: failure})

    monkeypatch.setattr(torchrun, "run", fake_run)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    result = CliRunner().invoke(main, ["--nproc", "2", "probe", "--dataset", "cifar10", "--blocks", "9"])
    assert result.exit_code == 1
    assert seen == dict(nproc="2", module=True, script="pipeline.cli.main",
                        argv=["--accumulate", "1", "probe", "--dataset", "cifar10", "--blocks", "9"])
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "rank 1 of 2 (pid 4242) died with exit code -9, SIGKILL" in lines[0], result.output


@pytest.mark.e2e
def test_pretraining_on_two_processes_equals_one(live_root, two_processes, tmp_path):
    """Diffusion pretraining: each rank decodes its share; flips, timesteps and noise are drawn per global batch."""
    worst = _worst(pretrain_steps(live_root, tmp_path), two_processes[3])
    assert worst < WEIGHT_TOLERANCE, f"pretrained weights differ by {worst:g}"


@pytest.mark.e2e
def test_a_streamed_split_read_in_disjoint_shares_trains_as_one_process(cache_dir, two_processes):
    one, top1 = streamed(cache_dir)
    two, top1_two = two_processes[4]
    assert _worst(one, two) < WEIGHT_TOLERANCE and top1 == top1_two


def test_gradient_accumulation_is_the_same_step_in_parts():
    """--accumulate 3: each batch in three micro-batches (sizes 11/11/10 of 32, and 2/1/1 of the last 4)."""
    torch.manual_seed(0)
    features, labels = {KEY: torch.randn(100, 8, 2, 2)}, torch.randint(0, 5, (100,))
    weights = []
    for accumulate in (1, 3):
        torch.manual_seed(0)
        head = create_head("linear", {KEY: (8, 2, 2)}, 5)
        fit(head, features, labels, features, labels, TrainConfig(epochs=2, lr=0.5, batch_size=32), progress=False,
            accumulate=accumulate)
        weights.append(head.state_dict())
    assert _worst(*weights) < 1e-6


def test_shares_cover_every_row_once_whatever_the_world_size():
    for rows in (0, 1, 7, 32, 33):
        for parts in (1, 2, 3, 8):
            cut = [range(rows)[distributed.share(rows, part, parts)] for part in range(parts)]
            assert [r for piece in cut for r in piece] == list(range(rows))
            assert max(map(len, cut)) - min(map(len, cut)) <= 1
