"""A grid of heads trained in one pass: every head sees every batch, each with its own learning rate.

As DINOv2's linear evaluation does, a learning-rate search costs one read of the features: the
heads share each batch, the summed loss gives each head exactly its own gradient (they share no
parameter), and the optimizer keeps one parameter group per head. The best head is then chosen
on a held-out part of the training split. Each head starts from the weights it would have in a
run of its own (the same seed before it is built), so on a CPU the grid's heads equal separate
runs bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

__all__ = ["HeadGrid"]


class HeadGrid(nn.Module):
    """Heads keyed "0", "1", ... (one per learning rate, in the given order); forward returns ``{key: logits}``.

    Args:
        build: makes one head (called once per learning rate, after ``torch.manual_seed(seed)``).
        lrs: the learning rates. seed: the seed each head is built from.
    """

    def __init__(self, build: Callable[[], nn.Module], lrs: Sequence[float], seed: int = 0):
        super().__init__()
        self.lrs = {str(i): float(lr) for i, lr in enumerate(lrs)}  # ModuleDict keys may not hold a dot
        heads = {}
        for name in self.lrs:
            torch.manual_seed(seed)
            heads[name] = build()
        self.heads = nn.ModuleDict(heads)

    def param_groups(self) -> list[dict]:
        """One optimizer parameter group per head, at its learning rate."""
        return [{"params": [p for p in self.heads[name].parameters() if p.requires_grad], "lr": lr}
                for name, lr in self.lrs.items()]

    def forward(self, features: Mapping) -> dict[str, torch.Tensor]:
        return {name: head(features) for name, head in self.heads.items()}
