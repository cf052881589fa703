"""Pipeline benchmark: end-to-end extraction images/s on ImageNet-size JPEGs against the pure truncated forward, one run.

The bench makes its own JPEGs (CIFAR-10 test images upscaled to 500x375 and re-encoded at
quality 90, the size of a typical ImageNet photo), then extracts them into a real cache
through ``plan_extraction`` / ``run_extraction`` in-process (decode, resize, noise, forward,
pool, write), and times the same truncated forward (same batch, blocks, timesteps, precision)
on tensors already on the device. The goal is the pipeline at >= 85% of the forward. It also
times decoding per image on one thread and on all threads, and the seeded noise per image,
so that one can say how many CPU threads a GPU needs. CPU: ``32x32_small`` (bundled weights);
with CUDA also ``256x256_uncond`` in bf16 at batch 64.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

JPEG_SIZE = (500, 375)


def _cifar_root() -> Path:
    return Path(os.environ.get("DIFFREP_DATA", Path.home() / ".cache" / "diffrep" / "data")) / "cifar10-jpg"


def sample_cifar10_test(dest: str | os.PathLike, per_class: int) -> int:
    """Copy the first ``per_class`` CIFAR-10 test JPEGs of each class to ``dest/test/<class>`` (for a machine without ../shared).

    ``make device-kit`` uses it so that the bench can make its 500x375 JPEGs on a lent GPU machine
    (``DIFFREP_DATA`` pointed at the parent of ``dest``). Unpacks ../shared's archive first if needed.
    """
    import shutil

    from pipeline.archives import ensure_unpacked
    from pipeline.manifest import default_data_root, default_shared_dir

    if not (_cifar_root() / "test").is_dir():
        ensure_unpacked(default_shared_dir() / "data" / "cifar10-jpg.tar.gz", default_data_root(), "cifar10-jpg")
    copied = 0
    for folder in sorted(p for p in (_cifar_root() / "test").iterdir() if p.is_dir()):
        target = Path(dest) / "test" / folder.name
        target.mkdir(parents=True, exist_ok=True)
        for image in sorted(folder.glob("*.jpg"))[:per_class]:
            shutil.copyfile(image, target / image.name)
            copied += 1
    return copied


def make_jpegs(root: Path, count: int, threads: int | None = None) -> list[str]:
    """``count`` CIFAR-10 test images upscaled to 500x375 and saved as quality-90 JPEGs in ``root/cifar10-jpg/test/<class>``.

    Classes are taken round-robin so any prefix is balanced; the folder layout is the cifar10 manifest's.
    """
    from PIL import Image

    source = _cifar_root() / "test"
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is missing: run make data (or the CIFAR-10 test fixture) first")
    classes = sorted(p for p in source.iterdir() if p.is_dir())
    files = [sorted(c.glob("*.jpg")) for c in classes]
    jobs = []
    for i in range(count):
        cls = i % len(classes)
        src = files[cls][(i // len(classes)) % len(files[cls])]
        jobs.append((src, root / "cifar10-jpg" / "test" / classes[cls].name / f"{i:06d}.jpg"))
    for c in classes:
        (root / "cifar10-jpg" / "test" / c.name).mkdir(parents=True, exist_ok=True)

    def one(job):
        src, dst = job
        with Image.open(src) as image:
            image.convert("RGB").resize(JPEG_SIZE, Image.Resampling.BICUBIC).save(dst, quality=90)
        return str(dst)

    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        return list(pool.map(one, jobs))


def _decode_rates(paths: list[str], image_size: int, threads: int) -> tuple[float, float]:
    """ms of wall time per image decoding ``paths`` on one thread, and on ``threads`` threads."""
    from extract.inputs.images import load_pixels

    start = time.perf_counter()
    for path in paths:
        load_pixels(path, image_size)
    one = (time.perf_counter() - start) / len(paths) * 1e3
    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        list(pool.map(lambda p: load_pixels(p, image_size), paths))
        many = (time.perf_counter() - start) / len(paths) * 1e3
    return one, many


def _noise_ms(image_size: int, count: int = 32) -> float:
    from extract.noise import seeded_noise

    start = time.perf_counter()
    seeded_noise(0, range(count), 150, (3, image_size, image_size))
    return (time.perf_counter() - start) / count * 1e3


def _pure_forward(config: str, checkpoint: str | None, blocks, timesteps, batch: int, batches: int, precision: str,
                  device: torch.device, threads: int) -> float:
    """images/s of the truncated forward alone (every timestep per image), inputs already on the device."""
    from extract.cache import CacheSpec
    from extract.job import _backbone, ShardJob
    from extract.precision import autocast

    spec = CacheSpec(dataset="", split="", backbone_id="", config_name=config, image_size=0, num_images=0)
    job = ShardJob(cache="", spec=spec, shard=0, start=0, paths=(), todo=(), checkpoint=checkpoint, device=str(device))
    model = _backbone(job, device)
    size = model.image_size
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    x = torch.randn(batch, 3, size, size, device=device)
    steps = {t: torch.full((batch,), t, dtype=torch.long, device=device) for t in timesteps}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        with torch.inference_mode(), autocast(device, precision):
            for t in timesteps:  # warm-up (and cuDNN's kernel search)
                model.features(x, steps[t], list(blocks))
            sync()
            start = time.perf_counter()
            for _ in range(batches):
                for t in timesteps:
                    model.features(x, steps[t], list(blocks))
            sync()
            seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)
    return batch * batches / seconds


def _pipeline(root: Path, cache_dir: str, config: str, checkpoint: str | None, blocks, timesteps, batch: int,
              shard: int, images: int, precision: str, device: str, threads: int, decode_threads: int) -> float:
    """images/s of a real in-process extraction of ``images`` JPEGs (a one-shard warm-up run first)."""
    from pipeline.cluster import open_runner
    from pipeline.extraction import ExtractionRequest, plan_extraction
    from pipeline.extraction_run import run_extraction

    def run(limit: int, where: str) -> float:
        request = ExtractionRequest(
            dataset="cifar10", split="test", timesteps=tuple(timesteps), blocks=tuple(blocks), cache_dir=where,
            pool=16, config_name=config, checkpoint=checkpoint, limit=limit, data_root=str(root), shard_size=shard,
            batch_size=batch, device=device, precision=precision, num_threads=threads, decode_threads=decode_threads,
        )
        plan = plan_extraction(request)
        with open_runner(synchronous=True) as runner:
            summary = run_extraction(plan, runner, progress=False)
        assert not summary.failed, summary.describe()
        return summary.images / summary.seconds

    run(batch, os.path.join(cache_dir, "warm-up"))
    return run(images, os.path.join(cache_dir, "timed"))


def bench_pipeline_section(images: int = 768, threads: int = 2, rounds: int = 2, settings: list | None = None) -> list[str]:
    """Every pipeline figure as lines to print: CPU with 32x32_small; with CUDA, also 256x256_uncond bf16 batch 64.

    ``settings``: (device, config, checkpoint, blocks, batch, shard size, images, precision, torch
    threads, decode threads) per measurement, instead of those two (a test runs a small dry run).
    """
    from extract.backbone.configs import bundled_checkpoint

    cuda = torch.cuda.is_available()
    cpus = os.cpu_count() or 1
    lines = []
    root = Path(tempfile.mkdtemp(prefix="diffrep-bench-jpeg-"))
    try:
        count = max(images, 4096) if cuda else images
        made = time.perf_counter()
        paths = make_jpegs(root, count)
        made = time.perf_counter() - made
        sample = paths[: min(len(paths), 96)]
        lines.append(f"pipeline: {count} JPEGs of {JPEG_SIZE[0]}x{JPEG_SIZE[1]} (CIFAR-10 upscaled, quality 90) made in {made:.1f} s; "
                     f"{cpus} CPUs{', CUDA ' + torch.cuda.get_device_name() if cuda else ', no GPU'}")
        for size in (32, 256):
            one, many = _decode_rates(sample, size, cpus)
            lines.append(f"  decode+resize to {size}: {one:.2f} ms/image on 1 thread, {many:.2f} ms/image wall on {cpus} threads "
                         f"({one / many:.1f}x); 1,000 images/s needs ~{one:.0f} threads at the 1-thread rate")
        for size in (32, 256):
            lines.append(f"  seeded noise {size}x{size}: {_noise_ms(size):.2f} ms per image and timestep (one thread)")

        default = settings is None
        if default:
            settings = [("cpu", "32x32_small", bundled_checkpoint("32x32_small"), (10, 12, 14), 64, 128, images, "fp32",
                         threads, max(1, cpus - threads) if cpus > threads else 1)]
            if cuda:
                settings.append(("cuda", "256x256_uncond", None, (19, 24, 30), 64, 256, count, "bf16", threads,
                                 max(1, min(32, cpus - 1))))
        timesteps = (90, 150, 300)
        for device, config, checkpoint, blocks, batch, shard, n, precision, torch_threads, decode_threads in settings:
            # alternated and best of `rounds`: on a shared machine the load moves, and it moves both alike
            forward = (config, checkpoint, blocks, timesteps, batch, max(2, n // batch // 2), precision,
                       torch.device(device), torch_threads)
            pure_runs, pipeline_runs = [], []
            for _ in range(rounds):
                pure_runs.append(_pure_forward(*forward))
                cache_dir = tempfile.mkdtemp(prefix="diffrep-bench-cache-")
                try:
                    pipeline_runs.append(_pipeline(root, cache_dir, config, checkpoint, blocks, timesteps, batch, shard,
                                                   n, precision, device, torch_threads, decode_threads))
                finally:
                    shutil.rmtree(cache_dir, ignore_errors=True)
            pure, end_to_end = max(pure_runs), max(pipeline_runs)
            weights = "bundled weights" if checkpoint else "random weights"
            lines += [
                f"  {device}: {config} ({weights}), {precision}, batch {batch}, shards of {shard}, blocks "
                f"{','.join(map(str, blocks))}, t={','.join(map(str, timesteps))}, {torch_threads} torch threads, "
                f"{decode_threads} decode threads, {n} images:",
                f"    end to end (decode, noise, forward, pool, write to a cache) {end_to_end:8.1f} images/s",
                f"    pure truncated forward on device tensors                  {pure:8.1f} images/s",
                f"    (best of {rounds} alternated runs each: pipeline {', '.join(f'{r:.1f}' for r in pipeline_runs)}; "
                f"forward {', '.join(f'{r:.1f}' for r in pure_runs)})",
                f"    pipeline / forward = {end_to_end / pure:.2f} (goal >= 0.85)",
            ]
        if default and not cuda:
            lines.append("  cuda: no GPU on this machine; the 256x256_uncond bf16 batch-64 figures need one")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return lines


if __name__ == "__main__":
    print(*bench_pipeline_section(), sep="\n")
