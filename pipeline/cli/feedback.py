"""``diffrep feedback``: DifFeed (decoder-to-encoder feedback, two passes) trained through the live backbone."""

from __future__ import annotations

import click

from pipeline.cli.options import (
    FolderName, checkpoint_option, config_option, dataset_option, default_cache_dir, device_option,
)


@click.command("feedback")
@dataset_option()
@click.option("--timestep", "-t", type=click.IntRange(min=0), default=150, show_default=True)
@click.option("--strategy", type=click.Choice(["bottleneck", "all", "windowed", "multi-scale"]), default="bottleneck",
              show_default=True, help="Which decoder blocks feed back into which encoder blocks (see README).")
@click.option("--readout", "-b", type=click.IntRange(min=1), default=None,
              help="Block whose features the head reads [default: middle + 5, b=24 on the 256x256 model].")
@config_option()
@checkpoint_option()
@click.option("--weight-seed", type=int, default=0, show_default=True, help="Seed of random weights (without --checkpoint).")
@click.option("--train-split", type=FolderName("split"), default="train", show_default=True)
@click.option("--test-split", type=FolderName("split"), default="test", show_default=True)
@click.option("--per-class", type=click.IntRange(min=1), default=None, help="First N training images of each class.")
@click.option("--test-per-class", type=click.IntRange(min=1), default=None, help="First N test images of each class.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None)
@click.option("--noise-seed", type=int, default=0, show_default=True, help="Seeded noise per (image, t), as extract.")
@click.option("--fresh-noise", is_flag=True, help="New noise every training step (the official code) instead.")
@click.option("--augment", is_flag=True, help="Random resized crop (0.8-1.0) and flip every training step (the official code).")
@click.option("--label-fraction", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Train on this share of every class's images (e.g. 0.01, 0.1), drawn with --seed.")
@click.option("--cache-dir", type=click.Path(file_okay=False, resolve_path=True), default=default_cache_dir,
              show_default="$DIFFREP_CACHE or ~/.cache/diffrep/features",
              help="Read pass 1 from this feature cache when it holds every source block unpooled (--pool none) for "
                   "this backbone and noise seed; otherwise pass 1 runs live (the plan says which).")
@click.option("--pass1", "pass1", type=click.Choice(["auto", "cache", "live"]), default="auto", show_default=True,
              help="auto: read pass 1 from --cache-dir when it holds it, else run it live (the plan says why); "
                   "cache: refuse in one line unless the cache can give it; live: always run it.")
@click.option("--dim", type=click.IntRange(min=8), default=None, help="Attention head width [default: 1024].")
@click.option("--depth", type=click.IntRange(min=1), default=None, help="Attention head blocks [default: 2].")
@click.option("--pool", type=click.IntRange(min=1), default=None, help="Attention head token grid side [default: 16].")
@click.option("--epochs", type=click.IntRange(min=1), default=28, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Stop after N optimizer steps instead (a dataset too large for whole epochs).")
@click.option("--solver", type=click.Choice(["sgd", "adam"]), default="sgd", show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-2, show_default=True)
@click.option("--finetune", is_flag=True, help="Train the backbone's pass 2 too (at --backbone-lr); the tuned weights go "
                                              "to <checkpoint-dir>/backbone.pt, loadable by --checkpoint.")
@click.option("--backbone-lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="--finetune: the backbone's learning rate (official 1e-3).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Backbone autocast [default: bf16 on GPUs, fp32 on the CPU].")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@device_option()
@click.option("--decode-threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None,
              help="Where checkpoint.pth goes each epoch [default: results/checkpoints/<run>].")
@click.option("--resume", is_flag=True, help="Continue from --checkpoint-dir (same data, backbone and settings).")
@click.option("--results", "results_path", type=click.Path(dir_okay=False), default=None)
@click.option("--dry-run", is_flag=True, help="Print the plan (pairs, parameters, backbone passes) and stop.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def feedback(dry_run, **options) -> None:
    """Train DifFeed: pass 1 (no gradients) to the deepest feedback source, feedback layers (1x1 conv,
    BatchNorm, ReLU) into the mirrored encoder blocks, pass 2 on the same noisy image to the
    read-out block, the attention head on its features. The backbone stays frozen unless --finetune.
    Pass 1 is read from the feature cache when it holds the source blocks unpooled.

    \b
    Example:
      diffrep feedback --dataset cifar10 --config 32x32_small -t 25 --strategy bottleneck --dry-run
    """
    from pipeline.feedback import FeedbackRequest, plan_feedback, run_feedback

    options["timestep"] = int(options["timestep"])
    plan = plan_feedback(FeedbackRequest(**options), dry_run=dry_run)
    click.echo(plan.describe())
    if dry_run:
        return
    row = run_feedback(plan, announce=lambda row: click.echo(
        f"DifFeed ({row['strategy']}, read-out b={row['blocks'][0]}, t={row['timesteps'][0]}) on {row['dataset']}: "
        f"top-1 {100 * row['top1']:.2f}%, top-5 {100 * row['top5']:.2f}% in {row['train_seconds']:.1f} s"))
    if row.get("backbone_path"):
        click.echo(f"tuned backbone (official layout, loadable by --checkpoint): {row['backbone_path']}")
