"""The ``diffrep`` command line: the one group, and the one place that adds its commands.

Commands live one concept per module (``pipeline.cli.extract``, ``.probe``, ...) as plain click
commands that parse, call one library function, and print; they import nothing from here, and load
torch only when they run (``--help`` stays fast). Every ``DiffrepError`` raised below becomes one
line on stderr and exit status 1 (a cache that lacks work ends with the exact extract command,
``pipeline.advice``); a Ctrl-C becomes one line saying what was kept (the message of
``ExtractionInterrupted`` or ``RunInterrupted`` where a loop says it) and exit status 130.
"""

from __future__ import annotations

import logging

import click

from extract.errors import DiffrepError
from pipeline.cli.demo import demo
from pipeline.cli.extract import extract
from pipeline.cli.feedback import feedback
from pipeline.cli.fuse import fuse
from pipeline.cli.info import info
from pipeline.cli.pretrain import pretrain
from pipeline.cli.search import search
from pipeline.cli.segment import segment
from pipeline.cli.probe import cka, knn, probe, report, sweep
from pipeline.cli.verify import verify

__all__ = ["main"]

#: A Ctrl-C outside the loops that checkpoint (planning, loading, reports).
INTERRUPTED_ELSEWHERE = "interrupted (Ctrl-C): what had finished before is kept; the same command starts again"


class _Group(click.Group):
    """A click group that turns library errors into one-line messages, and a Ctrl-C that says what to do into
    that line on stderr and exit status 130."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DiffrepError as exc:
            from pipeline.advice import advised

            raise click.ClickException(advised(exc)) from exc
        except KeyboardInterrupt as exc:  # the loops that keep work say what they kept; elsewhere, say it plainly
            click.echo(f"\n{str(exc) or INTERRUPTED_ELSEWHERE}", err=True)
            raise SystemExit(130) from None


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
      search   find the best (block, timestep) by a staged search, not the full grid
      verify   read a cache back and check every shard against its checksum
    Start with `diffrep info` (the backbone's block table) or `make demo`.
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


# Each command lives in its own module as a plain click command; this is the one place that adds them.
for _command in (info, extract, probe, knn, cka, sweep, report, demo, pretrain, fuse, feedback, verify):
    main.add_command(_command)
main.add_command(search)
main.add_command(segment)
