"""Cross-validated accuracy of features on one split: seeded stratified folds, each scored by kNN or the converged linear probe fitted on the others.

A search that scores a (b, t) on a few images per class must use every image it paid a forward
for, to fit and to score, and must not touch the test split it will be judged on: k-fold
cross-validation does both. Folds are drawn per class (a seeded shuffle of each class dealt out
round-robin), so every fold holds about 1/k of every class. The two scorers are the ones the
sweep uses: weighted kNN (cosine, k neighbours, standardised with the fitting folds' statistics)
and the converged linear probe (``probe.logistic``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from probe.errors import ProbeError
from probe.knn import knn_classify
from probe.logistic import Standardizer, converged_linear_probe

__all__ = ["SCORERS", "CrossValScore", "stratified_folds", "cross_validate"]

SCORERS = ("knn", "linear")


@dataclass(frozen=True)
class CrossValScore:
    """Accuracies (fractions) over every row, each row scored by the model fitted without its fold."""

    top1: float
    top5: float
    rows: int
    folds: int


def stratified_folds(labels: np.ndarray | torch.Tensor, folds: int, seed: int) -> np.ndarray:
    """(N,) fold number of every row: each class shuffled with the seed, then dealt to the folds in turn.

    Raises:
        ProbeError: fewer than 2 folds, or more folds than rows.
    """
    labels = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels)
    if folds < 2 or folds > len(labels):
        raise ProbeError(f"cross-validation needs 2 to {len(labels)} folds on {len(labels)} rows, got {folds}: "
                         f"pass --folds 5 or use more images")
    rng = np.random.default_rng([int(seed), 0x666f_6c64])
    out = np.empty(len(labels), dtype=np.int64)
    start = int(rng.integers(folds))  # classes do not all begin with fold 0, so fold sizes stay even
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        out[members] = (start + np.arange(len(members))) % folds
        start = (start + len(members)) % folds
    return out


def cross_validate(x: torch.Tensor, y: torch.Tensor, num_classes: int, scorer: str = "knn", *, folds: int = 5,
                   seed: int = 0, k: int = 20, l2_grid: Sequence[float] = (1e-3,),
                   device: str | torch.device = "cpu") -> CrossValScore:
    """k-fold accuracy of ``scorer`` on features ``x`` (N, D) with labels ``y`` (N,).

    Args:
        scorer: ``knn`` (weighted kNN at ``k``, standardised) or ``linear`` (converged probe; ``l2_grid``
            of one value skips its held-out choice, several choose on a held-out part of the fitting folds).
        folds, seed: how many stratified folds, drawn how.

    Returns:
        :class:`CrossValScore`.

    Raises:
        ProbeError: an unknown scorer, or folds that do not fit the rows.
    """
    if scorer not in SCORERS:
        raise ProbeError(f"unknown scorer {scorer!r}: choose one of {', '.join(SCORERS)}")
    device = torch.device(device)
    y = y.long()
    assignment = torch.from_numpy(stratified_folds(y, folds, seed))
    hits1 = hits5 = 0.0
    for fold in range(folds):
        held = assignment == fold
        if not bool(held.any()):
            continue
        fit_x, fit_y, held_x, held_y = x[~held], y[~held], x[held], y[held]
        if scorer == "knn":
            scale = Standardizer.fit(fit_x)
            scale = Standardizer(scale.mean.to(device), scale.std.to(device))
            scores = knn_classify(fit_x, fit_y, held_x, held_y, num_classes, ks=(k,), device=device,
                                  transform=scale)[k]
            top1, top5 = scores["top1"], scores["top5"]
        else:
            result = converged_linear_probe(fit_x, fit_y, held_x, held_y, num_classes, l2_grid=l2_grid, seed=seed,
                                            device=device)
            top1, top5 = result.top1, result.top5
        hits1 += top1 * int(held.sum())
        hits5 += top5 * int(held.sum())
    rows = int(y.shape[0])
    return CrossValScore(top1=hits1 / rows, top5=hits5 / rows, rows=rows, folds=folds)
