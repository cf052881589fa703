"""Distributed section of ``make bench``: a cached head trained on 1 process vs 2 gloo processes on this CPU.

The same run both ways (global batch 256, same order, same weights to float tolerance): one process
with every core's threads, against two ranks with one thread each, launched the way torchrun would
(``tests.probe.ranks``). Images/s counts training rows per second of ``fit``'s train time (loading
and process start excluded, reported apart; one warm-up step per head first). On a 2-core machine expect little gain: the point is
the correctness and the path to many GPUs, where each rank has its own device.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

CONFIG, BLOCK, TIMESTEP = "32x32_small", 9, 50
HEADS = (("linear", {}, 1e-2), ("attention", dict(dim=128, num_heads=4, depth=1, token_pool=4), 5e-2))
EPOCHS, BATCH = 2, 256


def _train(cache_dir: str) -> list[tuple[str, float, int, float]]:
    """(head, train seconds, rows trained, top-1) of each head in HEADS on the cached split (every rank calls)."""
    import fusion  # noqa: F401
    from probe.features import load_features, open_split, resolve_backbone_id
    from probe.heads import create_head
    from probe.train import TrainConfig, fit

    backbone = resolve_backbone_id(cache_dir, "cifar10", "train", CONFIG)
    train, test = (load_features(open_split(cache_dir, "cifar10", split, backbone), [(BLOCK, TIMESTEP)])
                   for split in ("train", "test"))
    shapes = {(BLOCK, TIMESTEP): tuple(train.features[(BLOCK, TIMESTEP)].shape[1:])}
    out = []
    for name, options, lr in HEADS:
        warm = create_head(name, shapes, 10, **options)  # one step first: first-call costs are not throughput
        fit(warm, train.features, train.labels, test.features, test.labels, TrainConfig(lr=lr, batch_size=BATCH, steps=1),
            progress=False)
        torch.manual_seed(0)
        head = create_head(name, shapes, 10, **options)
        result = fit(head, train.features, train.labels, test.features, test.labels,
                     TrainConfig(epochs=EPOCHS, lr=lr, batch_size=BATCH), progress=False)
        out.append((name, result.train_seconds, train.num_images * EPOCHS, result.top1))
    return out


def bench_distributed(per_class: int = 50) -> list[str]:
    """The section's lines: images/s of each head on 1 and 2 processes, and the ratio."""
    from click.testing import CliRunner

    from pipeline.archives import ensure_unpacked
    from pipeline.cli.main import main
    from pipeline.manifest import default_data_root, default_shared_dir
    from tests.probe.ranks import run_ranks

    root = ensure_unpacked(default_shared_dir() / "data" / "cifar10-jpg.tar.gz", default_data_root(), "cifar10-jpg")
    cores = os.cpu_count() or 1
    lines = [f"distributed: {CONFIG} b={BLOCK} t={TIMESTEP} cache of {per_class} CIFAR-10 images a class, "
             f"{EPOCHS} epochs, global batch {BATCH}, {cores} CPU cores; 1 process (all threads, then 1 thread) "
             f"vs 2 gloo ranks x 1 thread"]
    with tempfile.TemporaryDirectory() as folder:
        cache = str(Path(folder) / "cache")
        began = time.perf_counter()
        result = CliRunner().invoke(main, [
            "extract", "--dataset", "cifar10", "--config", CONFIG, "-t", str(TIMESTEP), "-b", str(BLOCK),
            "--pool", "8", "--per-class", str(per_class), "--synchronous", "--no-progress", "-y",
            "--data-root", str(Path(root).parent), "--cache-dir", cache])
        if result.exit_code != 0:
            return lines + [f"  extract failed: {result.output.strip().splitlines()[-1:]}"]
        lines.append(f"  cache written in {time.perf_counter() - began:.1f} s")
        one = _train(cache)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one thread, as each rank has: what the second process alone adds
        try:
            single = _train(cache)
        finally:
            torch.set_num_threads(threads)
        began = time.perf_counter()
        two = run_ranks(2, _train, cache)
        spawn = time.perf_counter() - began - sum(seconds for _, seconds, _, _ in two)
    for (name, s1, rows, top1), (_, s0, _, _), (_, s2, _, top1_two) in zip(one, single, two):
        lines.append(f"  {name:9s} 1 process x {threads} threads {rows / s1:7.0f} images/s, x 1 thread {rows / s0:7.0f}; "
                     f"2 ranks x 1 thread {rows / s2:7.0f} images/s ({s1 / s2:.2f}x and {s0 / s2:.2f}x); "
                     f"top-1 {100 * top1:.1f}% / {100 * top1_two:.1f}%")
    lines.append(f"  starting 2 ranks and loading the cache in each: {spawn:.1f} s (once per run, not per epoch)")
    return lines
