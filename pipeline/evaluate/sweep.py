"""Linear probes (or kNN) over every cached (b, t) and pool, with a table and heatmaps: ``diffrep sweep``.

Each (b, t, pool) is recorded in the results table as soon as it is measured, so an interrupted
sweep keeps what it measured. A cell of the grid that is absent, unfinished or damaged in either split
stops the sweep before anything trains, named with the extract command that completes it; with
``skip_incomplete`` the rest is swept and the missing cells are named in the result and the report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from extract.errors import CacheIncompleteError
from extract.precision import resolve_device
from probe.errors import ProbeError
from probe.features import choose_read_pool, flatten_features, load_at_pools
from probe.heads import create_head, default_lr
from probe.knn import knn_classify
from probe.logistic import Standardizer

from pipeline.evaluate.cache_pair import (
    CacheSelection, FitProtocol, open_pair, provenance, require_in_ram, take_label_fraction,
)
from pipeline.evaluate.knn import standardizer_on
from pipeline.evaluate.probe import choose_solver, fit_converged, fit_paper
from pipeline.report import markdown_table, plot_sweep_heatmaps
from pipeline.results import record_rows, results_table

__all__ = ["SweepRequest", "SweepResult", "run_sweep"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepRequest:
    """Linear probes (or kNN) over every cached (b, t) and pool.

    Args:
        cache: the train/test caches. blocks, timesteps: restrict the sweep to these (None: every cached one).
        pools: sides the maps are pooled to. head: ``linear`` or ``knn`` (k = 20).
        protocol: how the linear head is fitted (lbfgs by default). standardize: kNN's standardisation.
        device: where it trains. out_dir: the sweep's table and heatmaps. progress: a bar per epoch.
        skip_incomplete: sweep the complete cells when some are absent, unfinished or damaged (they are named
            in the result and the report); without it such a cell stops the sweep before anything trains.
    """

    cache: CacheSelection
    blocks: tuple[int, ...] | None = None
    timesteps: tuple[int, ...] | None = None
    pools: tuple[int, ...] = (1, 2, 4)
    head: str = "linear"
    protocol: FitProtocol = field(default_factory=lambda: FitProtocol(solver="lbfgs"))
    standardize: bool = True
    device: str = "auto"
    out_dir: str = "results/sweeps"
    progress: bool = False
    skip_incomplete: bool = False


class SweepResult(NamedTuple):
    """What ``run_sweep`` measured and wrote, and the grid cells it could not measure (``--skip-incomplete``)."""

    table: pa.Table
    written: list[Path]
    missing: dict[str, str]  # "b<b>/t<t>" -> what is wrong with it, in which split


def run_sweep(request: SweepRequest, announce: Callable[[dict], None] | None = None) -> SweepResult:
    """Linear probes (or kNN) over every (b, t, pool); returns the sweep table, the files written, the cells missed.

    Raises:
        CacheIncompleteError: a cell of the grid is absent, unfinished or damaged in either split (named, with
            the extract command that completes it), unless ``skip_incomplete``.
    """
    selection = request.cache
    pair = open_pair(selection)
    fitting = request.protocol
    solver = choose_solver("linear", fitting.solver) if request.head == "linear" else None
    cached = sorted(set(pair.train.arrays()) | set(pair.test.arrays()))
    if request.blocks or request.timesteps:
        blocks = request.blocks or sorted({b for b, _ in cached})
        timesteps = request.timesteps or sorted({t for _, t in cached})
        grid = [(int(b), int(t)) for b in blocks for t in timesteps]
    else:
        grid = cached
    if not grid:
        raise ProbeError(f"the caches of {selection.dataset} hold no (b, t) array: run diffrep extract first")
    missing = _missing_cells(pair, grid, selection)
    if missing and not request.skip_incomplete:
        split, cache, problem = next(iter(missing.values()))
        keys = [key for key, (s, _, _) in missing.items() if s == split]
        others = f" ({len(missing)} cells in all: {', '.join(f'b{b}/t{t}' for b, t in missing)})" if len(missing) > 1 else ""
        what = f"the sweep's grid is incomplete: {problem}{others} (sweep the rest with --skip-incomplete, or complete it)"
        raise CacheIncompleteError(f"{what}: run the diffrep extract command that wrote the {split} cache again",
                                   problem=what, spec=cache.spec, path=cache.path, arrays=keys, runs=cache.runs)
    if missing:
        log.warning("sweep skips %d incomplete cell(s): %s", len(missing),
                    "; ".join(problem for _, _, problem in missing.values()))
    keys = [key for key in grid if key not in missing]
    if not keys:
        raise ProbeError(f"no cell of the sweep's grid is complete in both splits of {selection.dataset}: "
                         f"{'; '.join(problem for _, _, problem in missing.values())}")
    for key in keys:
        read_pool = {key: choose_read_pool(pair.train, key, max(request.pools, key=lambda p: p or 1 << 30))}
        for split, cache in ((selection.train_split, pair.train), (selection.test_split, pair.test)):
            require_in_ram(cache, [key], read_pool, split)
    device = resolve_device(request.device)
    lrs = tuple(fitting.lr) if fitting.lr else (default_lr("linear"),)
    rows = []
    for key in keys:
        for pool in request.pools:
            read_pool = {key: choose_read_pool(pair.train, key, pool)}
            train = take_label_fraction(load_at_pools(pair.train, [key], read_pool), fitting)
            test = load_at_pools(pair.test, [key], read_pool)
            num_classes = len(train.class_names) or int(train.labels.max()) + 1
            row = dict(**provenance(selection, pair), train_size=train.num_images, test_size=test.num_images,
                       blocks=[key[0]], timesteps=[key[1]], pool=int(pool), seed=fitting.seed,
                       label_fraction=fitting.label_fraction)
            train_x, test_x = flatten_features(train.features, [key], pool), flatten_features(test.features, [key], pool)
            if request.head == "knn":
                began = time.perf_counter()
                scale = standardizer_on(Standardizer.fit(train_x), device) if request.standardize else None
                scores = knn_classify(train_x, train.labels, test_x, test.labels, num_classes, ks=(20,),
                                      device=device, transform=scale)[20]
                row.update(head="knn", protocol="knn", standardize=request.standardize, k=min(20, train.num_images),
                           parameters=0, epochs=0, top1=scores["top1"], top5=scores["top5"],
                           train_seconds=time.perf_counter() - began)
            elif solver == "lbfgs":
                row.update(head="linear", **fit_converged(train_x, train.labels, test_x, test.labels, num_classes,
                                                          fitting, device))
            else:
                shapes = {key: tuple(train.features[key].shape[1:])}
                row.update(head="linear", **fit_paper(lambda: create_head("linear", shapes, num_classes, pool=pool or None),
                                                      lrs, solver, train, test, fitting, device, request.progress))
            log.info("sweep b=%d t=%d pool=%d: top-1 %.4f", key[0], key[1], pool, row["top1"])
            record_rows([row], selection.results_path, announce)  # one row at a time: an interrupted sweep keeps what it measured
            rows.append(row)
    cells = {f"b{b}/t{t}": problem for (b, t), (_, _, problem) in missing.items()}
    table = results_table(rows)
    out_dir = Path(request.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"sweep_{selection.dataset}_{pair.backbone_id}_{request.head}"
    pq.write_table(table, out_dir / f"{stem}.parquet")
    skipped = "".join(f"- {cell}: {problem}\n" for cell, problem in cells.items())
    (out_dir / f"{stem}.md").write_text(f"# sweep {selection.dataset} {pair.backbone_id} {request.head}\n\n"
                                        + markdown_table(table) + "\n"
                                        + (f"\n## Cells not measured (--skip-incomplete)\n\n{skipped}" if skipped else ""))
    written = [out_dir / f"{stem}.parquet", out_dir / f"{stem}.md"]
    for metric in ("top1", "top5"):
        written.append(plot_sweep_heatmaps(table, out_dir / f"{stem}_{metric}.png", metric=metric,
                                           title=f"{selection.dataset} {pair.backbone_id} {request.head} {metric}"))
    return SweepResult(table, written, cells)


def _missing_cells(pair, grid, selection: CacheSelection) -> dict:
    """``{(b, t): (split, cache, problem)}`` for cells absent, unfinished or damaged in either split (train first)."""
    missing = {}
    for key in grid:
        for split, cache in ((selection.train_split, pair.train), (selection.test_split, pair.test)):
            problem = _cell_problem(cache, key)
            if problem:
                missing[key] = (split, cache, f"b{key[0]}/t{key[1]} of the {split} split {problem}")
                break
    return missing


def _cell_problem(cache, key) -> str | None:
    """What is wrong with one (b, t) array of a cache (every view), None when it is complete and undamaged."""
    b, t = key
    if not cache.has_array(b, t):
        return "is not extracted"
    for view in cache.spec.view_ids:
        if not cache.has_array(b, t, view):
            return f"has no view {view}"
        damaged = cache.damaged_shards(b, t, view)
        if damaged:
            return f"has {len(damaged)} damaged shard(s) {', '.join(map(str, sorted(damaged)))}"
        unwritten = cache.missing_shards(b, t, view)
        if unwritten:
            return f"is missing {len(unwritten)} of {cache.num_shards} shards"
    return None
