"""Probe section of ``make bench``: seconds per epoch of a head on the cache, fed by the live backbone, and on tensors in memory.

One run, same images, same block and timestep, same head initialisation and batch order:
(a) cache: the Zarr cache is read once into float32 tensors (the load is reported and amortised
over the 28-epoch protocol), then epochs index those tensors; (b) live backbone, the official
code's way: every epoch decodes the JPEGs, draws the noise, runs the U-Net up to b and pools
before the head sees the batch; (c) in memory: epochs on tensors already there (the limit).
The backbone is ``32x32_small`` with random weights on a few hundred CIFAR-10 train images,
so the whole section stays within a couple of minutes on a laptop CPU.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import torch
from torch.nn import functional as F

CONFIG = "32x32_small"
BLOCK, TIMESTEP, STORED_POOL = 9, 50, 8
PROTOCOL_EPOCHS = 28
HEADS = (("linear", dict(pool=2), 2), ("attention", dict(dim=256, num_heads=8, depth=2), 8))


def _live_epoch(head, optimizer, model, schedule, paths, labels, order, batch_size, image_size) -> None:
    """One epoch the official way: decode, noise, truncated U-Net forward, pool, then the head step."""
    from extract.inputs.images import load_batch
    from extract.noise import seeded_noise
    from extract.pooling import pool_features

    head.train()
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size].tolist()
        x0, _, _ = load_batch([paths[r] for r in rows], image_size, num_threads=1)
        steps = torch.full((len(rows),), TIMESTEP, dtype=torch.long)
        x_t = schedule.q_sample(x0, steps, seeded_noise(0, rows, TIMESTEP, tuple(x0.shape[1:])))
        with torch.no_grad():
            features = pool_features(model.features(x_t, steps, [BLOCK])[BLOCK], STORED_POOL).float()
        loss = F.cross_entropy(head({(BLOCK, TIMESTEP): features}), labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _live_vs_cache(model, schedule, index, cache, rows: int = 16) -> float:
    """Largest difference between live pooled features of the first images and the cached rows (same data check)."""
    from extract.inputs.images import load_batch
    from extract.noise import seeded_noise
    from extract.pooling import pool_features

    ids = list(range(rows))
    x0, _, _ = load_batch(index.paths[:rows], model.image_size, num_threads=1)
    steps = torch.full((rows,), TIMESTEP, dtype=torch.long)
    x_t = schedule.q_sample(x0, steps, seeded_noise(0, ids, TIMESTEP, tuple(x0.shape[1:])))
    with torch.no_grad():
        live = pool_features(model.features(x_t, steps, [BLOCK])[BLOCK], STORED_POOL).float()
    cached = torch.from_numpy(cache.load(BLOCK, TIMESTEP)[:rows].astype(np.float32))
    return float((live - cached).abs().max())


def _interleaved_min_seconds(fns, repeats: int) -> list[float]:
    """Fastest of ``repeats`` timings of each function, run alternately so load from other processes hits all alike."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for slot, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[slot].append(time.perf_counter() - start)
    return [min(t) for t in times]


def bench_probe(per_class: int = 26, batch_size: int = 64, repeats: int = 3, threads: int = 1) -> list[str]:
    """Seconds per epoch of the linear probe and the attention head, three ways; returns lines to print.

    One torch thread by default: on a shared CPU, timings with more threads swing with other load.
    """
    previous_threads = torch.get_num_threads()
    try:
        return _bench(per_class, batch_size, repeats, threads)
    finally:
        torch.set_num_threads(previous_threads)


