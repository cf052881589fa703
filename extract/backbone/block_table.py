"""The block table of a named backbone of any family: per paper block b, its module, channels, size, stride, cost, parameters.

The rows are measured by the family (``BackboneFamily.block_table``: FLOPs counted on the meta
device, 2 x multiply-adds, the convention of the reference tables); this module looks the family
up and renders the table for ``diffrep info``.
"""

from __future__ import annotations

from extract.backbone.family import BlockRow
from extract.backbone.registry import family_of

__all__ = ["BlockRow", "block_table", "format_block_table"]


def block_table(config_name: str, batch: int = 1) -> list[BlockRow]:
    """One row per block of a named configuration, plus a final row ``b=0`` for the full forward.

    The last row (``module='total'``) holds the whole forward's FLOPs (the output head included)
    and the parameter total.
    """
    return family_of(config_name).block_table(config_name, batch)


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
