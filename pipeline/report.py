"""Reports of the results table and CKA matrices: a terminal table, Markdown, and PNG plots (matplotlib, Agg).

``plot_sweep_heatmaps`` draws accuracy over block x timestep with one panel per pool size (the
paper's Figures 3 and 4); ``plot_search_heatmap`` what a staged search scored, each cell with its
stage; ``plot_cka_heatmap`` draws one CKA matrix; ``write_report`` does it all for a results table.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

__all__ = [
    "TABLE_COLUMNS", "format_table", "markdown_table", "plot_sweep_heatmaps", "plot_search_heatmap", "plot_best_by_head",
    "plot_cka_heatmap", "write_report",
]

TABLE_COLUMNS = ("date", "dataset", "backbone_id", "head", "strategy", "blocks", "timesteps", "pool", "k",
                 "parameters", "protocol", "solver", "l2", "lr", "epochs", "label_fraction", "train_views", "fresh_noise", "augment",
                 "finetune", "train_split", "test_split", "top1", "top5", "train_seconds",
                 "task", "image_size", "box_ap", "box_ap50", "box_ap75", "mask_ap", "mask_ap50", "mask_ap75")  # detect


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cell(name: str, value) -> str:
    if value is None:
        return ""
    if name in ("top1", "top5") or name.startswith(("box_ap", "mask_ap")):
        return f"{100 * value:.2f}"
    if name == "parameters":
        return f"{value / 1e6:.2f}M" if value >= 1e5 else str(value)
    if name in ("lr", "l2"):
        return f"{value:g}"
    if name == "train_seconds":
        return f"{value:.1f}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if name == "date":
        return str(value)[:16].replace("T", " ")
    return str(value)


def _rows(table: pa.Table, columns: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    columns = [c for c in columns if c in table.column_names and table.column(c).null_count < table.num_rows]
    data = table.select(columns).to_pylist()  # columns no row fills (e.g. strategy without DifFeed) are left out
    headers = [f"{c} %" if c in ("top1", "top5") or c.startswith(("box_ap", "mask_ap")) else c for c in columns]
    return headers, [[_cell(c, row[c]) for c in columns] for row in data]


def format_table(table: pa.Table, columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """A fixed-width text table (accuracies in percent) for the terminal."""
    headers, rows = _rows(table, columns)
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(table: pa.Table, columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """The same table as GitHub Markdown."""
    headers, rows = _rows(table, columns)
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def plot_sweep_heatmaps(table: pa.Table, path: str | os.PathLike, metric: str = "top1", title: str = "") -> Path:
    """Heatmaps of ``metric`` (percent) over block (rows) x timestep (columns), one panel per pool.

    Args:
        table: results rows of single-block, single-timestep runs (one head, one backbone, one dataset);
            when a (b, t, pool) appears more than once the last row wins.
        path: the PNG to write. metric: ``top1`` or ``top5``. title: figure title.

    Returns:
        The path written.
    """
    plt = _pyplot()
    rows = [r for r in table.to_pylist() if "," not in r["blocks"] and "," not in r["timesteps"]]
    pools = sorted({r["pool"] if r["pool"] is not None else 0 for r in rows})
    blocks = sorted({int(r["blocks"]) for r in rows})
    steps = sorted({int(r["timesteps"]) for r in rows})
    grids = {}
    for pool in pools:
        grid = grids[pool] = np.full((len(blocks), len(steps)), np.nan)
        for r in rows:
            if (r["pool"] or 0) == pool and r[metric] is not None:
                grid[blocks.index(int(r["blocks"])), steps.index(int(r["timesteps"]))] = 100 * r[metric]
    values = [v for g in grids.values() for v in g.ravel() if not math.isnan(v)]
    low, high = (min(values), max(values)) if values else (0.0, 100.0)
    fig, axes = plt.subplots(1, max(len(pools), 1), figsize=(1.5 + (1.2 + 0.6 * len(steps)) * max(len(pools), 1),
                                                           1.6 + 0.4 * max(len(blocks), 2)),
                             squeeze=False, layout="constrained")
    image = None
    for ax, pool in zip(axes[0], pools):
        grid = grids[pool]
        image = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower", vmin=low, vmax=high)
        for i in range(len(blocks)):
            for j in range(len(steps)):
                if not math.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=7, color="white")
        ax.set_xticks(range(len(steps)), [str(t) for t in steps])
        ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
        ax.set_xlabel("timestep t")
        ax.set_ylabel("block b")
        ax.set_title(f"pool {pool if pool else 'none'}")
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), label=f"{metric} %")
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_search_heatmap(cells: Sequence[dict], path: str | os.PathLike, title: str = "") -> Path:
    """What a search scored: each cell's latest score (percent) over block x timestep, annotated with its stage.

    Args:
        cells: ``{"block", "timestep", "stage", "top1"}`` per scored cell (``pipeline.search`` ranks them so);
            cells never scored stay blank. path: the PNG to write. title: figure title.

    Returns:
        The path written.
    """
    plt = _pyplot()
    blocks = sorted({int(c["block"]) for c in cells})
    steps = sorted({int(c["timestep"]) for c in cells})
    grid = np.full((len(blocks), len(steps)), np.nan)
    stage = {}
    for c in cells:
        i, j = blocks.index(int(c["block"])), steps.index(int(c["timestep"]))
        grid[i, j], stage[(i, j)] = 100 * c["top1"], int(c["stage"])
    fig, ax = plt.subplots(figsize=(2.5 + 0.8 * len(steps), 1.8 + 0.45 * max(len(blocks), 2)), layout="constrained")
    image = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
    for (i, j), k in stage.items():
        ax.text(j, i, f"{grid[i, j]:.1f}\ns{k}", ha="center", va="center", fontsize=7, color="white")
    ax.set_xticks(range(len(steps)), [str(t) for t in steps])
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
    ax.set_xlabel("timestep t")
    ax.set_ylabel("block b")
    fig.colorbar(image, ax=ax, label="score % at the cell's last stage (sK)")
    if title:
        ax.set_title(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _search_cells(table: pa.Table) -> list[dict]:
    """Each (b, t) of a search's rows at its latest stage (``protocol = search-stage-<k>``)."""
    latest: dict[tuple[int, int], dict] = {}
    for r in table.to_pylist():
        stage = int(r["protocol"].rsplit("-", 1)[1])
        key = (int(r["blocks"]), int(r["timesteps"]))
        if key not in latest or stage >= latest[key]["stage"]:
            latest[key] = dict(block=key[0], timestep=key[1], stage=stage, top1=r["top1"])
    return list(latest.values())


