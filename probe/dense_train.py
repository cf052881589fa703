"""Training and scoring dense heads on cached block maps streamed batch by batch, with label maps per batch.

RAM holds one batch of maps (float16, native block size) and its labels, never the split: a
``DenseSource`` reads rows ``start:stop`` of every array as one slice (``FeatureCache.row_reader``)
or from arrays already in RAM when the caller found they fit under the cap. The maps reach the
training device as float16, the head upsamples them there, and its logits are resized (bilinear)
to the label's size before the cross-entropy (ignore index 255). An epoch visits the split's
batches (runs of consecutive cache rows, which the cache already holds in a seeded class-mixed
order) in an order that is a pure function of (seed, epoch), so ``resume`` repeats it.
Checkpoints and resume rules are ``probe.train``'s: one dict {head, optimizer, scheduler, epoch,
config, identity, rng, history} after every epoch; a resume with other settings is refused.
Scoring resizes each image's logits to the label pixels its square covers and counts them in one
``ConfusionMatrix``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from probe.dense_heads import _resize
from probe.errors import ProbeError
from probe.seg_metrics import ConfusionMatrix, SegScores
from probe.train import (
    CHECKPOINT_NAME, TrainConfig, _describe, _differences, _interrupted, _make_optimizer, _read_checkpoint, _rng_state,
    _save, _set_rng_state, epoch_order,
)

__all__ = ["DenseSource", "DenseFit", "fit_dense", "score_dense", "images_per_chunk", "IGNORE_INDEX"]

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
Key = tuple[int, int]
RowReader = Callable[[int, int], np.ndarray]


@dataclass
class DenseSource:
    """A split's maps and labels, read a batch of rows at a time.

    Args:
        readers: ``{(b, t): read(start, stop) -> (n, C, h, w) float16}`` (a cache row reader, or a slice of an
            array in RAM). num_rows: N. labels: ``labels(start, stop) -> (n, S, S) uint8`` at the input square
            (training), 255 where ignored. valid: bool ``(N,)``; invalid rows are never trained on or scored.
    """

    readers: Mapping[Key, RowReader]
    num_rows: int
    labels: Callable[[int, int], np.ndarray] | None = None
    valid: np.ndarray | None = None

    def ranges(self, batch_size: int, seed: int | None, epoch: int) -> list[tuple[int, int]]:
        bounds = [(lo, min(lo + batch_size, self.num_rows)) for lo in range(0, self.num_rows, batch_size)]
        if seed is None:
            return bounds
        return [bounds[i] for i in epoch_order(len(bounds), seed, epoch).tolist()]

    def read(self, start: int, stop: int) -> dict[Key, torch.Tensor]:
        return {key: torch.from_numpy(np.ascontiguousarray(read(start, stop))) for key, read in self.readers.items()}

    def batches(self, batch_size: int, seed: int | None, epoch: int) -> Iterator[tuple[dict[Key, torch.Tensor], torch.Tensor]]:
        """``({(b, t): (n, C, h, w) float16}, (n, S, S) int64 labels)`` in the epoch's order (CPU tensors)."""
        for start, stop in self.ranges(batch_size, seed, epoch):
            labels = torch.from_numpy(self.labels(start, stop).astype(np.int64))
            if self.valid is not None and not self.valid[start:stop].all():
                labels[torch.from_numpy(~self.valid[start:stop])] = IGNORE_INDEX
            yield self.read(start, stop), labels


@dataclass
class DenseFit:
    """What ``fit_dense`` returns: wall seconds of training, pixels trained on per second, per-epoch history."""

    train_seconds: float
    epochs: int
    pixels_per_second: float
    history: list[dict] = field(default_factory=list)


def _loss(head: nn.Module, features: Mapping[Key, torch.Tensor], target: torch.Tensor, moments=None,
          reduction: str = "mean") -> torch.Tensor:
    if moments is not None:
        outputs = head.forward_members(features, moments)
    else:
        outputs = head.forward_members(features) if hasattr(head, "forward_members") else [head(features)]
    size = tuple(target.shape[-2:])
    losses = [F.cross_entropy(_resize(o, size), target, ignore_index=IGNORE_INDEX, reduction=reduction) for o in outputs]
    return losses[0] if len(losses) == 1 else torch.stack(losses).sum()


