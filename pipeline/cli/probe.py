"""``diffrep probe | knn | cka | sweep | report``: evaluate cached features without touching the backbone.

Each command parses its options and calls one function of ``pipeline.evaluate``, which hands every
finished row to the command's ``announce`` (printed) before the results table is written.
"""

from __future__ import annotations

import functools

import click

from pipeline.cli.options import (
    BlockList, FolderName, IntList, PoolList, RamCapGb, TimestepList, cache_dir_option, cache_options, checkpoint_option, config_option,
    dataset_option, device_option, image_size_option, int_tuple, protocol_options,
)


def _live_options(fn):
    """--live and what only the live backbone needs: gathered into ``live`` (None without --live)."""
    decorators = [
        click.option("--live", is_flag=True,
                     help="Train through the live backbone the official way (backbone every step, fresh noise, random "
                          "resized crop 0.8-1.0 and flip) instead of reading the cache; sgd/adam only."),
        checkpoint_option(),
        click.option("--weight-seed", type=int, default=0, show_default=True, help="--live: seed of random weights (no --checkpoint)."),
        click.option("--data-root", type=click.Path(file_okay=False), default=None, help="--live: where the images are."),
        click.option("--per-class", type=click.IntRange(min=1), default=None, help="--live: first N training images of each class."),
        click.option("--test-per-class", type=click.IntRange(min=1), default=None, help="--live: first N test images of each class."),
        click.option("--noise-seed", type=int, default=0, show_default=True, help="--live: seeded noise of the test split (as extract)."),
        click.option("--fresh-noise/--seeded-noise", default=True, show_default=True,
                     help="--live: new noise every training step (official), or the cache's seeded noise."),
        click.option("--augment/--no-augment", default=True, show_default=True,
                     help="--live: random resized crop (0.8-1.0) and flip every training step (official)."),
        click.option("--cache-pool", type=click.IntRange(min=0), default=16, show_default=True,
                     help="--live: pool block maps to this side first, as a cache stores them (0: full maps)."),
        click.option("--finetune", is_flag=True, help="--live: train the backbone too (at --backbone-lr); the tuned weights "
                                                      "go to <checkpoint-dir>/backbone.pt, loadable by --checkpoint."),
        click.option("--backbone-lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
                     help="--finetune: the backbone's learning rate (official 1e-3)."),
        click.option("--steps", type=click.IntRange(min=1), default=None,
                     help="--live: stop after N optimizer steps (for datasets too large for whole epochs)."),
        click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
                     help="--live: backbone autocast [default: bf16 on GPUs, fp32 on the CPU]."),
        click.option("--decode-threads", type=click.IntRange(min=1), default=2, show_default=True,
                     help="--live: image-decoding threads ahead of the forward."),
        image_size_option(),
        click.option("--conditioning", type=click.Choice(["null-text", "learnable"]), default="null-text",
                     show_default=True, help="--live, Stable Diffusion: the empty prompt's embedding, or a learnable "
                                             "one of the text encoder's shape trained with the head."),
    ]
    names = ("live", "checkpoint", "weight_seed", "data_root", "per_class", "test_per_class", "noise_seed",
             "fresh_noise", "augment", "cache_pool", "finetune", "backbone_lr", "steps", "precision", "decode_threads",
             "image_size", "conditioning")

    @functools.wraps(fn)
    def wrapper(**options):
        given = {name: options.pop(name) for name in names}
        return fn(live=given if given.pop("live") else None, **options)

    return functools.reduce(lambda f, d: d(f), reversed(decorators), wrapper)


@click.command("probe")
@cache_options
@click.option("--blocks", "-b", type=BlockList(), required=True, help="Block(s) b whose cached features the head reads, e.g. 24 or 19,24.")
@click.option("--timesteps", "-t", type=TimestepList(), required=True, help="Timestep(s) t, e.g. 150.")
@click.option("--head", type=click.Choice(["linear", "mlp", "cnn", "attention", "difformer"]), default="linear",
              show_default=True, help="Head architecture (difformer: the paper's fusion, as diffrep fuse).")
@click.option("--pool", type=click.IntRange(min=1), default=None,
              help="Pooled side the head sees: linear/MLP 2, CNN 16, attention token grid 16 by default.")
@click.option("--hidden", callback=int_tuple, default=None, help="MLP hidden sizes, e.g. 2048,1024 [default: 1024].")
@click.option("--channels", callback=int_tuple, default=None, help="CNN channels of its two convolutions [default: 256,256].")
@click.option("--depth", type=click.IntRange(min=1), default=None, help="Attention head transformer blocks [default: 2].")
@click.option("--dim", type=click.IntRange(min=8), default=None, help="Attention head token width [default: 1024].")
@protocol_options
@device_option()
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None,
              help="Where checkpoint.pth is written each epoch (sgd/adam) [default: results/checkpoints/<run>].")
