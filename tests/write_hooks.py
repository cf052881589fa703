"""Test hooks around shard writes, from outside extract/: crash after the k-th write, or hold the writes after it.

``$DIFFREP_TEST_CRASH_AFTER_WRITES='k[:sentinel]'`` ends the process (exit status 3) after its k-th
write; with a sentinel file only the first process to get there dies (it creates the file), so a
restarted worker runs on. ``$DIFFREP_TEST_HOLD_AFTER_WRITES='k:folder'`` lets k writes through, then
creates ``folder/held`` and keeps every later write waiting until ``folder/release`` exists: a test
sends its Ctrl-C while the run cannot finish, whatever the machine's load. Two ways in:

* ``python tests/write_hooks.py extract ...``: the ``diffrep`` command with the hooks in this process;
* ``distributed.worker.preload`` naming this file: every Dask worker installs them when it starts.
"""

from __future__ import annotations

import os
import sys
import time

_CRASH = "DIFFREP_TEST_CRASH_AFTER_WRITES"
_HOLD = "DIFFREP_TEST_HOLD_AFTER_WRITES"


def install(worker=None) -> None:
    """Wrap ``extract.job.write_shard_data`` (looked up at each call) with the hooks the environment asks for.

    ``worker``: the Dask worker of this process, if any (a held write gives up when it closes).
    """
    import extract.job as job

    crash, hold = os.environ.get(_CRASH), os.environ.get(_HOLD)
    if not (crash or hold) or getattr(job.write_shard_data, "hooked", False):
        return
    count, _, sentinel = (crash or "0").partition(":")
    let_through, _, folder = (hold or "0").partition(":")
    real, writes = job.write_shard_data, [0]

    def hooked_write(*args, **kwargs):
        if hold and writes[0] >= int(let_through):
            _wait_for_release(folder, worker)
        result = real(*args, **kwargs)
        writes[0] += 1
        if crash and writes[0] >= int(count) and not (sentinel and os.path.exists(sentinel)):
            if sentinel:
                open(sentinel, "w").close()
            os._exit(3)
        return result

    hooked_write.hooked = True
    job.write_shard_data = hooked_write


def _wait_for_release(folder: str, worker) -> None:
    """Say ``held``, then wait for ``release``; a Dask worker that is closing (the run was stopped) gives up the write."""
    open(os.path.join(folder, "held"), "w").close()
    while not os.path.exists(os.path.join(folder, "release")):
        if worker is not None and worker.status.name != "running":
            raise RuntimeError("the run stopped while this write was held")
        time.sleep(0.02)


def dask_setup(worker) -> None:
    """The Dask preload hook."""
    install(worker)


if __name__ == "__main__":
    # run as a script, this folder would come first on sys.path and tests/extract would shadow the package
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    install()
    from pipeline.cli.main import main

    sys.exit(main(sys.argv[1:]))
