"""Weighted k-nearest-neighbour classification on cached features (cosine similarity, temperature 0.07).

As in DINOv2's evaluation, every k comes from one top-``max(ks)`` search: each neighbour votes for
its class with weight ``exp(cos / T)`` and the top-1 / top-5 of the summed votes are scored. Memory
stays bounded: the train side arrives in chunks (a tensor is split, or any iterable of chunks, such
as a cache streamed shard by shard), the test side stays in its dtype (float16 from the cache) and is
cast and normalised ``test_chunk`` rows at a time, and only the running best ``max(ks)`` similarities
and labels per test row are kept. The train side is used whole: kNN draws no subset of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.nn import functional as F

from probe.errors import ProbeError

__all__ = ["DEFAULT_KS", "knn_classify", "knn_votes"]

DEFAULT_KS = (10, 20, 100, 200)


def _chunks(features: torch.Tensor, labels: torch.Tensor, size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, features.shape[0], size):
        yield features[start:start + size], labels[start:start + size]


def _normalize(x: torch.Tensor, device: torch.device, transform: Callable | None = None) -> torch.Tensor:
    """One chunk of rows as float32 unit vectors on ``device`` (after ``transform``, e.g. standardisation)."""
    x = x.to(device).flatten(1).float()
    return F.normalize(transform(x) if transform is not None else x, dim=1)


@torch.no_grad()
def knn_votes(
    train: torch.Tensor | Iterable[tuple[torch.Tensor, torch.Tensor]],
    train_labels: torch.Tensor | None,
    test_features: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    train_chunk: int = 8192,
    test_chunk: int = 1024,
    device: str | torch.device = "cpu",
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[int, torch.Tensor]:
    """Class votes of the k nearest train rows for every test row, for every k.

    Args:
        train: (N, ...) train features, or an iterable of ``(features (n, ...), labels (n,))`` chunks
            (then ``train_labels`` is None). Each row is flattened and L2-normalised.
        train_labels: (N,) int64 when ``train`` is a tensor.
        test_features: (M, ...) test features.
        num_classes: width of the vote vectors.
        ks: neighbour counts; a k larger than N uses all N train rows.
        temperature: votes weigh ``exp(cosine / temperature)``.
        train_chunk: train rows per similarity block when ``train`` is a tensor.
        test_chunk: test rows per similarity block.
        device: where similarities are computed.
        transform: applied to every chunk of flattened float32 rows, train and test, before the
            normalisation (e.g. a ``Standardizer``); the splits themselves stay in their dtype.

    Returns:
        ``{k: (M, num_classes) float32 votes}`` on the CPU.

    Raises:
        ProbeError: empty inputs, mismatched widths, or a label outside 0..num_classes-1.
    """
    device = torch.device(device)
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ProbeError(f"k values must be positive, got {list(ks)}: pass e.g. 10,20,100,200")
    if isinstance(train, torch.Tensor):
        if train_labels is None or train_labels.shape[0] != train.shape[0]:
            raise ProbeError("train features and train labels have different numbers of rows: load them from one split")
        train = _chunks(train, train_labels, train_chunk)
    test = test_features.to(device).flatten(1)  # as given (float16 from the cache): cast one chunk at a time
    num_test, max_k = test.shape[0], ks[-1]
    best_sim = torch.full((num_test, max_k), float("-inf"), device=device)
    best_label = torch.zeros((num_test, max_k), dtype=torch.long, device=device)
    num_train = 0
    for features, labels in train:
        features = _normalize(features, device, transform)
        labels = labels.to(device, torch.long)
        if features.shape[1] != test.shape[1]:
            raise ProbeError(f"train rows have {features.shape[1]} values, test rows {test.shape[1]}: use the same (b, t, pool)")
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ProbeError(f"train labels must lie in 0..{num_classes - 1}: pass the dataset's number of classes")
        num_train += features.shape[0]
        for start in range(0, num_test, test_chunk):
            rows = slice(start, start + test_chunk)
            sim = _normalize(test[rows], device, transform) @ features.T
            merged_sim = torch.cat([best_sim[rows], sim], dim=1)
            merged_label = torch.cat([best_label[rows], labels.expand(sim.shape[0], -1)], dim=1)
            top_sim, top_index = merged_sim.topk(max_k, dim=1)
            best_sim[rows] = top_sim
            best_label[rows] = merged_label.gather(1, top_index)
    if num_train == 0 or num_test == 0:
        raise ProbeError(f"kNN needs train and test rows, got {num_train} and {num_test}: check the cache splits")
    weights = (best_sim / temperature).exp()  # exp(-inf) = 0 where fewer than max_k train rows exist
    votes = {}
    for k in ks:
        out = torch.zeros((num_test, num_classes), device=device)
        out.scatter_add_(1, best_label[:, :k], weights[:, :k])
        votes[k] = out.cpu()
    return votes


def knn_classify(
    train: torch.Tensor | Iterable[tuple[torch.Tensor, torch.Tensor]],
    train_labels: torch.Tensor | None,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    **vote_options: Any,
) -> dict[int, dict[str, float]]:
    """Top-1 and top-5 accuracy of the weighted kNN classifier at every k.

    Args:
        train, train_labels, test_features, num_classes: as in ``knn_votes``.
        test_labels: (M,) int64.
        vote_options: ``ks``, ``temperature``, ``train_chunk``, ``test_chunk``, ``device``, ``transform`` of ``knn_votes``.

    Returns:
        ``{k: {"top1": fraction, "top5": fraction}}`` (top-5 is top-min(5, classes)).
    """
    votes = knn_votes(train, train_labels, test_features, num_classes, **vote_options)
    test_labels = test_labels.cpu().long()
    if test_labels.shape[0] != test_features.shape[0]:
        raise ProbeError("test features and test labels have different numbers of rows: load them from one split")
    scores = {}
    for k, vote in votes.items():
        best = vote.topk(min(5, num_classes), dim=1).indices
        hits = best == test_labels[:, None]
        scores[k] = {"top1": hits[:, 0].float().mean().item(), "top5": hits.any(dim=1).float().mean().item()}
    return scores
