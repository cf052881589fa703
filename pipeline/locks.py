"""Advisory file locks (POSIX flock) for the few places where two diffrep processes may meet:
unpacking a dataset, appending to the results table, and extracting into one cache."""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["LockHeld", "file_lock"]


class LockHeld(Exception):
    """A non-blocking ``file_lock`` found the lock taken; ``holder`` is what its owner wrote in it."""

    def __init__(self, path: str, holder: str):
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


@contextmanager
def file_lock(lock_path: str | os.PathLike, blocking: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created with its folders) for the ``with`` body.

    The holder writes "pid N on HOST" into the file, so a refused caller can say who holds it.

    Raises:
        LockHeld: ``blocking=False`` and another process holds the lock.
    """
    lock_path = os.fspath(lock_path)
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.seek(0)
            raise LockHeld(lock_path, handle.read().strip() or "another process") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
