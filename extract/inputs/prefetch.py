"""Work queued ahead of the forward: one pool of decoding threads per process, shared by consecutive shard jobs.

PIL decoding, resizing and torch's seeded noise release the GIL, so threads run them while the
backbone computes. The pool outlives a job so that a job can queue the first batches of the
shard it expects next (``ahead``) while its own last batches run; the next job then ``take``s
them instead of waiting for a cold start. Work is keyed by what it computes, so a wrong guess
(on a cluster the next shard may go to another worker) only costs the queued work, which the
next job drops. Jobs in one process run one at a time (``extract.job``), so no job drops
another's work.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["Prefetcher", "PREFETCHER"]


class Prefetcher:
    """A thread pool whose queued results are found again by key."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._threads = 0
        self._queued: dict[Hashable, Future] = {}
        self._lock = threading.Lock()

    def use_threads(self, threads: int) -> None:
        """Run later work on ``threads`` threads (the pool is rebuilt only when the count changes)."""
        threads = max(1, int(threads))
        with self._lock:
            if self._pool is not None and self._threads == threads:
                return
            old, self._pool, self._threads = self._pool, ThreadPoolExecutor(threads, "diffrep-decode"), threads
        if old is not None:
            old.shutdown(wait=False)  # work already queued there still finishes

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self._pool is None:
            self.use_threads(1)
        return self._pool.submit(fn, *args)

    def take(self, key: Hashable, fn: Callable[..., Any], *args: Any) -> Future:
        """The queued future for ``key`` (removed from the queue), or ``fn(*args)`` submitted now."""
        with self._lock:
            future = self._queued.pop(key, None)
        return future if future is not None else self._submit(fn, *args)

    def ahead(self, key: Hashable, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` for a later ``take(key, ...)`` (nothing when it is queued already)."""
        with self._lock:
            if key in self._queued:
                return
            self._queued[key] = self._submit(fn, *args)

    def drop_queued(self) -> int:
        """Forget work queued ahead that no job took (cancelled if not started); returns how many."""
        with self._lock:
            stale, self._queued = list(self._queued.values()), {}
        for future in stale:
            future.cancel()
        return len(stale)

    @property
    def queued(self) -> int:
        return len(self._queued)


PREFETCHER = Prefetcher()
