"""The training protocol for heads on frozen features: train_one_epoch, evaluate, fit with checkpoint and resume.

Defaults follow the official code where the paper is silent: 28 epochs, StepLR(step 7, gamma 0.1),
cross-entropy, SGD with momentum 0 and weight decay 0 (Adam selectable). Features are moved to
the training device once; an epoch only indexes tensors already there (no decoding, no backbone).
A split too large for RAM comes as a ``BatchSource`` instead and is streamed from the cache each epoch.
Each epoch ends with one checkpoint dict {head, optimizer, scheduler, epoch, config, rng}; ``fit(...,
resume=True)`` restores it and continues, so a run killed and resumed ends with the same weights,
bit for bit, as one run straight through (batch order is a pure function of (seed, epoch)).
Checkpoints hold only tensors and plain values and load with ``weights_only=True`` (a crafted file
cannot run code); a Ctrl-C becomes one line saying which epoch's checkpoint is kept (``RunInterrupted``).
"""

from __future__ import annotations

import inspect
import itertools
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from extract import distributed
from extract.backbone.checkpoint import load_tensors
from extract.errors import RunInterrupted
from probe.errors import ProbeError
from probe.grid import HeadGrid
from probe.views import ViewStack, num_rows_of, view_choice

__all__ = [
    "TrainConfig", "FitResult", "BatchSource", "epoch_order", "tensor_batches", "train_one_epoch", "evaluate", "fit",
    "CHECKPOINT_NAME", "BACKBONE_NAME", "OPTIMIZERS",
]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pth"
#: Beside the checkpoint of a fine-tuned run: the tuned backbone in the official layout (``--checkpoint`` loads it).
BACKBONE_NAME = "backbone.pt"
OPTIMIZERS = ("sgd", "adam")

