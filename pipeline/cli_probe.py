"""``diffrep probe | knn | cka | sweep | report``: evaluate cached features without touching the backbone.

Each command parses its options, opens the train/test caches written by ``diffrep extract``,
calls the probe library (``probe.train.fit``, ``probe.knn.knn_classify``, ``probe.cka.cka_matrix``),
appends its rows to the results table and prints a summary.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import click

from .cli import main
from .options import (
    BlockList, IntList, PoolList, TimestepList, cache_dir_option, config_option, dataset_option, device_option,
)

log = logging.getLogger(__name__)

Key = tuple[int, int]


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


def _open_pair(cache_dir, dataset, config_name, backbone_id, train_split, test_split, ram_cap_gb):
    from probe.features import open_split, resolve_backbone_id

    backbone_id = resolve_backbone_id(cache_dir, dataset, train_split, config_name, backbone_id)
    cap = int(ram_cap_gb * 2**30) if ram_cap_gb else None
    train = open_split(cache_dir, dataset, train_split, backbone_id, cap)
    test = open_split(cache_dir, dataset, test_split, backbone_id, cap)
    if list(train.class_names) != list(test.class_names):
        from extract.errors import CacheError

        raise CacheError(f"{train_split} and {test_split} caches of {dataset} have different classes: extract both from one manifest")
    return backbone_id, train, test


def _read_pool(cache, key: Key, pool: int | None) -> int | None:
    """Pool to read at: ``pool`` when the stored maps are larger, else as stored (never finer)."""
    if not pool:
        return None
    return pool if cache.shape(*key)[-1] > pool else None


def _keys(blocks, timesteps) -> list[Key]:
    return [(int(b), int(t)) for b in blocks for t in timesteps]


def _fmt_keys(values) -> str:
    return ",".join(str(v) for v in values)


def run_probe(*, dataset, cache_dir, config_name, backbone_id, train_split, test_split, results_path, ram_cap_gb,
              blocks, timesteps, head, pool, hidden, channels, depth, epochs, lr, optimizer, batch_size, seed, device,
              checkpoint_dir, resume, progress, stream=False) -> dict:
    """Train one head on cached train features, score it on the test features, append the row; returns it."""
    import torch

    from extract.precision import resolve_device
    from probe.features import StreamedFeatures, feature_bytes, in_shapes
    from probe.heads import HEADS, count_parameters, create_head, default_lr
    from probe.train import fit

    from .results import append_result

    backbone_id, train_cache, test_cache = _open_pair(cache_dir, dataset, config_name, backbone_id,
                                                      train_split, test_split, ram_cap_gb)
    keys = _keys(blocks, timesteps)
    overrides = {}
    if pool is not None:
        overrides["token_pool" if head == "attention" else "pool"] = pool
    if hidden is not None:
        overrides["hidden"] = hidden
    if channels is not None:
        overrides["channels"] = channels
    if depth is not None:
        overrides["depth"] = depth
    head_pool = overrides.get("token_pool", overrides.get("pool", HEADS[head].defaults.get("pool", 16)))
    read_pool = {key: _read_pool(train_cache, key, head_pool) for key in keys}
    need = sum(feature_bytes(train_cache, [key], read_pool[key]) for key in keys)
    if stream or need > train_cache.ram_cap_bytes:
        stream_pool = read_pool[keys[0]] if len(set(read_pool.values())) == 1 else None
        log.warning("streaming %s from the cache every epoch (%s: %.2f GiB of float32 features, RAM cap %.1f GiB)",
                    dataset, "--stream" if stream else "over the RAM cap", need / 2**30, train_cache.ram_cap_bytes / 2**30)
        train = StreamedFeatures(train_cache, keys, stream_pool)
        test = StreamedFeatures(test_cache, keys, stream_pool)
        shapes, train_y, test_y = in_shapes(train_cache, keys, stream_pool), None, None
        train_x, test_x = train, test
    else:
        train, test = _load(train_cache, keys, read_pool), _load(test_cache, keys, read_pool)
        shapes = {key: tuple(train.features[key].shape[1:]) for key in keys}
        train_x, train_y, test_x, test_y = train.features, train.labels, test.features, test.labels
    torch.manual_seed(seed)
    module = create_head(head, shapes, len(train.class_names) or len(train_cache.class_names), **overrides)
    lr = lr if lr is not None else default_lr(head)
    if checkpoint_dir is None:
        name = f"{dataset}_{backbone_id}_{head}_b{_fmt_keys(blocks)}_t{_fmt_keys(timesteps)}_s{seed}"
        checkpoint_dir = Path(results_path or "results/results.parquet").parent / "checkpoints" / name
    result = fit(module, train_x, train_y, test_x, test_y, epochs=epochs, lr=lr,
                 optimizer=optimizer, batch_size=batch_size, seed=seed, device=resolve_device(device),
                 checkpoint_dir=checkpoint_dir, resume=resume, progress=progress)
    row = dict(dataset=dataset, train_size=train.num_images, test_size=test.num_images, backbone_id=backbone_id,
               head=head, blocks=list(blocks), timesteps=list(timesteps), pool=int(head_pool or 0),
               parameters=count_parameters(module), epochs=epochs, lr=lr, optimizer=optimizer,
               batch_size=batch_size, seed=seed, top1=result.top1, top5=result.top5,
               train_seconds=result.train_seconds)
    append_result(row, results_path)
    return row


def _load(cache, keys, read_pool):
    """Load every key at its read pool into one FeatureSet."""
    from probe.features import load_features

    first = None
    for key in keys:
        part = load_features(cache, [key], pool=read_pool[key])
        if first is None:
            first = part
        else:
            first.features.update(part.features)
    return first


@main.command("probe")
@_cache_options
@click.option("--blocks", type=BlockList(), required=True, help="Block(s) b whose cached features the head reads, e.g. 24 or 19,24.")
@click.option("--timesteps", type=TimestepList(), required=True, help="Timestep(s) t, e.g. 150.")
@click.option("--head", type=click.Choice(["linear", "mlp", "cnn", "attention"]), default="linear", show_default=True,
              help="Head architecture.")
@click.option("--pool", type=int, default=None,
              help="Pooled side the head sees: linear/MLP 2, CNN 16, attention token grid 16 by default.")
@click.option("--hidden", callback=_int_tuple, default=None, help="MLP hidden sizes, e.g. 2048,1024 [default: 1024].")
@click.option("--channels", callback=_int_tuple, default=None, help="CNN channels of its two convolutions [default: 256,256].")
@click.option("--depth", type=int, default=None, help="Attention head transformer blocks [default: 2].")
@click.option("--epochs", type=int, default=28, show_default=True, help="Epochs (StepLR divides the lr by 10 every 7).")
@click.option("--lr", type=float, default=None, help="Learning rate [default: 1e-2 linear/MLP/CNN, 5e-2 attention].")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd", show_default=True,
              help="SGD (momentum 0, weight decay 0, the official code) or Adam (the paper).")
@click.option("--batch-size", type=int, default=256, show_default=True)
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
    click.echo(f"{row['head']} on {row['dataset']} b={_fmt_keys(options['blocks'])} t={_fmt_keys(options['timesteps'])}"
               f" ({row['parameters']:,} parameters, {row['train_size']} train / {row['test_size']} test images): "
               f"top-1 {100 * row['top1']:.2f}%, top-5 {100 * row['top5']:.2f}% in {row['train_seconds']:.1f} s")


def run_knn(*, dataset, cache_dir, config_name, backbone_id, train_split, test_split, results_path, ram_cap_gb,
            blocks, timesteps, pool, k, temperature, batch_size, device) -> list[dict]:
    """kNN of the test split against the train split (streamed); one results row per k."""
    import torch

    from extract.precision import resolve_device
    from probe.knn import knn_classify

    from .results import append_results

    backbone_id, train_cache, test_cache = _open_pair(cache_dir, dataset, config_name, backbone_id,
                                                      train_split, test_split, ram_cap_gb)
    keys = _keys(blocks, timesteps)
    read_pool = {key: _read_pool(train_cache, key, pool) for key in keys}
    test = _load(test_cache, keys, read_pool)
    test_x = torch.cat([test.features[key].flatten(1) for key in keys], dim=1)
    num_classes = len(test.class_names) or int(test.labels.max()) + 1
    began = time.perf_counter()
    train_size = int(train_cache.valid.sum())
    scores = knn_classify(_iter_multi(train_cache, keys, read_pool, batch_size), None, test_x, test.labels,
                          num_classes, ks=k, temperature=temperature, device=resolve_device(device))
    seconds = time.perf_counter() - began
    rows = [dict(dataset=dataset, train_size=train_size, test_size=test.num_images, backbone_id=backbone_id,
                 head="knn", blocks=list(blocks), timesteps=list(timesteps), pool=int(pool or 0), k=kk, parameters=0,
                 epochs=0, seed=0, top1=s["top1"], top5=s["top5"], train_seconds=seconds)
            for kk, s in scores.items()]
    append_results(rows, results_path)
    return rows


def _iter_multi(cache, keys, read_pool, batch_size):
    """Stream ((n, sum of flattened widths), (n,) labels) batches of several keys, each read at its own pool."""
    import torch

    from probe.features import iter_feature_batches

    streams = [iter_feature_batches(cache, [key], batch_size, pool=read_pool[key]) for key in keys]
    for parts in zip(*streams):
        yield torch.cat([features[key].flatten(1) for (features, _), key in zip(parts, keys)], dim=1), parts[0][1]


@main.command("knn")
@_cache_options
@click.option("--blocks", type=BlockList(), required=True, help="Block(s) b, e.g. 24 (several are concatenated).")
@click.option("--timesteps", type=TimestepList(), required=True, help="Timestep(s) t, e.g. 150.")
@click.option("--pool", type=int, default=2, show_default=True, help="Pooled side of the maps before flattening.")
@click.option("--k", type=IntList(), default="10,20,100,200", show_default=True, help="Neighbour counts.")
@click.option("--temperature", type=float, default=0.07, show_default=True, help="Votes weigh exp(cosine / T).")
@click.option("--batch-size", type=int, default=4096, show_default=True, help="Train rows per similarity block.")
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


def run_cka(*, dataset, cache_dir, config_name, backbone_id, split, blocks, timesteps, at_t, at_b, pool, estimator,
            batch_size, limit, out_dir, ram_cap_gb) -> list[Path]:
    """Block x block CKA at t=at_t and timestep x timestep CKA at b=at_b; Parquet and PNG under out_dir."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from extract.errors import ProbeError
    from probe.cka import cka_matrix
    from probe.features import iter_feature_batches, open_split, resolve_backbone_id

    from .report import plot_cka_heatmap

    backbone_id = resolve_backbone_id(cache_dir, dataset, split, config_name, backbone_id)
    cache = open_split(cache_dir, dataset, split, backbone_id, int(ram_cap_gb * 2**30) if ram_cap_gb else None)
    at_t = at_t if at_t is not None else timesteps[0]
    at_b = at_b if at_b is not None else blocks[0]
    panels = []
    if len(blocks) > 1:
        panels.append(("blocks", f"t{at_t}", [(b, at_t) for b in blocks], [f"b{b}" for b in blocks]))
    if len(timesteps) > 1:
        panels.append(("timesteps", f"b{at_b}", [(at_b, t) for t in timesteps], [f"t{t}" for t in timesteps]))
    if not panels:
        raise ProbeError("CKA needs at least two blocks or two timesteps: pass e.g. --blocks 19,24,30 --timesteps 150")
    keys = sorted({key for _, _, ks, _ in panels for key in ks})
    read_pool = {key: _read_pool(cache, key, pool) for key in keys}
    if estimator == "linear" or len(set(read_pool.values())) > 1:
        loaded = _load(cache, keys, read_pool)
        arrays = [loaded.features[key][:limit] if limit else loaded.features[key] for key in keys]
        matrix = cka_matrix(arrays, estimator=estimator, batch_size=batch_size)
    else:
        stream = iter_feature_batches(cache, keys, batch_size, pool=next(iter(read_pool.values())))
        taken = 0

        def batches():
            nonlocal taken
            for features, labels in stream:
                if limit and taken >= limit:
                    return
                rows = min(len(labels), limit - taken) if limit else len(labels)
                taken += rows
                yield [features[key][:rows] for key in keys]

        matrix = cka_matrix(batches=batches(), estimator="minibatch")
    out_dir = Path(out_dir)
    written = []
    records = []
    for kind, fixed, panel_keys, labels in panels:
        index = [keys.index(key) for key in panel_keys]
        sub = matrix[np.ix_(index, index)]
        for i, (bi, ti) in enumerate(panel_keys):
            for j, (bj, tj) in enumerate(panel_keys):
                records.append(dict(dataset=dataset, split=split, backbone_id=backbone_id, kind=kind, fixed=fixed,
                                    b_row=bi, t_row=ti, b_col=bj, t_col=tj, pool=int(pool or 0),
                                    estimator=estimator, cka=float(sub[i, j])))
        stem = f"cka_{dataset}_{split}_{backbone_id}_{kind}_{fixed}"
        written.append(plot_cka_heatmap(sub, labels, out_dir / f"{stem}.png",
                                        title=f"CKA over {kind} at {fixed} ({dataset} {split})"))
    out_dir.mkdir(parents=True, exist_ok=True)
    table_path = out_dir / f"cka_{dataset}_{split}_{backbone_id}.parquet"
    pq.write_table(pa.Table.from_pylist(records), table_path)
    return [table_path, *written]


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
@click.option("--pool", type=int, default=None, help="Pool the maps to this side first [default: as stored].")
@click.option("--estimator", type=click.Choice(["minibatch", "linear"]), default="minibatch", show_default=True,
              help="Minibatch unbiased-HSIC CKA (streams, bounded memory) or full-batch linear CKA (in RAM).")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Images per minibatch.")
