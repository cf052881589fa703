"""The staged search: on a synthetic cache whose best cell is known it finds that cell, asks only for the rows it lacks, and counts its forwards exactly; its plan's arithmetic."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from extract.cache import CacheSpec, FeatureCache, create_cache
from probe.crossval import stratified_folds
from pipeline.errors import SearchError
from pipeline.report import write_report
from pipeline.search import SearchRequest, run_search
from pipeline.search_plan import build_plan, coarse_timesteps, kept_count, refine_timesteps, stage_rows
from tests.extract.shard_writes import write_and_mark

BLOCKS = (3, 6, 9)
TIMESTEPS = (5, 25, 50, 100, 200, 400)
BEST = (6, 100)  # not on stage 1's coarse grid (5, 50, 200, 400): only the refinement can reach it
CLASSES, PER_CLASS, SHARD = 4, 60, 20
SHAPE = (4, 2, 2)


def _strength(b: int, t: int) -> float:
    """Class signal of a cell: peaks at BEST, smooth over t (as accuracy is in every published curve)."""
    over_t = np.exp(-abs(np.log(t / BEST[1])))  # 1 at t=100, 0.5 at 50 and 200, 0.05 at 5
    return 1.2 * over_t * (1.0 if b == BEST[0] else 0.3)


def _rows(b: int, t: int, labels: np.ndarray) -> np.ndarray:
    """Features of (b, t) for rows with ``labels``: class means scaled by the cell's strength, plus unit noise."""
    means = np.random.default_rng(7).standard_normal((CLASSES, int(np.prod(SHAPE))))
    noise = np.random.default_rng([b, t]).standard_normal((len(labels), int(np.prod(SHAPE))))
    return (_strength(b, t) * means[labels] + noise).reshape(len(labels), *SHAPE).astype(np.float16)


@pytest.fixture
def synthetic(tmp_path):
    """A cache of CIFAR-like labels with every array created and no shard written."""
    n = CLASSES * PER_CLASS
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    spec = CacheSpec(dataset="synthetic", split="train", backbone_id="toy-000000000000", config_name="toy",
                     image_size=32, pool=2, num_images=n, shard_size=SHARD, row_order_seed=0)
    cache = create_cache(tmp_path, spec, [f"/toy/c{y}/{i:04d}.jpg" for i, y in enumerate(labels)], labels,
                         [f"c{y}" for y in range(CLASSES)], arrays={(b, t): SHAPE for b in BLOCKS for t in TIMESTEPS},
                         native_sizes={b: 2 for b in BLOCKS})
    return tmp_path, cache


def _request(tmp_path, **changes) -> SearchRequest:
    settings = dict(dataset="synthetic", cache_dir=str(tmp_path), blocks=BLOCKS, timesteps=TIMESTEPS,
                    start_per_class=5, growth=3.0, keep=1 / 3, final_cells=2, coarse_stride=2, scorer="knn", folds=5,
                    k=10, pool=2, device="cpu", results_path=str(tmp_path / "results.parquet"),
                    out_dir=str(tmp_path / "search"))
    settings.update(changes)
    return SearchRequest(**settings)


