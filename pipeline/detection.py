"""``diffrep detect`` as a library call: Mask R-CNN (or Faster R-CNN) on a diffusion backbone, trained and COCO-scored.

The backbone is a named configuration (checkpoint or seeded random weights) read through the
adapter ``probe.detection.DiffusionPyramid`` (several blocks of one noisy forward at t), or,
as the baseline, torchvision's ResNet-18 FPN at random initialisation (``--backbone resnet18``).
The detector, schedule and data are the same for both, so their AP compares the features. The
run writes one results row (task ``detect``: box and mask AP, AP50, AP75, blocks, t, input size).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from extract.backbone.configs import bundled_checkpoint
from extract.backbone.identity import backbone_id as weights_id
from extract.backbone.registry import create_backbone, family_of
from extract.errors import interrupted_saying
from extract.precision import resolve_device
from probe.detection import (DetectorConfig, DetectTrainConfig, DiffusionPyramid, PyramidBackbone, count_trainable,
                             create_detector, fit_detector, pyramid_blocks, pyramid_strides, resnet_fpn)
from probe.detection.model import DIFFUSION_NORM, IMAGENET_NORM
from probe.errors import ProbeError
from probe.live_head import default_precision

from pipeline.instances import DetectionImages, read_instances
from pipeline.results import default_results_path, record_rows

__all__ = ["DetectRequest", "run_detect", "BASELINES", "PRELOAD_IMAGES"]

#: Backbones that are not diffusion models (random initialisation only: nothing is downloaded).
BASELINES = ("resnet18",)
#: Splits up to this many images are decoded once and kept in memory.
PRELOAD_IMAGES = 5000

INTERRUPTED = "interrupted (Ctrl-C) before training began: nothing is kept; the same command starts again"


@dataclass(frozen=True)
class DetectRequest:
    """What ``diffrep detect`` was asked.

    Args:
        dataset, train_split, test_split, data_root, limit, test_limit, label: the instance data
            (``limit``: the first n training images; ``label``: pets class, breed or species).
        backbone: ``adm`` (a diffusion configuration, ``config_name``) or a baseline (``resnet18``, random init).
        config_name, checkpoint, weight_seed: the diffusion backbone; without a checkpoint, the one diffrep
            bundles for the configuration (32x32_small), else seeded random weights (``random_weights``: always).
        blocks, timestep: the pyramid (None: ``pyramid_blocks``) and t. noise_seed: the test images' noise.
        image_size: the square input side S. masks: Mask R-CNN, else Faster R-CNN.
        detections_per_image: the most detections kept per image (COCO scores up to 100).
        finetune, backbone_lr: train the diffusion backbone too, at its own lr.
        epochs, steps, batch_size, optimizer, lr, weight_decay, warmup_steps, seed: the schedule.
    """

    dataset: str = "pets"
    backbone: str = "adm"
    config_name: str = "32x32_small"
    checkpoint: str | None = None
    random_weights: bool = False
    weight_seed: int = 0
    blocks: tuple[int, ...] | None = None
    timestep: int = 25
    noise_seed: int = 0
    image_size: int = 64
    masks: bool = True
    detections_per_image: int = 100
    train_split: str = "train"
    test_split: str = "test"
    data_root: str | None = None
    limit: int | None = None
    test_limit: int | None = None
    label: str | None = None
    finetune: bool = False
    backbone_lr: float | None = None
    epochs: int = 12
    steps: int | None = None
    batch_size: int = 8
    optimizer: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_steps: int = 50
    seed: int = 0
    precision: str | None = None
    device: str = "auto"
    checkpoint_dir: str | None = None
    resume: bool = False
    results_path: str | None = None
    progress: bool = True


def _backbone(request: DetectRequest, precision: str, channels: int) -> tuple[PyramidBackbone, tuple, str, list[int]]:
    """(pyramid backbone, its input norm, backbone id, blocks)."""
    if request.backbone in BASELINES:
        if request.finetune or request.checkpoint or request.random_weights:
            raise ProbeError(f"--backbone {request.backbone} trains from random weights: drop --finetune, --checkpoint and --random-weights")
        torch.manual_seed(request.weight_seed)
        return resnet_fpn(request.backbone, channels), IMAGENET_NORM, f"{request.backbone}-random{request.weight_seed}", []
    if request.backbone != "adm":
        raise ProbeError(f"unknown backbone {request.backbone!r}: choose adm (a diffusion --config) or {', '.join(BASELINES)}")
    family = family_of(request.config_name)
    blocks = list(request.blocks or pyramid_blocks(request.config_name))
    strides = pyramid_strides(request.config_name, blocks)
    native = family.input_size(request.config_name)
    if request.image_size % max(strides.values()):
        raise ProbeError(f"--image-size {request.image_size} is not a multiple of the deepest stride {max(strides.values())} "
                         f"of blocks {','.join(map(str, blocks))}: pass a multiple of it (the model was trained at {native})")
    checkpoint = request.checkpoint or (None if request.random_weights else bundled_checkpoint(request.config_name))
    model = create_backbone(request.config_name, checkpoint=checkpoint, weight_seed=None if checkpoint else request.weight_seed)
    body = DiffusionPyramid(model, strides, request.timestep, family.schedule(request.config_name),
                            noise_seed=request.noise_seed, finetune=request.finetune, precision=precision)
    names = [f"b{b}" for b in body.order]
    identity = weights_id(request.config_name, checkpoint, request.weight_seed)
    return PyramidBackbone(body, body.channels, names, channels), DIFFUSION_NORM, identity, blocks


def run_detect(request: DetectRequest, announce: Callable[[dict], None] | None = None) -> dict:
    """Train the detector on the train split, score COCO AP on the test split, record and return the results row.

    Raises:
        DatasetError: the dataset is not here or not an instance set. ProbeError: invalid options, a
            checkpoint trained otherwise. RunInterrupted: Ctrl-C, saying what was kept.
    """
    with interrupted_saying(INTERRUPTED):
        return _run_detect(request, announce)


def _run_detect(request: DetectRequest, announce: Callable[[dict], None] | None) -> dict:
    device = resolve_device(request.device)
    precision = request.precision or default_precision(device)
    if request.image_size < 32:
        raise ProbeError(f"--image-size {request.image_size} is too small for a detector: pass 32 or more (e.g. 64)")
    train = read_instances(request.dataset, request.train_split, root=request.data_root, limit=request.limit,
                           label=request.label)
    test = read_instances(request.dataset, request.test_split, root=request.data_root, limit=request.test_limit,
                          label=request.label)
    if train.category_ids != test.category_ids:
        raise ProbeError(f"{request.dataset}: the train and test splits have other categories: use splits of one dataset")
    detector_config = DetectorConfig(image_size=request.image_size, masks=request.masks,
                                     detections_per_image=request.detections_per_image)
    backbone, norm, backbone_id, blocks = _backbone(request, precision, detector_config.fpn_channels)
    torch.manual_seed(request.seed)
    model = create_detector(backbone, len(train.category_ids), detector_config, norm)
    train_images = DetectionImages(train, request.image_size, masks=request.masks,
                                   preload=train.num_images <= PRELOAD_IMAGES)
    test_images = DetectionImages(test, request.image_size, masks=False,  # scored against the document's masks
                                  preload=test.num_images <= PRELOAD_IMAGES)
    config = DetectTrainConfig(epochs=request.epochs, batch_size=request.batch_size, seed=request.seed,
                               optimizer=request.optimizer, lr=request.lr, weight_decay=request.weight_decay,
                               warmup_steps=request.warmup_steps, steps=request.steps,
                               backbone_lr=(request.backbone_lr or request.lr / 10) if request.finetune else None)
    head = "maskrcnn" if request.masks else "fasterrcnn"
    identity = dict(dataset=request.dataset, train_split=request.train_split, test_split=request.test_split,
                    label=request.label, limit=request.limit, test_limit=request.test_limit, backbone=backbone_id,
                    blocks=blocks, timestep=request.timestep if blocks else None, image_size=request.image_size,
                    head=head, finetune=request.finetune, precision=precision, detector=vars(detector_config).copy())
    checkpoint_dir = request.checkpoint_dir or str(
        Path(request.results_path or default_results_path()).parent / "checkpoints" /
        (f"{request.dataset}_{backbone_id}_{head}" + (f"_b{'-'.join(map(str, blocks))}_t{request.timestep}" if blocks else "")
         + f"_s{request.image_size}{'_finetune' if request.finetune else ''}_s{request.seed}"))
    result = fit_detector(model, train_images, test_images, test.coco, test.category_ids, request.image_size, config,
                          device=device, checkpoint_dir=checkpoint_dir, resume=request.resume, identity=identity,
                          masks=request.masks, progress=request.progress)
    box, mask = result.scores["bbox"], result.scores.get("segm", {})
    row = dict(dataset=request.dataset, train_split=request.train_split, test_split=request.test_split,
               backbone_id=backbone_id, noise_seed=request.noise_seed if blocks else None, head=head, task="detect",
               protocol="detect", solver=request.optimizer, blocks=blocks, timesteps=[request.timestep] if blocks else [],
               image_size=request.image_size, train_size=len(train_images), test_size=len(test_images),
               parameters=count_trainable(model), epochs=result.epochs, lr=request.lr, batch_size=request.batch_size,
               seed=request.seed, finetune=request.finetune, box_ap=box["ap"], box_ap50=box["ap50"],
               box_ap75=box["ap75"], mask_ap=mask.get("ap"), mask_ap50=mask.get("ap50"), mask_ap75=mask.get("ap75"),
               train_seconds=result.train_seconds)
    record_rows([row], request.results_path, announce)
    row["history"] = result.history
    if request.finetune:
        row["backbone_path"] = str(Path(checkpoint_dir) / "backbone.pt")
    return row