def _bench(per_class: int, batch_size: int, repeats: int, threads: int) -> list[str]:
    from click.testing import CliRunner

    from extract.cache import open_cache
    from extract.backbone.identity import backbone_id
    from extract.backbone.configs import get_config
    from extract.job import build_backbone
    from extract.schedule import get_schedule
    from pipeline.cli.main import main
    from pipeline.datasets import build_index
    from probe.features import load_features
    from probe.heads import count_parameters, create_head, default_lr
    from probe.train import epoch_order, tensor_batches, train_one_epoch

    key = (BLOCK, TIMESTEP)
    index = build_index("cifar10", "train", per_class=per_class)
    labels = torch.from_numpy(index.labels.astype(np.int64))
    config = get_config(CONFIG)
    torch.set_num_threads(threads)
    lines = [f"probe: {CONFIG} (random weights, seed 0), b={BLOCK}, t={TIMESTEP}, cached pool {STORED_POOL}, "
             f"{index.num_images} CIFAR-10 train images, batch {batch_size}, {torch.get_num_threads()} threads, "
             f"fastest of {repeats} interleaved epochs after a warm-up"]
    with tempfile.TemporaryDirectory() as cache_dir:
        began = time.perf_counter()
        result = CliRunner().invoke(main, [
            "extract", "--dataset", "cifar10", "--split", "train", "--config", CONFIG, "-t", str(TIMESTEP),
            "-b", str(BLOCK), "--pool", str(STORED_POOL), "--per-class", str(per_class), "--synchronous",
            "--no-progress", "-y", "--threads", str(threads), "--cache-dir", cache_dir,
        ])
        if result.exit_code != 0:
            return lines + [f"  extract failed: {result.output.strip().splitlines()[-1:]}"]
        lines.append(f"  extract once into the cache: {time.perf_counter() - began:.2f} s")
        torch.set_num_threads(threads)  # the in-process extraction job sets its own thread count
        cache = open_cache(cache_dir, "cifar10", "train", backbone_id(CONFIG, weight_seed=0))
        model = build_backbone(CONFIG, weight_seed=0)
        schedule = get_schedule(config.noise_schedule, config.diffusion_steps)
        lines.append(f"  live features equal the cached ones: max |difference| {_live_vs_cache(model, schedule, index, cache):.1e}"
                     f" (float16 storage)")
        for name, overrides, pool in HEADS:
            read_pool = pool if cache.shape(*key)[-1] > pool else None
            began = time.perf_counter()
            loaded = load_features(cache, [key], pool=read_pool)
            load_seconds = time.perf_counter() - began
            features, shape = loaded.features, tuple(loaded.features[key].shape[1:])
            torch.manual_seed(0)
            head = create_head(name, {key: shape}, 10, **overrides)
            optimizer = torch.optim.SGD(head.parameters(), lr=default_lr(name))
            epoch = iter(range(10**6))

            def memory_epoch():
                order = epoch_order(loaded.num_images, 0, next(epoch))
                train_one_epoch(head, optimizer, tensor_batches(features, loaded.labels, order, batch_size), progress=False)

            def live_epoch():
                order = epoch_order(index.num_images, 0, next(epoch))
                _live_epoch(head, optimizer, model, schedule, index.paths, labels, order, batch_size, config.image_size)

            memory_epoch()  # warm-ups
            live_epoch()
            in_memory, live = _interleaved_min_seconds([memory_epoch, live_epoch], repeats)
            on_cache = in_memory + load_seconds / PROTOCOL_EPOCHS
            lines.append(f"  {name} head ({count_parameters(head):,} parameters, input {shape})")
            lines.append(f"    (a) on the cache      {on_cache:8.3f} s/epoch   x{on_cache / in_memory:7.1f}   "
                         f"(load once {load_seconds:.3f} s, amortised over {PROTOCOL_EPOCHS} epochs)")
            lines.append(f"    (b) live backbone     {live:8.3f} s/epoch   x{live / in_memory:7.1f}   "
                         f"(decode + noise + U-Net to b={BLOCK} + pool, every epoch)")
            lines.append(f"    (c) tensors in memory {in_memory:8.3f} s/epoch   x{1.0:7.1f}")
    return lines


if __name__ == "__main__":
    print("\n".join(bench_probe()))
