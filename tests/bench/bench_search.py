"""Search benchmark: the staged search against the full (block, timestep) grid on one CIFAR-10 setting, in one run.

Given a cache dir holding the full grid (``diffrep extract`` of every cell on the train and test
subsets, the search's shard size and pool), it measures:

1. the grid: the converged linear probe on every cell (``diffrep sweep``, one pool), train vs test;
2. the proxy scorers: k-fold cross-validated kNN and converged linear probe on the first rows of
   the train cache (stage 1's and stage 2's sizes), each cell's score rank-correlated (Spearman)
   with the grid's top-1;
3. the search itself (``--final`` included): its winner's grid top-1 against the grid's best (the
   top-1 gap), the rank correlation of its ranking with the grid's, and its forwards against the
   grid's (train only, and train + test).

    python -m tests.bench.bench_search --grid-dir DIR [--search-dir NEW_DIR] [--checkpoint PT | --weight-seed 0]

Without ``--search-dir`` the search runs on the grid's own cache: it then extracts nothing, and its
forwards are what its stages ask for, which is what runs on a fresh cache (the e2e test
``tests/pipeline/test_search_cifar10.py`` checks that equality); the features are bit for bit the
same (same images, noise, batch size and threads), so are the scores.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scipy.stats import spearmanr

BLOCKS = (5, 8, 10, 12, 15)
TIMESTEPS = (5, 25, 50, 100, 200, 400)


def grid_scores(grid_dir: str, pool: int, results: str) -> dict[tuple[int, int], float]:
    """(b, t) -> test top-1 of the converged linear probe on the full train subset (one sweep; an earlier
    run's table at ``results`` is read instead)."""
    import os

    import pyarrow.parquet as pq

    from pipeline.evaluate import CacheSelection, SweepRequest, run_sweep

    if os.path.exists(results):
        return {(int(r["blocks"]), int(r["timesteps"])): r["top1"] for r in pq.read_table(results).to_pylist()}

    table = run_sweep(SweepRequest(cache=CacheSelection(dataset="cifar10", cache_dir=grid_dir, config_name="32x32_small",
                                                           results_path=results),
                                      blocks=BLOCKS, timesteps=TIMESTEPS, pools=(pool,), head="linear", device="cpu",
                                      out_dir=results.rsplit("/", 1)[0])).table
    return {(int(r["blocks"]), int(r["timesteps"])): r["top1"] for r in table.to_pylist()}


def proxy_scores(grid_dir: str, rows: int, scorer: str, folds: int = 5) -> dict[tuple[int, int], float]:
    """(b, t) -> cross-validated score on the first ``rows`` rows of the train cache (as a search stage reads them)."""
    import torch

    from extract.cache import FeatureCache
    from probe.crossval import cross_validate
    from probe.features import resolve_backbone_id
    from extract.cache import cache_path
    from pipeline.search import _read_rows

    backbone = resolve_backbone_id(grid_dir, "cifar10", "train", "32x32_small")
    cache = FeatureCache(cache_path(grid_dir, "cifar10", "train", backbone))
    valid = np.asarray(cache.valid[:rows])
    labels = torch.from_numpy(np.asarray(cache.labels[:rows])[valid])
    return {(b, t): cross_validate(_read_rows(cache, (b, t), rows)[valid], labels, 10, scorer, folds=folds).top1
            for b in BLOCKS for t in TIMESTEPS}


def rank_correlation(a: dict, b: dict) -> float:
    keys = sorted(set(a) & set(b))
    return float(spearmanr([a[k] for k in keys], [b[k] for k in keys]).statistic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid-dir", required=True)
    parser.add_argument("--search-dir", default=None)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--weight-seed", type=int, default=0)
    parser.add_argument("--scorer", default="linear")
    parser.add_argument("--pool", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--out", default="/tmp/bench_search.json")
    parser.add_argument("--start-per-class", type=int, default=20)
    parser.add_argument("--growth", type=float, default=2.0)
    parser.add_argument("--shard-size", type=int, default=100, help="the grid cache's")
    parser.add_argument("--skip-proxies", action="store_true")
    args = parser.parse_args()

    from pipeline.search import SearchRequest, plan_search, run_search

    began = time.perf_counter()
    args.search_dir = args.search_dir or args.grid_dir
    grid = grid_scores(args.grid_dir, args.pool, args.grid_dir.rstrip("/") + "-grid/results.parquet")
    best = max(grid, key=lambda k: (grid[k], -k[1], -k[0]))
    report = {"grid": {f"b{b}/t{t}": v for (b, t), v in sorted(grid.items())}, "grid_best": [*best, grid[best]],
              "grid_seconds": time.perf_counter() - began}
    print(f"grid best b={best[0]} t={best[1]} {100 * grid[best]:.1f}%", flush=True)
    if not args.skip_proxies:
        for scorer, sizes in (("knn", (100, 300)), ("linear", (100,))):  # the linear scorer costs ~100x kNN's
            for rows in sizes:
                began = time.perf_counter()
                scores = proxy_scores(args.grid_dir, rows, scorer)
                rho = rank_correlation(scores, grid)
                top = max(scores, key=scores.get)
                report[f"proxy_{scorer}_{rows}"] = {"spearman": rho, "top": [*top, grid[top]],
                                                    "seconds": time.perf_counter() - began}
                print(f"proxy {scorer} on {rows} rows: spearman {rho:.3f}, its top b={top[0]} t={top[1]} has grid "
                      f"{100 * grid[top]:.1f}% ({time.perf_counter() - began:.0f} s)", flush=True)
    request = SearchRequest(dataset="cifar10", cache_dir=args.search_dir, blocks=BLOCKS, timesteps=TIMESTEPS,
                            config_name="32x32_small", checkpoint=args.checkpoint, weight_seed=args.weight_seed,
                            per_class=args.per_class, start_per_class=args.start_per_class, growth=args.growth,
                            shard_size=args.shard_size,
                            scorer=args.scorer, pool=args.pool, final=True,
                            test_per_class=args.test_per_class,
                            device="cpu", synchronous=True, results_path=args.out.rsplit(".", 1)[0] + "-search.parquet",
                            out_dir=args.out.rsplit(".", 1)[0] + "-search")
    plan = plan_search(request)
    print(plan.describe(), flush=True)
    began = time.perf_counter()
    result = run_search(request, echo=lambda line: print(line, flush=True), plan=plan)
    print(result.describe(), flush=True)
    winner = (result.ranked[0]["block"], result.ranked[0]["timestep"])
    order = {(r["block"], r["timestep"]): -i for i, r in enumerate(result.ranked)}
    stage1 = {(r["block"], r["timestep"]): r["stage1"] for r in result.ranked}
    test_forwards = plan.test_images * len(TIMESTEPS)
    report["search"] = {
        "winner": [*winner, grid[winner]], "gap_points": 100 * (grid[best] - grid[winner]),
        "final_top1": result.ranked[0].get("final_top1"), "spearman_ranking": rank_correlation(order, grid),
        "spearman_stage1": rank_correlation(stage1, grid), "cells_scored": len(result.ranked),
        "forwards": result.forwards, "final_forwards": result.final_forwards,
        "grid_forwards_train": plan.grid_forwards, "grid_forwards_train_test": plan.grid_forwards + test_forwards,
        "stages": [(s.name, s.rows, len(s.cells), s.forwards, s.ran) for s in result.stages],
        "seconds": time.perf_counter() - began,
    }
    print(json.dumps(report["search"], indent=1), flush=True)
    with open(args.out, "w") as out:
        json.dump(report, out, indent=1)


if __name__ == "__main__":
    main()
