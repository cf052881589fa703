"""COCO box and mask AP through pycocotools: detections in the COCO results format, scored by ``COCOeval``.

Nothing of the protocol is re-implemented: the ground truth is the split's instances document
(original image sizes), detections are mapped back to those sizes (boxes scaled, mask
probabilities resized and cut at 0.5, run-length encoded by pycocotools), and ``COCOeval``
gives AP over IoU 0.50:0.95, AP50 and AP75 per kind (``bbox``, ``segm``), up to 100 detections
per image. pycocotools prints as it works; that is kept off the terminal.
"""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.nn import functional as F

__all__ = ["coco_ground_truth", "to_coco_results", "coco_scores", "SCORE_NAMES"]

#: The figures ``coco_scores`` returns per kind (fractions; COCOeval's stats[0:3]).
SCORE_NAMES = ("ap", "ap50", "ap75")


def coco_ground_truth(document: dict) -> COCO:
    """A pycocotools ``COCO`` over an instances document (copied: pycocotools adds fields)."""
    gt = COCO()
    gt.dataset = copy.deepcopy(document)
    gt.dataset.setdefault("info", {})
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def to_coco_results(output: dict, image: dict, input_size: int, category_ids: list[int]) -> list[dict]:
    """One image's detections in the COCO results format, at the image's original size.

    Args:
        output: torchvision's detection output for one image at the S x S input: ``boxes`` (n, 4),
            ``scores`` (n,), ``labels`` (n,) in 1..K, and ``masks`` (n, 1, S, S) probabilities (Mask R-CNN).
        image: the document's image entry (``id``, ``width``, ``height``). input_size: S.
        category_ids: label k is category ``category_ids[k - 1]``.

    Returns:
        ``[{image_id, category_id, bbox [x, y, w, h], score, segmentation (RLE, masks only)}]``.
    """
    width, height = image["width"], image["height"]
    boxes = output["boxes"].detach().float().cpu() * torch.tensor([width, height, width, height]) / input_size
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    rles = None
    if "masks" in output and len(scores):
        probs = F.interpolate(output["masks"].detach().float(), size=(height, width), mode="bilinear",
                              align_corners=False)[:, 0]
        binary = (probs > 0.5).cpu().numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    out = []
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        row = {"image_id": int(image["id"]), "category_id": int(category_ids[labels[i] - 1]),
               "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(scores[i])}
        if rles is not None:
            rle = dict(rles[i])
            rle["counts"] = rle["counts"].decode("ascii")
            row["segmentation"] = rle
        out.append(row)
    return out


def coco_scores(ground_truth: COCO, results: list[dict], kinds: tuple[str, ...] = ("bbox", "segm"),
                image_ids: list[int] | None = None) -> dict[str, dict[str, float]]:
    """AP, AP50 and AP75 of ``results`` against ``ground_truth`` for each kind, by ``COCOeval``.

    Args:
        ground_truth: from ``coco_ground_truth``. results: COCO-format detections (``segmentation``
            needed for ``segm``). kinds: ``bbox`` and/or ``segm``.
        image_ids: the images scored (None: every image of the ground truth).

    Returns:
        ``{kind: {"ap", "ap50", "ap75"}}`` as fractions; 0.0 for every figure when there is no detection.
    """
    if not results:
        return {kind: dict.fromkeys(SCORE_NAMES, 0.0) for kind in kinds}
    with contextlib.redirect_stdout(io.StringIO()):
        detections = ground_truth.loadRes(copy.deepcopy(results))
        scores = {}
        for kind in kinds:
            evaluation = COCOeval(ground_truth, detections, iouType=kind)
            if image_ids is not None:
                evaluation.params.imgIds = list(image_ids)
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
            scores[kind] = {name: max(float(value), 0.0) for name, value in zip(SCORE_NAMES, evaluation.stats[:3])}
    return scores
