"""The detector: torchvision's Mask R-CNN (or Faster R-CNN) over a pyramid backbone, set for one square input side.

Every backbone gets the same detector: the FPN (256 channels), anchors that follow the input
side rather than the stride (sizes from S/8 to S spread over the pyramid's levels, aspect
ratios 1:2, 1:1, 2:1), RoI heads on the body's levels, and sampling sizes cut for small images
on a CPU (``DetectorConfig``). torchvision's own resize is a no-op (images arrive at S x S);
its normalisation is the backbone's: [-1, 1] for a diffusion model, ImageNet statistics for
a ResNet. No weights are ever downloaded: the ResNet baseline is built with ``weights=None``
and BatchNorm that trains (frozen BatchNorm would be an identity at random initialisation).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models import resnet as resnet_models
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops import MultiScaleRoIAlign

from probe.detection.backbone import PyramidBackbone

__all__ = ["DetectorConfig", "create_detector", "resnet_fpn", "anchor_sizes", "count_trainable", "frozen_prefixes",
           "DIFFUSION_NORM", "IMAGENET_NORM"]

#: (mean, std) that map [0, 1] pixels to the backbone's input range.
DIFFUSION_NORM = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
IMAGENET_NORM = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


@dataclass(frozen=True)
class DetectorConfig:
    """The detector's choices that are not the backbone's (the same for every backbone compared).

    Args:
        image_size: the square input side S in pixels. masks: Mask R-CNN (True) or Faster R-CNN.
        fpn_channels, box_features, mask_channels: widths of the FPN, the box head's two layers and
            the mask head's four convolutions (torchvision's 256, 1024, 256 are 4-16x the compute: the
            CPU figures use these; pass the paper's for COCO on a GPU). mask_pool: the mask head's RoI side
            (torchvision's 14 predicts 28 x 28 masks, larger than a pet in a 32-pixel image; 7 predicts 14 x 14).
        rpn_pre_nms, rpn_post_nms: proposals kept per image before / after the RPN's NMS (training;
            testing keeps the post-NMS count for both). rois_per_image: RoIs sampled per image for the heads' loss.
        detections_per_image: the most detections scored per image (COCO counts up to 100).
        size_divisible: batches are padded to a multiple of it (the deepest stride of the backbone).
    """

    image_size: int = 64
    masks: bool = True
    fpn_channels: int = 64
    box_features: int = 256
    mask_channels: int = 64
    mask_pool: int = 7
    rpn_pre_nms: int = 600
    rpn_post_nms: int = 300
    rois_per_image: int = 64
    detections_per_image: int = 100
    size_divisible: int = 32


def anchor_sizes(levels: int, image_size: int) -> tuple[tuple[int], ...]:
    """One anchor size per pyramid level, finest first: geometric from S/8 to S (levels >= 2)."""
    low, high = image_size / 8, float(image_size)
    if levels == 1:
        return ((int(round(high / 2)),),)
    return tuple((int(round(low * (high / low) ** (i / (levels - 1)))),) for i in range(levels))


def resnet_fpn(name: str = "resnet18", channels: int = 64) -> nn.Module:
    """A torchvision ResNet FPN at random initialisation (the baseline): BatchNorm trains, every stage trains."""
    resnet = getattr(resnet_models, name)(weights=None, norm_layer=nn.BatchNorm2d)
    widths = [resnet.get_submodule(f"layer{i}")[-1].conv1.in_channels for i in range(1, 5)]
    fpn = BackboneWithFPN(resnet, {f"layer{i}": str(i - 1) for i in range(1, 5)}, widths, channels,
                          extra_blocks=LastLevelMaxPool())
    fpn.names = ["0", "1", "2", "3"]
    return fpn


def create_detector(backbone: nn.Module, num_classes: int, config: DetectorConfig,
                    norm: tuple[list[float], list[float]] = DIFFUSION_NORM) -> nn.Module:
    """Mask R-CNN (``config.masks``) or Faster R-CNN over ``backbone``.

    Args:
        backbone: a ``PyramidBackbone`` (``out_channels``, ``names`` of the body's levels; the FPN adds ``pool``).
        num_classes: object classes, without the background (the detector adds it).
        config: the detector's settings. norm: (mean, std) of the backbone's input.
    """
    levels = len(backbone.names) + 1  # the FPN's max-pooled extra level
    anchors = AnchorGenerator(anchor_sizes(levels, config.image_size), ((0.5, 1.0, 2.0),) * levels)
    common = dict(
        num_classes=num_classes + 1, min_size=config.image_size, max_size=config.image_size,
        image_mean=norm[0], image_std=norm[1], size_divisible=config.size_divisible, rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(backbone.names, output_size=7, sampling_ratio=2),
        rpn_pre_nms_top_n_train=config.rpn_pre_nms, rpn_post_nms_top_n_train=config.rpn_post_nms,
        rpn_pre_nms_top_n_test=config.rpn_post_nms, rpn_post_nms_top_n_test=config.rpn_post_nms,
        box_batch_size_per_image=config.rois_per_image, box_detections_per_img=config.detections_per_image,
        box_head=TwoMLPHead(backbone.out_channels * 7 * 7, config.box_features),
        box_predictor=FastRCNNPredictor(config.box_features, num_classes + 1),
    )
    common.pop("num_classes")  # given by the predictors
    if config.masks:
        return MaskRCNN(backbone, mask_roi_pool=MultiScaleRoIAlign(backbone.names, output_size=config.mask_pool, sampling_ratio=2),
                        mask_head=MaskRCNNHeads(backbone.out_channels, (config.mask_channels,) * 4, 1),
                        mask_predictor=MaskRCNNPredictor(config.mask_channels, config.mask_channels, num_classes + 1),
                        **common)
    return FasterRCNN(backbone, **common)


def count_trainable(model: nn.Module) -> int:
    """Parameters that train (a frozen diffusion backbone's are left out)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def frozen_prefixes(model: nn.Module) -> list[str]:
    """State-dict prefixes of modules with no trainable parameter under them (left out of checkpoints)."""
    out = []
    for name, module in model.named_modules():
        params = list(module.parameters())
        if name and params and not any(p.requires_grad for p in params) and not any(name.startswith(p) for p in out):
            out.append(name + ".")
    return out

