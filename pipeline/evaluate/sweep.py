"""Linear probes (or kNN) over every cached (b, t) and pool, with a table and heatmaps: ``diffrep sweep``.

Each (b, t, pool) is recorded in the results table as soon as it is measured, so an interrupted
sweep keeps what it measured; arrays still being extracted are skipped with a warning.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from extract.precision import resolve_device
from probe.errors import ProbeError
from probe.features import choose_read_pool, flatten_features, load_at_pools
from probe.heads import create_head, default_lr
from probe.knn import knn_classify
from probe.logistic import Standardizer

from pipeline.evaluate.cache_pair import CacheSelection, FitProtocol, open_pair, provenance, take_label_fraction
from pipeline.evaluate.knn import standardizer_on
from pipeline.evaluate.probe import choose_solver, fit_converged, fit_paper
from pipeline.report import markdown_table, plot_sweep_heatmaps
from pipeline.results import record_rows, results_table

__all__ = ["SweepRequest", "run_sweep"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepRequest:
    """Linear probes (or kNN) over every cached (b, t) and pool.

    Args:
        cache: the train/test caches. blocks, timesteps: restrict the sweep to these (None: every cached one).
        pools: sides the maps are pooled to. head: ``linear`` or ``knn`` (k = 20).
        protocol: how the linear head is fitted (lbfgs by default). standardize: kNN's standardisation.
        device: where it trains. out_dir: the sweep's table and heatmaps. progress: a bar per epoch.
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


def run_sweep(request: SweepRequest, announce: Callable[[dict], None] | None = None) -> tuple[pa.Table, list[Path]]:
    """Linear probes (or kNN) over every (b, t, pool); returns the sweep table and the files written."""
    selection = request.cache
    pair = open_pair(selection)
    fitting = request.protocol
    solver = choose_solver("linear", fitting.solver) if request.head == "linear" else None
    in_test = set(pair.test.arrays())
    cached = [key for key in pair.train.arrays() if key in in_test]
    keys = [key for key in cached
            if (not request.blocks or key[0] in request.blocks) and (not request.timesteps or key[1] in request.timesteps)]
    incomplete = [key for key in keys if not (pair.train.is_complete(*key) and pair.test.is_complete(*key))]
    if incomplete:
        log.warning("sweep skips arrays still being extracted: %s (finish them with diffrep extract)",
                    ", ".join(f"b{b}/t{t}" for b, t in incomplete))
        keys = [key for key in keys if key not in incomplete]
    if not keys:
        raise ProbeError(f"no cached (b, t) arrays of {selection.dataset} match the sweep: cached are "
                         f"{', '.join(f'b{b}/t{t}' for b, t in cached) or 'none'}; run diffrep extract first")
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
    table = results_table(rows)
    out_dir = Path(request.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"sweep_{selection.dataset}_{pair.backbone_id}_{request.head}"
    pq.write_table(table, out_dir / f"{stem}.parquet")
    (out_dir / f"{stem}.md").write_text(f"# sweep {selection.dataset} {pair.backbone_id} {request.head}\n\n"
                                        + markdown_table(table) + "\n")
    written = [out_dir / f"{stem}.parquet", out_dir / f"{stem}.md"]
    for metric in ("top1", "top5"):
        written.append(plot_sweep_heatmaps(table, out_dir / f"{stem}_{metric}.png", metric=metric,
                                           title=f"{selection.dataset} {pair.backbone_id} {request.head} {metric}"))
    return table, written
