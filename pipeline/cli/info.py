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
    from extract.backbone.configs import NAMED_CONFIGS, get_config
    from extract.backbone.registry import create_backbone

    if list_only:
        for name, cfg in NAMED_CONFIGS.items():
            click.echo(f"{name:20s} {cfg.kind:10s} {cfg.description}")
        return
    get_config(config_name)
    if checkpoint:
        create_backbone(config_name, checkpoint=checkpoint)
        click.echo(f"checkpoint {checkpoint} loads into {config_name} (strict)")
    click.echo(format_block_table(block_table(config_name)))
