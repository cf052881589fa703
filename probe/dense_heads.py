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

    Computed without building that concatenation: bilinear resizing is linear per channel and keeps
    constants (its weights sum to one), so standardising a map and applying a 1x1 convolution commute
    with upsampling it. Each map is standardised at its native side (with the moments of its upsampled
    self, the BatchNorm's statistics), the first 1x1 layer is applied per map there, and only its output
    (K or the first hidden width channels) is upsampled and summed: the same function as upsample ->
    concatenate -> BatchNorm -> 1x1 (a test holds them equal), without the full-side float32 copies of
    every channel. A linear head's batch can then be trained in chunks of images with the gradient of
    the whole batch (``exact_in_chunks``): its only batch statistic, the BatchNorm's, depends on the maps
    alone, not on a trained weight.

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
        self.in_shapes = {key: tuple(in_shapes[key]) for key in self.keys}
        self.num_classes = int(num_classes)
        channels = sum(in_shapes[key][0] for key in self.keys)
        self.norm = nn.BatchNorm2d(channels, affine=False)

        def member() -> nn.Sequential:
            layers, width = [], channels
            for h in hidden:
                layers += [nn.Conv2d(width, h, 1), nn.ReLU(inplace=True), nn.BatchNorm2d(h)]
                width = h
            return nn.Sequential(*layers, nn.Conv2d(width, num_classes, 1))

        self.members = nn.ModuleList(member() for _ in range(max(1, int(ensemble))))

    @property
    def exact_in_chunks(self) -> bool:
        """True for linear members: per-image losses of one batch then sum to the batch's, whatever the chunks."""
        return all(len(m) == 1 for m in self.members)

    def bytes_per_image(self, label_side: int | None = None) -> int:
        """Float32 working set of one image in a training step (maps, their standardised copies, logits and grads)."""
        side = max(max(self.size), label_side or 0)
        maps = sum(c * h * w for c, h, w in self.in_shapes.values())
        first = self.members[0][0].out_channels
        return 4 * (2 * maps + len(self.members) * (first * self.size[0] * self.size[1] * 3 + self.num_classes * side * side * 4))

    @torch.no_grad()
    def moments(self, features: Mapping[Key, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, variance) per channel of the upsampled maps: the batch's in training (running stats updated
        once, as BatchNorm does), the running ones in eval. Upsampled a few channels at a time, never whole."""
        norm = self.norm
        if not self.training:
            return norm.running_mean, norm.running_var
        means, variances, count = [], [], 0
        for key in self.keys:
            x = features[key]
            step = max(1, (1 << 22) // max(1, x.shape[0] * self.size[0] * self.size[1]))
            for lo in range(0, x.shape[1], step):
                up = _resize(x[:, lo:lo + step].float(), self.size)
                variance, mean = torch.var_mean(up, dim=(0, 2, 3), unbiased=False)
                means.append(mean)
                variances.append(variance)
                count = up.numel() // up.shape[1]
        mean, variance = torch.cat(means), torch.cat(variances)
        norm.num_batches_tracked.add_(1)
        momentum = norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked)
        norm.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        norm.running_var.mul_(1 - momentum).add_(variance * count / max(count - 1, 1), alpha=momentum)
        return mean, variance

    def forward_members(self, features: Mapping[Key, torch.Tensor], moments: tuple[torch.Tensor, torch.Tensor] | None = None
                        ) -> list[torch.Tensor]:
        """Every member's logits at the finest map's side; ``moments`` from ``moments()`` of the whole batch when
        ``features`` is a chunk of it."""
        if any(value.requires_grad for value in features.values()):  # a backbone trained through: the plain formulation
            x = torch.cat([_resize(features[key].float(), self.size) for key in self.keys], dim=1)
            x = self.norm(x)
            return [m(x) for m in self.members]
        mean, variance = moments if moments is not None else self.moments(features)
        scale = (variance + self.norm.eps).rsqrt()
        standardised, lo = [], 0
        for key in self.keys:
            c = features[key].shape[1]
            standardised.append((lo, c, (features[key].float() - mean[lo:lo + c, None, None]) * scale[lo:lo + c, None, None]))
            lo += c
        outputs = []
        for member in self.members:
            first = member[0]
            total = None
            for lo, c, z in standardised:
                part = _resize(F.conv2d(z, first.weight[:, lo:lo + c]), self.size)
                total = part if total is None else total + part
            outputs.append(member[1:](total + first.bias[None, :, None, None]))
        return outputs

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
