"""``diffrep pretrain`` as a library call: images from the manifest, the training loop, a periodic linear-probe check.

The check answers "are the representations getting better?" while training runs: every
checkpoint, the EMA weights' features of one block at one timestep (seeded noise of
``probe_noise_seed``, 2x2 pool, through the one noisy forward ``extract.forward``) are computed
for a fixed class-balanced subset of the train split and of the test split, and a converged
linear probe (``probe.logistic``) is fitted on the first and scored on the second.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from extract import distributed
from extract.errors import interrupted_saying
from extract.forward import block_features, noisy_input
from extract.inputs.images import load_batch
from extract.precision import resolve_device
from extract.backbone.pretrain import LOSS_CSV, PretrainConfig, PretrainResult, pretrain
from extract.schedule import get_schedule
from extract.backbone.configs import get_config
from probe.logistic import converged_linear_probe

from pipeline.datasets import build_index

__all__ = ["PretrainRequest", "ProbeCheck", "run_pretrain", "plot_loss_curve"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainRequest:
    """What ``diffrep pretrain`` was asked: the recipe, the data, where to write, when to stop."""

    config: PretrainConfig
    dataset: str = "cifar10"
    split: str = "train"
    out_dir: str = "runs/pretrain"
    steps: int | None = None
    minutes: float | None = None
    resume: bool = False
    checkpoint_every: int = 100
    data_root: str | None = None
    limit: int | None = None
    device: str = "auto"
    decode_threads: int = 2
    probe_block: int | None = None
    probe_timestep: int = 25
    probe_train_per_class: int = 100
    probe_test_per_class: int = 50
    probe_test_split: str = "test"
    probe_noise_seed: int = 0
    probe: bool = True
    progress: bool = True
    init: str | None = None


class ProbeCheck:
    """Linear-probe top-1 of a model's block features on a fixed train/test subset (called at checkpoints)."""

    def __init__(self, request: PretrainRequest, device: torch.device):
        cfg = get_config(request.config.config_name)
        with torch.device("meta"):
            num_blocks = cfg.build().num_blocks
        self.block = request.probe_block or max(1, num_blocks // 2 - 1)
        self.t = request.probe_timestep
        self.device = device
        self.schedule = get_schedule(cfg.noise_schedule, cfg.diffusion_steps)
        self.schedule.check_timesteps([self.t])
        self.data = []
        for split, per_class in ((request.split, request.probe_train_per_class),
                                 (request.probe_test_split, request.probe_test_per_class)):
            index = build_index(request.dataset, split, root=request.data_root, per_class=per_class)
            images, ok, _ = load_batch(index.paths, cfg.image_size)
            keep = np.flatnonzero(ok)
            x_t = noisy_input(images[keep], self.t, keep.tolist(), request.probe_noise_seed, self.schedule, split=split)
            self.data.append((x_t, torch.from_numpy(index.labels[keep])))
        self.num_classes = int(max(labels.max() for _, labels in self.data)) + 1
        self.history: list[tuple[int, float]] = []

    @torch.no_grad()
    def features(self, model: torch.nn.Module, x_t: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
        parts = []
        for start in range(0, x_t.shape[0], batch_size):
            batch = x_t[start:start + batch_size].to(self.device)
            pooled = block_features(model, batch, self.t, [self.block], pool=2, float16=False)
            parts.append(pooled[self.block].flatten(1).cpu())
        return torch.cat(parts)

    def __call__(self, model: torch.nn.Module, step: int) -> str:
        began = time.perf_counter()
        (train_x, train_y), (test_x, test_y) = self.data
        result = converged_linear_probe(self.features(model, train_x), train_y, self.features(model, test_x), test_y,
                                        self.num_classes, l2_grid=(1e-3,), device=self.device)
        self.history.append((step, result.top1))
        return (f"step {step}: EMA linear probe b={self.block} t={self.t} 2x2 on {len(train_y)}/{len(test_y)} images: "
                f"top-1 {100 * result.top1:.1f}% ({time.perf_counter() - began:.0f} s)")


def plot_loss_curve(csv_path: str | Path, png_path: str | Path, probes: list[tuple[int, float]] | None = None) -> Path:
    """Loss (and its MSE part) against steps from ``loss.csv``; probe top-1 on a second axis when given."""
    from pipeline.report import _pyplot

    plt = _pyplot()
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if rows:
        steps = [int(r["step"]) for r in rows]
        ax.plot(steps, [float(r["loss"]) for r in rows], label="loss (mse + vb)")
        ax.plot(steps, [float(r["mse"]) for r in rows], label="mse", alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(loc="upper left")
    if probes:
        right = ax.twinx()
        right.plot([s for s, _ in probes], [100 * a for _, a in probes], "o-", color="tab:green", label="probe top-1 %")
        right.set_ylabel("linear probe top-1 %")
        right.legend(loc="upper right")
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def is_dense(dataset: str) -> bool:
    """A ``segmentation:`` entry of the manifest (its images train as any others; it has no class labels to probe)."""
    from pipeline.dense_data import dense_dataset_names

    return dataset in dense_dataset_names()


def training_images(request: PretrainRequest) -> list[str]:
    """The image files of the split: a classification dataset's index, or a dense dataset's images (labels unread)."""
    if is_dense(request.dataset):
        from pipeline.dense_data import build_dense_index

        return list(build_dense_index(request.dataset, request.split, data_root=request.data_root,
                                      limit=request.limit).image_paths)
    return list(build_index(request.dataset, request.split, root=request.data_root, limit=request.limit).paths)


def run_pretrain(request: PretrainRequest) -> tuple[PretrainResult, list[str]]:
    """Index the images, train, draw the loss curve; returns the result and the probe-check lines.

    Raises:
        RunInterrupted: Ctrl-C, saying which step's checkpoint is kept (or that nothing new was written).
    """
    device = resolve_device(request.device)
    with interrupted_saying("interrupted before training began: nothing new was written; the same command starts again"):
        paths = training_images(request)
        check = ProbeCheck(request, device) if request.probe and not is_dense(request.dataset) else None
    lines: list[str] = []
    probe_csv = Path(request.out_dir) / "probe.csv"
    if not request.resume and distributed.is_main():
        probe_csv.unlink(missing_ok=True)

    def on_checkpoint(model, step):
        if check is None:
            return None
        line = check(model, step)
        lines.append(line)
        probe_csv.parent.mkdir(parents=True, exist_ok=True)
        if not probe_csv.exists():
            probe_csv.write_text("step,top1\n")
        with open(probe_csv, "a") as f:
            f.write(f"{step},{check.history[-1][1]:.4f}\n")
        return line

    data = {"dataset": request.dataset, "split": request.split, "limit": request.limit, "images": len(paths),
            "labels_used": False}
    if request.init:
        data["init"] = os.path.basename(str(request.init))
    result = pretrain(request.config, paths, request.out_dir, init=request.init, steps=request.steps, minutes=request.minutes,
                      resume=request.resume, checkpoint_every=request.checkpoint_every, device=device,
                      decode_threads=request.decode_threads, data=data, on_checkpoint=on_checkpoint,
                      progress=request.progress)
    probes = None
    if probe_csv.exists():
        with open(probe_csv) as f:
            probes = sorted({int(r["step"]): float(r["top1"]) for r in csv.DictReader(f)}.items())
    if distributed.is_main():  # rank 0 wrote the curve; it alone draws it
        result.written.append(plot_loss_curve(Path(request.out_dir) / LOSS_CSV, Path(request.out_dir) / "loss.png", probes))
    return result, lines
