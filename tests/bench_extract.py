"""Extract-stage benchmark: truncated single pass vs full forward with hooks, cache write/read speed vs a raw memmap, bytes per image.

Run ``python -c "from tests.bench_extract import bench_extract; print(*bench_extract(), sep='\\n')"``;
``make bench`` runs it with the other sections. Figures are ratios measured in one run on this
machine; nothing here is asserted.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np
import torch

BLOCKS = (19, 24, 30)


def _seconds(fn, repeats: int = 1) -> float:
    """Best wall seconds of ``fn()`` over ``repeats`` runs (no warm-up: forwards here are long)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def bench_forwards(config: str = "256x256_uncond", batch: int = 1, threads: int = 2) -> list[str]:
    """images/s of ``features(blocks=19,24,30)`` (stops at 30) vs the official full forward with hooks on the blocks."""
    from extract.job import build_backbone

    torch.set_num_threads(threads)
    model = build_backbone(config, None, 0)
    size = model.image_size
    x = torch.randn(batch, 3, size, size)
    t = torch.full((batch,), 150)

    def truncated():
        with torch.no_grad():
            model.features(x, t, list(BLOCKS))

    captured = {}
    hooks = [model.block_module(b).register_forward_hook(lambda _m, _i, out, b=b: captured.__setitem__(b, out))
             for b in BLOCKS]

    def full_with_hooks():
        with torch.no_grad():
            model(x, t)

    try:
        ours = _seconds(truncated)
        official = _seconds(full_with_hooks)
    finally:
        for hook in hooks:
            hook.remove()
    return [
        f"extract forwards ({config}, batch {batch}, {threads} CPU threads, blocks {','.join(map(str, BLOCKS))}):",
        f"  truncated single pass: {batch / ours:.3f} images/s ({ours:.1f} s)",
        f"  full forward + hooks (official way): {batch / official:.3f} images/s ({official:.1f} s)",
        f"  speed-up {official / ours:.2f}x",
    ]


def bench_storage(config: str = "256x256_uncond", images: int = 256, shard_size: int = 128, pool: int = 16) -> list[str]:
    """Cache write MB/s and read MB/s (whole load, streaming) vs a raw numpy memmap of the same bytes; bytes per image."""
    from extract.cache import CacheSpec, create_cache, open_cache, write_shard
    from extract.configs import get_config
    from extract.pooling import pooled_size

    cfg = get_config(config)
    with torch.device("meta"):
        shapes = cfg.build().block_shapes()
    lines = [f"cache storage ({config} shapes, pool {pool}, {images} images, shards of {shard_size}, no compression):"]
    root = tempfile.mkdtemp(prefix="diffrep-bench-")
    try:
        for b in BLOCKS:
            channels, native = shapes[b]
            side = pooled_size(native, pool)
            data = np.random.default_rng(0).standard_normal((images, channels, side, side), dtype=np.float32)
            data = data.astype(np.float16)
            mb = data.nbytes / 1e6
            spec = CacheSpec(dataset=f"bench{b}", split="train", backbone_id="bench", config_name=config,
                             image_size=cfg.image_size, num_images=images, shard_size=shard_size, pool=pool)
            cache = create_cache(root, spec, [f"{i}.jpg" for i in range(images)], np.zeros(images), ["x"],
                                 arrays={(b, 150): (channels, side, side)}, native_sizes={b: native})

            def write():
                for shard in range(cache.num_shards):
                    start, stop = cache.shard_bounds(shard)
                    write_shard(cache.path, shard, {(b, 150): data[start:stop]})

            write_s = _seconds(write)
            reader = open_cache(root, f"bench{b}", "train", "bench")
            load_s = _seconds(lambda: reader.load(b, 150), repeats=2)
            stream_s = _seconds(lambda: [None for _ in reader.iter_shards(b, 150)], repeats=2)
            on_disk = _folder_bytes(os.path.join(cache.path, f"b{b}", "t150"))

            raw = os.path.join(root, f"raw{b}.npy")

            def raw_write():
                mm = np.lib.format.open_memmap(raw, mode="w+", dtype=np.float16, shape=data.shape)
                mm[:] = data
                mm.flush()
                del mm

            raw_write_s = _seconds(raw_write)
            raw_read_s = _seconds(lambda: np.array(np.load(raw, mmap_mode="r")), repeats=2)
            lines += [
                f"  b{b} ({channels}, {side}, {side}) float16: {on_disk / images / 1e3:.1f} KB on disk per image per (b, t) "
                f"(payload {channels * side * side * 2 / 1e3:.1f} KB)",
                f"    write {mb / write_s:.0f} MB/s vs memmap {mb / raw_write_s:.0f} MB/s; "
                f"read whole {mb / load_s:.0f} MB/s, streaming {mb / stream_s:.0f} MB/s vs memmap {mb / raw_read_s:.0f} MB/s "
                f"(page cache warm for both)",
            ]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return lines


def bench_pipeline(images_per_class: int = 30, threads: int = 2) -> list[str]:
    """End-to-end in-process extraction (decode, noise, truncated forward, pool, write) on CIFAR-10, small config."""
    from pipeline.cluster import open_runner
    from pipeline.extraction import ExtractionRequest, plan_extraction, run_extraction

    root = tempfile.mkdtemp(prefix="diffrep-bench-")
    try:
        request = ExtractionRequest(
            dataset="cifar10", split="test", timesteps=(90, 150, 300), blocks=(10, 12, 14), cache_dir=root,
            pool=16, config_name="32x32_small", per_class=images_per_class, shard_size=100, batch_size=50,
            num_threads=threads,
        )
        plan = plan_extraction(request)
        with open_runner(synchronous=True) as runner:
            summary = run_extraction(plan, runner, progress=False)
        return [
            f"extract pipeline (32x32_small random init, CIFAR-10 {plan.spec.num_images} images, t=90,150,300, "
            f"blocks 10,12,14, in-process, {threads} threads):",
            f"  {summary.images / summary.seconds:.1f} images/s, {summary.forwards / summary.seconds:.1f} forwards/s "
            f"({summary.seconds:.1f} s including decoding and writes)",
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def bench_extract(config: str = "256x256_uncond") -> list[str]:
    """Every extract-stage figure, as lines to print (about 2 minutes on 2 CPU cores with 256x256_uncond)."""
    lines = []
    lines += bench_forwards(config)
    lines += bench_storage(config)
    lines += bench_pipeline()
    return lines


if __name__ == "__main__":
    print(*bench_extract(), sep="\n")
