"""``diffrep verify``: read every written shard of the caches back and compare it with the checksum taken when it was written."""

from __future__ import annotations

import click

from pipeline.cli.options import FolderName, cache_dir_option


@click.command("verify")
@cache_dir_option()
@click.option("--dataset", type=FolderName("dataset"), default=None, help="Only the caches of this dataset (default: every cache under --cache-dir).")
@click.option("--split", type=FolderName("split"), default=None, help="Only the caches of this split.")
@click.option("--repair", is_flag=True,
              help="Forget the bad shards (delete their files, unset their markers) so that the same diffrep extract "
                   "command writes exactly those again.")
def verify(cache_dir: str, dataset: str | None, split: str | None, repair: bool) -> None:
    """Check the feature caches under --cache-dir: every index chunk and every written shard is
    read back and compared with the CRC-32 recorded when it was written (shards also for Inf/NaN).

    Prints one line per bad shard and a summary; exits with status 1 when anything is bad.
    Readers and extract only check that each file is there with its full size; this also
    catches damage that keeps sizes.
    """
    from extract.errors import CacheError

    from pipeline.verification import verify_caches

    reports = verify_caches(cache_dir, dataset=dataset, split=split, repair=repair)
    bad = 0
    for report in reports:
        for line in report.bad + report.notes:
            click.echo(line)
        bad += len(report.bad)
        unwritten = f", {report.unwritten} not written yet" if report.unwritten else ""
        state = "ok" if not report.bad else f"{len(report.bad)} bad" + (" (reset)" if report.repaired else "")
        click.echo(f"{report.path}: {report.arrays} arrays, {report.shards} shards read{unwritten}: {state}")
    if bad:
        fix = ("run the same diffrep extract command again: it writes them again" if repair else
               "run diffrep verify again with --repair, then the same diffrep extract command: it writes exactly those again")
        raise CacheError(f"{bad} bad shard(s) or index chunk(s) in {len(reports)} cache(s) (listed above): {fix}")
    click.echo(f"verified {len(reports)} cache(s): every written shard reads back as written")
