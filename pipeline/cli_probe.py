"""``diffrep probe | knn | cka | sweep | report``: evaluate cached features without touching the backbone.

Each command parses its options, calls one function of ``pipeline.evaluation`` and prints what it
returns.
"""

from __future__ import annotations

import functools

import click

from .cli import main
from .evaluation import fmt_keys, run_cka, run_knn, run_probe, run_sweep
from .options import (
    BlockList, IntList, PoolList, TimestepList, cache_dir_option, config_option, dataset_option, device_option,
)


def _int_tuple(ctx, param, value):
    """Parse ``2048,1024`` into (2048, 1024), order kept (hidden and channel sizes)."""
    if value is None:
        return None
    try:
        sizes = tuple(int(v) for v in str(value).split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 2048,1024") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{value!r}: give positive sizes, e.g. 2048,1024")
    return sizes


def _cache_options(fn):
    """--dataset, --cache-dir, --config, --backbone-id, --train-split/--test-split, --results, --ram-cap-gb."""
    decorators = [
        dataset_option(),
        cache_dir_option(),
        config_option(),
        click.option("--backbone-id", default=None,
                     help="Cache folder of the backbone (e.g. 256x256_uncond-1a2b3c4d5e6f); default: the one "
                          "cache of --config for this dataset."),
        click.option("--train-split", default="train", show_default=True, help="Split to train on (or the kNN memory)."),
        click.option("--test-split", default="test", show_default=True, help="Split to score."),
        click.option("--results", "results_path", type=click.Path(dir_okay=False), default=None,
                     help="Results table to append to [default: $DIFFREP_RESULTS or results/results.parquet]."),
        click.option("--ram-cap-gb", type=float, default=None,
                     help="Most RAM one cached array may take when read whole (default: the cache's, half the RAM)."),
    ]
    return functools.reduce(lambda f, d: d(f), reversed(decorators), fn)


@main.command("probe")
@_cache_options
@click.option("--blocks", type=BlockList(), required=True, help="Block(s) b whose cached features the head reads, e.g. 24 or 19,24.")
@click.option("--timesteps", type=TimestepList(), required=True, help="Timestep(s) t, e.g. 150.")
@click.option("--head", type=click.Choice(["linear", "mlp", "cnn", "attention"]), default="linear", show_default=True,
              help="Head architecture.")
@click.option("--pool", type=click.IntRange(min=1), default=None,
              help="Pooled side the head sees: linear/MLP 2, CNN 16, attention token grid 16 by default.")
@click.option("--hidden", callback=_int_tuple, default=None, help="MLP hidden sizes, e.g. 2048,1024 [default: 1024].")
@click.option("--channels", callback=_int_tuple, default=None, help="CNN channels of its two convolutions [default: 256,256].")
@click.option("--depth", type=click.IntRange(min=1), default=None, help="Attention head transformer blocks [default: 2].")
@click.option("--epochs", type=click.IntRange(min=1), default=28, show_default=True, help="Epochs (StepLR divides the lr by 10 every 7).")
@click.option("--lr", type=float, default=None, help="Learning rate [default: 1e-2 linear/MLP/CNN, 5e-2 attention].")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd", show_default=True,
              help="SGD (momentum 0, weight decay 0, the official code) or Adam (the paper).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Images per step.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the head's initialisation and batch order.")
@device_option()
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None,
              help="Where checkpoint.pth is written each epoch [default: results/checkpoints/<run>].")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --checkpoint-dir.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar per epoch.")
@click.option("--stream", is_flag=True,
              help="Read the features from the cache every epoch instead of holding them in RAM "
                   "(automatic when they exceed the RAM cap).")
def probe(**options) -> None:
    """Train a head on cached train-split features and report test top-1/top-5.

    Reads the arrays b<b>/t<t> written by `diffrep extract` (never the backbone), holds them in
    RAM as float32 once (or streams them when they exceed the RAM cap), trains by the protocol
    (28 epochs, StepLR 7/0.1, cross-entropy) with a checkpoint every epoch, and appends one row
    to the results table.

    \b
    Example:
      diffrep probe --dataset cifar10 --blocks 24 --timesteps 150 --head linear
    """
    row = run_probe(**options)
    click.echo(f"{row['head']} on {row['dataset']} b={fmt_keys(options['blocks'])} t={fmt_keys(options['timesteps'])}"
               f" ({row['parameters']:,} parameters, {row['train_size']} train / {row['test_size']} test images): "
               f"top-1 {100 * row['top1']:.2f}%, top-5 {100 * row['top5']:.2f}% in {row['train_seconds']:.1f} s")


