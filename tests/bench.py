"""``make bench``: performance figures as ratios measured in one run (never asserted in tests).

Sections: backbone (full vs truncated forwards of 256x256_uncond), extract (cache and
extraction throughput), probe (seconds per epoch on the cache vs live backbone vs in memory).
Run one with ``python -m tests.bench backbone``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def _time(fn, repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_backbone(config: str = "256x256_uncond", blocks=(19, 24, 30), repeats: int = 2) -> list[str]:
    """Full forward vs ``features`` truncated after b, batch 1, float32, on this machine's CPU."""
    from extract.block_table import block_table
    from extract.configs import get_config

    torch.manual_seed(0)
    model = get_config(config).build().eval()
    size = model.image_size
    x, t = torch.randn(1, 3, size, size), torch.tensor([150])
    flops = {r.b: r.flops_cum for r in block_table(config)}
    lines = [f"backbone: {config}, batch 1, float32, {torch.get_num_threads()} threads, median of {repeats} after a warm-up"]
    with torch.inference_mode():
        full = _time(lambda: model(x, t), repeats)
        lines.append(f"  full forward                 {full:8.2f} s   ratio 1.000   (FLOP share 1.000)")
        for b in blocks:
            sec = _time(lambda: model.features(x, t, [b]), repeats)
            lines.append(
                f"  truncated after b={b:<2}        {sec:8.2f} s   ratio {sec / full:.3f}   (FLOP share {flops[b] / flops[0]:.3f})"
            )
        sec = _time(lambda: model.features(x, t, list(blocks)), repeats)
        lines.append(
            f"  one pass capturing b={','.join(map(str, blocks))} {sec:5.2f} s   ratio {sec / full:.3f}   (FLOP share {flops[max(blocks)] / flops[0]:.3f})"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", default=["backbone", "extract", "probe"])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    for section in args.sections:
        if section == "backbone":
            lines = bench_backbone(repeats=args.repeats)
        elif section == "extract":
            from tests.bench_extract import bench_extract

            lines = bench_extract()
        elif section == "probe":
            from tests.bench_probe import bench_probe

            lines = bench_probe()
        else:
            parser.error(f"unknown section {section!r}: choose backbone, extract or probe")
        sys.stdout.write("\n".join(lines) + "\n\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
