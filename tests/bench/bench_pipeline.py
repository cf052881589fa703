"""Pipeline benchmark: ``diffrep extract`` as users run it (the default, a one-worker local Dask cluster and ``--synchronous``) against the pure forward.

Each run is the real command in a subprocess, timed from outside: wall seconds, the run's own
images/s (its summary line, without the cluster's start), user and sys CPU seconds and minor page
faults of the command and every process it started (``os.wait4``, which sums the reaped worker
processes). Two image sets: the shared CIFAR-10 test JPEGs (32 px) and the bench's own JPEGs
(CIFAR-10 upscaled to 500x375 and re-encoded at quality 90, the size of a typical ImageNet photo).
The variants alternate round by round and the medians are printed, since on a shared machine
the load moves; CPU seconds and page faults move far less than wall time. With ``before=True``
another variant runs the one-worker cluster with ``MALLOC_TRIM_THRESHOLD_=65536`` in the environment,
as distributed's nanny gave its workers before issue 23 (so one command shows before and after).
Since issue 23 the default with one worker (one GPU or none) is in-process; ``--workers 1`` is the
local cluster that was the default before.
The section also times the pure truncated forward on tensors already on the device (the goal:
the default path at >= 0.9 of ``--synchronous``, and both near the forward), and decoding and
seeded noise per image (how many CPU threads a GPU needs). CPU: ``32x32_small``; with CUDA also
``256x256_uncond`` in bf16 at batch 64 on the 500x375 JPEGs.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

JPEG_SIZE = (500, 375)
REPO = Path(__file__).resolve().parents[2]


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


@dataclass(frozen=True)
class CommandRun:
    """One diffrep command timed from outside: wall seconds, CPU seconds and minor page faults of it and its reaped children."""

    wall: float
    user: float
    sys: float
    faults: int
    output: str

    @property
    def cpu(self) -> float:
        return self.user + self.sys


def run_diffrep(args: list[str], env: dict[str, str] | None = None) -> CommandRun:
    """Run ``diffrep ARGS`` from this checkout in a subprocess; raises with its output when it fails."""
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)  # a Dask cluster started by this process may have left it
    environ.update(env or {})
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-c", "from pipeline.cli.main import main; main()", *args],
                                 stdout=log, stderr=subprocess.STDOUT, env=environ, cwd=REPO)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read()
    if child.returncode != 0:
        raise RuntimeError(f"diffrep {' '.join(args)} exited {child.returncode}:\n{output[-3000:]}")
    return CommandRun(wall, usage.ru_utime, usage.ru_stime, usage.ru_minflt, output)


_RATE = re.compile(r"wrote \d+ shards \((\d+) images, (\d+) forwards\) in ([\d.]+) s")

# name, extra arguments, extra environment
VARIANTS = {
    "default": ([], {}),  # in-process since issue 23 (one worker on this machine)
    "--workers 1 (local cluster)": (["--workers", "1"], {}),
    "--workers 1, before issue 23": (["--workers", "1"], {"MALLOC_TRIM_THRESHOLD_": "65536"}),
    "--synchronous": (["--synchronous"], {}),
}
CLUSTER = "--workers 1 (local cluster)"


@dataclass(frozen=True)
class ExtractRun:
    """A timed ``diffrep extract``: the command (wall, CPU, faults) and its own images and seconds."""

    command: CommandRun
    images: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def run_extract(args: list[str], cache_dir: str, env: dict[str, str] | None = None) -> ExtractRun:
    """``diffrep extract ARGS --cache-dir CACHE_DIR --no-progress``, with the images and seconds its summary reports."""
    command = run_diffrep(["extract", *args, "--cache-dir", cache_dir, "--no-progress"], env)
    found = _RATE.findall(command.output)
    if not found:
        raise RuntimeError(f"no summary line in the output of diffrep extract:\n{command.output[-3000:]}")
    return ExtractRun(command, sum(int(i) for i, _, _ in found), sum(float(s) for _, _, s in found))


def _compare(label: str, args: list[str], variants: list[str], rounds: int) -> list[str]:
    """Run each variant ``rounds`` times, alternated, each into a fresh cache; lines of medians."""
    runs: dict[str, list[ExtractRun]] = {v: [] for v in variants}
    for _ in range(rounds):
        for variant in variants:
            extra, env = VARIANTS[variant]
            cache_dir = tempfile.mkdtemp(prefix="diffrep-bench-cache-")
            try:
                runs[variant].append(run_extract(args + extra, cache_dir, env))
            finally:
                shutil.rmtree(cache_dir, ignore_errors=True)
    lines = [f"  {label}: diffrep extract {' '.join(args)}",
             f"    {'path':<27} {'images/s':>9} {'wall s':>7} {'user s':>7} {'sys s':>6} {'CPU ms/img':>10} "
             f"{'faults/img':>10}   (median of {rounds}, alternated; images/s all runs)"]
    median = statistics.median
    for variant, done in runs.items():
        images = done[0].images
        lines.append(
            f"    {variant:<27} {median(r.rate for r in done):9.1f} {median(r.command.wall for r in done):7.1f} "
            f"{median(r.command.user for r in done):7.1f} {median(r.command.sys for r in done):6.1f} "
            f"{median(r.command.cpu for r in done) / images * 1e3:10.1f} "
            f"{median(r.command.faults for r in done) / images:10.0f}   ({', '.join(f'{r.rate:.1f}' for r in done)})")
    if "--synchronous" in runs:
        synchronous = median(r.rate for r in runs["--synchronous"])
        outside = {v: median(r.command.wall - r.seconds for r in done) for v, done in runs.items()}
        for variant in (v for v in ("default", CLUSTER) if v in runs):
            name = "default" if variant == "default" else "local cluster"
            lines.append(f"    {name} / --synchronous = {median(r.rate for r in runs[variant]) / synchronous:.2f} "
                         f"images/s (goal >= 0.90); start and close outside the run: {outside[variant]:.1f} s "
                         f"{name}, {outside['--synchronous']:.1f} s --synchronous")
    return lines


@dataclass(frozen=True)
class Workload:
    """What one comparison extracts: backbone, blocks, timesteps, batch, shards, device and precision."""

    config: str = "32x32_small"
    blocks: tuple[int, ...] = (8, 10, 12)
    timesteps: tuple[int, ...] = (25, 100)
    batch: int = 64
    shard: int = 256
    device: str = "cpu"
    precision: str = "fp32"
    threads: int = 2

    def args(self) -> list[str]:
        return ["--config", self.config, "-b", ",".join(map(str, self.blocks)), "-t", ",".join(map(str, self.timesteps)),
                "--batch-size", str(self.batch), "--shard-size", str(self.shard), "--device", self.device,
                "--precision", self.precision, "--threads", str(self.threads)]


def bench_pipeline_section(per_class: int = 100, jpegs: int = 500, threads: int = 2, rounds: int = 2,
                           before: bool = False, workloads: list[Workload] | None = None) -> list[str]:
    """Every pipeline figure as lines to print.

    Args:
        per_class: shared CIFAR-10 test JPEGs per class (the issue-23 case: 200, here 100 by default).
        jpegs: how many 500x375 JPEGs to make and extract.
        threads: torch threads of the CPU runs; rounds: alternated runs per variant.
        before: also run the default path with the environment distributed's nanny gave before issue 23.
        workloads: instead of ``32x32_small`` on the CPU (and ``256x256_uncond`` bf16 with CUDA).
    """
    cuda = torch.cuda.is_available()
    cpus = os.cpu_count() or 1
    lines = []
    root = Path(tempfile.mkdtemp(prefix="diffrep-bench-jpeg-"))
    variants = ["default", CLUSTER] + (["--workers 1, before issue 23"] if before else []) + ["--synchronous"]
    try:
        count = max(jpegs, 4096) if cuda else jpegs
        made = time.perf_counter()
        paths = make_jpegs(root, count)
        made = time.perf_counter() - made
        sample = paths[: min(len(paths), 96)]
        lines.append(f"pipeline: {cpus} CPUs{', CUDA ' + torch.cuda.get_device_name() if cuda else ', no GPU'}; "
                     f"{count} JPEGs of {JPEG_SIZE[0]}x{JPEG_SIZE[1]} (CIFAR-10 upscaled, quality 90) made in {made:.1f} s")
        for size in (32, 256):
            one, many = _decode_rates(sample, size, cpus)
            lines.append(f"  decode+resize to {size}: {one:.2f} ms/image on 1 thread, {many:.2f} ms/image wall on {cpus} threads "
                         f"({one / many:.1f}x); 1,000 images/s needs ~{one:.0f} threads at the 1-thread rate")
        for size in (32, 256):
            lines.append(f"  seeded noise {size}x{size}: {_noise_ms(size):.2f} ms per image and timestep (one thread)")
        if workloads is None:
            workloads = [Workload(threads=threads)]
            if cuda:
                workloads.append(Workload("256x256_uncond", (19, 24, 30), (90, 150, 300), 64, 256, "cuda", "bf16", threads))
        for work in workloads:
            sets = [] if work.device != "cpu" else [
                ("shared CIFAR-10 test JPEGs, 32x32", ["--dataset", "cifar10", "--split", "test", "--per-class", str(per_class)])]
            sets.append((f"bench JPEGs, {JPEG_SIZE[0]}x{JPEG_SIZE[1]}",
                         ["--dataset", "cifar10", "--split", "test", "--data-root", str(root), "--limit", str(count)]))
            lines.append(f"  {work.device}: {work.config} (random weights), {work.precision}, batch {work.batch}, "
                         f"{work.threads} torch threads, blocks {','.join(map(str, work.blocks))}, "
                         f"t={','.join(map(str, work.timesteps))}")
            for label, data in sets:
                lines += _compare(label, data + work.args(), variants, rounds)
            forward = max(_pure_forward(work.config, None, work.blocks, work.timesteps, work.batch, 8, work.precision,
                                        torch.device(work.device), work.threads) for _ in range(rounds))
            lines.append(f"    pure truncated forward on device tensors, same model and batch: {forward:.1f} images/s "
                         f"(best of {rounds})")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return lines


if __name__ == "__main__":
    print(*bench_pipeline_section(), sep="\n")
