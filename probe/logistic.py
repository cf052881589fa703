"""The converged linear probe: standardised features, multinomial logistic regression by full-batch L-BFGS.

A linear probe is meant to measure the features, not the optimiser. SGD for a fixed number of
epochs converges on ImageNet (10,000 steps an epoch) but not on a few thousand images, where it
reports far less than the features hold. Logistic regression is convex, so full-batch L-BFGS
reaches its optimum whatever the dataset size; this is the protocol of CLIP-style evaluations:

1. standardise every feature with the training split's mean and std;
2. pick the L2 weight from a grid on a seeded, class-balanced held-out part of the training split;
3. refit on the whole training split with that weight; score the test split.

The loss is ``mean cross-entropy + l2 / 2 * ||W||^2`` (the bias is not penalised). Features are
kept in float16 on the training device and cast per chunk of rows, and the loss and gradient are
accumulated over chunks, so the memory limit is the float16 features themselves: b=24 of the
256x256 model at 2x2 (4,096 features) on all 1.28M ImageNet rows is 10.5 GB, which fits a GPU
with 16 GB or more, or a CPU with that much RAM (slowly: each L-BFGS iteration reads every row).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from extract import distributed
from probe.errors import ProbeError
from probe.subsets import heldout_split

__all__ = [
    "DEFAULT_L2_GRID", "Standardizer", "LogisticModel", "fit_logistic", "logistic_loss", "heldout_split",
    "ConvergedProbeResult", "converged_linear_probe",
]

log = logging.getLogger(__name__)

#: L2 weights tried on the held-out part (the issue's measurements put the optimum near 1e-3).
DEFAULT_L2_GRID = (1e-4, 1e-3, 1e-2)


@dataclass(frozen=True)
class Standardizer:
    """Per-feature mean and std of the training rows; applied to every split before the probe."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor, chunk_rows: int = 65536, across_ranks: bool = False) -> "Standardizer":
        """Mean and std of ``x`` (N, D), a chunk of rows at a time (see :meth:`from_batches`)."""
        return cls.from_batches((x[start:start + chunk_rows] for start in range(0, x.shape[0], chunk_rows)),
                                across_ranks)

    @classmethod
    def from_batches(cls, batches: Iterable[torch.Tensor], across_ranks: bool = False) -> "Standardizer":
        """Mean and std (float64 accumulation) over a stream of (n, D) batches; a constant feature gets std 1.

        ``across_ranks``: each rank holds part of the rows; the sums are added over ranks (every rank calls).
        """
        total = squares = None
        count = 0
        for part in batches:
            part = part.double()
            total = part.sum(0) if total is None else total + part.sum(0)
            squares = (part * part).sum(0) if squares is None else squares + (part * part).sum(0)
            count += part.shape[0]
        if across_ranks and distributed.active():
            if total is None:
                raise ProbeError(f"rank {distributed.rank()} holds no training rows: use fewer processes than rows")
            sums = distributed.all_reduce_sum(torch.cat([total, squares, torch.tensor([float(count)], dtype=torch.float64,
                                                                                      device=total.device)]))
            d = total.shape[0]
            total, squares, count = sums[:d], sums[d:2 * d], int(sums[-1].item())
        if count == 0:
            raise ProbeError("no training rows to standardise with: the train split is empty or every image was invalid")
        mean = total / count
        std = (squares / count - mean * mean).clamp_min(0).sqrt()
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        return cls(mean.float(), std.float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


@dataclass
class LogisticModel:
    """Weights of a fitted probe: logits = standardize(x) @ weight.T + bias."""

    weight: torch.Tensor  # (classes, D) float32
    bias: torch.Tensor  # (classes,) float32
    standardizer: Standardizer
    l2: float
    loss: float  # final training objective (float64 accumulation)
    iterations: int

    @torch.no_grad()
    def logits(self, x: torch.Tensor, chunk_rows: int = 65536) -> torch.Tensor:
        """(N, classes) float32 logits of raw features ``x`` (N, D), computed in chunks."""
        parts = [self.standardizer(x[s:s + chunk_rows].to(self.weight.device)) @ self.weight.T + self.bias
                 for s in range(0, x.shape[0], chunk_rows)]
        return torch.cat(parts) if parts else torch.zeros(0, self.weight.shape[0], device=self.weight.device)


def logistic_loss(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor, l2: float,
                  standardizer: Standardizer | None = None, chunk_rows: int = 65536,
                  backward: bool = False, across_ranks: bool = False) -> float:
    """The probe's objective ``mean CE + l2/2 ||W||^2``, accumulated in float64 over chunks of rows.

    With ``backward`` the gradients of weight and bias are accumulated into their ``.grad``. With
    ``across_ranks`` each rank holds a share of the rows: the cross-entropy is divided by every
    rank's rows together and its value and gradients are summed over ranks (every rank calls), so
    each rank gets the objective and gradient of all rows; the penalty is added once.
    """
    sharded = across_ranks and distributed.active()
    n = distributed.global_count(x.shape[0]) if sharded else x.shape[0]
    if sharded and backward:
        for p in (weight, bias):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    total = 0.0
    for start in range(0, n, chunk_rows):
        part = x[start:start + chunk_rows]
        part = standardizer(part) if standardizer is not None else part.float()
        logits = part @ weight.T + bias
        loss = F.cross_entropy(logits, y[start:start + chunk_rows], reduction="sum") / n
        if backward:
            loss.backward()
        total += float(loss.detach().double())
    if sharded:
        value = torch.tensor([total], dtype=torch.float64, device=weight.device)
        if backward:
            flat = distributed.all_reduce_sum(torch.cat([weight.grad.reshape(-1).double(), bias.grad.double(), value]))
            weight.grad.copy_(flat[:weight.numel()].view_as(weight))
            bias.grad.copy_(flat[weight.numel():weight.numel() + bias.numel()])
            total = float(flat[-1])
        else:
            total = float(distributed.all_reduce_sum(value)[0])
    penalty = 0.5 * l2 * (weight * weight).sum()
    if backward:
        penalty.backward()
    return total + float(penalty.detach().double())


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, *,
                 standardizer: Standardizer | None = None, max_iter: int = 1000, tolerance: float = 1e-7,
                 init: LogisticModel | None = None, chunk_rows: int = 65536,
                 across_ranks: bool = False) -> LogisticModel:
    """Multinomial logistic regression on features ``x`` by full-batch L-BFGS (strong Wolfe line search).

    Args:
        x: (N, D) raw features (float16 or float32) on the training device. y: (N,) int64 labels.
        num_classes: classes. l2: L2 weight of ``l2/2 ||W||^2``.
        standardizer: statistics to standardise with (None: fit them on ``x``).
        max_iter: L-BFGS iterations at most. tolerance: stop when the gradient's largest entry, or
            the change of the objective between iterations, falls below it.
        init: warm start (e.g. the fit of a neighbouring L2 weight).
        across_ranks: each rank holds a share of the rows (``extract.distributed``); loss and gradient
            are summed over ranks, so every rank takes the same L-BFGS steps as one process on all rows.

    Returns:
        The fitted :class:`LogisticModel`.
    """
    if x.shape[0] == 0:
        raise ProbeError("no training rows for the linear probe: the train split is empty or every image was invalid")
    standardizer = standardizer or Standardizer.fit(x, across_ranks=across_ranks)
    device = x.device
    if init is not None:
        weight = init.weight.detach().clone().to(device).requires_grad_(True)
        bias = init.bias.detach().clone().to(device).requires_grad_(True)
    else:
        weight = torch.zeros(num_classes, x.shape[1], device=device, requires_grad=True)
        bias = torch.zeros(num_classes, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=tolerance, tolerance_change=tolerance * 1e-3,
                                  line_search_fn="strong_wolfe")
    evaluations = 0

    def closure():
        nonlocal evaluations
        evaluations += 1
        optimizer.zero_grad(set_to_none=False)
        value = logistic_loss(weight, bias, x, y, l2, standardizer, chunk_rows, backward=True, across_ranks=across_ranks)
        return torch.tensor(value, dtype=torch.float32)

    optimizer.step(closure)
    state = optimizer.state[optimizer._params[0]]
    with torch.no_grad():
        final = logistic_loss(weight, bias, x, y, l2, standardizer, chunk_rows, across_ranks=across_ranks)
    return LogisticModel(weight.detach(), bias.detach(), standardizer, float(l2), final, int(state.get("n_iter", evaluations)))


