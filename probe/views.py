"""Several stored views per image (noise draws, flips) and the seeded choice of one per image per epoch.

The official code draws new noise and a new crop/flip every step; a frozen cache holds what
``diffrep extract --noise-draws K --flip`` stored: K noise draws, each also flipped. Training on
a ``ViewStack`` picks one of them for every image in every epoch, as a pure function of
(seed, epoch), so resumed runs repeat it; evaluation reads view 0 (the centre crop, draw 0).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["ViewStack", "view_choice", "take_rows", "num_rows_of"]


class ViewStack(dict):
    """``{(b, t): (V, N, C, h, w)}``: V views of each of N rows, the same V for every key."""

    @property
    def num_views(self) -> int:
        return int(next(iter(self.values())).shape[0])


def view_choice(num_rows: int, num_views: int, seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(num_rows,) int64 view of each row in one epoch: seeded by (seed, epoch), independent of the batch order."""
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) * 7 + 0x5EED)
    return torch.randint(num_views, (num_rows,), generator=generator).to(device)


def take_rows(features: Mapping, index: torch.Tensor) -> dict:
    """The rows ``index`` of plain ``{(b, t): (N, ...)}`` features or of a ``ViewStack`` (kept one)."""
    if isinstance(features, ViewStack):
        return ViewStack({key: value[:, index] for key, value in features.items()})
    return {key: value[index] for key, value in features.items()}


def num_rows_of(value: torch.Tensor, stacked: bool) -> int:
    return int(value.shape[1] if stacked else value.shape[0])
