"""``make bench``: performance figures as ratios measured in one run (never asserted in tests).

Sections: backbone (full vs truncated forwards of 256x256_uncond), extract (cache and
extraction throughput), pipeline (``diffrep extract`` through the default local cluster and
``--synchronous``, on the shared 32-px CIFAR-10 JPEGs and on 500x375 JPEGs: images/s, wall, user
and sys CPU; ``--before`` adds the default path as it ran before issue 23; the GPU part only with
CUDA), headline (the official protocol, ``probe --live``, against extract + cached probe on the
same images, head and epochs, and the ratio extrapolated to ImageNet), probe (seconds per epoch
on the cache vs live backbone vs in memory), fusion (DifFeed training images/s, truncated passes
vs both in full), gpu (bf16 images/s of the real 256x256 model and its share of the GPU's peak;
skipped without CUDA), distributed (a cached head on 1 process vs 2 gloo ranks), segment (peak RSS against the RAM cap
while a dense head trains on a CamVid cache of unpooled maps three times the cap, and its pixels/s), sd (Stable
Diffusion 1.5's truncated vs full U-Net at 256 px against its FLOP table, and the VAE encoder's cost; not in the
default run: ``make bench EXTRA=sd``). Run one with ``python -m tests.bench pipeline``. Not in the default run
(accuracy, not speed, and several minutes): protocols (each linear-probe protocol's top-1 and
seconds on one cache), segment-study (the segmentation figures of the README, about 40 minutes on 2 CPU cores).
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
    from extract.backbone.block_table import block_table
    from extract.backbone.configs import get_config

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


# Dense bf16 tensor-core peaks (FLOP/s) of common GPUs, by a substring of the device name.
_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def bench_gpu(config: str = "256x256_uncond", blocks=(19, 24, 30), batches=(32, 64, 128, 256), repeats: int = 3,
              device: str = "cuda") -> list[str]:
    """bf16 extraction throughput of the real configuration (random weights) on a CUDA GPU.

    For each batch size that fits: images/s of the truncated single pass capturing ``blocks`` and
    of the official way (a full forward whose hooks capture them), and the truncated pass's
    achieved FLOP/s as a share of the GPU's bf16 peak.
    """
    if device == "cuda" and not torch.cuda.is_available():
        return ["gpu: no CUDA device on this machine; skipped"]
    from extract.backbone.block_table import block_table
    from extract.backbone.registry import create_backbone
    from extract.precision import autocast

    torch.backends.cudnn.benchmark = True
    device = torch.device(device)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "cpu (a dry run of this section)"
    peak = next((v for k, v in _BF16_PEAK.items() if k in name), None)
    model = create_backbone(config, weight_seed=0).to(device).eval()
    flops = {r.b: r.flops_cum for r in block_table(config)}
    size = model.image_size
    lines = [f"gpu: {name}, {config} random weights, bf16 autocast, blocks {','.join(map(str, blocks))}"]

    captured = {}  # the official way keeps the hooked block outputs

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(fn, batch):
        fn()
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        return batch * repeats / (time.perf_counter() - start)

    for batch in batches:
        x = torch.randn(batch, 3, size, size, device=device)
        t = torch.full((batch,), 150, device=device, dtype=torch.long)
        try:
            with torch.inference_mode(), autocast(device, "bf16"):
                truncated = timed(lambda: model.features(x, t, list(blocks)), batch)
                hooks = [model.block_module(b).register_forward_hook(
                    lambda m, i, o, b=b: captured.__setitem__(b, o)) for b in blocks]
                try:
                    official = timed(lambda: model(x, t), batch)
                finally:
                    for hook in hooks:
                        hook.remove()
        except torch.OutOfMemoryError:
            lines.append(f"  batch {batch}: out of memory")
            torch.cuda.empty_cache()
            break
        achieved = truncated * flops[max(blocks)]
        share = f"{achieved / peak:.1%} of the {peak / 1e12:.0f} TFLOP/s bf16 peak" if peak else "peak unknown"
        lines.append(
            f"  batch {batch:4d}: truncated {truncated:8.1f} images/s, full forward + hooks {official:8.1f} images/s "
            f"({truncated / official:.2f}x); {achieved / 1e12:.2f} TFLOP/s = {share}; "
            + (f"max memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else "")
        )
        if cuda:
            torch.cuda.reset_peak_memory_stats()
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*",
                        default=["backbone", "extract", "pipeline", "headline", "probe", "fusion", "gpu", "distributed", "segment"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--before", action="store_true",
                        help="pipeline: also run the default path with the malloc setting it had before issue 23")
    args = parser.parse_args(argv)
    for section in args.sections:
        if section == "backbone":
            lines = bench_backbone(repeats=args.repeats)
        elif section == "extract":
            from tests.bench.bench_extract import bench_extract

            lines = bench_extract()
        elif section == "pipeline":
            from tests.bench.bench_pipeline import bench_pipeline_section

            lines = bench_pipeline_section(rounds=max(args.repeats, 2), before=args.before)
        elif section == "headline":
            from tests.bench.bench_headline import bench_headline

            lines = bench_headline()
        elif section == "gpu":
            lines = bench_gpu()
        elif section == "probe":
            from tests.bench.bench_probe import bench_probe

            lines = bench_probe()
        elif section == "fusion":
            from tests.bench.bench_fusion import bench_fusion

            lines = bench_fusion()
        elif section == "sd":
            from tests.bench.bench_sd import bench_sd

            lines = bench_sd(repeats=args.repeats)
        elif section == "distributed":
            from tests.bench.bench_distributed import bench_distributed

            lines = bench_distributed()
        elif section == "segment":
            from tests.bench.bench_segment import bench_segment_memory

            lines = bench_segment_memory()
        elif section == "segment-study":
            from tests.bench.bench_segment import bench_segment_study

            lines = bench_segment_study()
        elif section == "protocols":
            from tests.bench.bench_protocols import bench_protocols

            lines = bench_protocols()
        else:
            parser.error(f"unknown section {section!r}: choose backbone, extract, pipeline, headline, probe, "
                         "fusion, gpu, distributed, segment, segment-study, sd or protocols")
        sys.stdout.write("\n".join(lines) + "\n\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
