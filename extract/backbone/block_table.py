"""The block table of a backbone: per paper block b, its module, channels, size, cost and parameters.

FLOPs are counted by running the configuration once on the meta device (no memory, no
arithmetic) under ``torch.utils.flop_counter.FlopCounterMode``, i.e. 2 x multiply-adds of
convolutions, linear layers and attention matmuls, the convention of the reference tables.
Cumulative FLOPs to reach b include the time embedding and every block before b.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from extract.backbone.configs import get_config

__all__ = ["BlockRow", "block_table", "format_block_table"]


@dataclass(frozen=True)
class BlockRow:
    b: int
    module: str
    channels: int
    size: int
    flops_cum: int
    params: int


def block_table(config_name: str, batch: int = 1) -> list[BlockRow]:
    """One row per block of a named configuration, plus a final row ``b=0`` for the full forward.

    The last row (``module='total'``) holds the whole forward's FLOPs (the output head included)
    and the parameter total.
    """
    cfg = get_config(config_name)
    with torch.device("meta"):
        model = cfg.build().eval()
    size = cfg.image_size
    x = torch.empty(batch, 3, size, size, device="meta")
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    y = torch.zeros(batch, dtype=torch.long, device="meta") if getattr(model, "num_classes", None) else None

    counter = FlopCounterMode(display=False)
    cumulative: dict[int, int] = {}
    handles = []
    for b in range(1, model.num_blocks + 1):
        def record(_module, _inputs, _output, b=b):
            cumulative[b] = counter.get_total_flops()

        handles.append(model.block_module(b).register_forward_hook(record))
    try:
        with counter, torch.no_grad():
            model(x, t, y)
    finally:
        for handle in handles:
            handle.remove()
    total_flops = counter.get_total_flops()

    shapes = model.block_shapes()
    rows = [
        BlockRow(
            b=b,
            module=model.block_module_name(b),
            channels=shapes[b][0],
            size=shapes[b][1],
            flops_cum=cumulative[b],
            params=sum(p.numel() for p in model.block_module(b).parameters()),
        )
        for b in range(1, model.num_blocks + 1)
    ]
    rows.append(BlockRow(0, "total", 0, 0, total_flops, sum(p.numel() for p in model.parameters())))
    return rows


def format_block_table(rows: list[BlockRow]) -> str:
    """Render rows as an aligned text table (GFLOPs and share of the full forward)."""
    total = rows[-1]
    lines = [f"{'b':>3}  {'module':<17} {'channels':>8} {'size':>5} {'cum GFLOPs':>11} {'of full':>8} {'params':>12}"]
    for r in rows[:-1]:
        lines.append(
            f"{r.b:>3}  {r.module:<17} {r.channels:>8} {r.size:>5} {r.flops_cum / 1e9:>11.2f} "
            f"{r.flops_cum / total.flops_cum:>8.1%} {r.params:>12,}"
        )
    lines.append(f"{'':>3}  {'full forward':<17} {'':>8} {'':>5} {total.flops_cum / 1e9:>11.2f} {'100.0%':>8} {total.params:>12,}")
    return "\n".join(lines)
