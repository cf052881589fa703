"""``diffrep detect``: Mask R-CNN / Faster R-CNN on a diffusion backbone (or a random-init ResNet-18 FPN), COCO AP."""

from __future__ import annotations

import click

from pipeline.cli.options import BlockList, FolderName, checkpoint_option, config_option, dataset_option, device_option


@click.command("detect")
@dataset_option(default="pets")
@click.option("--backbone", type=click.Choice(["adm", "resnet18"]), default="adm", show_default=True,
              help="adm: the diffusion --config through the block-pyramid adapter; resnet18: torchvision's ResNet-18 FPN "
                   "at random initialisation (the baseline; nothing is downloaded).")
@config_option(default="32x32_small")
@checkpoint_option()
@click.option("--random-weights", is_flag=True, help="Seeded random weights (--weight-seed) instead of the checkpoint "
                                                    "diffrep bundles for --config (32x32_small has one).")
@click.option("--weight-seed", type=int, default=0, show_default=True,
              help="Seed of random weights (without --checkpoint; with --backbone resnet18 its init).")
@click.option("--blocks", "-b", type=BlockList(), default=None,
              help="Blocks of the pyramid, one per stride [default: the deepest decoder block of each of the 4 coarsest "
                   "strides down to 2; 32x32_small: 12,15; 256x256_uncond: 21,24,27,30].")
@click.option("--timestep", "-t", type=click.IntRange(min=0), default=25, show_default=True)
@click.option("--image-size", type=click.IntRange(min=32), default=64, show_default=True,
              help="Model input side in pixels: every image is resized to it (square).")
@click.option("--masks/--no-masks", default=True, show_default=True, help="Mask R-CNN, or Faster R-CNN (boxes only).")
@click.option("--detections-per-image", type=click.IntRange(min=1), default=100, show_default=True,
              help="Most detections kept per image (COCO scores up to 100; fewer score faster on a CPU).")
@click.option("--label", type=click.Choice(["breed", "species"]), default=None,
              help="pets: the class of a pet [default: the manifest entry's, breed].")
@click.option("--train-split", type=FolderName("split"), default="train", show_default=True)
@click.option("--test-split", type=FolderName("split"), default="test", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Train on the first N images.")
@click.option("--test-limit", type=click.IntRange(min=1), default=None, help="Score the first N test images.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None)
@click.option("--noise-seed", type=int, default=0, show_default=True, help="Seeded noise of the scored images, as extract.")
@click.option("--finetune", is_flag=True, help="Train the diffusion backbone too (at --backbone-lr); the tuned weights go "
                                              "to <checkpoint-dir>/backbone.pt, loadable by --checkpoint.")
@click.option("--backbone-lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="--finetune: the backbone's learning rate [default: --lr / 10].")
@click.option("--epochs", type=click.IntRange(min=1), default=12, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Stop after N optimizer steps instead.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=3e-4, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.05, show_default=True)
@click.option("--warmup-steps", type=click.IntRange(min=0), default=50, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the detector's init, order, flips, noise.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Backbone autocast [default: bf16 on GPUs, fp32 on the CPU].")
@device_option()
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None,
              help="Where checkpoint.pth goes each epoch [default: results/checkpoints/<run>].")
@click.option("--resume", is_flag=True, help="Continue from --checkpoint-dir (same data, backbone and settings).")
@click.option("--results", "results_path", type=click.Path(dir_okay=False), default=None)
@click.option("--progress/--no-progress", default=True, show_default=True)
def detect(blocks, timestep, **options) -> None:
    """Train Mask R-CNN (or Faster R-CNN, --no-masks) on a backbone and score COCO box and mask AP.

    The diffusion backbone runs once per image per step: x_t at --timestep (fresh noise while
    training, seeded noise when scoring), stopped after the deepest of --blocks, those blocks an
    FPN pyramid. Data: a COCO-format manifest entry (coco, when you have it) or pets (the
    Oxford-IIIT Pet sample, masks from its trimaps).

    \b
    Example:
      diffrep detect --dataset pets --config 32x32_small --image-size 64 --epochs 12
      diffrep detect --dataset pets --backbone resnet18 --image-size 64 --epochs 12
    """
    from pipeline.detection import DetectRequest, run_detect

    request = DetectRequest(blocks=tuple(blocks) if blocks else None, timestep=int(timestep), **options)
    row = run_detect(request, announce=lambda row: click.echo(
        f"{row['head']} on {row['dataset']} ({row['backbone_id']}"
        + (f", b={','.join(map(str, row['blocks']))}, t={row['timesteps'][0]}" if row["blocks"] else "")
        + f", {row['image_size']} px): box AP {100 * row['box_ap']:.1f} (AP50 {100 * row['box_ap50']:.1f}, "
          f"AP75 {100 * row['box_ap75']:.1f})"
        + (f", mask AP {100 * row['mask_ap']:.1f} (AP50 {100 * row['mask_ap50']:.1f}, AP75 {100 * row['mask_ap75']:.1f})"
           if row.get("mask_ap") is not None else "")
        + f" in {row['train_seconds']:.0f} s"))
    if row.get("backbone_path"):
        click.echo(f"tuned backbone (official layout, loadable by --checkpoint): {row['backbone_path']}")
