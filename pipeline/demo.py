"""The demo: the whole pipeline on the embedded default (CIFAR-10 from ../shared, the small ADM).

Extracts a class-balanced CIFAR-10 subset at a few (b, t) with ``32x32_small`` (random weights:
no checkpoint can be downloaded here), then sweeps linear probes and kNN over the cache and
writes the accuracy table and heatmaps, as ``diffrep extract`` + ``diffrep sweep`` would.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DemoSettings", "run_demo"]


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs; every field is a ``diffrep demo`` option."""

    cache_dir: str
    out_dir: str = "results/demo"
    config_name: str = "32x32_small"
    train_per_class: int = 100
    test_per_class: int = 50
    timesteps: tuple[int, ...] = (10, 50, 150)
    blocks: tuple[int, ...] = (4, 9, 10, 12, 15)
    pool: int = 8
    probe_pools: tuple[int, ...] = (1, 2, 4)
    synchronous: bool = False
    device: str = "auto"
    progress: bool = True
    results_path: str | None = field(default=None)


def run_demo(settings: DemoSettings, echo: Callable[[str], None] = print) -> dict:
    """Extract train/test features of the demo subset, then sweep linear probes and kNN.

    Returns:
        ``{"linear": table, "knn": table, "written": [paths]}`` (pyarrow tables of the sweeps).
    """
    from .cluster import open_runner
    from .evaluation import CacheSelection, SweepRequest, run_sweep
    from .extraction import ExtractionRequest, plan_extraction, run_extraction

    results_path = settings.results_path or os.path.join(settings.out_dir, "results.parquet")
    plans = []
    for split, per_class in (("train", settings.train_per_class), ("test", settings.test_per_class)):
        request = ExtractionRequest(
            dataset="cifar10", split=split, timesteps=tuple(settings.timesteps), blocks=tuple(settings.blocks),
            cache_dir=settings.cache_dir, pool=settings.pool, config_name=settings.config_name,
            per_class=per_class, device=settings.device,
        )
        plan = plan_extraction(request)
        echo(plan.describe())
        plans.append(plan)
    if any(plan.jobs for plan in plans):
        with open_runner(synchronous=settings.synchronous, device=settings.device) as runner:
            echo(f"running on {runner.description}")
            for plan in plans:
                if plan.jobs:
                    echo(run_extraction(plan, runner, progress=settings.progress).describe())
    else:
        echo("the demo cache is complete: probing only")

    cache = CacheSelection(dataset="cifar10", cache_dir=settings.cache_dir, config_name=settings.config_name,
                           results_path=results_path)
    common = dict(cache=cache, blocks=tuple(settings.blocks), timesteps=tuple(settings.timesteps),
                  pools=tuple(settings.probe_pools), device=settings.device, out_dir=settings.out_dir)
    echo(f"converged linear probes over {len(settings.blocks)} blocks x {len(settings.timesteps)} timesteps x "
         f"{len(settings.probe_pools)} pools (standardised features, L-BFGS, L2 chosen on held-out train rows)")
    linear, written = run_sweep(SweepRequest(head="linear", **common))
    echo("kNN (k=20, standardised features) over the same grid")
    knn, written_knn = run_sweep(SweepRequest(head="knn", **common))
    return {"linear": linear, "knn": knn, "written": [Path(p) for p in written + written_knn]}
