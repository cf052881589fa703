"""``diffrep pretrain``: text-free diffusion training of an ADM configuration on a manifest dataset (labels unused)."""

from __future__ import annotations

import click

from pipeline.cli.options import FolderName, config_option, dataset_option, device_option


@click.command("pretrain")
@config_option(default="32x32_small")
@dataset_option(default="cifar10")
@click.option("--split", type=FolderName("split"), default="train", show_default=True, help="Split whose images train the model (labels are never read).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="runs/pretrain", show_default=True,
              help="Folder for ema.pt / model.pt (official layout, with a JSON each), train_state.pt, loss.csv, loss.png.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Stop after this many optimizer steps in all.")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Or stop after this much wall time (whichever comes first); the JSON records the steps reached.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True, help="Adam learning rate after warm-up.")
@click.option("--warmup", "warmup_steps", type=click.IntRange(min=0), default=50, show_default=True, help="Linear warm-up steps.")
@click.option("--grad-clip", type=click.FloatRange(min=0), default=1.0, show_default=True, help="Max gradient norm (0: no clipping).")
@click.option("--ema-decay", type=click.FloatRange(min=0, max=1, max_open=True), default=0.995, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Data order, flips, timesteps and noise.")
@click.option("--weight-seed", type=int, default=None,
              help="Start from fan-in scaled random weights drawn from this seed (default: ADM's own initialisation).")
@click.option("--no-flip", is_flag=True, help="No random horizontal flips.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Autocast precision (default: bf16 on CUDA, fp32 on CPU).")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="Torch CPU threads.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=100, show_default=True,
              help="Steps between checkpoints (and probe checks).")
@click.option("--resume", is_flag=True, help="Continue from OUT/train_state.pt (same settings); ends bit-identical to a straight run on CPU.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Train on N images spread over the classes only (smoke tests).")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Root of the image folders.")
@click.option("--probe-block", "-b", type=click.IntRange(min=1), default=None,
              help="Block of the periodic linear-probe check (default: two above the middle block).")
@click.option("--probe-timestep", "-t", type=click.IntRange(min=0), default=25, show_default=True)
@click.option("--no-probe", is_flag=True, help="Skip the linear-probe check at checkpoints (always skipped on a segmentation dataset).")
@click.option("--init", "init", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Start from this checkpoint of --config instead of a fresh initialisation: more text-free training "
                   "of trained weights, e.g. on a new dataset's own images (--dataset camvid).")
@click.option("--decode-threads", type=click.IntRange(min=1), default=2, show_default=True)
@device_option()
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def pretrain(config_name, dataset, split, out_dir, steps, minutes, batch_size, lr, warmup_steps, grad_clip, ema_decay,
             seed, weight_seed, no_flip, precision, threads, checkpoint_every, resume, limit, data_root, probe_block,
             probe_timestep, no_probe, init, decode_threads, device, no_progress) -> None:
    """Train a diffusion U-Net without labels: eps-prediction loss (+ the variational bound when the
    configuration learns sigma), uniform timesteps, flips, Adam with warm-up and clipping, EMA weights.

    \b
    Example (the bundled checkpoint's recipe):
      diffrep pretrain --config 32x32_small --dataset cifar10 --steps 1500 --out runs/pretrain
    More text-free training of the bundled weights on a segmentation dataset's own images:
      diffrep pretrain --config 32x32_small --dataset camvid --init extract/weights/32x32_small.pt --minutes 15
    Use the result anywhere a checkpoint goes:
      diffrep extract --config 32x32_small --checkpoint runs/pretrain/ema.pt ...
    """
    from extract.precision import resolve_device
    from extract.backbone.pretrain import PretrainConfig

    from pipeline.pretraining import PretrainRequest, run_pretrain

    if steps is None and minutes is None:
        raise click.UsageError("pass --steps N or --minutes M (or both: whichever comes first)")
    if precision is None:
        precision = "bf16" if resolve_device(device).type == "cuda" else "fp32"
    from extract.backbone.checkpoint import file_sha256

    config = PretrainConfig(config_name=config_name, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                            grad_clip=grad_clip, ema_decay=ema_decay, seed=seed, weight_seed=weight_seed,
                            init_sha256=file_sha256(init) if init else "",
                            flip=not no_flip, channels_last=resolve_device(device).type == "cpu",
                            precision=precision, threads=threads)
    request = PretrainRequest(config=config, dataset=dataset, split=split, out_dir=out_dir, steps=steps, minutes=minutes,
                              resume=resume, checkpoint_every=checkpoint_every, data_root=data_root, limit=limit,
                              device=device, decode_threads=decode_threads, probe_block=probe_block,
                              probe_timestep=probe_timestep, probe=not no_probe, progress=not no_progress, init=init)
    result, _ = run_pretrain(request)
    click.echo(f"stopped after {result.step} steps ({result.images_seen} images seen, {result.seconds / 60:.1f} min, "
               f"by {result.stopped_by}); final loss {result.loss:.4f}")
    for path in result.written:
        click.echo(f"wrote {path}")