def _writer(cache: FeatureCache, asked: list):
    """A stand-in for the extraction: writes the shards of the asked rows and cells; returns forwards run."""
    written: set[tuple[int, int, int]] = set()
    labels = cache.labels

    def fill(requests) -> int:
        forwards = 0
        for request in requests:
            shards = -(-request.first_rows // SHARD)
            for t in request.timesteps:
                todo = [s for s in range(shards) if any((s, b, t) not in written for b in request.blocks)]
                asked.append((t, tuple(request.blocks), request.first_rows, todo))
                for shard in todo:
                    start, stop = cache.shard_bounds(shard)
                    write_and_mark(cache.path, shard, {(b, t): _rows(b, t, labels[start:stop]) for b in request.blocks})
                    written.update((shard, b, t) for b in request.blocks)
                    forwards += stop - start
        return forwards

    return fill


def test_the_search_finds_the_known_best_cell_off_the_coarse_grid_and_pays_only_for_new_rows(synthetic):
    root, cache = synthetic
    scorer = "knn"
    request = _request(root, scorer=scorer)
    plan = build_plan(request, cache.spec, cache.path, CLASSES, {b: 2 * int(np.prod(SHAPE)) for b in BLOCKS})
    asked = []
    result = run_search(request, plan=plan, fill=_writer(cache, asked))

    assert (result.ranked[0]["block"], result.ranked[0]["timestep"]) == BEST
    assert result.ranked[0]["top1"] > 0.8
    # stage 1 is every block at the coarse timesteps on the first 5 images per class (one shard)
    assert [a for a in asked if a[2] == 20] [:1] == [(5, BLOCKS, 20, [0])]
    assert {a[0] for a in asked if a[2] == 20} >= {5, 50, 200, 400, 100}
    # a grown stage asks for the kept cells only, and no shard is extracted twice for a cell
    seen = set()
    for t, blocks, rows, shards in asked:
        for shard in shards:
            for b in blocks:
                assert (shard, b, t) not in seen
                seen.add((shard, b, t))
    # forwards: counted per timestep from the rows asked for, equal to what the stand-in ran
    assert result.forwards == sum(s.ran for s in result.stages) == sum(
        (cache.shard_bounds(s)[1] - cache.shard_bounds(s)[0]) for t, _, _, shards in asked for s in shards)
    assert result.forwards <= plan.forwards < plan.grid_forwards
    for stage, planned in zip([s for s in result.stages if s.name.isdigit()], [s for s in plan.stages if s.name.isdigit()]):
        assert stage.rows == planned.rows and len(stage.cells) <= planned.cells and stage.forwards <= planned.forwards

    rows = pq.read_table(request.results_path).to_pylist()
    assert {r["protocol"] for r in rows} >= {"search-stage-1", "search-stage-2"}
    assert all(r["head"] == scorer for r in rows)
    assert {(int(r["blocks"]), int(r["timesteps"])) for r in rows if r["protocol"] == "search-stage-1"} == \
        {(b, t) for b in BLOCKS for t in (5, 50, 200, 400, 25, 100)} - {(b, 25) for b in BLOCKS} | \
        {(b, t) for b in BLOCKS for t in {a[0] for a in asked if a[2] == 20}}
    written = [p.name for p in result.written]
    assert any(name.endswith(".png") for name in written) and any(name.endswith(".md") for name in written)
    report = [p.name for p in write_report(pq.read_table(request.results_path), root / "report")]
    assert any(name.startswith("search_synthetic") for name in report)


def test_the_linear_scorer_scores_noise_near_chance_and_the_best_cell_near_100(synthetic):
    """Stage 1 alone (every cell kept): a cell without signal near 1/4, the best one near 100%, on the same rows."""
    root, cache = synthetic
    request = _request(root, final_cells=30, scorer="linear", folds=2, start_per_class=15)
    plan = build_plan(request, cache.spec, cache.path, CLASSES, {b: 32 for b in BLOCKS})
    result = run_search(request, plan=plan, fill=_writer(cache, []))
    scores = {(r["block"], r["timestep"]): r["top1"] for r in result.ranked}
    assert scores[(3, 5)] < 0.45 and scores[BEST] > 0.9
    assert (result.ranked[0]["block"], result.ranked[0]["timestep"]) == BEST
    assert len(result.stages) >= 2 and all(s.rows == 60 for s in result.stages)


def test_stage_rows_are_whole_shards_growing_to_the_subset():
    assert stage_rows(100, 3, 100, 2000) == [100, 300, 900, 2000]
    assert stage_rows(50, 2, 64, 300) == [64, 128, 256, 300]
    assert stage_rows(10, 1.01, 10, 30) == [10, 20, 30]  # at least a shard more each stage


def test_coarse_grid_and_refinement_between_scored_neighbours():
    assert coarse_timesteps(TIMESTEPS, 2) == (5, 50, 200, 400)
    assert coarse_timesteps(TIMESTEPS, 4) == (5, 200, 400)
    assert refine_timesteps(TIMESTEPS, {5, 50, 200, 400}, 50) == [25, 100]
    assert refine_timesteps(TIMESTEPS, {5, 200, 400}, 200) == [50]  # the middle of 25, 50, 100
    assert refine_timesteps(TIMESTEPS, {5, 200, 400}, 5) == [50]
    assert refine_timesteps(TIMESTEPS, set(TIMESTEPS), 100) == []


def test_kept_count_keeps_a_share_but_never_all_nor_below_the_final_cells():
    assert kept_count(30, 1 / 3, 2) == 10
    assert kept_count(10, 1 / 3, 2) == 4
    assert kept_count(4, 1 / 3, 2) == 2
    assert kept_count(3, 0.9, 2) == 2
    assert kept_count(1, 0.5, 2) == 1


def test_stratified_folds_spread_every_class():
    labels = np.repeat(np.arange(5), 23)
    folds = stratified_folds(labels, 5, seed=0)
    counts = np.array([[np.sum((labels == c) & (folds == f)) for f in range(5)] for c in range(5)])
    assert counts.min() >= 4 and counts.max() <= 5
    assert np.bincount(folds).max() - np.bincount(folds).min() <= 1


def test_settings_that_leave_no_search_fail_in_one_line(synthetic):
    root, cache = synthetic
    from pipeline.search_plan import plan_search

    with pytest.raises(SearchError, match="--growth"):
        plan_search(_request(root, growth=1.0))
    with pytest.raises(SearchError, match="--keep"):
        plan_search(_request(root, keep=1.0))