@click.option("--limit", type=int, default=None, help="Use only the first N valid images.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="results/cka", show_default=True)
@click.option("--ram-cap-gb", type=float, default=None, help="RAM cap for whole-array reads.")
def cka(**options) -> None:
    """Linear CKA between cached arrays: block x block at a fixed t, timestep x timestep at a fixed b.

    Writes the matrices as one Parquet table and each as a heatmap PNG.
    """
    for path in run_cka(**options):
        click.echo(f"wrote {path}")


def run_sweep(*, dataset, cache_dir, config_name, backbone_id, train_split, test_split, results_path, ram_cap_gb,
              blocks, timesteps, pools, head, epochs, lr, optimizer, batch_size, seed, device, out_dir,
              progress) -> tuple[object, list[Path]]:
    """Linear probes (or kNN) over every (b, t, pool); results rows, sweep table, heatmaps."""
    import pyarrow.parquet as pq
    import torch

    from extract.errors import ProbeError
    from extract.precision import resolve_device
    from probe.heads import count_parameters, create_head, default_lr
    from probe.knn import knn_classify
    from probe.train import fit

    from .report import markdown_table, plot_sweep_heatmaps
    from .results import append_results, results_table

    backbone_id, train_cache, test_cache = _open_pair(cache_dir, dataset, config_name, backbone_id,
                                                      train_split, test_split, ram_cap_gb)
    cached = [key for key in train_cache.arrays() if key in set(test_cache.arrays())]
    keys = [key for key in cached if (not blocks or key[0] in blocks) and (not timesteps or key[1] in timesteps)]
    if not keys:
        raise ProbeError(f"no cached (b, t) arrays of {dataset} match the sweep: cached are "
                         f"{', '.join(f'b{b}/t{t}' for b, t in cached) or 'none'}; run diffrep extract first")
    lr = lr if lr is not None else default_lr("linear")
    rows = []
    for key in keys:
        for pool in pools:
            read_pool = {key: _read_pool(train_cache, key, pool)}
            train, test = _load(train_cache, [key], read_pool), _load(test_cache, [key], read_pool)
            num_classes = len(train.class_names) or int(train.labels.max()) + 1
            row = dict(dataset=dataset, train_size=train.num_images, test_size=test.num_images,
                       backbone_id=backbone_id, blocks=[key[0]], timesteps=[key[1]], pool=int(pool))
            if head == "knn":
                began = time.perf_counter()
                scores = knn_classify(train.features[key], train.labels, test.features[key], test.labels,
                                      num_classes, ks=(20,), device=resolve_device(device))[20]
                row.update(head="knn", k=20, parameters=0, epochs=0, top1=scores["top1"], top5=scores["top5"],
                           train_seconds=time.perf_counter() - began)
            else:
                torch.manual_seed(seed)
                shapes = {key: tuple(train.features[key].shape[1:])}
                module = create_head("linear", shapes, num_classes, pool=pool or None)
                result = fit(module, train.features, train.labels, test.features, test.labels, epochs=epochs, lr=lr,
                             optimizer=optimizer, batch_size=batch_size, seed=seed, device=resolve_device(device),
                             progress=progress)
                row.update(head="linear", parameters=count_parameters(module), epochs=epochs, lr=lr,
                           optimizer=optimizer, batch_size=batch_size, seed=seed, top1=result.top1, top5=result.top5,
                           train_seconds=result.train_seconds)
            log.info("sweep b=%d t=%d pool=%d: top-1 %.4f", key[0], key[1], pool, row["top1"])
            rows.append(row)
    append_results(rows, results_path)
    table = results_table(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"sweep_{dataset}_{backbone_id}_{head}"
    pq.write_table(table, out_dir / f"{stem}.parquet")
    (out_dir / f"{stem}.md").write_text(f"# sweep {dataset} {backbone_id} {head}\n\n" + markdown_table(table) + "\n")
    written = [out_dir / f"{stem}.parquet", out_dir / f"{stem}.md"]
    for metric in ("top1", "top5"):
        written.append(plot_sweep_heatmaps(table, out_dir / f"{stem}_{metric}.png", metric=metric,
                                           title=f"{dataset} {backbone_id} {head} {metric}"))
    return table, written


@main.command("sweep")
@_cache_options
@click.option("--blocks", type=BlockList(), default=None, help="Only these blocks [default: every cached block].")
@click.option("--timesteps", type=TimestepList(), default=None, help="Only these timesteps [default: every cached one].")
@click.option("--pools", type=PoolList(), default="1,2,4", show_default=True, help="Pool sizes, one heatmap panel each.")
@click.option("--head", type=click.Choice(["linear", "knn"]), default="linear", show_default=True,
              help="Linear probe by the protocol, or kNN (k=20).")
@click.option("--epochs", type=int, default=28, show_default=True)
@click.option("--lr", type=float, default=None, help="Learning rate [default: 1e-2].")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd", show_default=True)
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@device_option()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="results/sweeps", show_default=True)
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
