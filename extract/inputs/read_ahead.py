"""A producer run on a background thread a few items ahead of its consumer (cache windows, decoded image batches).

Used by the streamed cache reader and the live image feed: errors in the thread reach the
consumer; a consumer that stops early stops the thread, which never blocks on a full queue.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

__all__ = ["read_ahead"]


def read_ahead(produce: Callable[[threading.Event], Iterator], depth: int = 1, name: str = "diffrep-read-ahead") -> Iterator:
    """Run ``produce(stop)`` on a background thread, ``depth`` items ahead of the consumer.

    An error in the thread is raised here, in the consumer's thread; when the consumer stops early
    (``close``, an exception, garbage collection) ``stop`` is set and the thread ends after its current read.
    """
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in produce(stop):
                if not put(("item", item)):
                    return
            put(("done", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put(("error", exc))

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while True:
            kind, item = items.get()
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        while not items.empty():  # free a window already read
            items.get_nowait()
        thread.join()
