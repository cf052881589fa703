"""Test hooks around shard writes, from outside extract/: crash after the k-th write, or sleep after each.

``$DIFFREP_TEST_CRASH_AFTER_WRITES='k[:sentinel]'`` ends the process (exit status 3) after its k-th
write; with a sentinel file only the first process to get there dies (it creates the file), so a
restarted worker runs on. ``$DIFFREP_TEST_SLEEP_AFTER_WRITES=s`` sleeps s seconds after each write
(time to press Ctrl-C). Two ways in:

* ``python tests/write_hooks.py extract ...``: the ``diffrep`` command with the hooks in this process;
* ``distributed.worker.preload`` naming this file: every Dask worker installs them when it starts.
"""

from __future__ import annotations

import os
import sys
import time

_CRASH = "DIFFREP_TEST_CRASH_AFTER_WRITES"
_SLEEP = "DIFFREP_TEST_SLEEP_AFTER_WRITES"


def install() -> None:
    """Wrap ``extract.job.write_shard_data`` (looked up at each call) with the hooks the environment asks for."""
    import extract.job as job

    crash, sleep = os.environ.get(_CRASH), float(os.environ.get(_SLEEP) or 0)
    if not (crash or sleep) or getattr(job.write_shard_data, "hooked", False):
        return
    count, _, sentinel = (crash or "0").partition(":")
    real, writes = job.write_shard_data, [0]

    def hooked_write(*args, **kwargs):
        result = real(*args, **kwargs)
        writes[0] += 1
        if crash and writes[0] >= int(count) and not (sentinel and os.path.exists(sentinel)):
            if sentinel:
                open(sentinel, "w").close()
            os._exit(3)
        time.sleep(sleep)
        return result

    hooked_write.hooked = True
    job.write_shard_data = hooked_write


def dask_setup(worker) -> None:  # noqa: ARG001 - the Dask preload hook
    install()


if __name__ == "__main__":
    # run as a script, this folder would come first on sys.path and tests/extract would shadow the package
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    install()
    from pipeline.cli.main import main

    sys.exit(main(sys.argv[1:]))
