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


def format_block_table(rows: list[BlockRow], extra_sizes: dict[str, dict[int, str]] | None = None,
                       size_label: str = "size") -> str:
    """Render rows as an aligned text table (GFLOPs and share of the full forward).

    ``extra_sizes``: ``{column heading: {b: value}}``, more columns after the size (SD's sides and GFLOPs at 256 px).
    """
    total = rows[-1]
    extra = extra_sizes or {}
    width = max([17] + [len(r.module) for r in rows[:-1]])
    widths = {s: max(5, len(s)) for s in extra}
    sizes_head = "".join(f" {s:>{widths[s]}}" for s in extra)
    lines = [f"{'b':>3}  {'module':<{width}} {'channels':>8} {size_label:>5}{sizes_head} {'cum GFLOPs':>11} "
             f"{'of full':>8} {'params':>12}"]
    for r in rows[:-1]:
        sides = "".join(f" {extra[s][r.b]:>{widths[s]}}" for s in extra)
        lines.append(
            f"{r.b:>3}  {r.module:<{width}} {r.channels:>8} {r.size:>5}{sides} {r.flops_cum / 1e9:>11.2f} "
            f"{r.flops_cum / total.flops_cum:>8.1%} {r.params:>12,}"
        )
    pad = "".join(f" {'':>{widths[s]}}" for s in extra)
    lines.append(f"{'':>3}  {'full forward':<{width}} {'':>8} {'':>5}{pad} {total.flops_cum / 1e9:>11.2f} {'100.0%':>8} "
                 f"{total.params:>12,}")
    return "\n".join(lines)
