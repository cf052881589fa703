"""``diffrep info``: the block table of a backbone (channels, size, cumulative GFLOPs, parameters)."""

from __future__ import annotations

import click

from pipeline.cli.options import checkpoint_option, config_option


@click.command("info")
@config_option()
@checkpoint_option()
@click.option("--list", "list_only", is_flag=True, help="List the named configurations and exit.")
def info(config_name: str, checkpoint: str | None, list_only: bool) -> None:
    """Print the block table of a backbone: b, module, channels, spatial size, cumulative GFLOPs
    to reach b (batch 1), and parameters per block.

    With --checkpoint the file is loaded strictly into the configuration first, so a wrong
    file is reported before anything else.
    """
    from extract.backbone.block_table import block_table, format_block_table
    from extract.backbone.configs import NAMED_CONFIGS
    from extract.backbone.registry import create_backbone, family_of

    if list_only:
        for name, cfg in NAMED_CONFIGS.items():
            click.echo(f"{name:20s} {cfg.kind:10s} {cfg.description}")
        from extract.backbone.sd_configs import SD_CONFIGS

        for name, sd in SD_CONFIGS.items():
            click.echo(f"{name:20s} {'sd':10s} {sd.description}")
        return
    family = family_of(config_name)
    if checkpoint:
        create_backbone(config_name, checkpoint=checkpoint)
        click.echo(f"checkpoint {checkpoint} loads into {config_name} (strict)")
    sizes = family.table_sizes(config_name)
    if family.inputs == "latent":  # the FLOPs are the U-Net's at the first size; sides at every size, in latent cells
        extra: dict[str, dict[int, str]] = {}
        for s in sizes[1:]:
            extra[f"@{s}"] = {b: str(side) for b, (_, side) in family.block_shapes(config_name, s).items()}
        for s in sizes[1:]:
            extra[f"GFLOPs@{s}"] = {r.b: f"{r.flops_cum / 1e9:.2f}" for r in family.block_table(config_name, image_size=s)}
        click.echo(f"{config_name}: U-Net on the VAE latent of the image (side / 8); sides in latent cells; "
                   f"cum GFLOPs at {sizes[0]} px, batch 1 (the VAE encoder adds its own, once per image)")
        click.echo(format_block_table(block_table(config_name), extra, size_label=f"@{sizes[0]}"))
        return
    click.echo(format_block_table(block_table(config_name)))
