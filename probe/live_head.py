"""A head on the live backbone: features computed from the noisy images every step, as the official code trains.

``LiveHead`` takes what ``probe.live_images.LiveImages`` yields (``{(0, t): x_t}``), runs the backbone's
truncated forward once per timestep for every block the head reads and pools each map the way the
cache stores it (adaptive average, float16), through the extract job's own code
(``extract.forward.block_features``), and hands the head the same ``{(b, t): (N, C, h, w)}``
mapping it would read from the cache. So one head class serves both paths and the only difference
between them is what the data source does (fresh noise, crops and flips every step, or the
cache's one frozen view).

``TunableBackbone`` is what live modules (this one, DifFeed) share: the backbone is frozen unless
``finetune``; frozen, its weights are left out of checkpoints; tuned, they go in, and
``backbone_state_dict`` returns them in the official layout (loadable by ``--checkpoint``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from extract.forward import block_features, diffuse, model_input
from extract.pooling import pooled_size

from probe.errors import ProbeError

__all__ = ["TunableBackbone", "LiveHead", "live_in_shapes", "default_precision"]

Key = tuple[int, int]


def default_precision(device: torch.device | str) -> str:
    """bf16 autocast on GPUs (the backbone dominates the step), float32 on the CPU."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def live_in_shapes(backbone: nn.Module, blocks: Sequence[int], timesteps: Sequence[int], pool: int,
                   name: str | None = None) -> dict[Key, tuple]:
    """``{(b, t): (C, h, w)}`` of pooled block outputs, as a cache with this ``pool`` stores them.

    ``name``: the configuration's name, for the error about a block out of range.
    """
    shapes = backbone.block_shapes()
    out = {}
    for b in blocks:
        if b not in shapes:
            raise ProbeError(f"block {b} is out of range for {name or type(backbone).__name__}: "
                             f"valid blocks are 1..{max(shapes)}")
        channels, native = shapes[b]
        side = pooled_size(native, pool)
        for t in timesteps:
            out[(b, t)] = (channels, side, side)
    return out


class TunableBackbone(nn.Module):
    """A module with a ``backbone`` that is frozen unless ``finetune`` (then trained at its own lr)."""

    backbone: nn.Module
    finetune: bool

    def _set_tuning(self, finetune: bool) -> None:
        self.finetune = bool(finetune)
        self.backbone.requires_grad_(self.finetune)

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The backbone's parameters that train (none unless ``finetune``)."""
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's weights in the official state-dict layout (what ``--checkpoint`` loads)."""
        return {k: v.detach().cpu() for k, v in self.backbone.state_dict().items()}

    def state_dict(self, *args, **kwargs):
        """Everything that trains: the frozen backbone is left out (it is the configuration's, not ours)."""
        state = super().state_dict(*args, **kwargs)
        if self.finetune:
            return state
        return type(state)((k, v) for k, v in state.items() if not k.startswith("backbone."))

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        missing, unexpected = super().load_state_dict(state, strict=False, assign=assign)
        wrong = list(unexpected) + [k for k in missing if self.finetune or not k.startswith("backbone.")]
        if strict and wrong:
            raise RuntimeError(f"checkpoint does not fit this model: {wrong[:4]}")  # fit turns this into one line
        return missing, unexpected


class LiveHead(TunableBackbone):
    """The backbone's pooled block features, computed every step, into a probe head.

    Args:
        backbone: a model with ``features(x, timesteps, blocks)`` (frozen unless ``finetune``).
        head: a head from ``probe.heads.create_head`` built for ``live_in_shapes(...)``.
        blocks, timesteps: what the head reads. pool: the cache's stored side (pooling as it does).
        finetune: gradients reach the backbone. precision: fp32, bf16 or fp16 autocast of the backbone.
        schedule: a latent family's schedule: batches then carry clean images and noise (``LiveImages``'s
            ``latent_shape``) and x_t is made here, after the backbone's encoder.
        cond: a conditioning that trains with the head (SD's learnable text embedding, (1, L, D) initial value).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, blocks: Sequence[int], timesteps: Sequence[int],
                 pool: int = 16, finetune: bool = False, precision: str = "fp32", schedule=None,
                 cond: torch.Tensor | None = None):
        super().__init__()
        self.schedule = schedule
        self.cond = nn.Parameter(cond.detach().clone()) if cond is not None else None
        self.backbone, self.head = backbone, head
        self.blocks, self.timesteps, self.pool = list(blocks), [int(t) for t in timesteps], int(pool)
        self.precision = precision
        live_in_shapes(backbone, self.blocks, self.timesteps, self.pool)  # blocks checked before any image
        self._set_tuning(finetune)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.finetune:
            self.backbone.eval()  # frozen: no dropout; tuned, the backbone trains as the official code does
        return self

    def block_features(self, images: Mapping[Key, torch.Tensor]) -> dict[Key, torch.Tensor]:
        """``{(0, t): x_t}`` -> ``{(b, t): pooled float16 features}`` for every block and timestep read
        (float32 when the backbone is tuned)."""
        out = {}
        trains = self.finetune or self.cond is not None
        for t in self.timesteps:
            x_t = images[(0, t)]
            if (-1, t) in images:  # a latent family: encode the clean images, then add the batch's noise
                x_t = diffuse(model_input(self.backbone, x_t, self.precision), t, images[(-1, t)], self.schedule)
            with torch.set_grad_enabled(trains and torch.is_grad_enabled()):
                pooled = block_features(self.backbone, x_t, t, self.blocks, pool=self.pool,
                                        precision=self.precision, float16=not trains, cond=self.cond)
            out.update({(b, t): maps for b, maps in pooled.items()})
        return out

    def forward(self, images: Mapping[Key, torch.Tensor]) -> torch.Tensor:
        return self.head({key: value.float() for key, value in self.block_features(images).items()})

