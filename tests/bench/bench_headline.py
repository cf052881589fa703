"""Headline benchmark: the official protocol (``probe --live``) against ``extract`` + a cached ``probe``, same images, head, solver and epochs, and the ratio at ImageNet scale.

The official protocol runs the backbone every step, with fresh noise and random resized crop and
flip; diffrep extracts once (the default path: in-process with one worker) and trains the head on the
cache. Both train the same linear head with SGD for the paper's 28 epochs on the same CIFAR-10
subset (100 train / 50 test images a class, the bundled ``32x32_small``), each command timed from
outside as a user runs it (wall, user and sys CPU of it and its workers). The marginal cost of
each further head is one more cached ``probe`` against one more live run. The ImageNet figure
scales the measured seconds per FLOP of each side (extraction's forwards, the live run's
forwards, the cached head's row-epochs) by the block table's FLOPs of ``256x256_uncond`` at b=24,
its full forward (the official code runs the whole U-Net every step) and its head width.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from tests.bench.bench_pipeline import CommandRun, run_diffrep, run_extract

IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000
_PROBE_LINE = re.compile(r"(\d+) train / (\d+) test images\): top-1 ([\d.]+)%.* in ([\d.]+) s")


def _probe(args: list[str]) -> tuple[CommandRun, int, int, float, float]:
    """A timed ``diffrep probe``: the command, its train and test image counts, its top-1 (%) and training seconds."""
    command = run_diffrep(["probe", *args, "--no-progress"])
    found = _PROBE_LINE.search(command.output)
    if not found:
        raise RuntimeError(f"no result line in the output of diffrep probe:\n{command.output[-3000:]}")
    return command, int(found.group(1)), int(found.group(2)), float(found.group(3)), float(found.group(4))


def _rows(config: str) -> dict:
    from extract.backbone.block_table import block_table

    return {row.b: row for row in block_table(config)}


def bench_headline(train_per_class: int = 100, test_per_class: int = 50, epochs: int = 28, block: int = 10,
                   timestep: int = 25, imagenet_block: int = 24) -> list[str]:
    """The headline figures as lines to print (a few minutes on two CPU cores)."""
    from extract.backbone.configs import bundled_checkpoint

    config, big = "32x32_small", "256x256_uncond"
    checkpoint = bundled_checkpoint(config)
    work = Path(tempfile.mkdtemp(prefix="diffrep-bench-headline-"))
    model = ["--dataset", "cifar10", "--config", config, "--checkpoint", checkpoint, "-b", str(block), "-t", str(timestep)]
    head = ["--head", "linear", "--solver", "sgd", "--epochs", str(epochs), "--results", str(work / "results.parquet")]
    try:
        cache = str(work / "cache")
        extracts = [run_extract([*model, "--split", split, "--per-class", str(n)], cache)
                    for split, n in (("train", train_per_class), ("test", test_per_class))]
        extract_forwards = sum(e.images for e in extracts)  # one timestep, one view: a forward per image
        cached, train_n, _, cached_top1, cached_train_seconds = _probe([*model, *head, "--cache-dir", cache,
                                                       "--checkpoint-dir", str(work / "ck-cached")])
        live, live_train_n, _, live_top1, live_train_seconds = _probe([
            *model, *head, "--live", "--per-class", str(train_per_class), "--test-per-class", str(test_per_class),
            "--checkpoint-dir", str(work / "ck-live")])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    extract_wall = sum(e.command.wall for e in extracts)
    extract_cpu = sum(e.command.cpu for e in extracts)
    cached_wall, cached_cpu = extract_wall + cached.wall, extract_cpu + cached.cpu
    lines = [
        f"headline: official protocol vs extract + cached probe, CIFAR-10 {train_per_class} train / {test_per_class} "
        f"test images a class, {config} (bundled weights), b={block} t={timestep}, linear head, SGD, {epochs} epochs",
        f"    {'':<44} {'wall s':>7} {'user s':>7} {'sys s':>6}  top-1",
        f"    {'extract train + test (default path)':<44} {extract_wall:7.1f} "
        f"{sum(e.command.user for e in extracts):7.1f} {sum(e.command.sys for e in extracts):6.1f}",
        f"    {'probe on the cache':<44} {cached.wall:7.1f} {cached.user:7.1f} {cached.sys:6.1f}  {cached_top1:.2f}%",
        f"    {'extract + cached probe':<44} {cached_wall:7.1f} {cached_cpu:15.1f} (CPU)",
        f"    {'probe --live (backbone every step, fresh noise, crop/flip)':<44} {live.wall:7.1f} {live.user:7.1f} "
        f"{live.sys:6.1f}  {live_top1:.2f}%",
        f"    ratio, live / (extract + cached probe): {live.wall / cached_wall:.1f}x wall, {live.cpu / cached_cpu:.1f}x CPU",
        f"    each further head: {cached.wall:.1f} s on the cache vs {live.wall:.1f} s live = {live.wall / cached.wall:.1f}x "
        f"(each command's ~start of Python and torch included)",
    ]

    # ImageNet, 256x256_uncond at b=imagenet_block: this machine's seconds per FLOP, scaled by the block table. The
    # rates come from the runs' own seconds (extraction's summary, each probe's training time): at ImageNet scale
    # the start of a command or a cluster is negligible.
    small, large = _rows(config), _rows(big)
    flops_small, flops_big, flops_full = small[block].flops_cum, large[imagenet_block].flops_cum, large[0].flops_cum
    per_flop_extract = sum(e.seconds for e in extracts) / (extract_forwards * flops_small)
    per_flop_live = live_train_seconds / (epochs * live_train_n * flops_small)
    head_per_row_epoch = cached_train_seconds / (epochs * train_n)
    width = large[imagenet_block].channels / small[block].channels  # linear head input, same pooled side
    images = IMAGENET_TRAIN + IMAGENET_VAL
    live_images = epochs * IMAGENET_TRAIN + IMAGENET_VAL
    imagenet_cached = images * flops_big * per_flop_extract + epochs * IMAGENET_TRAIN * head_per_row_epoch * width
    imagenet_live = live_images * flops_big * per_flop_live
    imagenet_official = live_images * flops_full * per_flop_live
    flop_level = epochs * flops_full / flops_big  # the training forwards alone, as the paper's figure
    hours = 3600.0
    lines += [
        f"  ImageNet ({IMAGENET_TRAIN:,} train / {IMAGENET_VAL:,} val), {big} b={imagenet_block}, one {epochs}-epoch "
        f"linear probe, from this machine's seconds per FLOP ({per_flop_extract * 1e12:.2f} s/TFLOP extracting, "
        f"{per_flop_live * 1e12:.2f} s/TFLOP live, runs' own seconds), the cached head's "
        f"{head_per_row_epoch * 1e6:.0f} us per row and epoch x {width:.0f} (wider features) and the block table ({flops_big / 1e12:.3f} TFLOP to b={imagenet_block}, "
        f"{flops_full / 1e12:.3f} TFLOP full forward):",
        f"    extract + cached probe          {imagenet_cached / hours:10.0f} h",
        f"    live, truncated at b={imagenet_block:<2}         {imagenet_live / hours:10.0f} h   "
        f"({imagenet_live / imagenet_cached:.0f}x)",
        f"    official (full forward a step)  {imagenet_official / hours:10.0f} h   "
        f"({imagenet_official / imagenet_cached:.0f}x; FLOP level {flop_level:.0f}x: {epochs} full forwards "
        f"against one to b={imagenet_block} per training image)",
    ]
    return lines


if __name__ == "__main__":
    print(*bench_headline(), sep="\n")
