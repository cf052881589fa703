"""The ``diffrep`` command line: thin commands that parse, call one library function, and print.

Every ``DiffrepError`` raised below becomes one line on stderr and exit status 1.
"""

from __future__ import annotations

import logging

import click

from extract.errors import DiffrepError

__all__ = ["main"]


class _Group(click.Group):
    """A click group that turns library errors into one-line messages."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DiffrepError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group("diffrep", cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="diffrep")
def main(verbose: int) -> None:
    """diffrep: diffusion U-Nets (guided-diffusion ADM) as visual feature extractors.

    \b
    Stages:
      extract  run the backbone once per (image, t) and cache block features (Zarr)
      probe    train linear / MLP / CNN / attention heads on cached features
      knn, cka, sweep, report   evaluate and compare cached features
      verify   read a cache back and check every shard against its checksum
    Start with `diffrep info` (the backbone's block table) or `make demo`.
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


# Commands live one concept per module and register themselves on `main`.
from pipeline.cli import info  # noqa: E402,F401
from pipeline.cli import extract  # noqa: E402,F401
from pipeline.cli import probe  # noqa: E402,F401
from pipeline.cli import demo  # noqa: E402,F401
from pipeline.cli import pretrain  # noqa: E402,F401
from pipeline.cli import fuse  # noqa: E402,F401
from pipeline.cli import feedback  # noqa: E402,F401
from pipeline.cli import verify  # noqa: E402,F401
