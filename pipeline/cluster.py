"""Where extraction tasks run: the one place that knows Dask (local cluster, an existing one by address, or in-process).

``open_runner()`` with no address runs in this process when there would be one worker (one GPU or
none) and starts a LocalCluster when there are several (one worker process per GPU, or ``workers``;
``workers=1`` asks for a one-worker cluster explicitly), ``open_runner(scheduler="tcp://host:8786")``
joins an existing cluster, and ``open_runner(synchronous=True)`` runs every task in this process.
All give a runner whose ``run(fn, items, retries)`` yields ``(item, result or exception)`` as tasks
finish.

Why one worker runs in-process by default (issue 23): a one-worker local cluster does the same work
as this process, plus a second Python that imports torch, a scheduler and a nanny. Measured on this
project's 2-core machine it ran at 0.76-0.82 of in-process on 500x375 JPEGs. What it buys (a crashed
or killed worker is restarted and its shard retried) does not pay for that when a rerun resumes
anyway, keeping every finished shard. A cluster earns its place with several workers or GPUs.

A local cluster listens on loopback only (scheduler, workers and dashboard), and its worker
processes keep glibc's malloc as a plain process has it: distributed's nanny would start them with
``MALLOC_TRIM_THRESHOLD_=65536`` (``distributed.nanny.pre-spawn-environ``), and setting any malloc
threshold turns off glibc's dynamic mmap threshold, so every allocation over 128 KiB (each
activation of a forward, each decoded image) became a fresh mmap whose pages the kernel faults in
and zeroes, and an munmap when freed: five times the page faults of an in-process run, a third of
the CPU time in the kernel, and half the images/s of ``--synchronous`` (issue 23).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from extract.errors import DiffrepError

__all__ = ["TaskRunner", "open_runner", "count_gpus", "IN_PROCESS_DEFAULT", "LOCAL_DASHBOARD", "LOCAL_WORKER_CONFIG"]

logger = logging.getLogger(__name__)

IN_PROCESS_DEFAULT = "in-process (one worker: no local cluster needed; --workers N starts one)"
LOCAL_DASHBOARD = "127.0.0.1:0"  # loopback, any free port (no "8787 is in use" beside another cluster)

# Dask settings of the local cluster diffrep starts (not of a cluster joined by address, whose
# workers are configured by whoever started them). None removes a variable from what the nanny
# sets; the user's own environment still passes to the workers.
LOCAL_WORKER_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


def count_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no torch CUDA means no GPU
        return 0


class _Refused:
    """A task's DiffrepError carried back as a value: a bad setting fails the same way on every try,
    so it must not be retried (Dask retries whatever a task raises)."""

    def __init__(self, error: Exception):
        self.error = error


def _call(fn: Callable[[Any], Any], item: Any) -> Any:
    try:
        return fn(item)
    except DiffrepError as exc:
        return _Refused(exc)


class TaskRunner:
    """Runs a function over picklable items; ``description`` says where (for the plan printout).

    Failures other than a DiffrepError (a killed worker, an I/O hiccup) are retried ``retries`` times.
    """

    description = "in-process"

    def __init__(self, description: str = "in-process"):
        self.description = description

    def run(self, fn: Callable[[Any], Any], items: Sequence[Any], retries: int = 2,
            name: str = "task") -> Iterator[tuple[Any, Any]]:
        """Yield ``(item, result)`` or ``(item, exception)`` for each item, in completion order."""
        for item in items:
            for attempt in range(retries + 1):
                try:
                    result = _unwrap(_call(fn, item))
                except Exception as exc:  # noqa: BLE001 - reported with the item, after retries
                    logger.warning("%s failed (attempt %d of %d): %s", name, attempt + 1, retries + 1, exc)
                    result = exc
                if not isinstance(result, Exception) or isinstance(result, DiffrepError):
                    break
            yield item, result


def _unwrap(result: Any) -> Any:
    return result.error if isinstance(result, _Refused) else result


class _DaskRunner(TaskRunner):
    def __init__(self, client, description: str):
        self.client = client
        self.description = description

    def run(self, fn, items, retries=2, name="task"):
        from distributed import as_completed

        futures = {}
        for i, item in enumerate(items):
            future = self.client.submit(_call, fn, item, retries=retries, pure=False,
                                        key=f"{name}-{i}-{os.urandom(4).hex()}")
            futures[future] = item
        try:
            for future in as_completed(list(futures)):
                item = futures.pop(future)
                try:
                    result = _unwrap(future.result())
                except Exception as exc:  # noqa: BLE001 - KilledWorker, task errors: reported with the item
                    result = exc
                future.release()
                yield item, result
        finally:  # a caller that stops early (a fatal error) leaves no task running behind it
            if futures:
                self.client.cancel(list(futures))


def _pin_gpus(client, count: int) -> None:
    """Give each local worker its own GPU through $DIFFREP_DEVICE (read by ``extract.precision.resolve_device``)."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class PinGpu(WorkerPlugin):
        def setup(self, worker):
            name = str(worker.name)
            index = int(name) % count if name.isdigit() else 0
            os.environ["DIFFREP_DEVICE"] = f"cuda:{index}"

    client.register_plugin(PinGpu(), name="diffrep-pin-gpu")


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT while local worker processes start, so that they inherit "ignore".

    A terminal's Ctrl-C reaches every process of its group; workers that took it would each
    print a traceback. Only this process should stop (it then closes the cluster).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _ignore_sigint_in_workers(client) -> None:
    """The same for workers the nanny restarts later (they start from this process's own handler)."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class IgnoreSigint(WorkerPlugin):
        def setup(self, worker):
            import signal
            import threading

            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, signal.SIG_IGN)

    client.register_plugin(IgnoreSigint(), name="diffrep-ignore-sigint")


@contextmanager
def open_runner(
    scheduler: str | None = None, synchronous: bool = False, workers: int | None = None, device: str = "auto",
    dashboard: str = LOCAL_DASHBOARD,
) -> Iterator[TaskRunner]:
    """Open where tasks run, and close what this call started when done.

    Args:
        scheduler: address of an existing Dask scheduler (``tcp://host:8786``); None starts a local cluster.
            Its workers need diffrep installed and the image files and cache folder at the same paths.
        synchronous: run tasks one by one in this process (no Dask at all).
        workers: local worker processes (default: one per GPU; with one GPU or none, this process
            itself, no cluster); ``workers=1`` starts a one-worker cluster; ignored with scheduler.
        device: the extraction device; ``auto``/``cuda`` with several GPUs pins one GPU per local worker.
        dashboard: ``host:port`` of a local cluster's dashboard (default loopback, any free port;
            ``0.0.0.0:8787`` opens it to the network).
    """
    if synchronous:
        yield TaskRunner()
        return
    import dask.config
    from distributed import Client, LocalCluster

    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        logging.getLogger("distributed").setLevel(logging.WARNING)
    if scheduler:
        client = Client(scheduler, timeout="30s")
        try:
            yield _DaskRunner(client, f"Dask cluster at {scheduler}")
        finally:
            client.close()
        return
    gpus = count_gpus() if device in ("auto", "cuda") else 0
    count = workers or max(1, gpus)
    if workers is None and count == 1:  # one worker: a cluster would add only its start and its processes
        yield TaskRunner(description=IN_PROCESS_DEFAULT)
        return
    # the nannies read the config when created and keep it for the workers they restart
    with _sigint_ignored(), dask.config.set(LOCAL_WORKER_CONFIG):  # SIGINT: inherited by the workers
        cluster = LocalCluster(
            n_workers=count, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=dashboard,
            silence_logs=logging.CRITICAL,  # task errors come back with their shard and are reported once
        )
    client = Client(cluster)
    try:
        _ignore_sigint_in_workers(client)
        if gpus > 1:
            _pin_gpus(client, gpus)
        yield _DaskRunner(client, f"local Dask cluster, {count} worker process{'es' if count > 1 else ''}")
    finally:
        client.close()
        cluster.close()
