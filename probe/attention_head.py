"""The paper's attention head: per-(b, t) tokenizers, a zero-initialised CLS token, a pre-norm transformer.

Each cached map is average-pooled to at most ``token_pool`` x ``token_pool``, layer-normalised
over (C, h, w), and projected by a 1x1 convolution to ``dim`` channels; every spatial position
becomes one token. The tokens of all inputs and one CLS token (zero-initialised, no positional
embedding) go through ``depth`` pre-norm transformer blocks (GELU MLP, qkv without bias); the CLS
output goes to a Linear classifier. With the defaults on b=24 of ``256x256_uncond`` (1024 x 16 x 16)
and 1000 classes this has 15.2M / 27.8M / 53.0M parameters at depth 1 / 2 / 4.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from probe.errors import ProbeError

__all__ = ["AttentionHeadConfig", "AttentionHead", "Tokenizer", "TransformerBlock"]


@dataclass(frozen=True)
class AttentionHeadConfig:
    """Architecture choices of the attention head.

    Args:
        dim: token width. depth: transformer blocks. num_heads: attention heads per block.
        mlp_ratio: MLP hidden width / dim. token_pool: largest token grid side per input.
        qkv_bias: bias in the qkv projection.
    """

    dim: int = 1024
    depth: int = 2
    num_heads: int = 8
    mlp_ratio: float = 4.0
    token_pool: int = 16
    qkv_bias: bool = False

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ProbeError(f"attention head dim {self.dim} is not divisible by num_heads {self.num_heads}: change one of them")
        if self.depth < 1 or self.token_pool < 1:
            raise ProbeError(f"attention head needs depth >= 1 and token_pool >= 1, got {self.depth} and {self.token_pool}")


class Tokenizer(nn.Module):
    """One (b, t) map -> tokens: AdaptiveAvgPool(min(H, token_pool)) -> LayerNorm over (C, h, w) -> 1x1 conv.

    Args:
        in_shape: ``(C, H, W)`` of the cached map. dim: token width. token_pool: largest grid side.
    """

    def __init__(self, in_shape: tuple[int, int, int], dim: int, token_pool: int):
        super().__init__()
        channels, height, _ = in_shape
        self.size = min(height, token_pool)
        self.norm = nn.LayerNorm([channels, self.size, self.size])
        self.proj = nn.Conv2d(channels, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, size * size, dim)."""
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.adaptive_avg_pool2d(x, self.size)
        return self.proj(self.norm(x)).flatten(2).transpose(1, 2)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + Attn(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, dim) -> (N, L, dim)."""
        n, length, dim = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(n, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attn.transpose(1, 2).reshape(n, length, dim))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class AttentionHead(nn.Module):
    """Tokenizers per (b, t) input, CLS token, ``depth`` transformer blocks, Linear on the CLS output.

    Args:
        in_shapes: ``{(b, t): (C, h, w)}`` of the cached arrays.
        num_classes: output width.
        config: the architecture (``AttentionHeadConfig()`` by default).
    """

    def __init__(self, in_shapes: Mapping[tuple[int, int], tuple[int, int, int]], num_classes: int,
                 config: AttentionHeadConfig | None = None):
        super().__init__()
        if not in_shapes:
            raise ProbeError("a head needs at least one (b, t) input: pass in_shapes from the cache")
        self.config = config or AttentionHeadConfig()
        cfg = self.config
        self.keys = sorted(in_shapes)
        self.tokenizers = nn.ModuleDict(
            {f"b{b}_t{t}": Tokenizer(in_shapes[(b, t)], cfg.dim, cfg.token_pool) for b, t in self.keys}
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias) for _ in range(cfg.depth)
        )
        self.fc = nn.Linear(cfg.dim, num_classes)

    @classmethod
    def from_kwargs(cls, in_shapes, num_classes: int, config: AttentionHeadConfig | None = None, **kwargs: Any):
        """Registry builder: keyword overrides (``depth=4``) replace fields of the config."""
        known = {f.name for f in fields(AttentionHeadConfig)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ProbeError(f"attention head has no option {', '.join(unknown)}: choose from {', '.join(sorted(known))}")
        base = asdict(config) if config is not None else {}
        return cls(in_shapes, num_classes, AttentionHeadConfig(**{**base, **kwargs}))

    def forward(self, features: Mapping[tuple[int, int], torch.Tensor]) -> torch.Tensor:
        """``{(b, t): (N, C, h, w)}`` -> ``(N, num_classes)`` logits."""
        missing = [k for k in self.keys if k not in features]
        if missing:
            raise ProbeError(f"attention head expects (b, t) {self.keys} but got {list(features)}: load the same arrays")
        tokens = [self.tokenizers[f"b{b}_t{t}"](features[(b, t)]) for b, t in self.keys]
        first = tokens[0]
        x = torch.cat([self.cls_token.expand(first.shape[0], -1, -1).to(first.dtype), *tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.fc(x[:, 0])
