"""COCO AP wiring: detections equal to the ground truth score 1.0, shifted boxes the AP worked out by hand from their IoU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from probe.detection.coco_eval import coco_ground_truth, coco_scores, to_coco_results


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _document():
    """Two 40 x 30 images with one object each (a filled box, so mask IoU equals box IoU)."""
    images, annotations = [], []
    for image_id, (x, y, w, h) in ((1, (10, 5, 20, 20)), (2, (4, 2, 12, 16))):
        mask = np.zeros((30, 40), dtype=np.uint8)
        mask[y:y + h, x:x + w] = 1
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 40, "height": 30})
        annotations.append({"id": image_id, "image_id": image_id, "category_id": 7, "bbox": [x, y, w, h],
                            "area": w * h, "iscrowd": 0, "segmentation": _rle(mask)})
    return {"images": images, "annotations": annotations, "categories": [{"id": 7, "name": "pet"}]}


def _results(document, shifts=(0, 0), scores=(0.8, 0.9)):
    out = []
    for a, shift, score in zip(document["annotations"], shifts, scores):
        x, y, w, h = a["bbox"]
        mask = np.zeros((30, 40), dtype=np.uint8)
        mask[y:y + h, x + shift:x + shift + w] = 1
        out.append({"image_id": a["image_id"], "category_id": 7, "bbox": [x + shift, y, w, h], "score": score,
                    "segmentation": _rle(mask)})
    return out


def _ap_by_hand(ious, scores, threshold):
    """COCO's AP at one IoU threshold, one detection per object: precision made monotone from the right, read at
    the 101 recall points 0, 0.01, ..., 1 (0 past the last recall reached)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    hits = np.array([ious[i] >= threshold for i in order], dtype=float)
    recall = np.cumsum(hits) / len(ious)
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    points = np.linspace(0, 1, 101)
    return float(np.mean([precision[np.searchsorted(recall, r)] if r <= recall[-1] else 0.0 for r in points]))


def test_detections_equal_to_the_ground_truth_score_one():
    document = _document()
    scores = coco_scores(coco_ground_truth(document), _results(document))
    for kind in ("bbox", "segm"):
        assert scores[kind] == pytest.approx({"ap": 1.0, "ap50": 1.0, "ap75": 1.0})


def test_shifted_boxes_score_the_ap_their_iou_gives():
    """Each box shifted right: IoU = (w - s) h / (2 w h - (w - s) h), 2/3 and 5/7, off every threshold; the
    AP over 0.50:0.05:0.95 is then worked out by hand and must equal pycocotools' (boxes and the same masks)."""
    document = _document()
    shifts, det_scores = (4, 2), (0.8, 0.9)
    ious = []
    for a, shift in zip(document["annotations"], shifts):
        w, h = a["bbox"][2], a["bbox"][3]
        inter = (w - shift) * h
        ious.append(inter / (2 * w * h - inter))
    assert ious == pytest.approx([2 / 3, 5 / 7])
    thresholds = np.linspace(0.5, 0.95, 10)
    expected = {"ap": np.mean([_ap_by_hand(ious, det_scores, t) for t in thresholds]),
                "ap50": _ap_by_hand(ious, det_scores, 0.5), "ap75": _ap_by_hand(ious, det_scores, 0.75)}
    assert expected == pytest.approx({"ap": (4 + 51 / 101) / 10, "ap50": 1.0, "ap75": 0.0})
    scores = coco_scores(coco_ground_truth(document), _results(document, shifts, det_scores))
    assert scores["bbox"] == pytest.approx(expected, abs=1e-9)
    assert scores["segm"] == pytest.approx(expected, abs=1e-9)


def test_no_detections_score_zero():
    scores = coco_scores(coco_ground_truth(_document()), [])
    assert scores == {"bbox": {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}, "segm": {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}}


def test_detections_are_mapped_back_to_the_original_image_size():
    image = {"id": 3, "width": 80, "height": 40}
    masks = torch.zeros((1, 1, 32, 32))
    masks[0, 0, 8:24, 4:12] = 1.0
    output = {"boxes": torch.tensor([[4.0, 8.0, 12.0, 24.0]]), "scores": torch.tensor([0.8]),
              "labels": torch.tensor([2]), "masks": masks}
    (row,) = to_coco_results(output, image, 32, category_ids=[5, 9])
    assert row["image_id"] == 3 and row["category_id"] == 9 and row["score"] == pytest.approx(0.8)
    assert row["bbox"] == pytest.approx([10.0, 10.0, 20.0, 20.0])  # x * 80/32, y * 40/32
    mask = mask_utils.decode(row["segmentation"])
    assert mask.shape == (40, 80)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    assert abs(int(rows[0]) - 10) <= 1 and abs(int(rows[-1]) + 1 - 30) <= 1
    assert abs(int(cols[0]) - 10) <= 1 and abs(int(cols[-1]) + 1 - 30) <= 1