@main.command("knn")
@_cache_options
@click.option("--blocks", type=BlockList(), required=True, help="Block(s) b, e.g. 24 (several are concatenated).")
@click.option("--timesteps", type=TimestepList(), required=True, help="Timestep(s) t, e.g. 150.")
@click.option("--pool", type=click.IntRange(min=1), default=2, show_default=True, help="Pooled side of the maps before flattening.")
@click.option("--k", type=IntList(), default="10,20,100,200", show_default=True, help="Neighbour counts.")
@click.option("--temperature", type=float, default=0.07, show_default=True, help="Votes weigh exp(cosine / T).")
@click.option("--batch-size", type=click.IntRange(min=1), default=4096, show_default=True, help="Train rows per similarity block.")
@device_option()
def knn(**options) -> None:
    """Weighted kNN (cosine, T=0.07) of test features against the train features, at every k.

    The train side is streamed shard by shard, so memory stays bounded whatever its size;
    one row per k goes to the results table.
    """
    rows = run_knn(**options)
    for row in rows:
        click.echo(f"knn k={row['k']:<4} top-1 {100 * row['top1']:.2f}%  top-5 {100 * row['top5']:.2f}%"
                   f"  ({row['train_size']} train / {row['test_size']} test images)")


@main.command("cka")
@dataset_option()
@cache_dir_option()
@config_option()
@click.option("--backbone-id", default=None, help="Cache folder of the backbone; default: the one cache of --config.")
@click.option("--split", default="test", show_default=True, help="Split whose images are compared.")
@click.option("--blocks", type=BlockList(), required=True, help="Blocks of the block x block matrix, e.g. 19,24,30.")
@click.option("--timesteps", type=TimestepList(), required=True, help="Timesteps of the timestep x timestep matrix.")
@click.option("--at-t", type=int, default=None, help="Fixed t of the block matrix [default: first of --timesteps].")
@click.option("--at-b", type=int, default=None, help="Fixed b of the timestep matrix [default: first of --blocks].")
@click.option("--pool", type=click.IntRange(min=1), default=None, help="Pool the maps to this side first [default: as stored].")
@click.option("--estimator", type=click.Choice(["minibatch", "linear"]), default="minibatch", show_default=True,
              help="Minibatch unbiased-HSIC CKA (streams, bounded memory) or full-batch linear CKA (in RAM).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Images per minibatch.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N valid images.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="results/cka", show_default=True,
              help="Folder for the CKA Parquet table and heatmaps.")
@click.option("--ram-cap-gb", type=float, default=None, help="RAM cap for whole-array reads.")
def cka(**options) -> None:
    """Linear CKA between cached arrays: block x block at a fixed t, timestep x timestep at a fixed b.

    Writes the matrices as one Parquet table and each as a heatmap PNG.
    """
    for path in run_cka(**options):
        click.echo(f"wrote {path}")


@main.command("sweep")
@_cache_options
@click.option("--blocks", type=BlockList(), default=None, help="Only these blocks [default: every cached block].")
@click.option("--timesteps", type=TimestepList(), default=None, help="Only these timesteps [default: every cached one].")
@click.option("--pools", type=PoolList(), default="1,2,4", show_default=True, help="Pool sizes, one heatmap panel each.")
@click.option("--head", type=click.Choice(["linear", "knn"]), default="linear", show_default=True,
              help="Linear probe by the protocol, or kNN (k=20).")
@click.option("--epochs", type=click.IntRange(min=1), default=28, show_default=True, help="Epochs of each probe (StepLR every 7).")
@click.option("--lr", type=float, default=None, help="Learning rate [default: 1e-2].")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Images per step.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the heads' initialisation and batch order.")
@device_option()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="results/sweeps", show_default=True,
              help="Folder for the sweep table (Parquet, Markdown) and heatmaps.")
@click.option("--progress/--no-progress", default=False, show_default=True)
def sweep(**options) -> None:
    """Linear probes (or kNN) over every cached (b, t) and pool size: the paper's Figures 3 and 4.

    Appends one results row per (b, t, pool) and writes the sweep table (Parquet, Markdown) and
    heatmaps of accuracy over block x timestep, one panel per pool size.
    """
    from .report import format_table

    table, written = run_sweep(**options)
    click.echo(format_table(table, columns=("blocks", "timesteps", "pool", "head", "top1", "top5", "train_seconds")))
    for path in written:
        click.echo(f"wrote {path}")


@main.command("report")
@click.option("--results", "results_path", type=click.Path(dir_okay=False), default=None,
              help="Results table [default: $DIFFREP_RESULTS or results/results.parquet].")
@click.option("--dataset", default=None, help="Only rows of this dataset.")
@click.option("--head", default=None, help="Only rows of this head (linear, mlp, cnn, attention, knn).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="results/report", show_default=True,
              help="Folder for results.md and the PNG plots.")
def report(results_path, dataset, head, out_dir) -> None:
    """Print the results table and write it as Markdown with PNG plots (best top-1 per head; accuracy
    heatmaps over block x timestep for every sweep)."""
    import pyarrow.compute as pc

    from .report import format_table, write_report
    from .results import read_results

    table = read_results(results_path)
    if dataset:
        table = table.filter(pc.equal(table.column("dataset"), dataset))
    if head:
        table = table.filter(pc.equal(table.column("head"), head))
    click.echo(format_table(table))
    for path in write_report(table, out_dir):
        click.echo(f"wrote {path}")
