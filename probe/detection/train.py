"""Training protocol of a detector: train_one_epoch, evaluate (COCO AP), fit with checkpoint and resume.

The shape is the probe protocol's (``probe.train``): one checkpoint dict per epoch {model,
optimizer, scheduler, epoch, config, identity, rng, history}, ``resume`` that refuses a checkpoint
trained with other settings or data (naming the difference) and continues bit for bit, a tqdm bar
with the running loss, a Ctrl-C turned into one line saying which epoch is kept. What differs is
detection's: the loss is the sum of torchvision's losses, the optimizer is AdamW (as MAE's
detection settings) or SGD with momentum, the lr warms up linearly and drops tenfold for the last
fifth of the steps, images are flipped at random (seeded), and scoring is COCO AP (pycocotools).
A frozen diffusion backbone is left out of the checkpoint; a fine-tuned one trains at its own lr
and is also written in the official layout beside it (``backbone.pt``, loadable by ``--checkpoint``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from probe.detection.coco_eval import coco_ground_truth, coco_scores, to_coco_results
from probe.detection.model import frozen_prefixes
from probe.errors import ProbeError
from probe.train import (BACKBONE_NAME, CHECKPOINT_NAME, _describe, _differences, _interrupted, _read_checkpoint,
                         _rng_state, _save, _set_rng_state, epoch_order)
from extract.errors import RunInterrupted

__all__ = ["DetectTrainConfig", "DetectFitResult", "train_one_epoch", "evaluate", "fit_detector", "DETECT_OPTIMIZERS"]

log = logging.getLogger(__name__)

DETECT_OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class DetectTrainConfig:
    """Everything in the detection protocol that changes the trained weights (stored in each checkpoint).

    Args:
        epochs: passes over the training images. batch_size: images per step. seed: order, flips, init.
        optimizer: ``adamw`` (MAE's detection settings) or ``sgd`` (momentum 0.9). lr, weight_decay: its settings.
        warmup_steps: linear warm-up from lr/1000. backbone_lr: a fine-tuned backbone's lr (None: frozen).
        flip: random horizontal flips while training. steps: stop after so many steps in all (None: every epoch).
    """

    epochs: int = 12
    batch_size: int = 8
    seed: int = 0
    optimizer: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_steps: int = 50
    backbone_lr: float | None = None
    flip: bool = True
    steps: int | None = None

    def __post_init__(self):
        if self.optimizer not in DETECT_OPTIMIZERS:
            raise ProbeError(f"invalid optimizer {self.optimizer!r}: only {', '.join(DETECT_OPTIMIZERS)} are supported")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.warmup_steps < 0:
            raise ProbeError(f"epochs and batch_size must be >= 1, lr > 0 and warmup_steps >= 0, got "
                             f"{self.epochs}, {self.batch_size}, {self.lr}, {self.warmup_steps}")


@dataclass
class DetectFitResult:
    """What ``fit_detector`` returns: ``{kind: {ap, ap50, ap75}}``, train seconds (this call), per-epoch history."""

    scores: dict
    train_seconds: float
    epochs: int
    history: list[dict] = field(default_factory=list)


def _collate(samples):
    return tuple(zip(*samples))


def _flip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


def _batches(dataset, order: Sequence[int], batch_size: int):
    for start in range(0, len(order), batch_size):
        yield _collate([dataset[int(i)] for i in order[start:start + batch_size]])


def train_one_epoch(model: nn.Module, optimizer, scheduler, batches, num_batches: int | None, device: torch.device,
                    flip: bool = True, description: str = "train", progress: bool = True) -> dict[str, float]:
    """One pass of steps on the sum of torchvision's detection losses; the scheduler steps every batch.

    Args:
        batches: ``(images, targets, image_ids)`` tuples, images (3, S, S) in [0, 1]. flip: each image
            flipped with probability 1/2 (drawn from the global RNG, which the checkpoint keeps).

    Returns:
        ``{"loss": mean summed loss per step, "<each loss>": its mean}`` over the epoch.
    """
    model.train()
    totals: dict[str, float] = {}
    steps = 0
    bar = tqdm(batches, total=num_batches, desc=description, leave=False, disable=not progress, unit="batch")
    for images, targets, _ in bar:
        if flip:
            pairs = [_flip(i, t) if torch.rand(()) < 0.5 else (i, t) for i, t in zip(images, targets)]
            images, targets = [p[0] for p in pairs], [p[1] for p in pairs]
        images = [image.to(device) for image in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        losses = model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise ProbeError(f"the detection loss is {loss.item()} at step {steps + 1}: lower --lr or raise --warmup-steps")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        steps += 1
        for name, value in [("loss", loss), *losses.items()]:
            totals[name] = totals.get(name, 0.0) + float(value.detach())
        if progress:
            bar.set_postfix(loss=f"{totals['loss'] / steps:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2g}")
    if steps == 0:
        raise ProbeError("no training images: the train split is empty")
    return {name: value / steps for name, value in totals.items()}


@torch.no_grad()
def evaluate(model: nn.Module, dataset, coco: dict, category_ids: list[int], image_size: int,
             device: torch.device, batch_size: int = 8, masks: bool = True, progress: bool = True) -> dict:
    """COCO AP of ``model`` on every image of ``dataset`` (scored against ``coco``, the split's document).

    A diffusion backbone gets each image's seeded noise (its id), so a score is reproducible.

    Returns:
        ``{"bbox": {ap, ap50, ap75}, "segm": {...}}`` (``segm`` with masks only).
    """
    model.eval()
    images_by_id = {image["id"]: image for image in coco["images"]}
    body = getattr(model.backbone, "body", None)
    results: list[dict] = []
    scored: list[int] = []
    order = list(range(len(dataset)))
    bar = tqdm(_batches(dataset, order, batch_size), total=-(-len(order) // batch_size), desc="score",
               leave=False, disable=not progress, unit="batch")
    for images, _, ids in bar:
        with body.seeded_ids(ids) if hasattr(body, "seeded_ids") else contextlib.nullcontext():
            outputs = model([image.to(device) for image in images])
        scored.extend(ids)
        for output, image_id in zip(outputs, ids):
            results.extend(to_coco_results(output, images_by_id[image_id], image_size, category_ids))
    kinds = ("bbox", "segm") if masks else ("bbox",)
    return coco_scores(coco_ground_truth(coco), results, kinds, image_ids=scored)


def _optimizer(model: nn.Module, config: DetectTrainConfig) -> torch.optim.Optimizer:
    body = getattr(model.backbone, "body", None)
    tuned = [p for p in body.backbone.parameters() if p.requires_grad] if hasattr(body, "seeded_ids") else []
    if tuned and config.backbone_lr is None:
        raise ProbeError("the backbone is fine-tuned but has no learning rate: pass --backbone-lr")
    ids = {id(p) for p in tuned}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in ids]}]
    if tuned:
        groups.append({"params": tuned, "lr": config.backbone_lr})
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def _schedule(optimizer, config: DetectTrainConfig, total_steps: int):
    """Linear warm-up from lr/1000 over ``warmup_steps``, then the lr; a tenth of it for the last fifth of the steps."""
    drop = math.floor(0.8 * total_steps)

    def factor(step: int) -> float:
        warm = 1.0 if step >= config.warmup_steps else 1e-3 + (1 - 1e-3) * step / max(config.warmup_steps, 1)
        return warm * (0.1 if step >= drop else 1.0)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _trained_state(model: nn.Module, skip: list[str]) -> dict:
    return {k: v for k, v in model.state_dict().items() if not any(k.startswith(p) for p in skip)}


def fit_detector(model: nn.Module, train, test, coco: dict, category_ids: list[int], image_size: int,
                 config: DetectTrainConfig = DetectTrainConfig(), *, device: str | torch.device = "cpu",
                 checkpoint_dir: str | None = None, resume: bool = False, identity: Mapping | None = None,
                 masks: bool = True, progress: bool = True) -> DetectFitResult:
    """Train ``model`` on ``train``, then score it on ``test`` against ``coco`` (COCO AP).

    Args:
        model: from ``create_detector`` (moved to ``device``; trained in place).
        train, test: datasets of ``(image (3, S, S) in [0, 1], target, image id)`` (``pipeline.instances.DetectionImages``).
        coco: the test split's instances document. category_ids: label k's COCO category. image_size: S.
        config: the protocol. checkpoint_dir: ``checkpoint.pth`` written after every epoch (None: none).
        resume: continue from it when it exists. identity: what the data and model are; a resume with any
            difference is refused. masks: score masks too.

    Raises:
        ProbeError: a checkpoint trained with other settings or data; a loss that is not finite.
        RunInterrupted: Ctrl-C, saying which epoch's checkpoint is kept and that ``--resume`` continues.
    """
    device = torch.device(device)
    model.to(device)
    saved_config, identity = asdict(config), dict(identity or {})
    skip = frozen_prefixes(model)
    per_epoch = -(-len(train) // config.batch_size)
    total = config.steps if config.steps is not None else per_epoch * config.epochs
    num_epochs = -(-total // per_epoch)
    optimizer = _optimizer(model, config)
    scheduler = _schedule(optimizer, config, total)
    history: list[dict] = []
    start = 0
    path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if resume and path is not None and path.exists():
        state = _read_checkpoint(path)
        for what, saved, asked in (("settings", state["config"], saved_config),
                                   ("data or model", state.get("identity", {}), identity)):
            changed = _differences(saved, asked)
            if changed:
                raise ProbeError(f"checkpoint {path} was trained with other {what} ({_describe(changed)}): pass the "
                                 f"same options it was trained with, or another --checkpoint-dir to train anew")
        missing, unexpected = model.load_state_dict(state["head"], strict=False)
        wrong = list(unexpected) + [k for k in missing if not any(k.startswith(p) for p in skip)]
        if wrong:
            raise ProbeError(f"checkpoint {path} holds another detector's weights ({wrong[0]}): pass another --checkpoint-dir")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        history, start = list(state.get("history", [])), int(state["epoch"]) + 1
        log.info("resuming from %s at epoch %d of %d", path, start + 1, num_epochs)
    else:
        if resume:
            log.warning("--resume: no checkpoint in %s, training from epoch 1", checkpoint_dir)
        torch.manual_seed(config.seed)  # flips and fresh noise
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    kept, epoch = start, start
    try:
        for epoch in range(start, num_epochs):
            batches_now = min(per_epoch, total - epoch * per_epoch)  # the last epoch is cut short at config.steps
            order = epoch_order(len(train), config.seed, epoch).tolist()[:batches_now * config.batch_size]
            if len(order) % config.batch_size == 1 and len(order) > 1:
                order = order[:-1]  # a batch of one image cannot train BatchNorm (the ResNet baseline)
            stats = train_one_epoch(model, optimizer, scheduler, _batches(train, order, config.batch_size),
                                    -(-len(order) // config.batch_size), device, config.flip,
                                    f"epoch {epoch + 1}/{num_epochs}", progress)
            history.append({"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **stats})
            log.info("epoch %d/%d: loss %.4f", epoch + 1, num_epochs, stats["loss"])
            if path is not None:
                body = getattr(model.backbone, "body", None)
                if getattr(body, "finetune", False):
                    _save(path.parent / BACKBONE_NAME, {k: v.detach().cpu() for k, v in body.backbone.state_dict().items()})
                _save(path, {"head": _trained_state(model, skip), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "epoch": epoch, "config": saved_config,
                             "identity": identity, "rng": _rng_state(), "history": history})
                kept = epoch + 1
        train_seconds = time.perf_counter() - began
        epoch = num_epochs
        scores = evaluate(model, test, coco, category_ids, image_size, device, config.batch_size, masks, progress)
    except RunInterrupted:
        raise
    except KeyboardInterrupt:
        raise _interrupted(path, epoch, num_epochs, kept) from None
    return DetectFitResult(scores=scores, train_seconds=train_seconds, epochs=num_epochs, history=history)
