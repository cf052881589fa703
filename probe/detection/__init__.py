"""Detection and instance segmentation: torchvision's Mask R-CNN / Faster R-CNN over a diffusion backbone adapter, COCO AP."""

from probe.detection.backbone import DiffusionPyramid, PyramidBackbone, pyramid_blocks, pyramid_strides
from probe.detection.coco_eval import coco_ground_truth, coco_scores, to_coco_results
from probe.detection.model import DetectorConfig, anchor_sizes, count_trainable, create_detector, resnet_fpn
from probe.detection.train import DetectFitResult, DetectTrainConfig, evaluate, fit_detector

__all__ = [
    "DiffusionPyramid", "PyramidBackbone", "pyramid_blocks", "pyramid_strides", "coco_ground_truth", "coco_scores",
    "to_coco_results", "DetectorConfig", "anchor_sizes", "count_trainable", "create_detector", "resnet_fpn",
    "DetectFitResult", "DetectTrainConfig", "evaluate", "fit_detector",
]
