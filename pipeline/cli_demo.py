"""``diffrep demo``: the whole pipeline on CIFAR-10 with the small ADM, in a few minutes on a CPU."""

from __future__ import annotations

import os

import click

from .cli import main
from .options import BlockList, PoolList, TimestepList, device_option


def _default_demo_cache() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "diffrep", "demo")


@main.command("demo")
@click.option("--per-class", "train_per_class", type=click.IntRange(min=1), default=100, show_default=True,
              help="Train images per class (CIFAR-10 has 5000).")
@click.option("--test-per-class", type=click.IntRange(min=1), default=50, show_default=True,
              help="Test images per class (CIFAR-10 has 1000).")
@click.option("--timesteps", type=TimestepList(), default="10,50,150", show_default=True)
@click.option("--blocks", type=BlockList(), default="4,9,10,12,15", show_default=True,
              help="Blocks of 32x32_small (1..19; 10 is the middle block).")
@click.option("--pools", "probe_pools", type=PoolList(), default="1,2,4", show_default=True,
              help="Pool sizes of the linear-probe sweep.")
@click.option("--cache-dir", type=click.Path(file_okay=False, resolve_path=True), default=_default_demo_cache,
              show_default="~/.cache/diffrep/demo")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="results/demo", show_default=True,
              help="Folder for the sweep tables, heatmaps and results.parquet.")
@click.option("--synchronous", is_flag=True, help="Extract in this process instead of a local Dask cluster.")
@device_option()
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def demo(train_per_class, test_per_class, timesteps, blocks, probe_pools, cache_dir, out_dir, synchronous,
         device, no_progress) -> None:
    """Extract CIFAR-10 features with the small ADM (32x32_small, random weights) on a local
    Dask cluster, then sweep linear probes and kNN over block x timestep x pool.

    CIFAR-10 comes from ../shared/data (unpacked once into $DIFFREP_DATA). Run it again and the
    cache is reused: only the probes run.
    """
    from .demo import DemoSettings, run_demo
    from .report import format_table

    settings = DemoSettings(
        cache_dir=cache_dir, out_dir=out_dir, train_per_class=train_per_class, test_per_class=test_per_class,
        timesteps=tuple(timesteps), blocks=tuple(blocks), probe_pools=tuple(probe_pools),
        synchronous=synchronous, device=device, progress=not no_progress,
    )
    out = run_demo(settings, echo=click.echo)
    columns = ("blocks", "timesteps", "pool", "head", "top1", "top5")
    for name in ("linear", "knn"):
        table = out[name]
        click.echo(f"\n{name} (chance: 10% top-1)")
        click.echo(format_table(table, columns=columns))
        best = max(range(table.num_rows), key=lambda i: table["top1"][i].as_py())
        click.echo(f"best {name}: b={table['blocks'][best].as_py()} t={table['timesteps'][best].as_py()} "
                   f"pool={table['pool'][best].as_py()} top-1 {100 * table['top1'][best].as_py():.1f}%")
    for path in out["written"]:
        click.echo(f"wrote {path}")