@click.option("--resume", is_flag=True,
              help="Continue from the checkpoint in --checkpoint-dir; refused if it was trained on other features, "
                   "head or settings (without a checkpoint it says so and starts at epoch 1).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar per epoch.")
@click.option("--stream", is_flag=True,
              help="Read the features from the cache every epoch instead of holding them in RAM "
                   "(sgd/adam; automatic when they exceed the RAM cap): each epoch reads the split in a seeded "
                   "order of pieces, a quarter of the RAM cap at a time, shuffled.")
@_live_options
def probe(cache, live, **options) -> None:
    """Train a head on cached train-split features and report test top-1/top-5.

    Reads the arrays b<b>/t<t> written by `diffrep extract` (never the backbone). The linear head
    is fitted to convergence by default (--solver lbfgs); --solver sgd|adam runs the paper's
    protocol (28 epochs, StepLR 7/0.1, a checkpoint every epoch). One row goes to the results table.

    \b
    Examples:
      diffrep probe --dataset cifar10 -b 24 -t 150                        # converged linear probe
      diffrep probe --dataset cifar10 -b 24 -t 150 --solver sgd --lr 1e-3,1e-2,1e-1
      diffrep probe --dataset cifar10 -b 24 -t 150 --head attention
      diffrep probe --dataset cifar10 -b 24 -t 150 --live --solver sgd   # official: backbone every step
    """
    from pipeline.evaluate import ProbeRequest, fmt_keys, run_probe

    def announce(row: dict) -> None:  # printed before the results table is written: a failed write loses nothing
        click.echo(f"{row['head']} ({_protocol_text(row)}) on {row['dataset']} b={fmt_keys(options['blocks'])} "
                   f"t={fmt_keys(options['timesteps'])} ({row['parameters']:,} parameters, {row['train_size']} train / "
                   f"{row['test_size']} test images): top-1 {100 * row['top1']:.2f}%, top-5 {100 * row['top5']:.2f}% "
                   f"in {row['train_seconds']:.1f} s")

    if live is not None:
        row = _run_live(cache, live, options, announce)
    else:
        row = run_probe(ProbeRequest(cache=cache, **options), announce)
    if row.get("backbone_path"):
        click.echo(f"tuned backbone (official layout, loadable by --checkpoint): {row['backbone_path']}")


def _run_live(cache, live: dict, options: dict, announce) -> dict:
    """``diffrep probe --live``: the cache options that still mean something, the live ones, one results row."""
    from pipeline.errors import DatasetError
    from pipeline.live_probe import LiveProbeRequest, run_live_probe

    if options.pop("stream") or cache.backbone_id:
        raise DatasetError("--live reads images, not the cache: drop --stream / --backbone-id")
    request = LiveProbeRequest(
        dataset=cache.dataset, config_name=cache.config_name, train_split=cache.train_split, test_split=cache.test_split,
        results_path=cache.results_path, **live, **options)
    return run_live_probe(request, announce)


def _protocol_text(row: dict) -> str:
    if row.get("protocol") == "live":
        view = ", ".join(what for what, on in (("fresh noise", row.get("fresh_noise")), ("crop+flip", row.get("augment")),
                                                ("fine-tuned", row.get("finetune"))) if on)
        return f"live backbone{', ' + view if view else ''}, {row.get('solver')}, lr {row.get('lr'):g}"
    if row.get("protocol") == "converged":
        return f"converged, L2 {row['l2']:g}"
    return f"{row.get('solver')}, lr {row.get('lr'):g}"


@click.command("knn")
@cache_options
@click.option("--blocks", "-b", type=BlockList(), required=True, help="Block(s) b, e.g. 24 (several are concatenated).")
@click.option("--timesteps", "-t", type=TimestepList(), required=True, help="Timestep(s) t, e.g. 150.")
@click.option("--pool", type=click.IntRange(min=1), default=2, show_default=True, help="Pooled side of the maps before flattening.")
@click.option("--k", type=IntList(), default="10,20,100,200", show_default=True,
              help="Neighbour counts (a k above the training rows uses them all, with a warning).")
@click.option("--temperature", type=float, default=0.07, show_default=True, help="Votes weigh exp(cosine / T).")
@click.option("--standardize/--no-standardize", default=True, show_default=True,
              help="Standardise features with the training split's mean and std before the cosine.")
@click.option("--batch-size", type=click.IntRange(min=1), default=4096, show_default=True, help="Train rows per similarity block.")
@device_option()
def knn(cache, **options) -> None:
    """Weighted kNN (cosine, T=0.07) of test features against the train features, at every k.

    The train side is streamed shard by shard, so memory stays bounded whatever its size;
    one row per k goes to the results table.
    """
    from pipeline.evaluate import KnnRequest, run_knn

    options["k"] = tuple(options["k"])
    run_knn(KnnRequest(cache=cache, **options), announce=lambda row: click.echo(
        f"knn k={row['k']:<4} top-1 {100 * row['top1']:.2f}%  top-5 {100 * row['top5']:.2f}%"
        f"  ({row['train_size']} train / {row['test_size']} test images)"))


