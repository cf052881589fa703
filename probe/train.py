"""The training protocol for heads on frozen features: train_one_epoch, evaluate, fit with checkpoint and resume.

Defaults follow the official code where the paper is silent: 28 epochs, StepLR(step 7, gamma 0.1),
cross-entropy, SGD with momentum 0 and weight decay 0 (Adam selectable). Features are moved to
the training device once; an epoch only indexes tensors already there (no decoding, no backbone).
A split too large for RAM comes as a ``BatchSource`` instead and is streamed from the cache each epoch.
Each epoch ends with one checkpoint dict {head, optimizer, scheduler, epoch, config, rng}; ``fit(...,
resume=True)`` restores it and continues, so a run killed and resumed ends with the same weights,
bit for bit, as one run straight through (batch order is a pure function of (seed, epoch)).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from extract.errors import ProbeError

__all__ = [
    "TrainConfig", "FitResult", "BatchSource", "epoch_order", "tensor_batches", "train_one_epoch", "evaluate", "fit",
    "CHECKPOINT_NAME", "OPTIMIZERS",
]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pth"
OPTIMIZERS = ("sgd", "adam")

Features = Mapping[tuple[int, int], torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """Everything in the protocol that changes the trained weights (stored in each checkpoint).

    Args:
        epochs: passes over the training set (28). lr: initial learning rate.
        optimizer: ``sgd`` (momentum 0, weight decay 0, as the official code) or ``adam``.
        step_size, gamma: StepLR schedule (7, 0.1). batch_size: images per step. seed: batch order.
    """

    epochs: int = 28
    lr: float = 1e-2
    optimizer: str = "sgd"
    step_size: int = 7
    gamma: float = 0.1
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ProbeError(f"invalid optimizer {self.optimizer!r}: only {', '.join(OPTIMIZERS)} are supported")
        if self.epochs < 1 or self.batch_size < 1 or self.step_size < 1 or not self.lr > 0:
            raise ProbeError(
                f"epochs, batch_size and step_size must be >= 1 and lr > 0, got "
                f"{self.epochs}, {self.batch_size}, {self.step_size}, {self.lr}"
            )


@dataclass
class FitResult:
    """What ``fit`` returns: test top-1/top-5 (fractions), wall seconds of training, per-epoch history."""

    top1: float
    top5: float
    test_loss: float
    train_seconds: float
    epochs: int
    history: list[dict] = field(default_factory=list)


def _num_rows(features: Features, labels: torch.Tensor) -> int:
    sizes = {key: int(value.shape[0]) for key, value in features.items()}
    if not sizes or any(n != labels.shape[0] for n in sizes.values()):
        raise ProbeError(f"features have rows {sizes} but there are {labels.shape[0]} labels: load them from one cache split")
    return int(labels.shape[0])


def _make_optimizer(head: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in head.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.0, weight_decay=0.0)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=0.0)


def epoch_order(num_rows: int, seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(num_rows,) int64 batch order of one epoch: a pure function of (seed, epoch), so resuming repeats it."""
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(num_rows, generator=generator).to(device)


def tensor_batches(features: Features, labels: torch.Tensor, order: torch.Tensor,
                   batch_size: int) -> Iterator[tuple[dict[tuple[int, int], torch.Tensor], torch.Tensor]]:
    """Batches of tensors already on the device, rows taken in ``order``.

    Args:
        features: ``{(b, t): (N, C, h, w)}``. labels: (N,) int64. order: (N,) row indices. batch_size: rows per batch.

    Yields:
        ``({(b, t): (n, C, h, w)}, (n,) labels)``, n = batch_size except the last.
    """
    for start in range(0, order.shape[0], batch_size):
        index = order[start:start + batch_size]
        yield {key: value[index] for key, value in features.items()}, labels[index]