@torch.no_grad()
def _scores(model: LogisticModel, x: torch.Tensor, y: torch.Tensor, across_ranks: bool = False) -> dict[str, float]:
    """Top-1, top-5 and mean loss; ``across_ranks``: each rank scored its share, the counts are summed."""
    logits = model.logits(x)
    best = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = best == y.to(logits.device)[:, None]
    counts = torch.tensor([hits[:, 0].sum().item(), hits.any(dim=1).sum().item(),
                           F.cross_entropy(logits, y.to(logits.device), reduction="sum").item(), y.shape[0]],
                          dtype=torch.float64)
    if across_ranks:
        counts = distributed.all_reduce_sum(counts)
    top1, top5, loss, n = counts.tolist()
    n = max(n, 1)
    return {"top1": top1 / n, "top5": top5 / n, "loss": loss / n}


@dataclass
class ConvergedProbeResult:
    """Test scores of the refitted probe, the chosen L2, and what the selection saw."""

    top1: float
    top5: float
    test_loss: float
    l2: float
    train_loss: float
    heldout_size: int
    heldout_top1: dict[float, float] = field(default_factory=dict)
    iterations: int = 0
    train_seconds: float = 0.0
    model: LogisticModel | None = None


def converged_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                           num_classes: int, *, l2_grid: Sequence[float] = DEFAULT_L2_GRID,
                           heldout_fraction: float = 0.2, seed: int = 0, max_iter: int = 1000,
                           tolerance: float = 1e-7, device: str | torch.device = "cpu",
                           across_ranks: bool = False) -> ConvergedProbeResult:
    """Standardise, pick the L2 weight on a held-out part of the train split, refit on all of it, score test.

    Args:
        train_x, test_x: (N, D) features (any float dtype; kept float16 on ``device``, cast per chunk).
        train_y, test_y: (N,) int64 labels. num_classes: classes.
        l2_grid: L2 weights to try; a single value skips the selection.
        heldout_fraction: share of every class held out for the selection. seed: which rows.
        across_ranks: a distributed run (every rank calls with the same splits): each rank keeps only
            its contiguous share of the fit, held-out and test rows on its device; loss and gradient
            are all-reduced, scores summed as counts. The fit equals the one-process fit (to the
            solver's tolerance: the sums are added in another order).

    Returns:
        :class:`ConvergedProbeResult` (accuracies as fractions).
    """
    device = torch.device(device)
    began = time.perf_counter()
    grid = sorted({float(v) for v in l2_grid}, reverse=True)  # strongest first: each warm-starts the next
    if not grid or any(v < 0 for v in grid):
        raise ProbeError(f"L2 grid {list(l2_grid)} must hold non-negative weights, e.g. 1e-4,1e-3,1e-2")
    store = torch.float16 if device.type == "cuda" or train_x.dtype == torch.float16 else torch.float32
    sharded = across_ranks and distributed.active()
    mine = (lambda n: distributed.share(n)) if sharded else (lambda n: slice(None))
    full_x, full_y = train_x, train_y
    train_x, train_y = train_x[mine(train_x.shape[0])], train_y[mine(train_y.shape[0])]
    test_x, test_y = test_x[mine(test_x.shape[0])], test_y[mine(test_y.shape[0])]
    x = train_x.to(device, store)
    y = train_y.to(device, torch.long)
    heldout_top1: dict[float, float] = {}
    fit_rows, held_rows = heldout_split(full_y, heldout_fraction, seed) if len(grid) > 1 else (None, np.zeros(0))
    if len(grid) > 1 and len(held_rows) == 0:
        raise ProbeError("the train split is too small to hold out rows for choosing the L2 weight: "
                         "pass a single --l2 value or use more training images")
    if len(grid) > 1:
        fit_rows, kept_held = fit_rows[mine(len(fit_rows))], held_rows[mine(len(held_rows))]
        fit_index, held_index = torch.from_numpy(fit_rows), torch.from_numpy(kept_held)
        fx, fy = full_x[fit_index].to(device, store), full_y[fit_index].to(device, torch.long)
        hx, hy = full_x[held_index].to(device, store), full_y[held_index].to(device, torch.long)
        standardizer = Standardizer.fit(fx, across_ranks=sharded)
        previous = None
        fits = {}
        for l2 in grid:
            model = fit_logistic(fx, fy, num_classes, l2, standardizer=standardizer, max_iter=max_iter,
                                 tolerance=tolerance, init=previous, across_ranks=sharded)
            previous = fits[l2] = model
            heldout_top1[l2] = _scores(model, hx, hy, sharded)["top1"]
            log.info("L2 %.0e: held-out top-1 %.4f (%d iterations)", l2, heldout_top1[l2], model.iterations)
        best = max(grid, key=lambda v: (heldout_top1[v], v))  # ties go to the stronger penalty
        warm = fits[best]  # the refit on all rows starts from the chosen fit: the same optimum, fewer iterations
        del fx, fy, hx, hy
    else:
        best, warm = grid[0], None
    model = fit_logistic(x, y, num_classes, best, max_iter=max_iter, tolerance=tolerance, init=warm,
                         across_ranks=sharded)
    seconds = time.perf_counter() - began
    scores = _scores(model, test_x.to(device, store), test_y.to(device, torch.long), sharded)
    return ConvergedProbeResult(top1=scores["top1"], top5=scores["top5"], test_loss=scores["loss"], l2=best,
                                train_loss=model.loss, heldout_size=int(len(held_rows)), heldout_top1=heldout_top1,
                                iterations=model.iterations, train_seconds=seconds, model=model)
