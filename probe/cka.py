"""Centered kernel alignment between cached feature arrays: full-batch linear CKA and the minibatch unbiased-HSIC estimator.

Both flatten each image's features into one row. ``linear_cka`` is Kornblith et al. (2019):
``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred X, Y, computed through
whichever of the (n x n) Gram or (p x q) cross-covariance forms is smaller. ``MinibatchCKA``
is Nguyen et al. (2021): per minibatch the unbiased HSIC estimator of Song et al. (2012) on the
linear kernels, summed over minibatches, ``CKA = sum HSIC(K, L) / sqrt(sum HSIC(K, K) sum HSIC(L, L))``;
it needs only one minibatch of every array in memory at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from .errors import ProbeError

__all__ = ["linear_cka", "gram", "hsic_unbiased", "MinibatchCKA", "cka_matrix"]


def _rows(x) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    return x.reshape(x.shape[0], -1).double()


def linear_cka(x, y) -> float:
    """Full-batch linear CKA of two representations of the same n images.

    Args:
        x: (n, ...) array or tensor (flattened to (n, p)). y: (n, ...) (flattened to (n, q)).

    Returns:
        CKA in [0, 1]; 1 for representations equal up to an orthogonal transform and isotropic scale.

    Raises:
        ProbeError: different numbers of rows, fewer than 2 rows, or a constant representation.
    """
    x, y = _rows(x), _rows(y)
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ProbeError(f"CKA compares the same images: got {x.shape[0]} and {y.shape[0]} rows (need equal, >= 2)")
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    n, p, q = x.shape[0], x.shape[1], y.shape[1]
    if n * n <= p * q:
        k, l = x @ x.T, y @ y.T
        cross, self_x, self_y = (k * l).sum(), (k * k).sum(), (l * l).sum()
    else:
        cross = ((y.T @ x) ** 2).sum()
        self_x, self_y = ((x.T @ x) ** 2).sum(), ((y.T @ y) ** 2).sum()
    denominator = (self_x * self_y).sqrt()
    if denominator == 0:
        raise ProbeError("CKA is undefined for a constant representation (all rows equal): pick another array")
    return float(cross / denominator)


def gram(x) -> torch.Tensor:
    """Linear kernel: (n, ...) -> (n, n) float64 ``X X^T`` of the flattened rows."""
    x = _rows(x)
    return x @ x.T


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC estimator (Song et al. 2012) of two (n, n) kernel matrices, n >= 4.

    ``[tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))`` with zeroed diagonals.
    """
    n = k.shape[0]
    if n < 4:
        raise ProbeError(f"the unbiased HSIC needs at least 4 rows per minibatch, got {n}: use a larger batch size")
    k = k.clone().fill_diagonal_(0)
    l = l.clone().fill_diagonal_(0)
    trace = (k * l).sum()
    k_sum, l_sum = k.sum(), l.sum()
    middle = k_sum * l_sum / ((n - 1) * (n - 2))
    last = 2.0 / (n - 2) * (k.sum(dim=0) @ l.sum(dim=1))
    return (trace + middle - last) / (n * (n - 3))


class MinibatchCKA:
    """Accumulates the minibatch CKA estimator between every pair of ``num_arrays`` arrays.

    Feed the same images' rows of every array with ``update`` (one minibatch at a time); read the
    (num_arrays, num_arrays) matrix with ``compute``. Minibatches of fewer than 4 rows are skipped.
    """

    def __init__(self, num_arrays: int):
        self.num_arrays = num_arrays
        self.hsic = torch.zeros(num_arrays, num_arrays, dtype=torch.float64)
        self.batches = 0

    def update(self, batch: Sequence) -> None:
        """Args: batch: one (m, ...) array or tensor per array, the same m images in the same order."""
        if len(batch) != self.num_arrays:
            raise ProbeError(f"expected {self.num_arrays} arrays in a minibatch, got {len(batch)}")
        rows = {int(x.shape[0]) for x in batch}
        if len(rows) != 1:
            raise ProbeError(f"minibatch arrays have different row counts {sorted(rows)}: feed the same images to every array")
        if rows.pop() < 4:
            return
        grams = [gram(x) for x in batch]
        for i in range(self.num_arrays):
            for j in range(i, self.num_arrays):
                value = hsic_unbiased(grams[i], grams[j])
                self.hsic[i, j] += value
                if i != j:
                    self.hsic[j, i] += value
        self.batches += 1

    def compute(self) -> np.ndarray:
        """(num_arrays, num_arrays) float64 CKA matrix (diagonal 1)."""
        if self.batches == 0:
            raise ProbeError("no minibatch of at least 4 images was fed to CKA: give more images")
        diagonal = self.hsic.diagonal().clamp_min(1e-300)
        return (self.hsic / (diagonal[:, None] * diagonal[None, :]).sqrt()).numpy()


def cka_matrix(
    arrays: Sequence | None = None,
    batches: Iterable[Sequence] | None = None,
    estimator: str = "minibatch",
    batch_size: int = 256,
) -> np.ndarray:
    """CKA between every pair of arrays holding the same images.

    Args:
        arrays: (N, ...) arrays or tensors in memory (one per representation), or None with ``batches``.
        batches: instead of ``arrays``, an iterable of minibatches (one (m, ...) piece per array),
            e.g. streamed from the cache; only ``estimator="minibatch"``.
        estimator: ``minibatch`` (unbiased HSIC summed over minibatches) or ``linear`` (full batch).
        batch_size: rows per minibatch when ``arrays`` are given.

    Returns:
        (A, A) float64 matrix.
    """
    if estimator not in ("minibatch", "linear"):
        raise ProbeError(f"invalid CKA estimator {estimator!r}: choose minibatch or linear")
    if (arrays is None) == (batches is None):
        raise ProbeError("give CKA either arrays or batches, not both")
    if estimator == "linear":
        if arrays is None:
            raise ProbeError("the full-batch linear CKA needs the arrays in memory: pass arrays, or estimator='minibatch'")
        size = len(arrays)
        out = np.eye(size)
        for i in range(size):
            for j in range(i + 1, size):
                out[i, j] = out[j, i] = linear_cka(arrays[i], arrays[j])
        return out
    if arrays is not None:
        num_rows = int(arrays[0].shape[0])
        batches = ([a[s:s + batch_size] for a in arrays] for s in range(0, num_rows, batch_size))
    accumulator = None
    for batch in batches:
        if accumulator is None:
            accumulator = MinibatchCKA(len(batch))
        accumulator.update(batch)
    if accumulator is None:
        raise ProbeError("no minibatch was fed to CKA: give more images")
    return accumulator.compute()
