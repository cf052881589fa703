"""``diffrep search``: print the staged search's plan, then find the best (block, timestep) cells without the full grid."""

from __future__ import annotations

import click

from pipeline.cli.options import (
    BlockList, FloatList, TimestepList, cache_dir_option, checkpoint_option, config_option, dataset_option,
    device_option,
)


@click.command("search")
@dataset_option()
@click.option("--timesteps", "-t", type=TimestepList(), required=True,
              help="Candidate timesteps, e.g. 5,25,50,100,200,400 (stage 1 takes every --coarse-stride-th, then refines).")
@click.option("--blocks", "-b", type=BlockList(), required=True, help="Candidate blocks, e.g. 5,8,10,12,15.")
@click.option("--split", default="train", show_default=True, help="Split searched on (scores cross-validated on it alone).")
@click.option("--per-class", type=click.IntRange(min=1), default=None,
              help="The split's subset the stages draw from (its first N images per class; names the cache as extract's does).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Or N images spread evenly over the classes.")
@click.option("--start-per-class", type=click.IntRange(min=1), default=20, show_default=True,
              help="Stage 1's images per class (whole shards of the cache's seeded, class-mixed row order).")
@click.option("--growth", type=float, default=2.0, show_default=True, help="Each stage reads this many times more images.")
@click.option("--keep", type=float, default=1 / 3, show_default=True, help="Share of the cells each stage keeps.")
@click.option("--final-cells", type=click.IntRange(min=1), default=2, show_default=True,
              help="Stop once this many cells or fewer are kept.")
@click.option("--coarse-stride", type=click.IntRange(min=1), default=2, show_default=True,
              help="Stage 1 scores every N-th candidate timestep (and the last), then refines around the best.")
@click.option("--scorer", type=click.Choice(["linear", "knn"]), default="linear", show_default=True,
              help="Proxy score, k-fold cross-validated: the converged linear probe (ranks cells closer to the full "
                   "grid) or weighted kNN (k=--k, standardised; ~100x cheaper to score).")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True, help="Cross-validation folds.")
@click.option("--k", type=click.IntRange(min=1), default=20, show_default=True, help="kNN neighbours.")
@click.option("--l2", type=FloatList(allow_zero=True), default="1e-3", show_default=True,
              help="L2 weight(s) of the linear scorer (several: chosen on held-out rows of each fold).")
@click.option("--pool", type=click.IntRange(min=1), default=2, show_default=True, help="Side the maps are stored and scored at.")
@click.option("--final", is_flag=True,
              help="Then extract the winners on the whole subset and the test split and fit the converged linear probe.")
@click.option("--test-split", default="test", show_default=True, help="Split --final scores on.")
@click.option("--test-per-class", type=click.IntRange(min=1), default=None, help="--final's test images per class (default all).")
@config_option()
@checkpoint_option()
@click.option("--weight-seed", type=int, default=0, show_default=True, help="Seed of random weights (without --checkpoint).")
@click.option("--noise-seed", type=int, default=0, show_default=True, help="Seed of the per-image noise.")
@click.option("--order-seed", type=int, default=0, show_default=True, help="Seed of the cache's row order.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the cross-validation folds.")
@click.option("--shard-size", type=click.IntRange(min=1), default=None,
              help="Images per shard (default: stage 1's images, so every stage is whole shards).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Images per forward.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="Torch CPU threads per task.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Root of the image folders.")
@cache_dir_option()
@device_option()
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="Compute precision: auto is bf16 on a CUDA GPU of this machine, fp32 on the CPU.")
@click.option("--scheduler", default=None, help="Address of an existing Dask scheduler.")
@click.option("--synchronous", is_flag=True, help="Run every shard in this process (no Dask).")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Local Dask worker processes (default: one per GPU; with one GPU or none, in-process).")
@click.option("--results", "results_path", type=click.Path(dir_okay=False), default=None,
              help="Results table to append to [default: $DIFFREP_RESULTS or results/results.parquet].")
@click.option("--out-dir", type=click.Path(file_okay=False), default="results/search", show_default=True,
              help="Where the ranked table and the heatmap go.")
@click.option("--dry-run", is_flag=True, help="Print the plan and stop; writes nothing.")
def search(dataset, timesteps, blocks, split, per_class, limit, start_per_class, growth, keep, final_cells, coarse_stride,
           scorer, folds, k, l2, pool, final, test_split, test_per_class, config_name, checkpoint, weight_seed,
           noise_seed, order_seed, seed, shard_size, batch_size, threads, data_root, cache_dir, device, precision,
           scheduler, synchronous, workers, results_path, out_dir, dry_run) -> None:
    """Find the best (block, timestep) cells by a staged search: a few images per class at coarse
    timesteps, refined around the best, then successive halving on growing subsets.

    Each stage extracts only the rows it lacks (one forward per image and timestep captures every
    block), scores each cell by cross-validation on the search split, and keeps the best share.
    The plan (images, forwards, bytes per stage, against the full grid's) is printed first.
    """
    from extract.precision import resolve_precision

    from pipeline.search import SearchRequest, plan_search, run_search

    request = SearchRequest(
        dataset=dataset, cache_dir=cache_dir, blocks=tuple(blocks), timesteps=tuple(timesteps), config_name=config_name,
        checkpoint=checkpoint, weight_seed=weight_seed, noise_seed=noise_seed, order_seed=order_seed, split=split,
        per_class=per_class, limit=limit, data_root=data_root, start_per_class=start_per_class, growth=growth,
        keep=keep, final_cells=final_cells, coarse_stride=coarse_stride, scorer=scorer, folds=folds, k=k, l2=tuple(l2),
        pool=pool, shard_size=shard_size, seed=seed, final=final, test_split=test_split, test_per_class=test_per_class,
        device=device, precision=resolve_precision(precision, device), batch_size=batch_size, num_threads=threads,
        scheduler=scheduler, synchronous=synchronous, workers=workers, results_path=results_path, out_dir=out_dir,
    )
    plan = plan_search(request, dry_run=dry_run)
    click.echo(plan.describe())
    if dry_run:
        return
    result = run_search(request, echo=click.echo, plan=plan)
    click.echo(result.describe())
    for path in result.written:
        click.echo(f"wrote {path}")
