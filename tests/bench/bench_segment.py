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
import subprocess
import sys
import tempfile
import time

import numpy as np

from extract.backbone.configs import bundled_checkpoint
from pipeline.dense_data import build_dense_index
from pipeline.segmentation import SegmentRequest, extract_dense, run_segment


def _memory_request(cache_dir: str, size: int, cap_gib: float, blocks, timesteps) -> SegmentRequest:
    return SegmentRequest(dataset="camvid", blocks=tuple(blocks), timesteps=tuple(timesteps), config_name="32x32_small",
                          checkpoint=bundled_checkpoint("32x32_small"), image_size=size, cache_dir=cache_dir,
                          epochs=1, lr=1e-2, batch_size=8, synchronous=True, progress=False, ram_cap_gb=cap_gib,
                          results_path=os.path.join(cache_dir, "results.parquet"), figures=0, device="cpu",
                          test_limit=16)


def bench_segment_memory(cache_dir: str | None = None, size: int = 256, cap_gib: float = 1.0,
                         blocks=(1, 2, 3), timesteps=(25,)) -> list[str]:
    """Peak RSS vs the RAM cap while a per-pixel head trains on a CamVid cache of >= 3x the cap.

    The caches are filled here first; the training runs in a child process (the cache complete, so it only
    trains and scores), whose peak RSS is the figure: the extraction's own memory does not count.
    """
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "diffrep-seg-bench")
    request = _memory_request(cache_dir, size, cap_gib, blocks, timesteps)
    indexes = {"train": build_dense_index("camvid", "train"), "val": build_dense_index("camvid", "val", limit=16)}
    cache = extract_dense(request, indexes, size, echo=lambda line: None, limits={"val": 16})["train"]
    total = sum(2 * int(np.prod(cache.shape(b, t))) for b in blocks for t in timesteps)
    args = json.dumps({"cache_dir": cache_dir, "size": size, "cap_gib": cap_gib, "blocks": list(blocks),
                       "timesteps": list(timesteps)})
    began = time.perf_counter()
    child = subprocess.run([sys.executable, "-m", "tests.bench.bench_segment", "train-only", args], check=True,
                           capture_output=True, text=True)
    wall = time.perf_counter() - began
    row = json.loads(child.stdout.strip().splitlines()[-1])
    peak = row["peak_kib"] / (1 << 20)
    imports = subprocess.run([sys.executable, "-c", "import pipeline.segmentation, torch, zarr; "
                              "from tests.bench.bench_segment import peak_rss_kib; print(peak_rss_kib())"],
                             check=True, capture_output=True, text=True)
    baseline = int(imports.stdout.strip().splitlines()[-1]) / (1 << 20)
    return [
        f"segment memory: camvid train (367 images) at {size} px, 32x32_small b={','.join(map(str, blocks))} "
        f"t={','.join(map(str, timesteps))}, unpooled float16 maps {total / (1 << 30):.2f} GiB, RAM cap {cap_gib:.2f} GiB "
        f"({total / (cap_gib * (1 << 30)):.1f}x the cap)",
        f"  peak RSS of the training process {peak:.2f} GiB against the {cap_gib:.2f} GiB cap, everything included: "
        f"{baseline:.2f} GiB of it is importing torch, zarr and diffrep (a process that only imports them); the maps were "
        f"read a batch (8 images, {8 * total / cache.num_images / (1 << 20):.0f} MB of float16) at a time, never the "
        f"split, and a step's float32 working set kept under a quarter of the cap (a linear head trains a few images at a time)",
        f"  per-pixel linear head, 1 epoch: {row['pixels_per_second']:,.0f} labelled pixels/s "
        f"({row['train_seconds']:.1f} s training; {wall:.1f} s for the whole child, scoring 16 val images included)",
    ]


