"""Probe heads on cached features (linear, MLP, CNN, attention), one registry and one factory.

Every head takes one input, ``{(b, t): (N, C, h, w) float tensor}``, and returns ``(N, classes)``
logits. ``create_head(name, in_shapes, num_classes, **overrides)`` looks the name up in
``HEADS`` and lets the overrides win over the registered defaults, as timm's factories do;
``in_shapes`` come from the cache arrays, never from a table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from probe.errors import ProbeError
from extract.pooling import pooled_size

from probe.attention_head import AttentionHead

__all__ = [
    "FeatureKey", "InShapes", "HeadSpec", "HEADS", "register_head", "create_head",
    "default_lr", "count_parameters", "LinearHead", "MLPHead", "CNNHead",
]

FeatureKey = tuple[int, int]
"""``(b, t)``: the paper's block number and the diffusion timestep of one cached array."""

InShapes = Mapping[FeatureKey, tuple[int, int, int]]
"""``{(b, t): (C, h, w)}`` of the features a head will see."""


def _check_inputs(features: Mapping[FeatureKey, torch.Tensor], keys: Sequence[FeatureKey]) -> None:
    missing = [k for k in keys if k not in features]
    if missing:
        raise ProbeError(
            f"head expects features for (b, t) {list(keys)} but got {list(features)}: "
            f"load the same arrays it was built for"
        )


