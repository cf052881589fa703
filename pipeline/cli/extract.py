"""``diffrep extract``: print the plan, then fill the feature cache for the requested blocks and timesteps."""

from __future__ import annotations

import sys

import click

from pipeline.cli.options import (
    BlockList, FolderName, PoolList, TimestepList, cache_dir_option, checkpoint_option, config_option, dataset_option,
    device_option, image_size_option,
)

_CONFIRM_BYTES = 100e9


@click.command("extract")
@dataset_option()
@click.option("--split", "splits", type=FolderName("split", many=True), default=None,
              help="Comma-separated splits, each its own cache (default: every split of the dataset, e.g. train,test).")
@click.option("--timesteps", "-t", type=TimestepList(), required=True, help="Diffusion timesteps, e.g. 90,150,300.")
@click.option("--blocks", "-b", type=BlockList(), required=True, help="Paper block numbers, e.g. 19,24,30.")
@click.option("--pool", type=PoolList(), default="16", show_default=True,
              help="Stored maps are min(native, pool) per side; 'none' keeps full maps (coarser pools derive at read time).")
@config_option()
@checkpoint_option()
@image_size_option()
@click.option("--weight-seed", type=int, default=0, show_default=True, help="Seed of random weights (without --checkpoint).")
@click.option("--noise-seed", type=int, default=0, show_default=True, help="Seed of the per-image noise.")
@click.option("--order-seed", type=int, default=0, show_default=True,
              help="Seed of the cache's row order, a permutation of the class-sorted index fixed when the cache is created.")
@click.option("--flip", is_flag=True, help="Also cache the horizontally flipped view (same noise).")
@click.option("--noise-draws", type=click.IntRange(min=1), default=1, show_default=True,
              help="Store K seeded noise draws per (image, t) as views (x2 with --flip); heads trained with sgd/adam "
                   "pick one view per image per epoch, as the official code draws new noise every step.")
@click.option("--shard-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per shard: one task writes one whole shard.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Images per forward.")
@click.option("--per-class", type=click.IntRange(min=1), default=None, help="Keep the first N images of each class.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Keep N images spread evenly over the classes (the first of each; after --per-class).")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Root of the image folders.")
@click.option("--split-dir", type=click.Path(file_okay=False), default=None,
              help="The folder of the one --split asked for, overriding the manifest (e.g. a val set kept elsewhere).")
@cache_dir_option()
@device_option()
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="Compute precision (autocast): auto is bf16 where the backbone runs on a CUDA GPU of this machine, "
                   "fp32 on the CPU (pass bf16 for a remote --scheduler's GPUs); storage is always float16.")
@click.option("--decode-threads", type=click.IntRange(min=1), default=None,
              help="Image decoding threads per worker (default: its share of the CPUs, less the torch threads on a CPU run).")
@click.option("--decode-device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cuda decodes JPEGs with nvJPEG on the GPU (for GPUs short of CPU cores); its pixels may differ "
                   "from PIL's by a few levels, so the default stays PIL on the CPU.")
@click.option("--scheduler", default=None, help="Address of an existing Dask scheduler, e.g. tcp://10.0.0.5:8786 (its workers must see the images and --cache-dir).")
@click.option("--synchronous", is_flag=True, help="Run every shard in this process (no Dask).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Local Dask worker processes (default: one per GPU; with one GPU or none the run stays in this "
                   "process, which is faster there; --workers 1 still starts a one-worker cluster).")
# default 2 = extract.job.DEFAULT_THREADS, not imported so that --help does not load torch
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True,
              help="Torch CPU threads per task, the same wherever it runs (CPU results depend on it bit for bit).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before writing more than 100 GB.")
@click.option("--dry-run", is_flag=True, help="Print the plan and stop; writes nothing (a packed dataset is listed, not unpacked).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def extract(dataset, splits, timesteps, blocks, pool, config_name, checkpoint, image_size, weight_seed, noise_seed, order_seed, flip, noise_draws,
            shard_size, batch_size, per_class, limit, data_root, split_dir, cache_dir, device, precision, decode_threads,
            decode_device, scheduler, synchronous, workers, threads, yes, dry_run, no_progress) -> None:
    """Run the backbone once per (image, t), capture every requested block in that pass, and cache them.

    The same command again resumes (completed shards are skipped, shards whose files were lost
    are redone); adding timesteps or blocks writes only the new arrays. Unreadable images are
    reported and marked invalid. Ctrl-C stops it with every finished shard kept.
    """
    from extract.errors import ConfigError
    from extract.inputs.device_decode import check_decode_device
    from extract.job import default_decode_threads
    from extract.precision import resolve_device, resolve_precision

    from pipeline.cluster import count_gpus
    from pipeline.extraction import ExtractionRequest, dataset_splits
    from pipeline.extraction_run import fill_caches

    precision = resolve_precision(precision, device)
    if decode_device != "cpu" and scheduler is None:  # a remote cluster's workers check their own GPUs
        check_decode_device(decode_device, resolve_device(device))
    if decode_threads is None:
        per_gpu = count_gpus() if device in ("auto", "cuda") and scheduler is None else 0
        decode_threads = default_decode_threads(1 if synchronous else (workers or max(1, per_gpu)), device, threads)
    if len(pool) != 1:
        raise ConfigError(f"extract stores one pool size, got {len(pool)}: pass --pool 16 (coarser pools derive at read time)")
    if splits is None:
        split_names = dataset_splits(dataset, data_root)
    else:
        split_names = splits
    if split_dir is not None and len(split_names) != 1:
        raise click.UsageError(f"--split-dir is the folder of one split: pass --split too (one of {', '.join(split_names)})")
    requests = [
        ExtractionRequest(
            dataset=dataset, split=split, timesteps=tuple(timesteps), blocks=tuple(blocks), cache_dir=cache_dir,
            pool=pool[0], config_name=config_name, checkpoint=checkpoint, weight_seed=weight_seed,
            noise_seed=noise_seed, flip=flip, noise_draws=noise_draws, shard_size=shard_size, batch_size=batch_size,
            per_class=per_class, limit=limit, data_root=data_root, split_dir=split_dir, device=device,
            precision=precision, num_threads=threads, order_seed=order_seed, decode_threads=decode_threads,
            decode_device=decode_device, image_size=image_size,
        )
        for split in split_names
    ]
    fill_caches(requests, scheduler=scheduler, synchronous=synchronous, workers=workers, progress=not no_progress,
                dry_run=dry_run, confirm=None if yes or not sys.stdin.isatty() else _confirm_large, echo=click.echo)


def _confirm_large(plans) -> None:
    """Ask before writing more than 100 GB (an interactive run without --yes)."""
    total = sum(plan.bytes_new for plan in plans)
    if total > _CONFIRM_BYTES:
        click.confirm(f"write {total / 1e9:.0f} GB?", abort=True)
