"""Run a function on N gloo processes (torch.multiprocessing spawn), as torchrun would, and get rank 0's result.

The tests compare a distributed run with one process; the single-process side runs in the test's own
process, so each comparison costs one spawn of N fresh interpreters.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, target, args: tuple, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from extract import distributed

    distributed.initialize("cpu")
    try:
        result = target(*args)
        if rank == 0:
            torch.save(result, out)
    finally:
        distributed.shutdown()


def run_ranks(world: int, target, *args):
    """``target(*args)`` on ``world`` processes joined by gloo; returns what rank 0 returned (saved with torch.save)."""
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "result.pt")
        mp.start_processes(_worker, args=(world, free_port(), target, args, out), nprocs=world, join=True,
                           start_method="spawn")
        return torch.load(out, weights_only=False)
