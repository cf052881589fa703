"""``diffrep segment``: semantic segmentation on unpooled block maps (extracts what the cache lacks, trains, scores mIoU)."""

from __future__ import annotations

import click

from pipeline.cli.options import (
    BlockList, FolderName, RamCapGb, TimestepList, cache_dir_option, checkpoint_option, config_option, device_option,
    int_tuple,
)


@click.command("segment")
@click.option("--dataset", type=FolderName("dataset"), required=True,
              help="Dense dataset from the segmentation section of data_manifest.yaml: camvid, pets-seg, pets-seg-breeds, ade20k.")
@click.option("--blocks", "-b", type=BlockList(), default=None, help="Block(s) whose unpooled maps the head reads, e.g. 8 or 5,8,12.")
@click.option("--timesteps", "-t", type=TimestepList(), default=None, help="Timestep(s), e.g. 25 (several are concatenated).")
@click.option("--head", type=click.Choice(["pixel", "upernet"]), default="pixel", show_default=True,
              help="pixel: per-pixel linear/MLP classifier on the upsampled, concatenated maps (ddpm-segmentation); "
                   "upernet: projection, pyramid pooling, FPN and fusion (the paper's).")
@click.option("--hidden", callback=int_tuple, default=None, help="pixel: MLP widths, e.g. 256,128 [default: linear].")
@click.option("--ensemble", type=click.IntRange(min=1), default=None, help="pixel: classifiers trained side by side, probabilities averaged.")
@click.option("--channels", type=click.IntRange(min=8), default=None, help="upernet: width of every level [default: 256].")
@config_option()
@checkpoint_option()
@click.option("--weight-seed", type=int, default=0, show_default=True, help="Seed of random weights (without --checkpoint).")
@click.option("--raw-pixels", is_flag=True, help="Train the head on the input pixels instead of a backbone (the floor).")
@click.option("--image-size", type=click.IntRange(min=8), default=None,
              help="Backbone input side in pixels [default: the configuration's]; the U-Net is convolutional, so a "
                   "small model may run larger than it was trained.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Where the dataset folders are.")
@click.option("--train-split", type=FolderName("split"), default=None, help="[default: the dataset's first split]")
@click.option("--test-split", type=FolderName("split"), default=None, help="[default: the dataset's last split]")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Train on N images spread over the split.")
@click.option("--test-limit", type=click.IntRange(min=1), default=None, help="Score N images spread over the split.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True, help="Epochs (StepLR divides the lr by 10 every 7).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Images per step.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the head's initialisation and batch order.")
@device_option()
@cache_dir_option()
@click.option("--noise-seed", type=int, default=0, show_default=True, help="Seed of the per-image noise (extraction).")
@click.option("--shard-size", type=click.IntRange(min=1), default=64, show_default=True, help="Images per shard (extraction).")
@click.option("--extract-batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Images per forward (extraction).")
@click.option("--scheduler", default=None, help="Address of an existing Dask scheduler for the extraction.")
@click.option("--synchronous", is_flag=True, help="Extract in this process (no Dask).")
@click.option("--ram-cap-gb", type=RamCapGb(), default=None,
              help="Most RAM the maps may take: under it they are read whole, over it a batch at a time [default: half the RAM].")
@click.option("--results", "results_path", type=click.Path(dir_okay=False), default=None,
              help="Results table to append to [default: $DIFFREP_RESULTS or results/results.parquet].")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None, help="Where checkpoint.pth is written each epoch.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --checkpoint-dir (refused if trained otherwise).")
@click.option("--figures", type=click.IntRange(min=0), default=4, show_default=True,
              help="Test images drawn as image / truth / prediction (0: none).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="results/segment", show_default=True,
              help="Folder for the figures.")
@click.option("--live", is_flag=True,
              help="Run the backbone every training step instead of reading the cache (the official way): fresh noise, "
                   "and a random resized crop (0.8-1.0) and flip shared by each image and its label map.")
@click.option("--augment/--no-augment", default=True, show_default=True, help="--live: crop and flip every step.")
@click.option("--fresh-noise/--seeded-noise", default=True, show_default=True, help="--live: new noise every step.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def segment(**options) -> None:
    """Train a dense head on unpooled cached maps and report mIoU, per-class IoU and pixel accuracy.

    Extracts the blocks' maps unpooled (float16, native size) into the cache first when they are not
    there (same shards, resume and checks as diffrep extract), trains on the train split streamed a
    batch at a time, and scores the test split at each label map's own resolution (the input square's
    part of it). One row goes to the results table; the figures go to --out.

    \b
    Examples:
      diffrep segment --dataset camvid --config 32x32_small --checkpoint extract/weights/32x32_small.pt \\
          --image-size 64 -b 8 -t 25 --head pixel
      diffrep segment --dataset pets-seg --config 32x32_small --image-size 64 --raw-pixels --head upernet
      diffrep segment --dataset camvid --config 32x32_small --image-size 64 -b 8 -t 25 --live
    """
    from pipeline.segmentation import SegmentRequest, run_segment

    options["blocks"] = tuple(options["blocks"] or ())
    options["timesteps"] = tuple(options["timesteps"] or ())

    def announce(row: dict) -> None:
        what = "raw pixels" if row["blocks"] == "raw" else f"b={','.join(map(str, row['blocks']))} t={','.join(map(str, row['timesteps']))}"
        click.echo(f"{row['head']} head on {row['dataset']} {what} at {row['image_size']} px ({row['parameters']:,} parameters, "
                   f"{row['train_size']} train / {row['test_size']} test images): mIoU {100 * row['top1']:.2f}%, "
                   f"pixel accuracy {100 * row['pixel_accuracy']:.2f}% in {row['train_seconds']:.1f} s "
                   f"({row['pixels_per_second']:,.0f} pixels/s)")

    result = run_segment(SegmentRequest(**options), echo=click.echo, announce=announce)
    click.echo("per-class IoU: " + ", ".join(f"{name} {100 * iou:.1f}" for name, iou in result.class_iou.items()))
    for path in result.written:
        click.echo(f"wrote {path}")
