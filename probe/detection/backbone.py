"""A diffusion U-Net as a detection backbone: several blocks of one noisy forward returned as a feature pyramid.

``DiffusionPyramid`` takes clean images in [-1, 1], makes x_t at its timestep with the project's
one noisy forward (``extract.forward``: fresh noise while training, the seeded noise of each
image id when told the ids, as a cache would hold), runs the backbone once, stopped after the
deepest requested block, and returns those blocks as an ordered dict, finest stride first
(what torchvision's ``FeaturePyramidNetwork`` and ``MultiScaleRoIAlign`` expect). Strides come
from the block table (input side over the block's side), so any configuration works and blocks
of one stride are refused (the pyramid has one level per stride). Frozen, the backbone runs
without gradients in eval mode; with ``finetune`` it trains (at its own lr, set by the trainer).

``pyramid_blocks`` picks a default: the deepest decoder block at each of the coarsest strides
down to stride 2 (32x32_small: b = 12, 15 at strides 4, 2; the 256x256 model: b = 21, 24, 27, 30 at
strides 32, 16, 8, 4): a stride-1 level costs the most and adds least.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from extract.backbone.block_table import block_table
from extract.forward import block_features, diffuse, noisy_input
from extract.schedule import NoiseSchedule
from probe.errors import ProbeError

__all__ = ["DiffusionPyramid", "PyramidBackbone", "pyramid_strides", "pyramid_blocks"]


def pyramid_strides(config_name: str, blocks: Sequence[int]) -> dict[int, int]:
    """``{b: stride}`` from the block table (input side / block side); one block per stride.

    Raises:
        ProbeError: a block outside the table, two blocks of one stride, or a stride that is not a power of 2.
    """
    rows = {row.b: row for row in block_table(config_name) if row.b > 0}
    strides: dict[int, int] = {}
    for b in sorted(set(blocks)):
        if b not in rows:
            raise ProbeError(f"block {b} is out of range for {config_name}: valid blocks are 1..{max(rows)}")
        stride = rows[b].stride
        same = [other for other, s in strides.items() if s == stride]
        if same:
            raise ProbeError(f"blocks {same[0]} and {b} of {config_name} have the same stride {stride}: a pyramid "
                             f"takes one block per stride, pass one of them")
        if stride & (stride - 1):
            raise ProbeError(f"block {b} of {config_name} has stride {stride}, not a power of 2: pick another block")
        strides[b] = stride
    return strides


def pyramid_blocks(config_name: str, levels: int = 4, finest: int = 2) -> tuple[int, ...]:
    """The default pyramid: the deepest decoder block at each of the ``levels`` coarsest decoder strides >= ``finest``."""
    rows = [row for row in block_table(config_name) if row.b > 0]
    middle = len(rows) // 2 + 1
    deepest: dict[int, int] = {}
    for row in rows:
        if row.b > middle and row.stride >= finest:
            deepest[row.stride] = row.b
    return tuple(sorted(deepest[s] for s in sorted(deepest, reverse=True)[:levels]))


class DiffusionPyramid(nn.Module):
    """Clean images -> x_t at one t -> ``{"b<b>": (N, C_b, H/s_b, W/s_b)}``, finest stride first.

    Args:
        backbone: a family's module with ``features(x_t, timesteps, blocks)`` (``BlockwiseBackbone``).
        strides: ``{b: stride}`` (``pyramid_strides``). t: the timestep. schedule: the backbone's.
        noise_seed: seed of the noise of images whose ids are given (``seeded_ids``).
        finetune: gradients reach the backbone. precision: its autocast (fp32, bf16, fp16).
    """

    def __init__(self, backbone: nn.Module, strides: Mapping[int, int], t: int, schedule: NoiseSchedule,
                 noise_seed: int = 0, finetune: bool = False, precision: str = "fp32"):
        super().__init__()
        self.backbone, self.t, self.schedule = backbone, int(t), schedule
        schedule.check_timesteps([self.t])
        self.order = sorted(strides, key=lambda b: strides[b])  # finest first, as the FPN wants
        self.strides = {b: int(strides[b]) for b in self.order}
        self.channels = [backbone.block_shapes()[b][0] for b in self.order]
        self.noise_seed, self.precision, self.finetune = int(noise_seed), precision, bool(finetune)
        self.backbone.requires_grad_(self.finetune)
        self._ids: Sequence[int] | None = None

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.finetune:
            self.backbone.eval()  # frozen: no dropout, as the live heads run it
        return self

    @contextlib.contextmanager
    def seeded_ids(self, image_ids: Sequence[int]):
        """Inside, a batch of these image ids gets its seeded noise (``extract.noise``); outside, fresh noise."""
        self._ids = [int(i) for i in image_ids]
        try:
            yield self
        finally:
            self._ids = None

    def noisy(self, x0: torch.Tensor) -> torch.Tensor:
        """x_t of (N, 3, H, W) images in [-1, 1]: seeded inside ``seeded_ids``, else fresh from the global RNG."""
        if self._ids is not None:
            if len(self._ids) != x0.shape[0]:
                raise ProbeError(f"{len(self._ids)} image ids for a batch of {x0.shape[0]}: pass one id per image")
            return noisy_input(x0, self.t, self._ids, self.noise_seed, self.schedule)
        return diffuse(x0, self.t, torch.randn(x0.shape, dtype=torch.float32).to(x0.device), self.schedule)

    def forward(self, x0: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        with torch.set_grad_enabled(self.finetune and torch.is_grad_enabled()):
            maps = block_features(self.backbone, self.noisy(x0), self.t, self.order, pool=None,
                                  precision=self.precision)
        return OrderedDict((f"b{b}", maps[b].float()) for b in self.order)


class PyramidBackbone(nn.Module):
    """A body returning an ordered dict of maps, then torchvision's FPN (with a max-pooled extra level).

    What torchvision's ``MaskRCNN`` / ``FasterRCNN`` take as ``backbone``: ``out_channels`` and
    ``forward(images) -> {name: (N, out_channels, h, w)}``. ``names`` are the body's levels (the
    RoI poolers read them; the extra ``pool`` level only feeds the RPN).
    """

    def __init__(self, body: nn.Module, in_channels: Sequence[int], names: Sequence[str], out_channels: int = 64):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels, self.names = out_channels, list(names)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(self.body(x))