def images_per_chunk(head: nn.Module, batch: int, label_side: int | None, working_bytes: int | None,
                     training: bool = True) -> int:
    """Images per forward so one step's float32 working set stays under ``working_bytes``.

    Training chunks only heads whose chunked gradient equals the batch's (``exact_in_chunks``: the linear
    per-pixel head); scoring, where every head is per image (BatchNorm in eval), chunks any head that
    estimates its ``bytes_per_image``.
    """
    if working_bytes is None or not hasattr(head, "bytes_per_image"):
        return batch
    if training and not getattr(head, "exact_in_chunks", False):
        return batch
    return max(1, min(batch, int(working_bytes) // max(1, head.bytes_per_image(label_side))))


def _step(head: nn.Module, opt, features: Mapping[Key, torch.Tensor], target: torch.Tensor, labelled: int,
          chunk: int) -> float:
    """One optimiser step on the batch; in chunks of images when ``chunk`` < the batch (the same gradient:
    the batch's BatchNorm moments first, then each chunk's summed loss over the batch's labelled pixels)."""
    opt.zero_grad(set_to_none=True)
    n = target.shape[0]
    if chunk >= n:
        loss = _loss(head, features, target)
        loss.backward()
        opt.step()
        return loss.item()
    moments = head.moments(features)
    total = 0.0
    for lo in range(0, n, chunk):
        part = {key: value[lo:lo + chunk] for key, value in features.items()}
        loss = _loss(head, part, target[lo:lo + chunk], moments, reduction="sum") / labelled
        loss.backward()
        total += loss.item()
    opt.step()
    return total


def fit_dense(head: nn.Module, train: DenseSource, config: TrainConfig, *, device: str | torch.device = "cpu",
              checkpoint_dir: str | os.PathLike | None = None, resume: bool = False, identity: Mapping | None = None,
              progress: bool = True, working_bytes: int | None = None) -> DenseFit:
    """Train ``head`` with cross-entropy (ignore 255) on streamed batches, StepLR, a checkpoint every epoch.

    ``working_bytes``: the float32 working set one forward may take; a linear per-pixel head's batch is then
    run in chunks of images with the batch's gradient (``images_per_chunk``). None: whole batches.

    Raises:
        ProbeError: a checkpoint written for other settings or features; no labelled pixel in the split.
        RunInterrupted: Ctrl-C, naming the epoch whose checkpoint is kept.
    """
    device = torch.device(device)
    head.to(device)
    opt = _make_optimizer(head, config)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=config.step_size, gamma=config.gamma)
    saved_config, identity = asdict(config), dict(identity or {})
    history: list[dict] = []
    start_epoch = 0
    path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if resume and path is not None and path.exists():
        state = _read_checkpoint(path)
        for what, saved, asked in (("settings", state["config"], saved_config), ("features or head", state.get("identity", {}), identity)):
            changed = _differences(saved, asked)
            if changed:
                raise ProbeError(f"checkpoint {path} was trained with other {what} ({_describe(changed)}): pass the same "
                                 f"options it was trained with, or another --checkpoint-dir to train anew")
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        history, start_epoch = list(state.get("history", [])), int(state["epoch"]) + 1
    else:
        torch.manual_seed(config.seed)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    began, pixels, kept, epoch = time.perf_counter(), 0, start_epoch, start_epoch
    try:
        for epoch in range(start_epoch, config.epochs):
            head.train()
            total, seen = 0.0, 0
            batches = train.batches(config.batch_size, config.seed, epoch)
            bar = tqdm(batches, total=-(-train.num_rows // config.batch_size), desc=f"epoch {epoch + 1}/{config.epochs}",
                       leave=False, disable=not progress, unit="batch")
            for features, target in bar:
                features = {key: value.to(device, non_blocking=True) for key, value in features.items()}
                target = target.to(device, non_blocking=True)
                labelled = int((target != IGNORE_INDEX).sum())
                if labelled == 0:
                    continue
                chunk = images_per_chunk(head, target.shape[0], target.shape[-1], working_bytes)
                total += _step(head, opt, features, target, labelled, chunk) * labelled
                seen += labelled
            if seen == 0:
                raise ProbeError("no labelled pixel in the training split: check the dataset's label maps and ignore value")
            pixels += seen
            scheduler.step()
            history.append({"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "loss": total / seen})
            log.info("epoch %d/%d: loss %.4f", epoch + 1, config.epochs, total / seen)
            if path is not None:
                _save(path, {"head": head.state_dict(), "optimizer": opt.state_dict(), "scheduler": scheduler.state_dict(),
                             "epoch": epoch, "config": saved_config, "identity": identity, "rng": _rng_state(),
                             "history": history})
                kept = epoch + 1
    except KeyboardInterrupt:
        raise _interrupted(path, epoch, config.epochs, kept) from None
    seconds = time.perf_counter() - began
    return DenseFit(train_seconds=seconds, epochs=config.epochs, pixels_per_second=pixels / max(seconds, 1e-9),
                    history=history)


@torch.no_grad()
def score_dense(head: nn.Module, source: DenseSource, num_classes: int,
                truth: Callable[[int], tuple[np.ndarray, tuple[int, int, int, int]]], *, batch_size: int = 16,
                device: str | torch.device = "cpu", keep: int = 0, working_bytes: int | None = None
                ) -> tuple[SegScores, dict[int, np.ndarray]]:
    """Score at each label's own resolution: logits resized (bilinear) to the label pixels the square covers.

    Args:
        truth: ``truth(row) -> (label (H, W) uint8, (x0, y0, x1, y1))``: the full label map and the box of it
            the input square covers. keep: predictions of the first ``keep`` valid rows to return (figures).
        working_bytes: as ``fit_dense``'s; in eval every head is per image, so any head with ``bytes_per_image``
            is scored in batches that fit it.

    Returns:
        (scores from one confusion matrix over the split, ``{row: (y1 - y0, x1 - x0) uint8 prediction}``).
    """
    device = torch.device(device)
    head.to(device).eval()
    confusion = ConfusionMatrix(num_classes, IGNORE_INDEX)
    kept: dict[int, np.ndarray] = {}
    batch_size = images_per_chunk(head, batch_size, None, working_bytes, training=False)
    for start, stop in source.ranges(batch_size, None, 0):
        logits = head({key: value.to(device) for key, value in source.read(start, stop).items()}).float()
        for i, row in enumerate(range(start, stop)):
            if source.valid is not None and not source.valid[row]:
                continue
            label, (x0, y0, x1, y1) = truth(row)
            resized = F.interpolate(logits[i:i + 1], size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)
            prediction = resized[0].argmax(0)
            confusion.update(prediction, torch.from_numpy(np.ascontiguousarray(label[y0:y1, x0:x1])).to(device))
            if len(kept) < keep:
                kept[row] = prediction.to(torch.uint8).cpu().numpy()
    return confusion.scores(), kept