def peak_rss_kib() -> int:
    """This process's peak resident set (VmHWM, KiB). Not ``getrusage``: its ru_maxrss survives exec, so a child
    forked from a big parent reports the parent's peak."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def _train_only(args: dict) -> None:
    request = _memory_request(args["cache_dir"], args["size"], args["cap_gib"], args["blocks"], args["timesteps"])
    row = run_segment(request).row
    print(json.dumps({"pixels_per_second": row["pixels_per_second"], "train_seconds": row["train_seconds"],
                      "peak_kib": peak_rss_kib()}))


def _row(result) -> dict:
    row = result.row
    return {"dataset": row["dataset"], "backbone": row["backbone_id"], "head": row["head"], "blocks": row["blocks"],
            "timesteps": row["timesteps"], "miou": row["top1"], "pixel_accuracy": row["pixel_accuracy"],
            "train_seconds": row["train_seconds"], "class_iou": result.class_iou, "parameters": row["parameters"]}


def bench_segment_study(out: str = "results/segment-study", cache_dir: str | None = None, size: int = 64,
                        blocks=(2, 5, 8, 10, 12, 14, 16, 18), timestep: int = 25, more_timesteps=(5, 50, 100, 200, 400),
                        epochs: int = 10, datasets=("camvid", "pets-seg"), floors=("random-init", "raw pixels"),
                        combo=(5, 8, 12, 15)) -> list[str]:
    """The closing note's figures; appends one JSON line per trained head to ``<out>/study.jsonl``.

    Per dataset: per-pixel linear heads over ``blocks`` at ``timestep`` (one truncated forward per image captures
    them all), then at the best block the same head over ``more_timesteps``; at the best (b, t) the per-pixel MLP
    (256, 128) and UperNet (64 channels) on the trained weights, the random initialisation (seed 0) and raw pixels;
    with ``combo`` (several blocks), the three heads on the trained weights over those blocks at the best t.
    """
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "diffrep", "features-seg")
    os.makedirs(out, exist_ok=True)
    log = open(os.path.join(out, "study.jsonl"), "a+", encoding="utf-8")
    lines = []

    def record(result) -> dict:
        row = _row(result)
        log.write(json.dumps(row) + "\n")
        log.flush()
        print(f"{row['dataset']} {row['backbone']} {row['head']} b={row['blocks']} t={row['timesteps']}: "
              f"mIoU {100 * row['miou']:.1f} ({row['train_seconds']:.0f} s)", flush=True)
        return row

    for dataset in datasets:
        base = dict(dataset=dataset, config_name="32x32_small", image_size=size, cache_dir=cache_dir, epochs=epochs,
                    synchronous=True, progress=False, results_path=os.path.join(out, "results.parquet"),
                    out_dir=os.path.join(out, "figures"), device="cpu", figures=0, lr=1e-2)
        trained = dict(base, checkpoint=bundled_checkpoint("32x32_small"))
        random = dict(base, checkpoint=None, weight_seed=0)
        indexes = {split: build_dense_index(dataset, split) for split in ("train", "val" if dataset == "camvid" else "test")}
        extract_dense(SegmentRequest(**trained, blocks=tuple(blocks), timesteps=(timestep,)), indexes, size,
                      echo=lambda line: None)  # one forward per image captures every block
        done = {}  # linear sweep cells of an earlier, interrupted run of the study
        for line in open(os.path.join(out, "study.jsonl"), encoding="utf-8"):
            old = json.loads(line)
            if old["dataset"] == dataset and old["head"] == "pixel" and old["backbone"] != "raw-pixels" and \
                    "random" not in old["backbone"] and old["parameters"] < 20000:
                done[(old["blocks"][0], old["timesteps"][0])] = old["miou"]
        sweep = {}
        for b in blocks:
            sweep[(b, timestep)] = done.get((b, timestep)) or \
                record(run_segment(SegmentRequest(**trained, blocks=(b,), timesteps=(timestep,))))["miou"]
        best_b = max(sweep, key=sweep.get)[0]
        for t in more_timesteps:
            sweep[(best_b, t)] = done.get((best_b, t)) or record(run_segment(SegmentRequest(**trained, blocks=(best_b,), timesteps=(t,))))["miou"]
        best = max(sweep, key=sweep.get)
        lines.append(f"{dataset}: per-pixel linear mIoU over (b, t): " +
                     ", ".join(f"b{b}/t{t} {100 * v:.1f}" for (b, t), v in sorted(sweep.items())) +
                     f"; best b={best[0]} t={best[1]}")
        heads = (("pixel", {}), ("pixel", {"hidden": (256, 128)}), ("upernet", {"channels": 64, "lr": 1e-3}))
        for name, weights in (("trained", trained), ("random-init", random), ("raw pixels", base)):
            if name != "trained" and name not in floors:
                continue
            for head, extra in heads:
                if (name == "trained" and not extra) or (name != "trained" and extra.get("hidden")):
                    continue  # the sweep's best cell; the floors get the linear and UperNet heads
                cell = {"raw_pixels": True} if name == "raw pixels" else {"blocks": (best[0],), "timesteps": (best[1],)}
                row = record(run_segment(SegmentRequest(**{**weights, **extra, **cell, "figures": 3 if name == "trained" else 0},
                                                        head=head)))
                lines.append(f"  {name} {head}{' mlp' if extra.get('hidden') else ''}: mIoU {100 * row['miou']:.1f}, "
                             f"pixel acc {100 * row['pixel_accuracy']:.1f}, {row['train_seconds']:.0f} s")
        for head, extra in heads if combo else ():
            row = record(run_segment(SegmentRequest(**{**trained, **extra}, head=head, blocks=tuple(combo),
                                                    timesteps=(best[1],))))
            lines.append(f"  trained b={','.join(map(str, combo))} {head}{' mlp' if extra.get('hidden') else ''}: "
                         f"mIoU {100 * row['miou']:.1f}, pixel acc {100 * row['pixel_accuracy']:.1f}, "
                         f"{row['train_seconds']:.0f} s")
    log.close()
    return lines


if __name__ == "__main__":
    if sys.argv[1:2] == ["train-only"]:
        _train_only(json.loads(sys.argv[2]))
    else:
        study = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}  # e.g. {"datasets": ["pets-seg"], "blocks": [8]}
        for line in (bench_segment_study(**study) if sys.argv[1:2] == ["study"] else bench_segment_memory()):
            print(line, flush=True)
