"""The local Dask cluster diffrep starts: its workers allocate memory as a plain process does, and it listens on loopback only."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys

import psutil
import pytest

from pipeline.cluster import open_runner

# Page faults of allocating, filling and freeing a 1 MiB buffer 100 times (under numpy's 4 MiB
# huge-page size, as torch's CPU tensors are faulted in 4 KiB pages). glibc raises its mmap
# threshold after the first free, so a plain process reuses the memory (a few hundred faults in
# all); with any malloc threshold set (MALLOC_TRIM_THRESHOLD_) each buffer is a fresh mmap
# faulted in page by page: 100 x 256 faults.
_PROBE = """
import resource
import numpy as np

def faults():
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(100):
        buffer = np.empty(1 << 20, dtype=np.uint8)
        buffer.fill(1)
        del buffer
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
"""


def _allocation_faults() -> int:
    namespace: dict = {}
    exec(_PROBE, namespace)  # noqa: S102 - the same probe runs in a worker and in a control process
    return namespace["faults"]()


def _faults_in_a_process(trim_threshold: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}
    if trim_threshold is not None:
        env["MALLOC_TRIM_THRESHOLD_"] = trim_threshold
    code = _PROBE + "\nprint(faults())"
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    return int(out.stdout)


def _listening(process: psutil.Process) -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


@pytest.fixture(scope="module")
def local_runner():
    before = _listening(psutil.Process())
    with open_runner(workers=1, device="cpu") as runner:
        yield runner, before


def test_a_local_worker_reuses_freed_memory_like_a_plain_process(local_runner):
    """A job's big buffers (activations, decoded images) must not each be faulted in anew (issue 23)."""
    runner, _ = local_runner
    control = _faults_in_a_process("65536")  # what distributed's default does
    plain = _faults_in_a_process(None)
    assert control > 80 * 256, f"the probe must see the fresh mmaps ({control} faults)"
    worker = runner.client.submit(_allocation_faults, pure=False).result()  # on the task thread, as a job runs
    assert worker < control / 4 and worker < 4 * max(plain, 256), (worker, plain, control)
    environ = runner.client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
    assert list(environ.values()) == [None]


def test_a_local_cluster_listens_on_loopback_only(local_runner):
    """Scheduler and dashboard (in this process) and every worker process: no socket open to the network."""
    runner, before = local_runner
    opened = _listening(psutil.Process()) - before
    link = runner.client.dashboard_link
    dashboard_port = int(link.split(":")[2].split("/")[0])
    assert dashboard_port in {port for _, port in opened}, (link, opened)
    worker_sockets = runner.client.run(lambda: sorted(_listening(psutil.Process())))
    for ip, _ in list(opened) + [tuple(s) for sockets in worker_sockets.values() for s in sockets]:
        assert ipaddress.ip_address(ip).is_loopback, (ip, opened, worker_sockets)


def test_the_dashboard_opens_to_the_network_only_when_asked():
    with open_runner(workers=1, device="cpu", dashboard="0.0.0.0:0") as runner:
        port = int(runner.client.dashboard_link.split(":")[2].split("/")[0])
        ips = {ip for ip, p in _listening(psutil.Process()) if p == port}
    assert ips == {"0.0.0.0"}


def test_one_worker_runs_in_process_by_default_and_several_start_a_cluster(monkeypatch):
    """With one GPU or none the default is this process (no second Python, no scheduler); --workers 1 or
    several GPUs still start a local cluster (issue 23)."""
    import pipeline.cluster as cluster

    def where(**kwargs) -> tuple[str, int]:
        with open_runner(**kwargs) as runner:
            pid = next(runner.run(lambda _: os.getpid(), [0]))[1]
            return runner.description, pid

    description, pid = where(device="cpu")
    assert description == cluster.IN_PROCESS_DEFAULT and pid == os.getpid()
    monkeypatch.setattr(cluster, "count_gpus", lambda: 1)
    assert where(device="auto")[1] == os.getpid()  # one GPU: one worker, in-process too
    description, pid = where(workers=1, device="cpu")
    assert description == "local Dask cluster, 1 worker process" and pid != os.getpid()