def plot_best_by_head(table: pa.Table, path: str | os.PathLike) -> Path:
    """Bar chart of the best top-1 per (dataset, head) in the table."""
    plt = _pyplot()
    best: dict[str, float] = {}
    for r in table.to_pylist():
        if r.get("top1") is None:  # a detection row has box AP instead (in the table, not this chart)
            continue
        name = f"{r['dataset']}\n{r['head']}" + (f"@{r['k']}" if r["k"] is not None else "")
        best[name] = max(best.get(name, 0.0), 100 * (r["top1"] or 0.0))
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * max(len(best), 1), 3.5))
    ax.bar(range(len(best)), list(best.values()), color="tab:blue")
    ax.set_xticks(range(len(best)), list(best), fontsize=7)
    ax.set_ylabel("best top-1 %")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_cka_heatmap(matrix: np.ndarray, labels: Sequence[str], path: str | os.PathLike, title: str = "") -> Path:
    """One CKA matrix (values in [0, 1]) as an annotated heatmap PNG."""
    plt = _pyplot()
    size = len(labels)
    fig, ax = plt.subplots(figsize=(2.5 + 0.6 * max(size, 2), 1.8 + 0.55 * max(size, 2)))
    image = ax.imshow(np.asarray(matrix), vmin=0.0, vmax=1.0, cmap="magma", origin="lower")
    for i in range(size):
        for j in range(size):
            ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if matrix[i][j] > 0.5 else "white")
    ax.set_xticks(range(size), list(labels), rotation=45)
    ax.set_yticks(range(size), list(labels))
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="CKA")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(table: pa.Table, out_dir: str | os.PathLike) -> list[Path]:
    """Markdown table and PNG plots of a results table under ``out_dir``.

    Writes ``results.md``, ``best_by_head.png`` and, for every (dataset, backbone, head) with more
    than one single (b, t), ``sweep_<dataset>_<backbone>_<head>.png``; the rows of a staged search
    (``protocol = search-stage-<k>``) get their own ``search_...png`` of each cell's latest score.

    Returns:
        The paths written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "results.md"]
    written[0].write_text("# diffrep results\n\n" + markdown_table(table) + "\n")
    if table.num_rows:
        written.append(plot_best_by_head(table, out_dir / "best_by_head.png"))
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(table.to_pylist()):
        if "," in (r["blocks"] or ",") or "," in (r["timesteps"] or ","):
            continue
        search = "search" if (r["protocol"] or "").startswith("search-stage-") else "sweep"
        groups.setdefault((search, r["dataset"], r["backbone_id"], r["head"] + (f"@{r['k']}" if r["k"] else "")),
                          []).append(i)
    for (kind, dataset, backbone, head), index in groups.items():
        sub = table.take(index)
        if len({(r["blocks"], r["timesteps"]) for r in sub.select(["blocks", "timesteps"]).to_pylist()}) < 2:
            continue
        name = f"{kind}_{dataset}_{backbone}_{head}".replace("@", "k").replace("/", "_")
        title = f"{dataset} {backbone} {head}" + (" (search)" if kind == "search" else "")
        if kind == "search":
            written.append(plot_search_heatmap(_search_cells(sub), out_dir / f"{name}.png", title=title))
        else:
            written.append(plot_sweep_heatmaps(sub, out_dir / f"{name}.png", title=title))
    return written
