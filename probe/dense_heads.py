"""Dense heads on cached block maps: the per-pixel head (ddpm-segmentation's) and an UperNet-style head (the paper's).

Both take ``{(b, t): (N, C, h, w)}`` and return logits ``(N, K, H, W)`` at the finest input's size; the
training loop resizes them (bilinear) to the label's size. ``create_dense_head(name, in_shapes,
num_classes, **overrides)`` builds either from the shapes of the cache arrays.

* ``pixel``: every map upsampled (bilinear) to the finest map's size, concatenated, standardised by a
  BatchNorm without affine terms, then a per-pixel classifier: linear (``hidden=()``) or an MLP of 1x1
  convolutions with ReLU and BatchNorm (ddpm-segmentation's is 256, 128); ``ensemble`` > 1 trains that
  many independently initialised classifiers and averages their probabilities.
* ``upernet``: a 1x1 projection (+BN, ReLU) of each map to ``channels``; a pyramid-pooling module (scales
  1, 2, 3, 6) on the coarsest; torchvision's ``FeaturePyramidNetwork`` for the top-down path; every level
  upsampled to the finest, concatenated, fused by a 3x3 convolution, dropout 0.1, a 1x1 classifier.
  With a single map (the paper's "one block feeding every UperNet input") the projected map is resized
  bilinearly to a four-level pyramid of sides top, top/2, top/4, top/8, with top twice its side up to
  32 (the paper's 32x32 block fed strides 4-32 of a 256 input: 64, 32, 16, 8), else its own side.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import FeaturePyramidNetwork

from probe.errors import ProbeError

__all__ = ["PixelHead", "UperNetHead", "DENSE_HEADS", "create_dense_head"]

Key = tuple[int, int]


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _conv_bn_relu(cin: int, cout: int, kernel: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class PixelHead(nn.Module):
    """Per-pixel classifier over the concatenated, upsampled maps.

    Args:
        in_shapes: ``{(b, t): (C, h, w)}``. num_classes: K.
        hidden: MLP widths (1x1 convolutions); ``()`` is a linear classifier.
        ensemble: independently initialised classifiers whose probabilities are averaged (trained side by side).
    """

    def __init__(self, in_shapes: Mapping[Key, tuple[int, int, int]], num_classes: int, hidden: tuple[int, ...] = (),
                 ensemble: int = 1):
        super().__init__()
        self.keys = sorted(in_shapes)
        self.size = max((shape[1], shape[2]) for shape in in_shapes.values())
        channels = sum(in_shapes[key][0] for key in self.keys)
        self.norm = nn.BatchNorm2d(channels, affine=False)

        def member() -> nn.Sequential:
            layers, width = [], channels
            for h in hidden:
                layers += [nn.Conv2d(width, h, 1), nn.ReLU(inplace=True), nn.BatchNorm2d(h)]
                width = h
            return nn.Sequential(*layers, nn.Conv2d(width, num_classes, 1))

        self.members = nn.ModuleList(member() for _ in range(max(1, int(ensemble))))

    def forward_members(self, features: Mapping[Key, torch.Tensor]) -> list[torch.Tensor]:
        x = torch.cat([_resize(features[key].float(), self.size) for key in self.keys], dim=1)
        x = self.norm(x)
        return [m(x) for m in self.members]

    def forward(self, features: Mapping[Key, torch.Tensor]) -> torch.Tensor:
        outputs = self.forward_members(features)
        if len(outputs) == 1:
            return outputs[0]
        return torch.stack([o.softmax(1) for o in outputs]).mean(0).clamp_min(1e-12).log()


class _PyramidPooling(nn.Module):
    def __init__(self, channels: int, scales: tuple[int, ...]):
        super().__init__()
        self.scales = scales
        self.branches = nn.ModuleList(_conv_bn_relu(channels, channels) for _ in scales)
        self.bottleneck = _conv_bn_relu(channels * (len(scales) + 1), channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [_resize(branch(F.adaptive_avg_pool2d(x, s)), size) for s, branch in zip(self.scales, self.branches)]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UperNetHead(nn.Module):
    """UperNet-style decoder (projection, PPM, FPN, fusion) over one or several block maps.

    Args:
        in_shapes: ``{(b, t): (C, h, w)}``. num_classes: K. channels: width of every level (the paper: 1024
            projections into mmsegmentation's UperNet of 512). pool_scales: PPM bins. dropout: before the classifier.
    """

    def __init__(self, in_shapes: Mapping[Key, tuple[int, int, int]], num_classes: int, channels: int = 256,
                 pool_scales: tuple[int, ...] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        # finest first; ties keep the block order
        self.keys = sorted(in_shapes, key=lambda key: (-in_shapes[key][1], key))
        self.project = nn.ModuleDict({f"b{b}_t{t}": _conv_bn_relu(in_shapes[(b, t)][0], channels) for b, t in self.keys})
        self.levels = 4 if len(self.keys) == 1 else len(self.keys)
        self.ppm = _PyramidPooling(channels, tuple(pool_scales))
        self.fpn = FeaturePyramidNetwork([channels] * self.levels, channels)
        self.fuse = _conv_bn_relu(channels * self.levels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def _pyramid(self, features: Mapping[Key, torch.Tensor]) -> list[torch.Tensor]:
        maps = [self.project[f"b{b}_t{t}"](features[(b, t)].float()) for b, t in self.keys]
        if len(maps) > 1:
            return maps
        x = maps[0]
        h, w = x.shape[-2:]
        top = 2.0 if max(h, w) <= 16 else 1.0  # twice the side up to 32, else the map's own side
        return [_resize(x, (max(1, round(h * top / f)), max(1, round(w * top / f)))) for f in (1, 2, 4, 8)]

    def forward_members(self, features: Mapping[Key, torch.Tensor]) -> list[torch.Tensor]:
        return [self(features)]

    def forward(self, features: Mapping[Key, torch.Tensor]) -> torch.Tensor:
        levels = self._pyramid(features)
        levels[-1] = self.ppm(levels[-1])
        outs = list(self.fpn(OrderedDict((str(i), x) for i, x in enumerate(levels))).values())
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([_resize(o, size) for o in outs], dim=1))
        return self.classifier(self.dropout(fused))


DENSE_HEADS = {"pixel": PixelHead, "upernet": UperNetHead}


def create_dense_head(name: str, in_shapes: Mapping[Key, tuple[int, int, int]], num_classes: int, **overrides) -> nn.Module:
    """Build a dense head by name; ``overrides`` (hidden, ensemble / channels, pool_scales, dropout) win over defaults.

    Raises:
        ProbeError: unknown head name or no input maps.
    """
    if name not in DENSE_HEADS:
        raise ProbeError(f"unknown dense head {name!r}: use one of {', '.join(DENSE_HEADS)}")
    if not in_shapes:
        raise ProbeError("a dense head needs at least one (block, timestep) map: pass -b and -t")
    options = {key: value for key, value in overrides.items() if value is not None}
    return DENSE_HEADS[name](dict(in_shapes), int(num_classes), **options)
