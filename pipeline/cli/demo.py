"""``diffrep demo``: the paper's questions on diffrep's own trained ADM and CIFAR-10, in minutes on a CPU."""

from __future__ import annotations

import os

import click

from pipeline.cli.options import BlockList, PoolList, TimestepList, device_option


def _default_demo_cache() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "diffrep", "demo")


@click.command("demo")
@click.option("--per-class", "train_per_class", type=click.IntRange(min=1), default=200, show_default=True,
              help="Train images per class (CIFAR-10 has 5000).")
@click.option("--test-per-class", type=click.IntRange(min=1), default=100, show_default=True,
              help="Test images per class (CIFAR-10 has 1000).")
@click.option("--timesteps", "-t", type=TimestepList(), default="5,25,50,100,200,400", show_default=True)
@click.option("--blocks", "-b", type=BlockList(), default="5,8,10,12,15", show_default=True,
              help="Blocks of 32x32_small (1..19; 10 is the middle block).")
@click.option("--pools", "probe_pools", type=PoolList(), default="1,2,4", show_default=True,
              help="Pool sizes of the linear-probe sweep.")
@click.option("--random-weights", is_flag=True,
              help="Probe random weights (fan-in, seed 0) instead of the bundled trained checkpoint (no floors).")
@click.option("--full", is_flag=True,
              help="Train the attention head at the paper's settings (width 1024, depth 2, 28 epochs of SGD 5e-2): "
                   "an hour or more on a CPU, minutes on a GPU.")
@click.option("--no-floors", is_flag=True, help="Skip the random-init and raw-pixel floors.")
@click.option("--cache-dir", type=click.Path(file_okay=False, resolve_path=True), default=_default_demo_cache,
              show_default="~/.cache/diffrep/demo")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="results/demo", show_default=True,
              help="Folder for report.md, the sweep tables, heatmaps and results.parquet.")
@click.option("--synchronous", is_flag=True, help="Extract in this process (already the default on one machine with one GPU or none).")
@device_option()
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def demo(train_per_class, test_per_class, timesteps, blocks, probe_pools, random_weights, full, no_floors, cache_dir,
         out_dir, synchronous, device, no_progress) -> None:
    """Ask the paper's questions of diffrep's own text-free ADM (32x32_small trained on CIFAR-10,
    bundled): extract a block x timestep grid, fit converged linear probes, kNN, CKA and an
    attention head, compare with random-init and raw-pixel floors, and write results/demo/report.md
    saying which of the paper's findings held.

    CIFAR-10 comes from ../shared/data (unpacked once into $DIFFREP_DATA). Run it again and the
    caches are reused: only the probes run.
    """
    from pipeline.demo import PAPER_HEAD, DemoSettings, HeadSettings, run_demo
    from pipeline.report import format_table

    settings = DemoSettings(
        cache_dir=cache_dir, out_dir=out_dir, train_per_class=train_per_class, test_per_class=test_per_class,
        timesteps=tuple(timesteps), blocks=tuple(blocks), probe_pools=tuple(probe_pools), random_weights=random_weights,
        head=PAPER_HEAD if full else HeadSettings(), floors=not no_floors, synchronous=synchronous, device=device,
        progress=not no_progress,
    )
    out = run_demo(settings, echo=click.echo)
    click.echo("\nlinear probes (converged; chance 10%)")
    click.echo(format_table(out["linear"], columns=("blocks", "timesteps", "pool", "l2", "top1", "top5")))
    click.echo("")
    for finding in out["findings"]:
        click.echo(f"- {finding.sentence}")
    click.echo(f"\nreport: {out['report']}")
