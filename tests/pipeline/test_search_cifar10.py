"""``diffrep search`` on real CIFAR-10 (bundled 32x32_small): its winner is within GAP points of a small grid computed here on the same cache, for fewer forwards."""

from __future__ import annotations

from click.testing import CliRunner

from extract.backbone.configs import bundled_checkpoint
from pipeline.cli.main import main
from pipeline.evaluate import CacheSelection, SweepRequest, run_sweep
from pipeline.extraction_run import fill_caches
from pipeline.search import SearchRequest, run_search

BLOCKS, TIMESTEPS = (5, 10, 15), (5, 50, 400)
TRAIN, TEST = 30, 20  # images per class
GAP = 0.05  # the search's winner may trail the grid's best by at most 5 points of test top-1: on 200 test images
# one accuracy's standard error is about 3.3 points, so cells closer than that are not told apart by the grid either


def test_search_winner_is_within_the_gap_of_the_grid_and_costs_fewer_forwards(cifar10_root, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFREP_DATA", str(cifar10_root.parent))
    checkpoint = bundled_checkpoint("32x32_small")
    request = SearchRequest(dataset="cifar10", cache_dir=str(tmp_path / "cache"), blocks=BLOCKS, timesteps=TIMESTEPS,
                            config_name="32x32_small", checkpoint=checkpoint, per_class=TRAIN, start_per_class=10, growth=3.0, scorer="knn",
                            final=True, test_per_class=TEST, device="cpu", synchronous=True,
                            results_path=str(tmp_path / "results.parquet"), out_dir=str(tmp_path / "search"))
    result = run_search(request)
    assert [s.name for s in result.stages][:2] == ["1", "1 refine 50"]  # coarse (5, 400), then between them
    assert result.forwards == sum(s.ran for s in result.stages)  # a fresh cache: everything asked for ran
    grid_forwards = TRAIN * 10 * len(TIMESTEPS)
    assert result.forwards < grid_forwards

    # the full grid on the same cache: a forward at t runs wherever a block of t is missing, so only stage 1's
    # rows (every block at every t, the refinement's included) are spared; the winners never hold all blocks
    run = fill_caches([request.extraction(split, TIMESTEPS, BLOCKS, None, result.plan.shard_size, per_class)
                       for split, per_class in (("train", TRAIN), ("test", TEST))], synchronous=True, progress=False)
    assert run.summaries[0].forwards == grid_forwards - 10 * 10 * len(TIMESTEPS)
    selection = CacheSelection(dataset="cifar10", cache_dir=request.cache_dir, config_name="32x32_small",
                               results_path=str(tmp_path / "grid.parquet"))
    table = run_sweep(SweepRequest(cache=selection, pools=(2,), head="linear", device="cpu",
                                      out_dir=str(tmp_path / "grid"))).table
    grid = {(int(r["blocks"]), int(r["timesteps"])): r["top1"] for r in table.to_pylist()}
    winner = (result.ranked[0]["block"], result.ranked[0]["timestep"])
    assert max(grid.values()) - grid[winner] <= GAP, (winner, grid)
    # --final fitted the grid's own probe on the winners: the same numbers, and it ranked them by them
    finals = {(r["block"], r["timestep"]): r["final_top1"] for r in result.ranked if "final_top1" in r}
    assert len(finals) == 2 and all(abs(top1 - grid[key]) < 1e-9 for key, top1 in finals.items()), (finals, grid)
    assert finals[winner] == max(finals.values())


def test_search_dry_run_prints_the_plan_against_the_grid_and_writes_nothing(cifar10_root, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFREP_DATA", str(cifar10_root.parent))
    result = CliRunner().invoke(main, [
        "search", "--dataset", "cifar10", "--config", "32x32_small", "--per-class", "200", "--timesteps",
        "5,25,50,100,200,400", "--blocks", "5,8,10,12,15", "--cache-dir", str(tmp_path / "cache"), "--dry-run",
        "--test-per-class", "100"])
    assert result.exit_code == 0, result.output
    assert "stage 1 at t = 5, 50, 200, 400" in result.output
    assert "1                200     20.0     20          4       800" in result.output
    assert "full grid on train: 2000 images x 6 timesteps = 12000 forwards" in result.output
    assert "scoring it on test adds 6000" in result.output
    assert not (tmp_path / "cache").exists()