def train_one_epoch(
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[Features, torch.Tensor]],
    num_batches: int | None = None,
    description: str = "train",
    progress: bool = True,
) -> dict[str, float]:
    """One pass of cross-entropy steps over ``batches``.

    Args:
        head: the module, on the batches' device. optimizer: its optimizer.
        batches: ``({(b, t): (n, C, h, w)} float32, (n,) int64 labels)`` on that device, e.g.
            ``tensor_batches(...)`` or a streamed split's ``batches(...)``.
        num_batches: length of ``batches`` for the progress bar (None: unknown).
        description, progress: the tqdm bar's label, and whether to show it.

    Returns:
        ``{"loss": mean cross-entropy, "acc": top-1 training accuracy}`` over the epoch.
    """
    head.train()
    total_loss = correct = None
    seen = 0
    bar = tqdm(batches, total=num_batches, desc=description, leave=False, disable=not progress, unit="batch")
    for features, target in bar:
        logits = head(features)
        loss = F.cross_entropy(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        batch_loss = loss.detach() * target.shape[0]
        batch_correct = (logits.detach().argmax(dim=1) == target).sum()
        total_loss = batch_loss if total_loss is None else total_loss + batch_loss
        correct = batch_correct if correct is None else correct + batch_correct
        seen += target.shape[0]
        if progress:
            bar.set_postfix(loss=f"{total_loss.item() / seen:.4f}", acc=f"{correct.item() / seen:.3f}")
    if seen == 0:
        raise ProbeError("no training rows: the train split is empty or every image was invalid")
    return {"loss": total_loss.item() / seen, "acc": correct.item() / seen}


@torch.no_grad()
def evaluate(head: nn.Module, batches: Iterable[tuple[Features, torch.Tensor]]) -> dict[str, float]:
    """Top-1 / top-5 accuracy and mean cross-entropy of ``head`` over every batch.

    Args:
        head: the module, on the batches' device.
        batches: ``({(b, t): (n, C, h, w)}, (n,) int64 labels)``, e.g. ``tensor_batches(...)``.

    Returns:
        ``{"top1", "top5", "loss"}`` as fractions / mean; top-5 is top-k with k = min(5, classes).

    Raises:
        ProbeError: no rows at all.
    """
    head.eval()
    num_rows = top1 = top5 = 0
    loss = 0.0
    for features, target in batches:
        logits = head(features).float()
        loss += F.cross_entropy(logits, target, reduction="sum").item()
        best = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = best == target[:, None]
        top1 += hits[:, 0].sum().item()
        top5 += hits.any(dim=1).sum().item()
        num_rows += target.shape[0]
    if num_rows == 0:
        raise ProbeError("no rows to evaluate: the test split is empty or every image was invalid")
    return {"top1": top1 / num_rows, "top5": top5 / num_rows, "loss": loss / num_rows}


def _as_inputs(features: Features, labels: torch.Tensor, device: torch.device) -> tuple[Features, torch.Tensor]:
    """What a head trains on: float32 features and int64 labels on ``device``."""
    return {key: value.to(device, torch.float32) for key, value in features.items()}, labels.to(device, torch.long)


def _on_device(batches, device: torch.device):
    for features, labels in batches:
        yield _as_inputs(features, labels, device)


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class BatchSource(Protocol):
    """A split read batch by batch (e.g. ``probe.features.StreamedFeatures``) when it does not fit in RAM."""

    num_images: int

    def batches(self, batch_size: int, seed: int | None = None, epoch: int = 0) -> Iterator[tuple[Features, torch.Tensor]]:
        """``({(b, t): (n, C, h, w)}, (n,) labels)`` over every row once; shuffled as a pure function of (seed, epoch)."""


def _epoch_batches(data, labels, batch_size: int, seed: int | None, epoch: int, device: torch.device):
    """(batches on the device, number of batches) of one epoch of tensors or of a streamed source."""
    if isinstance(data, Mapping):
        num_rows = _num_rows(data, labels)
        order = epoch_order(num_rows, seed, epoch, device) if seed is not None else torch.arange(num_rows, device=device)
        return tensor_batches(data, labels, order, batch_size), -(-num_rows // batch_size)
    return _on_device(data.batches(batch_size, seed=seed, epoch=epoch), device), -(-data.num_images // batch_size)


def _to_device(data, labels, device: torch.device):
    """Tensors move to the device once (float32 features, int64 labels); streamed sources stay as they are."""
    if not isinstance(data, Mapping):
        return data, None
    _num_rows(data, labels)
    return _as_inputs(data, labels, device)


def fit(
    head: nn.Module,
    train_features: Features | BatchSource,
    train_labels: torch.Tensor | None,
    test_features: Features | BatchSource,
    test_labels: torch.Tensor | None,
    *,
    epochs: int = 28,
    lr: float = 1e-2,
    optimizer: str = "sgd",
    step_size: int = 7,
    gamma: float = 0.1,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device = "cpu",
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
) -> FitResult:
    """Train ``head`` on the train features by the protocol, then score it on the test features.

    Args:
        head: a module from ``create_head`` (moved to ``device`` here; trained in place).
        train_features, test_features: ``{(b, t): (N, C, h, w)}`` float tensors (any device; moved to
            ``device`` once), or a ``BatchSource`` streamed from the cache each epoch (labels None).
        train_labels, test_labels: (N,) int64 class indices for tensors; None for a ``BatchSource``.
        epochs, lr, optimizer, step_size, gamma, batch_size, seed: see ``TrainConfig``.
        device: where the head and the features live during training.
        checkpoint_dir: folder for ``checkpoint.pth`` written after every epoch (None: no checkpoints).
        resume: continue from ``checkpoint_dir/checkpoint.pth`` when it exists.
        progress: show a tqdm bar with running loss and accuracy.

    Returns:
        ``FitResult`` with test top-1 / top-5, train seconds (this call), history of every epoch.

    Raises:
        ProbeError: invalid options, mismatched rows, or a checkpoint written with another config.
    """
    config = TrainConfig(epochs=epochs, lr=lr, optimizer=optimizer, step_size=step_size, gamma=gamma,
                         batch_size=batch_size, seed=seed)
    device = torch.device(device)
    if isinstance(test_features, Mapping):
        _num_rows(test_features, test_labels)
    head.to(device)
    train_x, train_y = _to_device(train_features, train_labels, device)

    opt = _make_optimizer(head, config)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=config.step_size, gamma=config.gamma)
    history: list[dict] = []
    start_epoch = 0
    path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if resume and path is not None and path.exists():
        # CPU first: the saved RNG states must stay CPU ByteTensors; load_state_dict moves the rest
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["config"] != asdict(config):
            changed = {k: (state["config"].get(k), v) for k, v in asdict(config).items() if state["config"].get(k) != v}
            raise ProbeError(
                f"checkpoint {path} was trained with other settings {changed} (saved, asked): "
                f"pass the saved settings or another --checkpoint-dir"
            )
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        history = list(state.get("history", []))
        start_epoch = int(state["epoch"]) + 1
        log.info("resuming from %s at epoch %d of %d", path, start_epoch + 1, config.epochs)
    else:
        if resume:
            log.info("no checkpoint to resume in %s: starting from epoch 1", checkpoint_dir)
        torch.manual_seed(config.seed)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)

    began = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        batches, num_batches = _epoch_batches(train_x, train_y, config.batch_size, config.seed, epoch, device)
        stats = train_one_epoch(head, opt, batches, num_batches,
                                description=f"epoch {epoch + 1}/{config.epochs}", progress=progress)
        stats = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], **stats}
        scheduler.step()
        history.append(stats)
        log.info("epoch %d/%d: loss %.4f, train acc %.4f", epoch + 1, config.epochs, stats["loss"], stats["acc"])
        if path is not None:
            _save(path, {"head": head.state_dict(), "optimizer": opt.state_dict(), "scheduler": scheduler.state_dict(),
                         "epoch": epoch, "config": asdict(config), "rng": _rng_state(), "history": history})
    train_seconds = time.perf_counter() - began
    del train_x, train_y
    test_x, test_y = _to_device(test_features, test_labels, device)
    scores = evaluate(head, _epoch_batches(test_x, test_y, max(config.batch_size, 1024), None, 0, device)[0])
    return FitResult(top1=scores["top1"], top5=scores["top5"], test_loss=scores["loss"],
                     train_seconds=train_seconds, epochs=config.epochs, history=history)
