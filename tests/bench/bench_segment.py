"""Segmentation figures: the memory benchmark (``segment`` section) and the study behind NOTES-seg (``segment-study``).

``segment``: a CamVid cache of unpooled maps at least three times the RAM cap, a per-pixel head trained on it
streamed a batch at a time (the maps never held whole): peak RSS of this process against the cap, and
labelled pixels per second of head training.

``segment-study``: on camvid (train -> val) and pets-seg (trainval -> test), the bundled ``32x32_small`` at a
64-px input: per-pixel linear heads over blocks x timesteps, then at the best cell the per-pixel MLP and the
UperNet-style head, on the trained weights, on the same architecture's random initialisation and on raw
pixels. Best cell chosen on the scored split itself (as the demo's sweep does): an optimistic choice,
stated in the report.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time

from extract.backbone.configs import bundled_checkpoint
from pipeline.dense_data import build_dense_index
from pipeline.segmentation import SegmentRequest, extract_dense, run_segment


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


def bench_segment_memory(cache_dir: str | None = None, size: int = 128, cap_gib: float = 0.25) -> list[str]:
    """Peak RSS vs the RAM cap while a per-pixel head trains on a CamVid cache of >= 3x the cap."""
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "diffrep-seg-bench")
    blocks, timesteps = (2, 5, 8, 12, 15), (25,)
    request = SegmentRequest(dataset="camvid", blocks=blocks, timesteps=timesteps, config_name="32x32_small",
                             checkpoint=bundled_checkpoint("32x32_small"), image_size=size, cache_dir=cache_dir,
                             epochs=1, lr=1e-2, batch_size=8, synchronous=True, progress=False, ram_cap_gb=cap_gib,
                             results_path=os.path.join(cache_dir, "results.parquet"), figures=0, device="cpu",
                             test_limit=16)
    train = build_dense_index("camvid", "train")
    caches = extract_dense(request, {"train": train}, size, echo=lambda line: None)
    cache = caches["train"]
    total = sum(2 * cache.shape(b, t)[0] * cache.shape(b, t)[1] * cache.shape(b, t)[2] * cache.shape(b, t)[3]
                for b in blocks for t in timesteps)
    before = _peak_rss_gib()
    began = time.perf_counter()
    result = run_segment(request)
    wall = time.perf_counter() - began
    peak = _peak_rss_gib()
    return [
        f"segment memory: camvid train (367 images) at {size} px, 32x32_small b={','.join(map(str, blocks))} t=25, "
        f"maps {total / (1 << 30):.2f} GiB on disk (float16, unpooled), RAM cap {cap_gib:.2f} GiB "
        f"({total / (cap_gib * (1 << 30)):.1f}x the cap)",
        f"  peak RSS of the process {peak:.2f} GiB (before training {before:.2f} GiB: torch and the extraction); "
        f"the maps were streamed a batch at a time",
        f"  per-pixel linear head, 1 epoch, batch 8: {result.row['pixels_per_second']:,.0f} labelled pixels/s "
        f"({result.row['train_seconds']:.1f} s training, {wall:.1f} s with scoring)",
    ]


def _row(result) -> dict:
    row = result.row
    return {"dataset": row["dataset"], "backbone": row["backbone_id"], "head": row["head"], "blocks": row["blocks"],
            "timesteps": row["timesteps"], "miou": row["top1"], "pixel_accuracy": row["pixel_accuracy"],
            "train_seconds": row["train_seconds"], "class_iou": result.class_iou, "parameters": row["parameters"]}


def bench_segment_study(out: str = "results/segment-study", cache_dir: str | None = None, size: int = 64,
                        blocks=(5, 8, 10, 12, 15), timesteps=(25, 100), epochs: int = 10,
                        datasets=("camvid", "pets-seg")) -> list[str]:
    """The closing note's figures; writes ``<out>/study.jsonl`` (one line per trained head) and returns a summary."""
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "diffrep", "features-seg")
    os.makedirs(out, exist_ok=True)
    log = open(os.path.join(out, "study.jsonl"), "a", encoding="utf-8")
    lines = []
    for dataset in datasets:
        base = dict(dataset=dataset, config_name="32x32_small", image_size=size, cache_dir=cache_dir, epochs=epochs,
                    synchronous=True, progress=False, results_path=os.path.join(out, "results.parquet"),
                    out_dir=os.path.join(out, "figures"), device="cpu", figures=0, lr=1e-2)
        trained = dict(base, checkpoint=bundled_checkpoint("32x32_small"))
        random = dict(base, checkpoint=None, weight_seed=0)

        def record(result) -> dict:
            row = _row(result)
            log.write(json.dumps(row) + "\n")
            log.flush()
            return row

        indexes = {split: build_dense_index(dataset, split) for split in ("train", "val" if dataset == "camvid" else "test")}
        for weights in (trained, random):  # one forward per (image, t) captures every block
            extract_dense(SegmentRequest(**weights, blocks=tuple(blocks), timesteps=tuple(timesteps)), indexes, size,
                          echo=lambda line: None)
        sweep = {}
        for b in blocks:
            for t in timesteps:
                row = record(run_segment(SegmentRequest(**trained, blocks=(b,), timesteps=(t,), head="pixel")))
                sweep[(b, t)] = row["miou"]
        best = max(sweep, key=sweep.get)
        lines.append(f"{dataset}: per-pixel linear mIoU over (b, t): " +
                     ", ".join(f"b{b}/t{t} {100 * v:.1f}" for (b, t), v in sorted(sweep.items())) +
                     f"; best b={best[0]} t={best[1]}")
        for name, weights in (("trained", trained), ("random-init", random)):
            for head, extra in (("pixel", {"hidden": (256, 128)}), ("upernet", {"channels": 64, "lr": 1e-3})):
                row = record(run_segment(SegmentRequest(**{**weights, **extra}, blocks=(best[0],), timesteps=(best[1],),
                                                        head=head, figures=3 if name == "trained" else 0)))
                lines.append(f"  {name} {head}: mIoU {100 * row['miou']:.1f}, pixel acc {100 * row['pixel_accuracy']:.1f}, "
                             f"{row['train_seconds']:.0f} s")
            if name == "random-init":
                row = record(run_segment(SegmentRequest(**random, blocks=(best[0],), timesteps=(best[1],), head="pixel")))
                lines.append(f"  random-init pixel linear: mIoU {100 * row['miou']:.1f}")
        for head, extra in (("pixel", {"hidden": (256, 128)}), ("upernet", {"channels": 64, "lr": 1e-3})):
            row = record(run_segment(SegmentRequest(**{**base, **extra}, raw_pixels=True, head=head)))
            lines.append(f"  raw pixels {head}: mIoU {100 * row['miou']:.1f}, {row['train_seconds']:.0f} s")
    log.close()
    return lines


if __name__ == "__main__":
    import sys

    for line in (bench_segment_study() if "study" in sys.argv[1:] else bench_segment_memory()):
        print(line, flush=True)
