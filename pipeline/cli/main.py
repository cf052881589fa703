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
import sys

import click

from extract.errors import DiffrepError
from pipeline.cli.demo import demo
from pipeline.cli.detect import detect
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
        ctx.meta["diffrep.command"] = [*ctx._protected_args, *ctx.args]  # what --nproc hands to torchrun
        try:
            return super().invoke(ctx)
        except DiffrepError as exc:
            from pipeline.advice import advised

            raise click.ClickException(_on_rank(advised(exc))) from exc
        except RuntimeError as exc:  # under torchrun: a rank lost in a collective says so in one line
            if isinstance(exc, click.exceptions.Exit) or "extract.distributed" not in sys.modules:
                raise  # --help and friends; nothing distributed ran (and torch stays unloaded)
            from extract.distributed import describe_failure

            line = describe_failure(exc)
            if line is None:
                raise
            raise click.ClickException(line) from exc
        except KeyboardInterrupt as exc:  # the loops that keep work say what they kept; elsewhere, say it plainly
            click.echo(f"\n{str(exc) or INTERRUPTED_ELSEWHERE}", err=True)
            raise SystemExit(130) from None


@click.group("diffrep", cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Run the command on N local processes under torchrun (one run; --batch-size stays global).")
@click.option("--accumulate", type=click.IntRange(min=1), default=1, show_default=True,
              help="Micro-batches per optimizer step on every rank (gradient accumulation: the same global batch).")
@click.version_option(package_name="diffrep")
@click.pass_context
def main(ctx: click.Context, verbose: int, nproc: int | None, accumulate: int) -> None:
    """diffrep: diffusion U-Nets (guided-diffusion ADM) as visual feature extractors.

    \b
    Stages:
      extract  run the backbone once per (image, t) and cache block features (Zarr)
      probe    train linear / MLP / CNN / attention heads on cached features
      knn, cka, sweep, report   evaluate and compare cached features
      search   find the best (block, timestep) by a staged search, not the full grid
      detect   Mask R-CNN on a diffusion backbone, COCO box and mask AP
      verify   read a cache back and check every shard against its checksum
    Start with `diffrep info` (the backbone's block table) or `make demo`.
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    _distributed(ctx, nproc, accumulate, verbose)


def _on_rank(message: str) -> str:
    """A message prefixed with the rank that says it, in a distributed run."""
    from extract import distributed

    return f"rank {distributed.rank()}: {message}" if distributed.world_size() > 1 else message


def _distributed(ctx: click.Context, nproc: int | None, accumulate: int, verbose: int) -> None:
    """``--nproc``: start torchrun with this command and stop here; under torchrun: join the run (every
    rank but 0 prints nothing to stdout), and leave it when the command ends."""
    import os

    if nproc is not None and "WORLD_SIZE" not in os.environ:
        from pipeline.cli.launch import launch

        command = ctx.meta.get("diffrep.command", [])  # the command and its options, as given
        argv = ["-v"] * verbose + ["--accumulate", str(accumulate)] + command
        try:
            launch(nproc, argv)
        except DiffrepError as exc:
            raise click.ClickException(str(exc)) from exc
        ctx.exit(0)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or accumulate > 1:
        from extract import distributed

        distributed.initialize(os.environ.get("DIFFREP_DEVICE", "auto"), accumulate)
        ctx.call_on_close(distributed.shutdown)
        if not distributed.is_main():
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - one line per run, not one per rank


# Each command lives in its own module as a plain click command; this is the one place that adds them.
for _command in (info, extract, probe, knn, cka, sweep, report, demo, pretrain, fuse, feedback, verify):
    main.add_command(_command)
main.add_command(search)
main.add_command(segment)
main.add_command(detect)


if __name__ == "__main__":  # torchrun -m pipeline.cli.main ..., and python -m
    main()
