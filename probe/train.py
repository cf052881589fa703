"""The training protocol for heads on frozen features: train_one_epoch, evaluate, fit with checkpoint and resume.

Defaults follow the official code where the paper is silent: 28 epochs, StepLR(step 7, gamma 0.1),
cross-entropy, SGD with momentum 0 and weight decay 0 (Adam selectable). Features are moved to
the training device once; an epoch only indexes tensors already there (no decoding, no backbone).
Each epoch ends with one checkpoint dict {head, optimizer, scheduler, epoch, config, rng}; ``fit(...,
resume=True)`` restores it and continues, so a run killed and resumed ends with the same weights,
bit for bit, as one run straight through (batch order is a pure function of (seed, epoch)).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from extract.errors import ProbeError

__all__ = [
    "TrainConfig", "FitResult", "epoch_order", "train_one_epoch", "evaluate", "fit", "CHECKPOINT_NAME", "OPTIMIZERS",
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


def _batch(features: Features, index: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    return {key: value[index] for key, value in features.items()}


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


def epoch_order(num_rows: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """(num_rows,) int64 batch order of one epoch: a pure function of (seed, epoch), so resuming repeats it."""
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(num_rows, generator=generator).to(device)


def train_one_epoch(
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    features: Features,
    labels: torch.Tensor,
    batch_size: int,
    order: torch.Tensor,
    description: str = "train",
    progress: bool = True,
) -> dict[str, float]:
    """One pass over the features in ``order``.

    Args:
        head: the module, on the features' device. optimizer: its optimizer.
        features: ``{(b, t): (N, C, h, w)}`` float32 on the training device. labels: (N,) int64, same device.
        batch_size: rows per step. order: (N,) permutation of row indices.
        description, progress: the tqdm bar's label, and whether to show it.

    Returns:
        ``{"loss": mean cross-entropy, "acc": top-1 training accuracy}`` over the epoch.
    """
    head.train()
    total_loss = torch.zeros((), device=labels.device)
    correct = torch.zeros((), device=labels.device, dtype=torch.long)
    seen = 0
    starts = range(0, order.shape[0], batch_size)
    bar = tqdm(starts, desc=description, leave=False, disable=not progress, unit="batch")
    for start in bar:
        index = order[start:start + batch_size]
        target = labels[index]
        logits = head(_batch(features, index))
        loss = F.cross_entropy(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach() * target.shape[0]
        correct += (logits.detach().argmax(dim=1) == target).sum()
        seen += target.shape[0]
        if progress:
            bar.set_postfix(loss=f"{total_loss.item() / seen:.4f}", acc=f"{correct.item() / seen:.3f}")
    return {"loss": total_loss.item() / max(seen, 1), "acc": correct.item() / max(seen, 1)}


@torch.no_grad()
def evaluate(head: nn.Module, features: Features, labels: torch.Tensor, batch_size: int = 1024) -> dict[str, float]:
    """Top-1 / top-5 accuracy and mean cross-entropy of ``head`` on every row.

    Args:
        head: the module, on the features' device.
        features: ``{(b, t): (N, C, h, w)}`` on that device. labels: (N,) int64.
        batch_size: rows per forward.

    Returns:
        ``{"top1", "top5", "loss"}`` as fractions / mean; top-5 is top-k with k = min(5, classes).
    """
    head.eval()
    num_rows = _num_rows(features, labels)
    top1 = top5 = 0
    loss = 0.0
    for start in range(0, num_rows, batch_size):
        index = torch.arange(start, min(start + batch_size, num_rows), device=labels.device)
        target = labels[index]
        logits = head(_batch(features, index)).float()
        loss += F.cross_entropy(logits, target, reduction="sum").item()
        best = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = best == target[:, None]
        top1 += hits[:, 0].sum().item()
        top5 += hits.any(dim=1).sum().item()
    if num_rows == 0:
        raise ProbeError("no rows to evaluate: the test split is empty or every image was invalid")
    return {"top1": top1 / num_rows, "top5": top5 / num_rows, "loss": loss / num_rows}


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


def fit(
    head: nn.Module,
    train_features: Features,
    train_labels: torch.Tensor,
    test_features: Features,
    test_labels: torch.Tensor,
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
        train_features, test_features: ``{(b, t): (N, C, h, w)}`` float tensors (any device).
        train_labels, test_labels: (N,) int64 class indices.
        epochs, lr, optimizer, step_size, gamma, batch_size, seed: see ``TrainConfig``.
        device: where the head and the features live during training (features move once).
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
    num_train = _num_rows(train_features, train_labels)
    _num_rows(test_features, test_labels)
    head.to(device)
    train_x = {key: value.to(device, torch.float32) for key, value in train_features.items()}
    train_y = train_labels.to(device, torch.long)

    opt = _make_optimizer(head, config)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=config.step_size, gamma=config.gamma)
    history: list[dict] = []
    start_epoch = 0
    path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if resume and path is not None and path.exists():
        state = torch.load(path, map_location=device, weights_only=False)
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
    elif resume:
        log.info("no checkpoint to resume in %s: starting from epoch 1", checkpoint_dir)
    else:
        torch.manual_seed(config.seed)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)

    began = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        order = epoch_order(num_train, config.seed, epoch, device)
        stats = train_one_epoch(head, opt, train_x, train_y, config.batch_size, order,
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
    test_x = {key: value.to(device, torch.float32) for key, value in test_features.items()}
    scores = evaluate(head, test_x, test_labels.to(device, torch.long), batch_size=max(config.batch_size, 1024))
    return FitResult(top1=scores["top1"], top5=scores["top5"], test_loss=scores["loss"],
                     train_seconds=train_seconds, epochs=config.epochs, history=history)