Features = Mapping[tuple[int, int], torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """Everything in the protocol that changes the trained weights (stored in each checkpoint).

    Args:
        epochs: passes over the training set (28). lr: initial learning rate.
        optimizer: ``sgd`` (momentum 0, weight decay 0, as the official code) or ``adam``.
        step_size, gamma: StepLR schedule (7, 0.1). batch_size: images per step. seed: batch order.
        backbone_lr: lr of a fine-tuned backbone's parameters (official: 1e-3); None: nothing to tune.
        steps: stop after this many optimizer steps in all (None: every batch of every epoch).
    """

    epochs: int = 28
    lr: float = 1e-2
    optimizer: str = "sgd"
    step_size: int = 7
    gamma: float = 0.1
    batch_size: int = 256
    seed: int = 0
    backbone_lr: float | None = None
    steps: int | None = None

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ProbeError(f"invalid optimizer {self.optimizer!r}: only {', '.join(OPTIMIZERS)} are supported")
        if self.epochs < 1 or self.batch_size < 1 or self.step_size < 1 or not self.lr > 0:
            raise ProbeError(
                f"epochs, batch_size and step_size must be >= 1 and lr > 0, got "
                f"{self.epochs}, {self.batch_size}, {self.step_size}, {self.lr}"
            )
        if (self.backbone_lr is not None and not self.backbone_lr > 0) or (self.steps is not None and self.steps < 1):
            raise ProbeError(f"backbone lr must be > 0 and steps >= 1, got {self.backbone_lr}, {self.steps}")


@dataclass
class FitResult:
    """What ``fit`` returns: test top-1/top-5 (fractions), wall seconds of training, per-epoch history."""

    top1: float
    top5: float
    test_loss: float
    train_seconds: float
    epochs: int
    history: list[dict] = field(default_factory=list)
    lr: float | None = None  # the lr trained (a grid's choice)
    heldout_top1: dict[float, float] = field(default_factory=dict)  # a grid's held-out top-1 per lr


def _num_rows(features: Features, labels: torch.Tensor) -> int:
    stacked = isinstance(features, ViewStack)
    sizes = {key: num_rows_of(value, stacked) for key, value in features.items()}
    if not sizes or any(n != labels.shape[0] for n in sizes.values()):
        raise ProbeError(f"features have rows {sizes} but there are {labels.shape[0]} labels: load them from one cache split")
    return int(labels.shape[0])


def _make_optimizer(head: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD or Adam over the head; a ``HeadGrid`` gets one parameter group per head at its own lr, and a
    fine-tuned backbone (``TunableBackbone``) its own group at ``backbone_lr``."""
    if isinstance(head, HeadGrid):
        params = head.param_groups()
    else:
        tuned = head.backbone_parameters() if hasattr(head, "backbone_parameters") else []
        if tuned and config.backbone_lr is None:
            raise ProbeError("the backbone is fine-tuned but has no learning rate: pass --backbone-lr (official: 1e-3)")
        ids = {id(p) for p in tuned}
        params = [{"params": [p for p in head.parameters() if p.requires_grad and id(p) not in ids]}]
        if tuned:
            params.append({"params": tuned, "lr": config.backbone_lr})
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.0, weight_decay=0.0)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=0.0)


def epoch_order(num_rows: int, seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(num_rows,) int64 batch order of one epoch: a pure function of (seed, epoch), so resuming repeats it."""
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(num_rows, generator=generator).to(device)


def tensor_batches(features: Features, labels: torch.Tensor, order: torch.Tensor, batch_size: int,
                   views: torch.Tensor | None = None, ranks: bool = False) -> Iterator[tuple[dict[tuple[int, int], torch.Tensor], torch.Tensor]]:
    """Batches of tensors already on the device, rows taken in ``order``, cast to float32 one batch at a time.

    Args:
        features: ``{(b, t): (N, C, h, w)}``, or a ``ViewStack`` ``{(b, t): (V, N, C, h, w)}`` with ``views``.
        labels: (N,) int64. order: (N,) row indices. batch_size: rows per batch.
        views: (N,) the view each row is read in (a ``ViewStack`` only).
        ranks: a distributed run: each batch is this rank's contiguous share of the global batch.

    Yields:
        ``({(b, t): (n, C, h, w) float32}, (n,) labels)``, n = batch_size except the last (its share).
    """
    for start in range(0, order.shape[0], batch_size):
        index = order[start:start + batch_size]
        if ranks:
            index = index[distributed.share(index.shape[0])]
        if views is None:
            yield {key: value[index].float() for key, value in features.items()}, labels[index]
        else:
            chosen = views[index]
            yield {key: value[chosen, index].float() for key, value in features.items()}, labels[index]


def train_one_epoch(
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[Features, torch.Tensor]],
    num_batches: int | None = None,
    description: str = "train",
    progress: bool = True,
    accumulate: int = 1,
) -> dict[str, float]:
    """One pass of cross-entropy steps over ``batches``.

    Args:
        head: the module, on the batches' device. optimizer: its optimizer.
        batches: ``({(b, t): (n, C, h, w)} float32, (n,) int64 labels)`` on that device, e.g.
            ``tensor_batches(...)`` or a streamed split's ``batches(...)``.
        num_batches: length of ``batches`` for the progress bar (None: unknown).
        description, progress: the tqdm bar's label, and whether to show it.
        accumulate: micro-batches per step (gradient accumulation: the step is the batch's, in parts).

    In a distributed run (``head`` wrapped by ``extract.distributed.wrap_trained``) each batch is this
    rank's share of a global batch: the loss is scaled so that DDP's average of the ranks' gradients
    is the gradient of the global batch's mean cross-entropy, whatever the shares' sizes.

    Returns:
        ``{"loss": mean cross-entropy, "acc": top-1 training accuracy}`` over the epoch (averaged over
        the heads of a ``HeadGrid``; over every rank's rows).
    """
    head.train()
    total_loss = correct = None
    seen = 0
    parts = distributed.world_size()
    bar = tqdm(batches, total=num_batches, desc=description, leave=False,
               disable=not progress or not distributed.is_main(), unit="batch")
    for features, target in bar:
        if parts == 1 and accumulate == 1:
            outputs = head(features)
            outputs = outputs if isinstance(outputs, Mapping) else {"": outputs}
            # a HeadGrid's heads share no parameter: the summed loss gives each exactly its own gradient
            losses = [F.cross_entropy(logits, target) for logits in outputs.values()]
            loss = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            batch_loss = loss.detach() / len(losses) * target.shape[0]
        else:
            outputs, batch_loss = _accumulated_step(head, optimizer, features, target, parts, accumulate)
        batch_correct = sum((logits.detach().argmax(dim=1) == target).sum() for logits in outputs.values()) / len(outputs)
        total_loss = batch_loss if total_loss is None else total_loss + batch_loss
        correct = batch_correct if correct is None else correct + batch_correct
        seen += target.shape[0]
        if progress:
            rate = seen / max(bar.format_dict.get("elapsed", 0.0), 1e-9)
            bar.set_postfix(loss=f"{total_loss.item() / seen:.4f}", acc=f"{correct.item() / seen:.3f}",
                            images_per_s=f"{rate:.0f}")
    if parts > 1:
        sums = torch.tensor([float(total_loss if total_loss is not None else 0.0),
                             float(correct if correct is not None else 0.0), float(seen)], dtype=torch.float64)
        total_loss, correct, seen = distributed.all_reduce_sum(sums).tolist()
        seen = int(seen)
    if seen == 0:
        raise ProbeError("no training rows: the train split is empty or every image was invalid")
    return {"loss": float(total_loss) / seen, "acc": float(correct) / seen}


def _rows(features: Features, part: slice) -> dict:
    return {key: value[part] for key, value in features.items()}


def _accumulated_step(head: nn.Module, optimizer: torch.optim.Optimizer, features: Features, target: torch.Tensor,
                      parts: int, accumulate: int) -> tuple[dict, torch.Tensor]:
    """One optimizer step on this rank's share of a global batch, in ``accumulate`` micro-batches.

    Each micro-batch's loss is ``sum of cross-entropy * world size / rows of the global batch``: DDP
    averages the ranks' gradients, so the step's gradient is that of the global batch's mean loss.
    Returns ``({key: logits of every row}, summed cross-entropy of this rank's rows)``.
    """
    total = distributed.global_count(target.shape[0], target.device)
    optimizer.zero_grad(set_to_none=True)
    collected: dict[str, list[torch.Tensor]] = {}
    summed = torch.zeros((), dtype=torch.float64, device=target.device)
    rows = target.shape[0]
    for micro in range(accumulate):
        part = distributed.share(rows, micro, accumulate)
        with distributed.no_sync(head, skip=micro < accumulate - 1):
            outputs = head(_rows(features, part))
            outputs = outputs if isinstance(outputs, Mapping) else {"": outputs}
            losses = [F.cross_entropy(logits, target[part], reduction="sum") for logits in outputs.values()]
            loss = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
            (loss * (parts / max(total, 1))).backward()
        summed += loss.detach().double() / len(losses)
        for key, logits in outputs.items():
            collected.setdefault(key, []).append(logits.detach())
    optimizer.step()
    return {key: torch.cat(values) for key, values in collected.items()}, summed


@torch.no_grad()
def evaluate(head: nn.Module, batches: Iterable[tuple[Features, torch.Tensor]]) -> dict:
    """Top-1 / top-5 accuracy and mean cross-entropy of ``head`` over every batch.

    Args:
        head: the module, on the batches' device (a ``HeadGrid`` is scored head by head).
        batches: ``({(b, t): (n, C, h, w)}, (n,) int64 labels)``, e.g. ``tensor_batches(...)``; in a
            distributed run this rank's share (every rank calls it; the counts are summed over ranks).

    Returns:
        ``{"top1", "top5", "loss"}`` as fractions / mean; top-5 is top-k with k = min(5, classes).
        For a module returning ``{key: logits}``, ``{key: {"top1", "top5", "loss"}}``.

    Raises:
        ProbeError: no rows at all.
    """
    head.eval()
    totals: dict[str, list[float]] = {}
    num_rows = 0
    single = True
    for features, target in batches:
        outputs = head(features)
        single = not isinstance(outputs, Mapping)
        for key, logits in ({"": outputs} if single else outputs).items():
            logits = logits.float()
            best = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = best == target[:, None]
            sums = totals.setdefault(key, [0.0, 0.0, 0.0])
            sums[0] += hits[:, 0].sum().item()
            sums[1] += hits.any(dim=1).sum().item()
            sums[2] += F.cross_entropy(logits, target, reduction="sum").item()
        num_rows += target.shape[0]
    if distributed.active():  # every rank scored its share: add the counts (exact), then divide once
        keys = sorted(totals)
        sums = torch.tensor([v for key in keys for v in totals[key]] + [num_rows], dtype=torch.float64)
        sums = distributed.all_reduce_sum(sums).tolist()
        totals = {key: sums[3 * i:3 * i + 3] for i, key in enumerate(keys)}
        num_rows = int(sums[-1])
    if num_rows == 0:
        raise ProbeError("no rows to evaluate: the test split is empty or every image was invalid")
    scores = {key: {"top1": a / num_rows, "top5": b / num_rows, "loss": c / num_rows} for key, (a, b, c) in totals.items()}
    return scores[""] if single else scores


def _as_inputs(features: Features, labels: torch.Tensor, device: torch.device) -> tuple[Features, torch.Tensor]:
    """Features on ``device`` in their own dtype (float16 from the cache stays float16), int64 labels."""
    moved = {key: value.to(device) for key, value in features.items()}
    return (ViewStack(moved) if isinstance(features, ViewStack) else moved), labels.to(device, torch.long)


def _float_batches(batches, device: torch.device):
    for features, labels in batches:
        yield {key: value.to(device).float() for key, value in features.items()}, labels.to(device, torch.long)


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
    """(batches on the device, number of batches) of one epoch of tensors or of a streamed source.

    In a distributed run every batch is this rank's contiguous share of the global batch (the number of
    batches is the global one: every rank steps together)."""
    ranks = distributed.active()
    if isinstance(data, Mapping):
        num_rows = _num_rows(data, labels)
        order = epoch_order(num_rows, seed, epoch, device) if seed is not None else torch.arange(num_rows, device=device)
        views = None
        if isinstance(data, ViewStack):  # training: one seeded view per row and epoch; scoring: view 0
            views = view_choice(num_rows, data.num_views, seed, epoch, device) if seed is not None else \
                torch.zeros(num_rows, dtype=torch.long, device=device)
        return tensor_batches(data, labels, order, batch_size, views, ranks=ranks), -(-num_rows // batch_size)
    return _float_batches(_source_batches(data, batch_size, seed, epoch, ranks), device), -(-data.num_images // batch_size)


def _source_batches(data, batch_size: int, seed: int | None, epoch: int, ranks: bool):
    """A ``BatchSource``'s batches; in a distributed run this rank's share of each (decoded by the source
    itself when it can, as ``LiveImages`` does, else cut from the global batch)."""
    if not ranks:
        return data.batches(batch_size, seed=seed, epoch=epoch)
    if "ranks" in inspect.signature(data.batches).parameters:
        return data.batches(batch_size, seed=seed, epoch=epoch, ranks=True)
    return ((_rows(features, distributed.share(labels.shape[0])), labels[distributed.share(labels.shape[0])])
            for features, labels in data.batches(batch_size, seed=seed, epoch=epoch))


def _to_device(data, labels, device: torch.device):
    """Tensors move to the device once (in their dtype, int64 labels); streamed sources stay as they are."""
    if not isinstance(data, Mapping):
        return data, None
    _num_rows(data, labels)
    return _as_inputs(data, labels, device)


def _read_checkpoint(path: Path) -> dict:
    """The checkpoint dict, loaded as tensors and plain values only, or one line saying what the file is and what to do."""
    # CPU first: the saved RNG states must stay CPU ByteTensors; load_state_dict moves the rest
    state = load_tensors(path, "delete it to train from the start, or pass another --checkpoint-dir")
    if not isinstance(state, dict) or not {"head", "optimizer", "scheduler", "epoch", "config"} <= set(state):
        raise ProbeError(f"checkpoint {path} is not a diffrep probe checkpoint: delete it or pass another --checkpoint-dir")
    return state


def _differences(saved, asked, name: str = "") -> list[tuple[str, object, object]]:
    """(dotted field, saved, asked) for every leaf that differs; nested dicts are compared field by field."""
    if isinstance(saved, Mapping) and isinstance(asked, Mapping):
        return [d for key in [*asked, *(k for k in saved if k not in asked)]
                for d in _differences(saved.get(key), asked.get(key), f"{name}.{key}" if name else str(key))]
    return [] if saved == asked else [(name, saved, asked)]


def _describe(changed: list[tuple[str, object, object]], limit: int = 4) -> str:
    text = "; ".join(f"{name} {saved!r} saved, {asked!r} asked" for name, saved, asked in changed[:limit])
    return text + (f"; {len(changed) - limit} more" if len(changed) > limit else "")


def _interrupted(path: Path | None, epoch: int, num_epochs: int, kept: int) -> RunInterrupted:
    """The one line of a Ctrl-C in ``epoch`` (0-based; ``num_epochs`` while scoring), ``kept`` epochs on disk."""
    where = f"in epoch {epoch + 1} of {num_epochs}" if epoch < num_epochs else "while scoring the test split"
    if path is None:
        return RunInterrupted(f"interrupted {where}: nothing is kept (no checkpoint folder); the same command starts again")
    if kept == 0:
        return RunInterrupted(f"interrupted {where}, before the first checkpoint: nothing is kept; "
                              f"the same command starts again")
    return RunInterrupted(f"interrupted {where}: the checkpoint of epoch {kept} is in {path.parent}; "
                          f"the same command with --resume continues from it")


def _train_epoch(head, opt, scheduler, history: list, train_x, train_y, config: TrainConfig, epoch: int,
                 num_epochs: int, per_epoch: int, device: torch.device, progress: bool, accumulate: int = 1) -> None:
    """One epoch of ``fit``: its batches (cut short at ``config.steps``), the steps, the schedule, its history row."""
    batches, num_batches = _epoch_batches(train_x, train_y, config.batch_size, config.seed, epoch, device)
    if config.steps is not None and config.steps - epoch * per_epoch < num_batches:
        num_batches = config.steps - epoch * per_epoch
        batches = itertools.islice(batches, num_batches)
    stats = train_one_epoch(head, opt, batches, num_batches, description=f"epoch {epoch + 1}/{num_epochs}",
                            progress=progress, accumulate=accumulate)
    stats = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], **stats}
    scheduler.step()
    history.append(stats)
    log.info("epoch %d/%d: loss %.4f, train acc %.4f", epoch + 1, num_epochs, stats["loss"], stats["acc"])


def fit(
    head: nn.Module,
    train_features: Features | BatchSource,
    train_labels: torch.Tensor | None,
    test_features: Features | BatchSource,
    test_labels: torch.Tensor | None,
    config: TrainConfig = TrainConfig(),
    *,
    device: str | torch.device = "cpu",
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    identity: Mapping | None = None,
    heldout_features: Features | None = None,
    heldout_labels: torch.Tensor | None = None,
    progress: bool = True,
    accumulate: int | None = None,
) -> FitResult:
    """Train ``head`` on the train features by the protocol, then score it on the test features.

    Args:
        head: a module from ``create_head`` (moved to ``device`` here; trained in place), or a
            ``HeadGrid`` (one head per lr, trained in one pass; the best on the held-out rows is scored).
        train_features, test_features: ``{(b, t): (N, C, h, w)}`` float tensors (any device; moved to
            ``device`` once), or a ``BatchSource`` streamed from the cache each epoch (labels None).
        train_labels, test_labels: (N,) int64 class indices for tensors; None for a ``BatchSource``.
        config: epochs, lr, optimizer, schedule, batch size, seed, backbone lr, steps (a grid's lrs are
            its own and ``config.lr`` is ignored; with ``steps``, the epochs are those the steps take,
            the last one cut short).
        device: where the head and the features live during training.
        checkpoint_dir: folder for ``checkpoint.pth`` written after every epoch (None: no checkpoints); a
            fine-tuned backbone is also written there as ``backbone.pt`` in the official layout.
        resume: continue from ``checkpoint_dir/checkpoint.pth`` when it exists.
        identity: what the features are (cache, splits, backbone, blocks, timesteps, head and its
            options); stored in the checkpoint, and a resume with any difference is refused.
        heldout_features, heldout_labels: rows to choose a grid's best head on (required with a grid).
        progress: show a tqdm bar with running loss and accuracy.
        accumulate: micro-batches per optimizer step (None: ``--accumulate`` of the distributed context, 1).

    Under ``torchrun`` (``extract.distributed``) this is one run over every rank: ``config.batch_size``
    is the global batch, each rank takes its contiguous share of each batch of the single-process
    order, the trained parameters are wrapped in DDP (a frozen backbone is not), BatchNorm layers
    use global-batch statistics, scores are summed as counts over ranks, and rank 0 alone writes the
    checkpoint (which any world size resumes from).

    Returns:
        ``FitResult`` with test top-1 / top-5, train seconds (this call), history of every epoch; for a
        grid also the chosen lr and every lr's held-out top-1.

    Raises:
        ProbeError: invalid options, mismatched rows, or a checkpoint written with other settings or for
            other features. CheckpointError: a damaged checkpoint, or one holding objects that are not tensors.
        RunInterrupted: Ctrl-C, saying which epoch's checkpoint is kept and that ``--resume`` continues.
    """
    grid = isinstance(head, HeadGrid)
    if grid:
        config = replace(config, lr=max(head.lrs.values()))
        if heldout_features is None:
            raise ProbeError("a learning-rate grid needs held-out rows to choose on: pass heldout_features")
    saved_config = {**asdict(config), **({"lr_grid": sorted(head.lrs.values())} if grid else {})}
    identity = dict(identity or {})
    device = torch.device(device)
    if isinstance(test_features, Mapping):
        _num_rows(test_features, test_labels)
    head.to(device)
    train_x, train_y = _to_device(train_features, train_labels, device)
    accumulate = distributed.context().accumulate if accumulate is None else int(accumulate)
    distributed.sync_batch_norm(head)  # several ranks: BatchNorm on the global batch (DifFeed's feedback)

    opt = _make_optimizer(head, config)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=config.step_size, gamma=config.gamma)
    history: list[dict] = []
    start_epoch = 0
    path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if resume and path is not None and path.exists():
        state = _read_checkpoint(path)
        for what, saved, asked in (("settings", state["config"], saved_config),
                                   ("features or head", state.get("identity", {}), identity)):
            changed = _differences(saved, asked)
            if changed:
                raise ProbeError(
                    f"checkpoint {path} was trained with other {what} ({_describe(changed)}): pass the same "
                    f"options it was trained with, or another --checkpoint-dir to train anew"
                )
        try:
            head.load_state_dict(state["head"])
        except RuntimeError:
            raise ProbeError(f"checkpoint {path} holds another head's weights: pass another --checkpoint-dir") from None
        opt.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        history = list(state.get("history", []))
        start_epoch = int(state["epoch"]) + 1
        log.info("resuming from %s at epoch %d of %d", path, start_epoch + 1, config.epochs)
    else:
        if resume:
            log.warning("--resume: no checkpoint in %s, training from epoch 1", checkpoint_dir)
        torch.manual_seed(config.seed)
    if path is not None and distributed.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
    trained = distributed.wrap_trained(head, device)  # DDP over what trains (one process: the head itself)

    per_epoch = -(-(train_x.num_images if train_y is None else int(train_y.shape[0])) // config.batch_size)
    num_epochs = config.epochs if config.steps is None else -(-config.steps // per_epoch)
    began = time.perf_counter()
    kept, epoch = start_epoch, start_epoch  # epochs whose checkpoint is on disk; the epoch running
    try:
        for epoch in range(start_epoch, num_epochs):
            _train_epoch(trained, opt, scheduler, history, train_x, train_y, config, epoch, num_epochs, per_epoch,
                         device, progress, accumulate)
            if path is not None and getattr(head, "finetune", False) and distributed.is_main():
                _save(path.parent / BACKBONE_NAME, head.backbone_state_dict())
            if path is not None and distributed.is_main():
                _save(path, {"head": head.state_dict(), "optimizer": opt.state_dict(),
                             "scheduler": scheduler.state_dict(), "epoch": epoch, "config": saved_config,
                             "identity": identity, "rng": _rng_state(), "history": history})
            if path is not None:
                distributed.barrier()  # the epoch is on disk before any rank goes on
                kept = epoch + 1
        train_seconds = time.perf_counter() - began
        epoch = num_epochs
        del train_x, train_y
        chosen_lr, heldout_top1 = config.lr, {}
        if grid:
            held_x, held_y = _to_device(heldout_features, heldout_labels, device)
            held = evaluate(head, _epoch_batches(held_x, held_y, max(config.batch_size, 1024), None, 0, device)[0])
            heldout_top1 = {head.lrs[key]: value["top1"] for key, value in held.items()}
            best = max(held, key=lambda key: (held[key]["top1"], -int(key)))  # ties: the first lr given
            chosen_lr = head.lrs[best]
            head = head.heads[best]
            del held_x, held_y
        test_x, test_y = _to_device(test_features, test_labels, device)
        scores = evaluate(head, _epoch_batches(test_x, test_y, max(config.batch_size, 1024), None, 0, device)[0])
    except RunInterrupted:
        raise
    except KeyboardInterrupt:
        raise _interrupted(path, epoch, num_epochs, kept) from None
    return FitResult(top1=scores["top1"], top5=scores["top5"], test_loss=scores["loss"],
                     train_seconds=train_seconds, epochs=num_epochs, history=history, lr=chosen_lr,
                     heldout_top1=heldout_top1)
