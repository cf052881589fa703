"""mIoU, per-class IoU and pixel accuracy from one confusion matrix, held to a brute-force count on real CamVid label maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probe.seg_metrics import ConfusionMatrix
from tests.pipeline.test_dense_data import dense


def brute_force(truths, predictions, num_classes, ignore=255):
    """Per class, intersections and unions counted pixel set by pixel set over the whole split (no matrix)."""
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    correct = total = 0
    for truth, prediction in zip(truths, predictions):
        scored = truth != ignore
        for c in range(num_classes):
            inter[c] += np.logical_and.reduce([truth == c, prediction == c, scored]).sum()
            union[c] += (((truth == c) | (prediction == c)) & scored).sum()
        correct += ((truth == prediction) & scored).sum()
        total += scored.sum()
    present = np.array([any(((t == c) & (t != ignore)).any() for t in truths) for c in range(num_classes)])
    iou = np.where(present, inter / np.maximum(union, 1), np.nan)
    return float(np.nanmean(iou[present])), iou, correct / total, present


def test_confusion_matches_brute_force_on_camvid_with_absent_classes():
    val = dense("camvid", "val")
    rows = [0, 1, 2, 3, 4, 5]
    truths = [val.read_label(r) for r in rows]
    rng = np.random.default_rng(0)
    predictions = []
    for k, truth in enumerate(truths):  # another frame's labels, shifted, with noise: plausible and imperfect
        other = np.roll(truths[(k + 1) % len(truths)], 7, axis=1).copy()
        other[other == 255] = 0
        noise = rng.random(other.shape) < 0.1
        other[noise] = rng.integers(0, 11, noise.sum())
        predictions.append(other.astype(np.uint8))
    absent = [c for c in range(11) if not any((t == c).any() for t in truths)]
    predictions[0][:5, :5] = absent[0] if absent else 0  # a class absent from the truth but predicted
    confusion = ConfusionMatrix(11)
    for truth, prediction in zip(truths, predictions):
        confusion.update(torch.from_numpy(prediction), torch.from_numpy(truth))
    scores = confusion.scores()
    miou, iou, accuracy, present = brute_force(truths, predictions, 11)
    assert np.array_equal(scores.present, present)
    assert np.allclose(scores.iou[present], iou[present]) and np.isnan(scores.iou[~present]).all()
    assert scores.miou == pytest.approx(miou) and scores.pixel_accuracy == pytest.approx(accuracy)
    assert scores.pixels == sum(int((t != 255).sum()) for t in truths)


def test_perfect_prediction_scores_one_and_ignore_counts_nothing():
    truth = torch.tensor([[0, 1, 255], [1, 1, 255]])
    confusion = ConfusionMatrix(3)
    confusion.update(truth.clamp_max(2), truth)
    scores = confusion.scores()
    assert scores.miou == 1.0 and scores.pixel_accuracy == 1.0 and scores.pixels == 4 and np.isnan(scores.iou[2])
