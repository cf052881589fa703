"""``diffrep fuse``: train DifFormer on cached blocks x timesteps (the paper's fusion from the cache)."""

from __future__ import annotations

import click

from pipeline.cli.options import BlockList, FloatList, TimestepList, cache_options, device_option


@click.command("fuse")
@cache_options
@click.option("--blocks", "-b", type=BlockList(), default="19,24,30", show_default=True, help="Blocks fused.")
@click.option("--timesteps", "-t", type=TimestepList(), default="90,150,300", show_default=True, help="Timesteps fused.")
@click.option("--dim", type=click.IntRange(min=8), default=None, help="Token width [default: 1024].")
@click.option("--depth", type=click.IntRange(min=1), default=None, help="Transformer blocks [default: 2].")
@click.option("--pool", type=click.IntRange(min=1), default=None, help="Largest token grid side per block [default: 16].")
@click.option("--solver", type=click.Choice(["sgd", "adam"]), default="sgd", show_default=True,
              help="SGD (momentum 0, the official code) or Adam.")
@click.option("--lr", type=FloatList(), default="5e-2", show_default=True,
              help="Learning rate(s); several train in one pass, the best on held-out train rows is scored.")
@click.option("--heldout-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Share of every class held out to choose among several --lr.")
@click.option("--epochs", type=click.IntRange(min=1), default=28, show_default=True, help="Epochs (StepLR 7, 0.1).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@device_option()
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None,
              help="Where checkpoint.pth is written each epoch [default: results/checkpoints/<run>].")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --checkpoint-dir (same features and settings).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def fuse(cache, **options) -> None:
    """Train DifFormer on cached features of several blocks and timesteps, report test top-1/top-5.

    One tokenizer per block shared across timesteps, ONE transformer shared across timesteps and
    run once per timestep on all blocks' tokens plus a CLS token, the per-timestep CLS outputs
    concatenated into the classifier (28.9M parameters on 256x256_uncond, 50 classes, 3 x 3).
    Every (b, t) must be cached in both splits; a missing one is refused with the extract command.

    \b
    Example:
      diffrep fuse --dataset imagenet-50 -t 90,150,300 -b 19,24,30
    """
    from pipeline.evaluate import FitProtocol, ProbeRequest, fmt_keys, run_probe

    protocol = FitProtocol(**{name: options.pop(name) for name in
                              ("solver", "lr", "heldout_fraction", "epochs", "batch_size", "seed")})
    run_probe(ProbeRequest(cache=cache, head="difformer", protocol=protocol, **options), announce=lambda row: click.echo(
        f"DifFormer ({row['solver']}, lr {row['lr']:g}) on {row['dataset']} b={fmt_keys(options['blocks'])} "
        f"t={fmt_keys(options['timesteps'])} ({row['parameters']:,} parameters, {row['train_size']} train / "
        f"{row['test_size']} test images): top-1 {100 * row['top1']:.2f}%, top-5 {100 * row['top5']:.2f}% "
        f"in {row['train_seconds']:.1f} s"))