class _PooledFlatten(nn.Module):
    """Adaptive-average-pools each input to ``pool`` and concatenates the flattened maps."""

    def __init__(self, in_shapes: InShapes, pool: int | None):
        super().__init__()
        if not in_shapes:
            raise ProbeError("a head needs at least one (b, t) input: pass in_shapes from the cache")
        self.keys = sorted(in_shapes)
        self.pool = pool
        self.sizes = [pooled_size(in_shapes[k][1], pool) for k in self.keys]
        self.out_features = sum(in_shapes[k][0] * s * s for k, s in zip(self.keys, self.sizes))

    def forward(self, features: Mapping[FeatureKey, torch.Tensor]) -> torch.Tensor:
        _check_inputs(features, self.keys)
        parts = []
        for key, size in zip(self.keys, self.sizes):
            x = features[key]
            if x.shape[-1] != size or x.shape[-2] != size:
                x = F.adaptive_avg_pool2d(x, size)
            parts.append(x.flatten(1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class LinearHead(nn.Module):
    """The paper's linear probe: adaptive average pool to ``pool`` x ``pool``, flatten, Linear.

    No batch norm. Several (b, t) inputs are concatenated after pooling.

    Args:
        in_shapes: ``{(b, t): (C, h, w)}``.
        num_classes: output width.
        pool: pooled side (default 2; ``None`` or 0 keeps the cached size).
    """

    def __init__(self, in_shapes: InShapes, num_classes: int, pool: int | None = 2):
        super().__init__()
        self.flatten = _PooledFlatten(in_shapes, pool)
        self.fc = nn.Linear(self.flatten.out_features, num_classes)

    def forward(self, features: Mapping[FeatureKey, torch.Tensor]) -> torch.Tensor:
        """``{(b, t): (N, C, h, w)}`` -> ``(N, num_classes)`` logits."""
        return self.fc(self.flatten(features))


class MLPHead(nn.Module):
    """Pool and flatten as the linear probe, then hidden Linear+ReLU layers, then Linear.

    Args:
        in_shapes: ``{(b, t): (C, h, w)}``. num_classes: output width.
        hidden: hidden layer widths, e.g. ``(1024,)`` or ``(2048, 1024)``.
        pool: pooled side before flattening (default 2). dropout: before each hidden Linear.
    """

    def __init__(
        self, in_shapes: InShapes, num_classes: int, hidden: Sequence[int] = (1024,),
        pool: int | None = 2, dropout: float = 0.0,
    ):
        super().__init__()
        if not hidden or any(int(h) < 1 for h in hidden):
            raise ProbeError(f"MLP hidden sizes must be positive integers, got {list(hidden)}: pass e.g. hidden=(1024,)")
        self.flatten = _PooledFlatten(in_shapes, pool)
        layers: list[nn.Module] = []
        width = self.flatten.out_features
        for size in hidden:
            if dropout:
                layers.append(nn.Dropout(dropout))
            layers += [nn.Linear(width, int(size)), nn.ReLU(inplace=True)]
            width = int(size)
        layers.append(nn.Linear(width, num_classes))
        self.mlp = nn.Sequential(*layers)

    def forward(self, features: Mapping[FeatureKey, torch.Tensor]) -> torch.Tensor:
        """``{(b, t): (N, C, h, w)}`` -> ``(N, num_classes)`` logits."""
        return self.mlp(self.flatten(features))


class CNNHead(nn.Module):
    """Two 3x3 convolutions (ReLU) on the channel-stacked inputs, global average pool, Linear.

    Inputs of different sizes are average-pooled to the smallest side (at most ``pool``)
    and stacked along channels.

    Args:
        in_shapes: ``{(b, t): (C, h, w)}``. num_classes: output width.
        channels: output channels of the two convolutions. pool: largest spatial side kept (default 16).
    """

    def __init__(
        self, in_shapes: InShapes, num_classes: int, channels: Sequence[int] = (256, 256), pool: int | None = 16,
    ):
        super().__init__()
        if len(channels) != 2 or any(int(c) < 1 for c in channels):
            raise ProbeError(f"CNN head takes two positive channel sizes, got {list(channels)}: pass e.g. channels=(256, 256)")
        if not in_shapes:
            raise ProbeError("a head needs at least one (b, t) input: pass in_shapes from the cache")
        self.keys = sorted(in_shapes)
        self.size = min(pooled_size(in_shapes[k][1], pool) for k in self.keys)
        in_channels = sum(in_shapes[k][0] for k in self.keys)
        c1, c2 = (int(c) for c in channels)
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2, num_classes)

    def forward(self, features: Mapping[FeatureKey, torch.Tensor]) -> torch.Tensor:
        """``{(b, t): (N, C, h, w)}`` -> ``(N, num_classes)`` logits."""
        _check_inputs(features, self.keys)
        maps = []
        for key in self.keys:
            x = features[key]
            if x.shape[-1] != self.size or x.shape[-2] != self.size:
                x = F.adaptive_avg_pool2d(x, self.size)
            maps.append(x)
        x = torch.cat(maps, dim=1) if len(maps) > 1 else maps[0]
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


@dataclass(frozen=True)
class HeadSpec:
    """A registered head: its builder, the default keyword arguments, and its default learning rate."""

    name: str
    builder: Callable[..., nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)
    lr: float = 1e-2
    description: str = ""


HEADS: dict[str, HeadSpec] = {}


def register_head(spec: HeadSpec) -> HeadSpec:
    """Add a head to the registry (its name must be new)."""
    if spec.name in HEADS:
        raise ProbeError(f"head {spec.name!r} is registered twice: pick another name")
    HEADS[spec.name] = spec
    return spec


def _spec(name: str) -> HeadSpec:
    try:
        return HEADS[name]
    except KeyError:
        raise ProbeError(f"unknown head {name!r}: choose one of {', '.join(HEADS)}") from None


def create_head(name: str, in_shapes: InShapes, num_classes: int, **overrides: Any) -> nn.Module:
    """Build a registered head; ``overrides`` win over its defaults.

    Args:
        name: a key of ``HEADS`` (``linear``, ``mlp``, ``cnn``, ``attention``; ``difformer`` once ``fusion``
            is imported).
        in_shapes: ``{(b, t): (C, h, w)}`` of the cached arrays it will read.
        num_classes: number of classes (output width).
        **overrides: head keyword arguments, e.g. ``pool=4``, ``hidden=(2048,)``, ``depth=4``.

    Returns:
        The ``nn.Module`` (random init, on the current default device).

    Raises:
        ProbeError: unknown name, unknown keyword, or invalid sizes.
    """
    spec = _spec(name)
    if num_classes < 2:
        raise ProbeError(f"a classifier needs at least 2 classes, got {num_classes}: check the dataset labels")
    shapes = {(int(b), int(t)): tuple(int(v) for v in shape) for (b, t), shape in in_shapes.items()}
    kwargs = {**spec.defaults, **overrides}
    try:
        return spec.builder(shapes, num_classes, **kwargs)
    except TypeError as exc:
        raise ProbeError(f"head {name!r} does not take these options {sorted(overrides)}: {exc}") from None


def default_lr(name: str) -> float:
    """The protocol's learning rate for a head (1e-2 linear, 5e-2 attention)."""
    return _spec(name).lr


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; works on the meta device."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


register_head(HeadSpec("linear", LinearHead, dict(pool=2), lr=1e-2,
                       description="adaptive avg pool to 2x2, flatten, Linear (the paper's linear probe)"))
register_head(HeadSpec("mlp", MLPHead, dict(hidden=(1024,), pool=2), lr=1e-2,
                       description="pool to 2x2, flatten, hidden Linear+ReLU layers, Linear"))
register_head(HeadSpec("cnn", CNNHead, dict(channels=(256, 256), pool=16), lr=1e-2,
                       description="two 3x3 convolutions with ReLU, global average pool, Linear"))
register_head(HeadSpec("attention", AttentionHead.from_kwargs, {}, lr=5e-2,
                       description="per-block tokenizer, CLS token, pre-norm transformer (the paper's attention head)"))
