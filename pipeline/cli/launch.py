"""``diffrep --nproc N <command>``: start ``torchrun`` for the user, and say in one line which rank died.

The plain form is ``torchrun --nproc-per-node N -m pipeline.cli.main <command> ...`` (add ``--nnodes`` and
``--rdzv-endpoint`` across machines); ``--nproc`` is that on one machine (``--standalone``: a free local
port), run in this process through ``torch.distributed.run`` so that a rank's death comes back as one
line naming the rank instead of torchrun's failure table. Each rank runs the command as one run
(``extract.distributed``); rank 0 alone writes checkpoints and results.
"""

from __future__ import annotations

import logging
import signal

from pipeline.errors import DistributedRunFailed

__all__ = ["launch"]


def _signal_name(code: int) -> str:
    try:
        return f", {signal.Signals(-code).name}" if code < 0 else ""
    except ValueError:
        return ""


def launch(nproc: int, argv: list[str]) -> None:
    """Run ``diffrep <argv>`` on ``nproc`` local processes under torchrun; returns when every rank finished.

    Raises:
        DistributedRunFailed: a rank exited with an error or was killed; the message names the first one
            (and its exit code or signal) and says that the finished epochs' checkpoint is kept.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(["--standalone", "--nproc-per-node", str(int(nproc)), "--max-restarts", "0",
                       "-m", "pipeline.cli.main", *argv])
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = min(exc.failures.items(), key=lambda item: item[1].timestamp)
        code = int(failure.exitcode)
        raise DistributedRunFailed(
            f"rank {rank} of {nproc} (pid {failure.pid}) died with exit code {code}{_signal_name(code)}; the job "
            f"stopped: the checkpoint of the last finished epoch is kept, the same command with --resume continues"
        ) from None
