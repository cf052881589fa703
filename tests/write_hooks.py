"""Kill the process after its k-th shard write, to test resume: a Dask worker preload, or a wrapper of `diffrep`.

``$DIFFREP_TEST_CRASH_AFTER_WRITES='k[:sentinel]'`` sets k; with a sentinel file, only the first
process to reach k dies (it creates the file), so a restarted worker runs on. Used two ways:

* ``python tests/crash_after_writes.py extract ...``: the ``diffrep`` command, crashing in-process;
* ``dask.config.set({"distributed.worker.preload": [__file__]})``: every local worker crashes alike.
"""

from __future__ import annotations

import os
import sys

_ENV = "DIFFREP_TEST_CRASH_AFTER_WRITES"


def install() -> None:
    """Wrap ``extract.job.write_shard`` so that the k-th completed write ends the process (exit status 3)."""
    import extract.job as job

    setting = os.environ.get(_ENV)
    if not setting or getattr(job.write_shard, "crashes", False):
        return
    count, _, sentinel = setting.partition(":")
    real, writes = job.write_shard, [0]

    def write_then_maybe_crash(*args, **kwargs):
        real(*args, **kwargs)
        writes[0] += 1
        if writes[0] >= int(count) and not (sentinel and os.path.exists(sentinel)):
            if sentinel:
                open(sentinel, "w").close()
            os._exit(3)

    write_then_maybe_crash.crashes = True
    job.write_shard = write_then_maybe_crash


def dask_setup(worker) -> None:  # noqa: ARG001 - the Dask preload hook
    install()


if __name__ == "__main__":
    install()
    from pipeline.cli import main

    sys.exit(main(sys.argv[1:]))
