"""Semantic-segmentation scores from one confusion matrix accumulated over a split: mIoU, per-class IoU, pixel accuracy.

The standard protocol: every scored pixel of every image adds one count to ``confusion[truth, prediction]``
(ignored pixels add nothing); at the end, IoU of class c is ``TP / (TP + FP + FN)`` from that one matrix
(never a mean of per-image IoUs), mIoU averages it over the classes present in the split's ground
truth (a class absent from the split, and never predicted, has no IoU; predicted but absent it would
score 0 and is still left out of the mean, as mmsegmentation does with its NaN), and pixel accuracy is the
trace over the total.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ConfusionMatrix", "SegScores"]


@dataclass(frozen=True)
class SegScores:
    """What one split scored.

    Attributes:
        miou: mean IoU over ``present`` classes (fraction in [0, 1]).
        iou: ``(K,)`` float64 per-class IoU, NaN for classes absent from the ground truth.
        pixel_accuracy: correct / scored pixels. present: bool ``(K,)``. pixels: scored pixels.
    """

    miou: float
    iou: np.ndarray
    pixel_accuracy: float
    present: np.ndarray
    pixels: int


class ConfusionMatrix:
    """``(K, K)`` int64 counts, rows = truth, columns = prediction, accumulated batch by batch on any device."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.counts = torch.zeros((self.num_classes, self.num_classes), dtype=torch.int64)

    def update(self, prediction: torch.Tensor, truth: torch.Tensor) -> None:
        """Add the pixels of ``prediction`` and ``truth`` (same shape, class ids; ``ignore_index`` in truth skipped)."""
        if prediction.shape != truth.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and truth {tuple(truth.shape)} differ in shape")
        truth = truth.reshape(-1).long()
        prediction = prediction.reshape(-1).long()
        keep = (truth != self.ignore_index) & (truth >= 0) & (truth < self.num_classes)
        k = self.num_classes
        flat = truth[keep] * k + prediction[keep]
        self.counts += torch.bincount(flat, minlength=k * k).reshape(k, k).cpu()

    def merge(self, other: "ConfusionMatrix") -> None:
        self.counts += other.counts

    def scores(self) -> SegScores:
        counts = self.counts.double().numpy()
        tp = np.diag(counts)
        truth = counts.sum(1)
        predicted = counts.sum(0)
        present = truth > 0
        union = truth + predicted - tp
        iou = np.full(self.num_classes, np.nan)
        iou[present] = tp[present] / union[present]
        total = counts.sum()
        return SegScores(
            miou=float(np.mean(iou[present])) if present.any() else float("nan"), iou=iou,
            pixel_accuracy=float(tp.sum() / total) if total else float("nan"), present=present, pixels=int(total),
        )
