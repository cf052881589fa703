"""One extraction job: decode one shard's images, run the backbone once per (view, t), pool, and write whole shards.

A job is a picklable ``ShardJob`` in and a small ``ShardResult`` out, so any executor can run it
(in-process, a local Dask cluster, a remote one); it imports no Dask and no click. A job writes
its shard's data objects only; the result carries the markers (checksums), invalid rows and
compute settings that the orchestrating process records (``extract.cache.MarkWriter``). The
backbone is built once per process and reused by every later job. Decoding runs ahead in a
background thread and writes run behind in another, so both overlap with the forward passes.

Results are bit-identical wherever a job runs: the noise is a pure function of (seed, image id, t)
(the image's position in the dataset index, not its cache row), batches are cut the same way
inside a shard, and torch's thread count is fixed by the job.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .cache import ShardMarks, write_shard_data
from .configs import create_backbone
from .errors import CacheMismatchError, DiskSpaceError
from .images import load_batch
from .noise import seeded_noise
from .pooling import pool_features
from .precision import autocast, resolve_device
from .provenance import compute_conflict, compute_settings
from .schedule import get_schedule

__all__ = ["DEFAULT_THREADS", "ShardJob", "ShardResult", "run_shard_job", "build_backbone"]

logger = logging.getLogger(__name__)

DEFAULT_THREADS = 2
_BACKBONES: dict[tuple, nn.Module] = {}
_ONE_JOB_AT_A_TIME = threading.Lock()


@dataclass(frozen=True)
class ShardJob:
    """Everything one job needs (picklable).

    Args:
        cache: path of the cache group; shard: shard number; start: its first cache row.
        paths: the shard's image paths, rows start.. in order.
        image_ids: each row's image id (position in the dataset index: the key of its noise);
            empty means start, start + 1, ... (caches in index order).
        todo: ``((view, t, (b, ...)), ...)``: for each (view, t), the blocks still to write.
        config_name, checkpoint, weight_seed: the backbone (weights from the file, else random from the seed).
        image_size, noise_schedule, diffusion_steps, noise_seed, pool, precision: as in the CacheSpec.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...; batch_size: images per forward.
        num_threads: torch intra-op threads, set by the job itself: CPU float results depend on the
            thread count (and on batch_size), so a fixed value gives the same bits in-process and on
            any worker (Dask workers would otherwise run with OMP_NUM_THREADS=1).
        decode_threads: image decoding threads.
        recorded_compute: ``((array name, compute settings), ...)`` already recorded for the arrays
            it writes: a worker that would compute otherwise (another device kind or precision) refuses.
    """

    cache: str
    shard: int
    start: int
    paths: tuple[str, ...]
    todo: tuple[tuple[int, int, tuple[int, ...]], ...]
    config_name: str
    image_size: int
    noise_schedule: str
    diffusion_steps: int
    checkpoint: str | None = None
    weight_seed: int | None = 0
    noise_seed: int = 0
    pool: int = 16
    precision: str = "fp32"
    device: str = "auto"
    batch_size: int = 64
    num_threads: int = DEFAULT_THREADS
    decode_threads: int = 2
    image_ids: tuple[int, ...] = ()
    recorded_compute: tuple[tuple[str, dict], ...] = ()

    @property
    def forwards(self) -> int:
        """Image forwards this job runs: one per image and (view, t)."""
        return len(self.paths) * len(self.todo)


@dataclass
class ShardResult:
    """What a job reports back: images done, invalid rows ``{row: reason}`` (cache rows), seconds, forwards,
    the marker value of every (b, t, view) it wrote and the settings it computed with."""

    shard: int
    images: int
    forwards: int
    seconds: float
    invalid: dict[int, str] = field(default_factory=dict)
    markers: dict[tuple[int, int, int], int] = field(default_factory=dict)
    compute: dict | None = None

    def marks(self) -> ShardMarks:
        """What the orchestrating process records for this shard (``MarkWriter.mark``)."""
        return ShardMarks(self.shard, dict(self.markers), dict(self.invalid), self.compute)


def build_backbone(config_name: str, checkpoint: str | None = None, weight_seed: int | None = 0) -> nn.Module:
    """A backbone in eval mode: loaded from ``checkpoint``, or random weights from ``weight_seed``
    (``extract.random_init``: a pure function of the seed; the global RNG is untouched)."""
    return create_backbone(config_name, checkpoint=checkpoint, weight_seed=None if checkpoint else int(weight_seed or 0))


def _backbone(job: ShardJob, device: torch.device) -> nn.Module:
    key = (job.config_name, job.checkpoint, None if job.checkpoint else job.weight_seed, str(device))
    if key not in _BACKBONES:
        _BACKBONES.clear()
        logger.info("building backbone %s on %s", job.config_name, device)
        model = build_backbone(job.config_name, job.checkpoint, job.weight_seed).to(device)
        for param in model.parameters():
            param.requires_grad_(False)
        _BACKBONES[key] = model
    return _BACKBONES[key]


def run_shard_job(job: ShardJob) -> ShardResult:
    """Extract one shard: for each (view, t) ONE truncated forward per batch for all its blocks, then whole-shard writes.

    Args:
        job: the shard and what is left to write in it.

    Returns:
        ShardResult with the rows that could not be decoded and why (their features are zeros, valid=False).
    """
    # The thread count is process-wide: jobs sharing a process (a dask worker with --nthreads > 1)
    # run one at a time, or they would change each other's count mid-forward and break bit-identity.
    with _ONE_JOB_AT_A_TIME:
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(max(1, job.num_threads))
        try:
            return _run(job)
        finally:  # in-process runs must not leave the caller's thread count changed
            torch.set_num_threads(previous_threads)


def _run(job: ShardJob) -> ShardResult:
    began = time.perf_counter()
    device = resolve_device(job.device)
    compute = compute_settings(device, job.precision)
    for array, recorded in job.recorded_compute:  # before any forward: nothing of this shard is written
        problem = compute_conflict(array, recorded, compute)
        if problem:
            raise CacheMismatchError(problem)
    model = _backbone(job, device)
    schedule = get_schedule(job.noise_schedule, job.diffusion_steps)
    schedule.check_timesteps([t for _, t, _ in job.todo])
    count = len(job.paths)
    ids = list(job.image_ids) if job.image_ids else list(range(job.start, job.start + count))
    assert len(ids) == count, f"shard {job.shard}: {len(ids)} image ids for {count} paths"
    bounds = [(lo, min(lo + job.batch_size, count)) for lo in range(0, count, max(1, job.batch_size))]

    with ThreadPoolExecutor(1, thread_name_prefix="diffrep-decode") as decoder, \
            ThreadPoolExecutor(1, thread_name_prefix="diffrep-write") as writer:
        decoded: list[Future] = [
            decoder.submit(load_batch, job.paths[lo:hi], job.image_size, False, job.decode_threads) for lo, hi in bounds
        ]
        ok = np.ones(count, dtype=bool)
        reasons = [""] * count
        writes: list[Future] = []
        index_written = False
        for view, t, blocks in job.todo:
            buffers: dict[int, np.ndarray] = {}
            for k, (lo, hi) in enumerate(bounds):
                x0, batch_ok, batch_errors = decoded[k].result()
                if not index_written:
                    ok[lo:hi] = batch_ok
                    for row, reason in batch_errors.items():
                        reasons[lo + row] = reason
                if view == 1:
                    x0 = torch.flip(x0, dims=[3])
                steps = torch.full((hi - lo,), int(t), dtype=torch.long)
                noise = seeded_noise(job.noise_seed, ids[lo:hi], int(t), tuple(x0.shape[1:]))
                x_t = schedule.q_sample(x0, steps, noise).to(device)
                with torch.no_grad(), autocast(device, job.precision):
                    feats = model.features(x_t, steps.to(device), list(blocks))
                for b in blocks:
                    pooled = pool_features(feats[b], job.pool).cpu().numpy()
                    if b not in buffers:
                        buffers[b] = np.zeros((count, *pooled.shape[1:]), dtype=np.float16)
                    buffers[b][lo:hi] = pooled
            for b in buffers:
                buffers[b][~ok] = 0
            index_written = True
            for previous in writes:
                previous.result()
            writes.append(writer.submit(
                _write, job.cache, job.shard, {(b, int(t)): buffers[b] for b in blocks}, view
            ))
        markers = {}
        for (view, _, _), pending in zip(job.todo, writes):
            markers.update({(b, t, view): value for (b, t), value in pending.result().items()})
    invalid = {job.start + row: reasons[row] for row in range(count) if not ok[row]}
    return ShardResult(
        shard=job.shard, images=count, forwards=job.forwards, seconds=time.perf_counter() - began,
        invalid=invalid, markers=markers, compute=compute,
    )


def _write(path: str, shard: int, features: dict, view: int) -> dict:
    try:
        return write_shard_data(path, shard, features, view=view)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # every later shard would fail the same way
            raise DiskSpaceError(
                f"disk full while writing shard {shard} of {path}: free space and run the same command again "
                "(completed shards are kept)"
            ) from exc
        raise
