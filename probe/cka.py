"""Centered kernel alignment between cached feature arrays: full-batch linear CKA and the minibatch unbiased-HSIC estimator.

Both flatten each image's features into one row. ``linear_cka`` is Kornblith et al. (2019):
``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred X, Y, computed through
whichever of the (n x n) Gram or (p x q) cross-covariance forms is smaller. ``MinibatchCKA``
is Nguyen et al. (2021): per minibatch the unbiased HSIC estimator of Song et al. (2012) on the
linear kernels, summed over minibatches, ``CKA = sum HSIC(K, L) / sqrt(sum HSIC(K, K) sum HSIC(L, L))``;
it needs only one minibatch of every array in memory at a time.

Both run on the training device: features stay as given (float16 from the cache) and are cast to
float32 a chunk at a time for the matrix products (TF32 off), whose results are summed in float64
(float64 input is computed in float64). Minibatches are drawn seeded at random: indexes are sorted by class, and a minibatch of one class
measures within-class similarity only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from probe.errors import ProbeError

__all__ = ["linear_cka", "gram", "hsic_unbiased", "MinibatchCKA", "cka_matrix"]


_CHUNK_VALUES = 1 << 24  # float32 values of one chunk moved to the device (64 MiB)


def _rows(x) -> torch.Tensor:
    """(n, ...) array or tensor -> (n, p) tensor in its own dtype (no copy of the whole split in float32)."""
    x = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(np.asarray(x)))
    return x.reshape(x.shape[0], -1)


def _work(x: torch.Tensor) -> torch.dtype:
    """Product dtype: float32 for cached (float16) or float32 features; float64 input keeps float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def _full_float32(device: torch.device):
    """Matrix products in true float32 on CUDA (TF32 keeps 10 mantissa bits: too few for CKA's sums)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _column_mean(x: torch.Tensor, device: torch.device, chunk: int) -> torch.Tensor:
    """(p,) column means of (n, p) ``x`` in its product dtype, summed in float64 a chunk of rows at a time."""
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=device)
    for start in range(0, x.shape[0], chunk):
        total += x[start:start + chunk].to(device).double().sum(0)
    return (total / x.shape[0]).to(_work(x))


def _centered_gram(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(n, n) float64 ``Xc Xc^T``: float32 products over chunks of columns, summed in float64."""
    n = x.shape[0]
    mean = _column_mean(x, device, max(1, _CHUNK_VALUES // max(1, x.shape[1])))
    gram_ = torch.zeros(n, n, dtype=torch.float64, device=device)
    width = max(1, _CHUNK_VALUES // n)
    for start in range(0, x.shape[1], width):
        part = x[:, start:start + width].to(device, _work(x)) - mean[start:start + width]
        gram_ += (part @ part.T).double()
    return gram_


def _cross_covariances(x: torch.Tensor, y: torch.Tensor, device: torch.device):
    """(Yc^T Xc, Xc^T Xc, Yc^T Yc) in float64: float32 products over chunks of rows, summed in float64."""
    p, q = x.shape[1], y.shape[1]
    chunk = max(1, _CHUNK_VALUES // (p + q))
    mean_x, mean_y = _column_mean(x, device, chunk), _column_mean(y, device, chunk)
    sums = [torch.zeros(q, p, dtype=torch.float64, device=device), torch.zeros(p, p, dtype=torch.float64, device=device),
            torch.zeros(q, q, dtype=torch.float64, device=device)]
    for start in range(0, x.shape[0], chunk):
        xc = x[start:start + chunk].to(device, _work(x)) - mean_x
        yc = y[start:start + chunk].to(device, _work(y)) - mean_y
        for total, (a, b) in zip(sums, ((yc, xc), (xc, xc), (yc, yc))):
            total += (a.T @ b).double()
    return sums


def linear_cka(x, y, device: str | torch.device = "cpu") -> float:
    """Full-batch linear CKA of two representations of the same n images.

    Args:
        x: (n, ...) array or tensor (flattened to (n, p)). y: (n, ...) (flattened to (n, q)).
            Any float dtype; cast to float32 a chunk at a time on ``device``.
        device: where the products run (float32, TF32 off, summed in float64).

    Returns:
        CKA in [0, 1]; 1 for representations equal up to an orthogonal transform and isotropic scale.

    Raises:
        ProbeError: different numbers of rows, fewer than 2 rows, or a constant representation.
    """
    x, y = _rows(x), _rows(y)
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ProbeError(f"CKA compares the same images: got {x.shape[0]} and {y.shape[0]} rows (need equal, >= 2)")
    device = torch.device(device)
    n, p, q = x.shape[0], x.shape[1], y.shape[1]
    with torch.no_grad(), _full_float32(device):
        if n * n <= p * q:
            k, l = _centered_gram(x, device), _centered_gram(y, device)
            cross, self_x, self_y = (k * l).sum(), (k * k).sum(), (l * l).sum()
        else:
            yx, xx, yy = _cross_covariances(x, y, device)
            cross, self_x, self_y = (yx ** 2).sum(), (xx ** 2).sum(), (yy ** 2).sum()
    denominator = (self_x * self_y).sqrt()
    if denominator == 0:
        raise ProbeError("CKA is undefined for a constant representation (all rows equal): pick another array")
    return float(cross / denominator)


def gram(x, device: str | torch.device = "cpu") -> torch.Tensor:
    """Linear kernel of one minibatch: (n, ...) -> (n, n) float64 ``Xc Xc^T``, rows flattened.

    Columns are centred first (the unbiased HSIC does not change, and float32 loses less); the
    product runs in float32 on ``device`` and is returned in float64 for the HSIC sums.
    """
    device = torch.device(device)
    x = _rows(x)
    x = x.to(device, _work(x))
    x = x - x.mean(dim=0, keepdim=True)
    with _full_float32(device):
        return (x @ x.T).double()


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

    def __init__(self, num_arrays: int, device: str | torch.device = "cpu"):
        self.num_arrays = num_arrays
        self.device = torch.device(device)
        self.hsic = torch.zeros(num_arrays, num_arrays, dtype=torch.float64, device=self.device)
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
        grams = [gram(x, self.device) for x in batch]
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
        hsic = self.hsic.cpu()
        diagonal = hsic.diagonal().clamp_min(1e-300)
        return (hsic / (diagonal[:, None] * diagonal[None, :]).sqrt()).numpy()


def cka_matrix(
    arrays: Sequence | None = None,
    batches: Iterable[Sequence] | None = None,
    estimator: str = "minibatch",
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """CKA between every pair of arrays holding the same images.

    Args:
        arrays: (N, ...) arrays or tensors in memory (one per representation), or None with ``batches``.
        batches: instead of ``arrays``, an iterable of minibatches (one (m, ...) piece per array),
            e.g. streamed from the cache (mixed across classes: ``StreamedFeatures``); only ``estimator="minibatch"``.
        estimator: ``minibatch`` (unbiased HSIC summed over minibatches) or ``linear`` (full batch).
        batch_size: rows per minibatch when ``arrays`` are given.
        seed: the minibatches of ``arrays`` are a seeded random partition of the rows (never
            consecutive rows: a class-sorted split would give one-class minibatches).
        device: where the products run (float32, summed in float64).

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
                out[i, j] = out[j, i] = linear_cka(arrays[i], arrays[j], device=device)
        return out
    if arrays is not None:
        tensors = [_rows(a) for a in arrays]
        order = torch.randperm(int(tensors[0].shape[0]), generator=torch.Generator().manual_seed(int(seed)))
        batches = ([a[index] for a in tensors] for index in order.split(batch_size))
    accumulator = None
    for batch in batches:
        if accumulator is None:
            accumulator = MinibatchCKA(len(batch), device)
        accumulator.update(batch)
    if accumulator is None:
        raise ProbeError("no minibatch was fed to CKA: give more images")
    return accumulator.compute()