@click.command("cka")
@dataset_option()
@cache_dir_option()
@config_option()
@click.option("--backbone-id", type=FolderName("backbone id"), default=None,
              help="Cache folder of the backbone; default: the one cache of --config.")
@click.option("--split", type=FolderName("split"), default="test", show_default=True, help="Split whose images are compared.")
@click.option("--blocks", "-b", type=BlockList(), required=True, help="Blocks of the block x block matrix, e.g. 19,24,30.")
@click.option("--timesteps", "-t", type=TimestepList(), required=True, help="Timesteps of the timestep x timestep matrix.")
@click.option("--at-t", type=int, default=None, help="Fixed t of the block matrix [default: first of --timesteps].")
@click.option("--at-b", type=int, default=None, help="Fixed b of the timestep matrix [default: first of --blocks].")
@click.option("--pool", type=click.IntRange(min=1), default=None, help="Pool the maps to this side first [default: as stored].")
@click.option("--estimator", type=click.Choice(["minibatch", "linear"]), default="minibatch", show_default=True,
              help="Minibatch unbiased-HSIC CKA (streams, bounded memory) or full-batch linear CKA (in RAM).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Images per minibatch.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Use N valid images, drawn class-balanced with --seed (indexes are sorted by class).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --limit's draw and of the minibatch order.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="results/cka", show_default=True,
              help="Folder for the CKA Parquet table and heatmaps.")
@click.option("--ram-cap-gb", type=RamCapGb(), default=None, help="RAM cap for whole-array reads (GiB).")
@device_option()
def cka(**options) -> None:
    """Linear CKA between cached arrays: block x block at a fixed t, timestep x timestep at a fixed b.

    Runs on --device in float32 with float64 sums; minibatches are drawn at random across the
    whole split (seeded). Writes the matrices as one Parquet table and each as a heatmap PNG.
    """
    from pipeline.evaluate import CkaRequest, run_cka

    for path in run_cka(CkaRequest(**options)):
        click.echo(f"wrote {path}")


@click.command("sweep")
@cache_options
@click.option("--blocks", "-b", type=BlockList(), default=None, help="Only these blocks [default: every cached block].")
@click.option("--timesteps", "-t", type=TimestepList(), default=None, help="Only these timesteps [default: every cached one].")
@click.option("--pools", type=PoolList(), default="1,2,4", show_default=True, help="Pool sizes, one heatmap panel each.")
@click.option("--head", type=click.Choice(["linear", "knn"]), default="linear", show_default=True,
              help="Linear probe, or kNN (k=20).")
@protocol_options
@click.option("--standardize/--no-standardize", default=True, show_default=True,
              help="kNN: standardise features with the training split's statistics first.")
@device_option()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="results/sweeps", show_default=True,
              help="Folder for the sweep table (Parquet, Markdown) and heatmaps.")
@click.option("--progress/--no-progress", default=False, show_default=True)
@click.option("--skip-incomplete", is_flag=True,
              help="Sweep the complete cells when some (b, t) are absent, unfinished or damaged in a split; they are "
                   "named in the output and the report (without it such a cell stops the sweep before it trains).")
def sweep(cache, **options) -> None:
    """Linear probes (or kNN) over every cached (b, t) and pool size: the paper's Figures 3 and 4.

    Appends one results row per (b, t, pool) and writes the sweep table (Parquet, Markdown) and
    heatmaps of accuracy over block x timestep, one panel per pool size. Linear probes are the
    converged probe unless --solver sgd|adam asks for the paper's protocol.
    """
    from pipeline.evaluate import SweepRequest, run_sweep
    from pipeline.report import format_table

    table, written, missing = run_sweep(SweepRequest(cache=cache, **options), announce=lambda row: click.echo(
        f"b={row['blocks'][0]} t={row['timesteps'][0]} pool={row['pool']}: top-1 {100 * row['top1']:.2f}%, "
        f"top-5 {100 * row['top5']:.2f}%"))
    click.echo(format_table(table, columns=("blocks", "timesteps", "pool", "head", "protocol", "l2", "lr", "top1",
                                            "top5", "train_seconds")))
    for path in written:
        click.echo(f"wrote {path}")
    for cell, problem in missing.items():
        click.echo(f"not measured (--skip-incomplete): {problem}")


@click.command("report")
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

    from pipeline.report import format_table, write_report
    from pipeline.results import read_results

    table = read_results(results_path)
    if dataset:
        table = table.filter(pc.equal(table.column("dataset"), dataset))
    if head:
        table = table.filter(pc.equal(table.column("head"), head))
    click.echo(format_table(table))
    for path in write_report(table, out_dir):
        click.echo(f"wrote {path}")
