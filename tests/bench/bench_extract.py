"""Extract-stage benchmark: truncated single pass vs full forward with hooks, cache write/read speed vs a raw memmap, bytes per image.

Run ``python -c "from tests.bench.bench_extract import bench_extract; print(*bench_extract(), sep='\\n')"``;
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


def _drop_page_cache(path: str) -> None:
    """Flush a file or folder to disk and ask the kernel to drop its pages (a cold-ish read next)."""
    files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for name in files:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_storage(config: str = "256x256_uncond", images: int = 1024, shard_size: int = 256, pool: int = 16,
                  repeats: int = 5) -> list[str]:
    """Whole-array cache write and read MB/s against plain numpy ``tofile``/``fromfile`` of the same bytes, one run.

    Each (b, t) array is written as an extraction writes it (``write_shard_data`` per shard, as a
    worker, with the shard's CRC-32 the job chained beside the forward; then one ``MarkWriter.mark`` of
    every shard, as the orchestrator, whose writer is opened once per run and so outside the timing)
    and read whole with ``load``,
    cold (fsync, then the pages dropped with POSIX_FADV_DONTNEED) as the raw file is; best of
    ``repeats``, interleaved with the raw figures so that a busy machine slows both alike; writes
    are timed into the page cache and again up to the fsync (on disk), of new files on both sides
    (an extraction writes each shard once; replacing a file costs its unlink). The
    same is timed with the direct shard I/O switched off (Zarr doing all of it: the figures before
    ``extract.cache.shard_io``). Goal: cache >= 70% of raw both ways.
    """
    from unittest import mock

    from extract.cache import reader as cache_reader, writer as cache_writer
    from extract.cache import CacheSpec, MarkWriter, ShardMarks, create_cache, inner_chunk_rows, open_cache, write_shard_data
    from extract.cache.integrity import shard_checksum
    from extract.backbone.configs import get_config
    from extract.pooling import pooled_size

    cfg = get_config(config)
    with torch.device("meta"):
        shapes = cfg.build().block_shapes()
    lines = [f"cache storage ({config} shapes, pool {pool}, {images} images, shards of {shard_size}, no compression; "
             f"best of {repeats}, reads cold: fsync + FADV_DONTNEED):"]
    root = tempfile.mkdtemp(prefix="diffrep-bench-")
    zarr_only = [mock.patch.object(cache_writer, "write_shard_object", lambda *a: False),
                 mock.patch.object(cache_reader, "read_shard_object", lambda *a: False)]
    try:
        for b in BLOCKS:
            channels, native = shapes[b]
            side = pooled_size(native, pool)
            data = np.random.default_rng(0).standard_normal((images, channels, side, side), dtype=np.float32)
            data = data.astype(np.float16)
            mb = data.nbytes / 1e6
            raw = os.path.join(root, f"raw{b}.bin")
            best = {}

            def keep(key, seconds):
                best[key] = min(best.get(key, float("inf")), seconds)

            for way in ("direct", "zarr"):
                name = f"bench{b}{way}"
                spec = CacheSpec(dataset=name, split="train", backbone_id="bench", config_name=config,
                                 image_size=cfg.image_size, num_images=images, shard_size=shard_size, pool=pool)
                cache = create_cache(root, spec, [f"{i}.jpg" for i in range(images)], np.zeros(images), ["x"],
                                     arrays={(b, 150): (channels, side, side)}, native_sizes={b: native})
                folder = os.path.join(cache.path, f"b{b}")  # the array's objects and markers, as raw's one file
                patches = zarr_only if way == "zarr" else []
                for patch in patches:
                    patch.start()
                try:
                    shards = [data[slice(*cache.shard_bounds(s))] for s in range(cache.num_shards)]
                    # a job chains each shard's CRC-32 over its rows as they come back, beside the forward
                    crcs = [shard_checksum(part) for part in shards] if way == "direct" else [None] * len(shards)

                    marker = MarkWriter(cache.path)  # the orchestrator opens its writer once per run, untimed here

                    def write_all():
                        """As an extraction writes: workers write shard data, the orchestrator marks them (one object)."""
                        marks = []
                        for s, part in enumerate(shards):
                            known = {(b, 150): crcs[s]} if crcs[s] is not None else None
                            values = write_shard_data(cache.path, s, {(b, 150): part}, checksums=known)
                            marks.append(ShardMarks(s, {(b, 150, 0): v for (_, _), v in values.items()}))
                        marker.mark(marks)

                    chunks = os.path.join(cache.path, f"b{b}", "t150", "c")  # the shard objects

                    def fresh(*paths):
                        """An extraction writes new shards: what a previous repeat left goes first, untimed (both sides)."""
                        for path in paths:
                            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else \
                                (os.remove(path) if os.path.exists(path) else None)

                    for _ in range(repeats):
                        fresh(chunks)
                        keep((way, "write"), _seconds(write_all))
                        fresh(raw)
                        keep(("raw", "write"), _seconds(lambda: data.tofile(raw)))
                        fresh(chunks)
                        keep((way, "durable"), _seconds(lambda: (write_all(), _drop_page_cache(folder))))
                        fresh(raw)
                        keep(("raw", "durable"), _seconds(lambda: (data.tofile(raw), _drop_page_cache(raw))))
                        _drop_page_cache(folder)
                        reader = open_cache(root, name, "train", "bench")
                        keep((way, "read"), _seconds(lambda: reader.load(b, 150)))
                        _drop_page_cache(raw)
                        keep(("raw", "read"), _seconds(lambda: np.fromfile(raw, dtype=np.float16)))
                finally:
                    for patch in patches:
                        patch.stop()
                shutil.rmtree(cache.path, ignore_errors=True)
            rate = {key: mb / sec for key, sec in best.items()}
            inner = inner_chunk_rows(shard_size, channels * side * side * 2)
            lines += [
                f"  b{b} ({channels}, {side}, {side}) float16, {channels * side * side * 2 / 1e3:.0f} KB per image, "
                f"shards of {shard_size} ({shard_size * channels * side * side * 2 / 1e6:.0f} MB), inner chunks of {inner}:",
                f"    write {rate[('direct', 'write')]:5.0f} MB/s vs raw tofile {rate[('raw', 'write')]:5.0f} "
                f"= {rate[('direct', 'write')] / rate[('raw', 'write')]:.2f} (through Zarr only: {rate[('zarr', 'write')]:.0f} MB/s "
                f"= {rate[('zarr', 'write')] / rate[('raw', 'write')]:.2f})",
                f"    write + fsync {rate[('direct', 'durable')]:5.0f} MB/s vs raw {rate[('raw', 'durable')]:5.0f} "
                f"= {rate[('direct', 'durable')] / rate[('raw', 'durable')]:.2f} (through Zarr only: "
                f"{rate[('zarr', 'durable')]:.0f} MB/s = {rate[('zarr', 'durable')] / rate[('raw', 'durable')]:.2f})",
                f"    read  {rate[('direct', 'read')]:5.0f} MB/s vs raw fromfile {rate[('raw', 'read')]:5.0f} "
                f"= {rate[('direct', 'read')] / rate[('raw', 'read')]:.2f} (through Zarr only: {rate[('zarr', 'read')]:.0f} MB/s "
                f"= {rate[('zarr', 'read')] / rate[('raw', 'read')]:.2f})",
            ]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return lines


def bench_pipeline(images_per_class: int = 30, threads: int = 2) -> list[str]:
    """End-to-end in-process extraction (decode, noise, truncated forward, pool, write) on CIFAR-10, small config."""
    from pipeline.cluster import open_runner
    from pipeline.extraction import ExtractionRequest, plan_extraction
    from pipeline.extraction_run import run_extraction

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
