"""DifFeed: decoder features fed back into the encoder, and a second pass on the same noisy image.

Pass 1 runs the frozen backbone without gradients until the deepest feedback source. Each source
block b goes through its own feedback layer (1x1 conv without bias, BatchNorm, ReLU) to the
channels of encoder block 2L+2-b (its mirror: 38-b on the 256x256 model), is resized when sizes
differ, and is added to that encoder block's output in pass 2, so it also feeds the block's skip
connection. Pass 2 is the same walk (``extract.forward.block_features(..., inject=...)``) on the SAME x_t and
stops at the read-out block, whose features go to the head.

Strategies (sources in the model's own numbering, M = L+1 the middle block; 256x256: M = 19):

- ``bottleneck``: every third decoder block from M+2 (21, 24, ..., 36 -> 17, 14, ..., 2); 2.76M.
- ``all``: every decoder block M+1..2L+1 -> M-1..1; 7.62M.
- ``windowed``: M+1..M+5 -> M-1..M-5 (20..24 -> 18..14); 5.25M.
- ``multi-scale``: the windowed sources, each with its own layer to the channels of block M-1,
  resized to its size and summed into that one block. The paper evaluates it; the official code's
  one-target-per-source mapping cannot express several sources summed into one block. One
  injection point at the bottleneck keeps the sum over maps of one scale, which is what makes
  adding them meaningful.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from extract.backbone.adm import UNetModel
from extract.forward import block_features
from extract.precision import autocast
from probe.errors import ProbeError
from probe.live_head import TunableBackbone

__all__ = ["STRATEGIES", "feedback_pairs", "default_readout", "FeedbackLayer", "DifFeed"]

STRATEGIES = ("bottleneck", "all", "windowed", "multi-scale")


def feedback_pairs(model: UNetModel, strategy: str) -> list[tuple[int, int]]:
    """(source decoder block, target encoder block) pairs of a strategy for this model's depth."""
    middle = model.num_blocks // 2 + 1
    last = model.num_blocks
    if strategy == "bottleneck":
        sources = list(range(middle + 2, last, 3))
    elif strategy == "all":
        sources = list(range(middle + 1, last + 1))
    elif strategy in ("windowed", "multi-scale"):
        sources = list(range(middle + 1, min(middle + 5, last) + 1))
    else:
        raise ProbeError(f"unknown feedback strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if strategy == "multi-scale":
        return [(b, middle - 1) for b in sources]
    return [(b, model.mirror_block(b)) for b in sources]


def default_readout(model: UNetModel) -> int:
    """The paper's read-out block, b=24 on the 256x256 model: five blocks past the middle block."""
    return model.num_blocks // 2 + 1 + 5


class FeedbackLayer(nn.Sequential):
    """1x1 conv (no bias) -> BatchNorm -> ReLU: a decoder map to an encoder block's channels."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU())


class DifFeed(TunableBackbone):
    """The backbone with feedback layers and a head on the read-out block.

    Args:
        backbone: a ``UNetModel`` (frozen unless ``finetune``; pass 1 never takes gradients).
        head: a module taking ``{(readout, t): (N, C, h, w)}`` (e.g. the attention head).
        strategy: one of ``STRATEGIES``. readout: block whose features the head reads (default: M+5).
        finetune: let gradients reach the backbone in pass 2 (its own lr is the caller's choice).
        precision: fp32, bf16 or fp16 autocast of both passes.
        full_passes: run both passes through every block, as the official code does (hooks on a whole
            forward); the features are the same, only slower. For benchmarks.
    """

    def __init__(self, backbone: UNetModel, head: nn.Module, strategy: str = "bottleneck", readout: int | None = None,
                 finetune: bool = False, precision: str = "fp32", full_passes: bool = False):
        super().__init__()
        if not isinstance(backbone, UNetModel):
            raise ProbeError("DifFeed needs a diffusion U-Net (its decoder feeds back): pass a unet configuration")
        self.backbone = backbone
        self.head = head
        self.strategy = strategy
        self.readout = readout if readout is not None else default_readout(backbone)
        if not 1 <= self.readout <= backbone.num_blocks:
            raise ProbeError(f"read-out block {self.readout} is out of range for {backbone.name}: "
                             f"valid blocks are 1..{backbone.num_blocks}")
        self.pairs = feedback_pairs(backbone, strategy)
        late = sorted({target for _, target in self.pairs if target >= self.readout})
        if late:
            raise ProbeError(f"feedback into block(s) {late} cannot change read-out block {self.readout}: "
                             f"read out at a block past them (e.g. --readout {default_readout(backbone)})")
        shapes = backbone.block_shapes()
        self.sizes = {target: shapes[target][1] for _, target in self.pairs}
        self.feedback = nn.ModuleDict(
            {f"b{source}": FeedbackLayer(shapes[source][0], shapes[target][0]) for source, target in self.pairs})
        self.precision, self.full_passes = precision, full_passes
        self._set_tuning(finetune)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.train(mode and self.finetune)  # frozen: eval (no dropout); tuned: as the official code
        return self

    @property
    def sources(self) -> list[int]:
        return [source for source, _ in self.pairs]

    def feedback_maps(self, sources: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """``{target encoder block: summed feedback map at its size}`` from pass-1 source features."""
        maps: dict[int, torch.Tensor] = {}
        for source, target in self.pairs:
            m = self.feedback[f"b{source}"](sources[source].float())
            size = self.sizes[target]
            if m.shape[-1] != size:
                m = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)
            maps[target] = maps[target] + m if target in maps else m
        return maps

    def readout_features(self, x_t: torch.Tensor, timesteps: torch.Tensor,
                         sources: Mapping[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Both passes on the same ``x_t``: (N, C, h, w) features of the read-out block.

        ``sources``: pass 1's source features read from a cache (same image, t and noise); pass 1 is
        then skipped.
        """
        last = [self.backbone.num_blocks] if self.full_passes else []
        if sources is None:
            with torch.no_grad():
                sources = block_features(self.backbone, x_t, timesteps, self.sources + last, precision=self.precision)
        with autocast(x_t.device, self.precision):
            inject = self.feedback_maps(sources)
        readout = block_features(self.backbone, x_t, timesteps, [self.readout] + last, inject=inject,
                                 precision=self.precision)
        return readout[self.readout]

    def forward(self, images: Mapping[tuple[int, int], torch.Tensor]) -> torch.Tensor:
        """``{(0, t): (N, 3, H, W) noisy images at timestep t}`` (as ``probe.live_images.LiveImages`` yields),
        optionally with pass 1's cached ``{(source, t): features}`` -> (N, classes) logits."""
        (t,) = {t for b, t in images if b == 0}
        x_t = images[(0, t)]
        timesteps = torch.full((x_t.shape[0],), int(t), device=x_t.device)
        cached = {b: images[(b, t)] for b in self.sources if (b, t) in images}
        sources = cached if len(cached) == len(self.sources) else None
        return self.head({(self.readout, int(t)): self.readout_features(x_t, timesteps, sources).float()})
