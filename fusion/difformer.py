"""DifFormer: the paper's fusion of several blocks and timesteps from the cache, as the official code builds it.

One tokenizer per block (the attention head's: pool, LayerNorm over (C, h, w), 1x1 conv), shared
by every timestep of that block; ONE transformer (the attention head's blocks), shared by every
timestep and run once per timestep on the concatenated tokens of all blocks plus one CLS token;
the |T| CLS outputs are concatenated into the final Linear(dim * |T|, classes). On
``256x256_uncond`` with 50 classes, T = {90, 150, 300} and B = {19, 24, 30} that is 28.9M
parameters (the paper prints 29.3M).

This differs from the attention head given several (b, t) arrays, which puts every (b, t)'s
tokens in ONE sequence with a tokenizer per (b, t) (a "joint-token" attention head): ask for
``--head difformer`` (``diffrep fuse``) to get DifFormer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any

import torch
from torch import nn

from probe.attention_head import AttentionHeadConfig, Tokenizer, TransformerBlock
from probe.errors import ProbeError
from probe.heads import HeadSpec, register_head

__all__ = ["DifFormer"]


class DifFormer(nn.Module):
    """Per-block tokenizers and one transformer shared across timesteps; CLS per timestep, concatenated.

    Args:
        in_shapes: ``{(b, t): (C, h, w)}`` of the cached arrays: every block at every timestep.
        num_classes: output width. config: width, depth, heads, token pool (the attention head's).
    """

    def __init__(self, in_shapes: Mapping[tuple[int, int], tuple[int, int, int]], num_classes: int,
                 config: AttentionHeadConfig | None = None):
        super().__init__()
        if not in_shapes:
            raise ProbeError("DifFormer needs at least one (b, t) input: pass in_shapes from the cache")
        self.config = cfg = config or AttentionHeadConfig()
        self.blocks_in = sorted({b for b, _ in in_shapes})
        self.timesteps = sorted({t for _, t in in_shapes})
        missing = [(b, t) for b in self.blocks_in for t in self.timesteps if (b, t) not in in_shapes]
        if missing:
            raise ProbeError(f"DifFormer reads every block at every timestep; missing "
                             f"{', '.join(f'b{b}/t{t}' for b, t in missing)}: extract them too")
        for b in self.blocks_in:
            shapes = {in_shapes[(b, t)] for t in self.timesteps}
            if len(shapes) > 1:
                raise ProbeError(f"block {b} has different shapes across timesteps {sorted(shapes)}: read one pool")
        self.tokenizers = nn.ModuleDict(
            {f"b{b}": Tokenizer(in_shapes[(b, self.timesteps[0])], cfg.dim, cfg.token_pool) for b in self.blocks_in})
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias) for _ in range(cfg.depth))
        self.fc = nn.Linear(cfg.dim * len(self.timesteps), num_classes)

    @classmethod
    def from_kwargs(cls, in_shapes, num_classes: int, **kwargs: Any) -> "DifFormer":
        """Registry builder: keyword overrides (``depth=4``, ``dim=256``) replace fields of the config."""
        known = {f.name for f in fields(AttentionHeadConfig)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ProbeError(f"DifFormer has no option {', '.join(unknown)}: choose from {', '.join(sorted(known))}")
        return cls(in_shapes, num_classes, AttentionHeadConfig(**{**asdict(AttentionHeadConfig()), **kwargs}))

    def forward(self, features: Mapping[tuple[int, int], torch.Tensor]) -> torch.Tensor:
        """``{(b, t): (N, C, h, w)}`` -> ``(N, num_classes)`` logits."""
        missing = [(b, t) for b in self.blocks_in for t in self.timesteps if (b, t) not in features]
        if missing:
            raise ProbeError(f"DifFormer expects (b, t) {missing} too: load the arrays it was built for")
        outputs = []
        for t in self.timesteps:
            tokens = [self.tokenizers[f"b{b}"](features[(b, t)]) for b in self.blocks_in]
            x = torch.cat([self.cls_token.expand(tokens[0].shape[0], -1, -1).to(tokens[0].dtype), *tokens], dim=1)
            for block in self.blocks:
                x = block(x)
            outputs.append(x[:, 0])
        return self.fc(torch.cat(outputs, dim=1))


register_head(HeadSpec("difformer", DifFormer.from_kwargs, {}, lr=5e-2,
                       description="DifFormer: per-block tokenizers, one transformer shared across timesteps, "
                                   "CLS per timestep concatenated (the paper's fusion)"))
