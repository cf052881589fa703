"""One extraction job: decode one shard's images, run the backbone once per (view, t), pool, and write whole shards.

A job is a picklable ``ShardJob`` in and a small ``ShardResult`` out, so any executor can run it
(in-process, a local Dask cluster, a remote one); it imports no Dask and no click. A job writes
its shard's data objects only; the result carries the markers (checksums), invalid rows and
compute settings that the orchestrating process records (``extract.cache.MarkWriter``). The
backbone is built once per process and reused by every later job.

The forward never waits for the host: images decode on a pool of threads that outlives the job
(``extract.inputs.prefetch``: the next shard's first batches decode while this one's last run), the
seeded noise of the next (view, t) is drawn there too, pixels stay uint8 until they reach the
device, and each (view, t)'s whole-shard write runs on a writer thread behind the next forwards
(its errors surface in the job; a failed job leaves the shards it finished marked). On a GPU,
host buffers are pinned, copies are non-blocking, results come back one batch behind, and
cuDNN picks its fastest kernels (``cudnn.benchmark``).

Results are bit-identical wherever a job runs: the noise is a pure function of (seed, image id, t)
(the image's position in the dataset index, not its cache row), batches are cut the same way
inside a shard, and torch's thread count is fixed by the job.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import threading
import sys
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from extract.cache import CacheSpec, ShardMarks, write_shard_data
from extract.cache.spec import noise_split
from extract.backbone.registry import create_backbone, family_of
from extract.inputs.device_decode import check_decode_device, load_pixels_on_device
from extract.errors import CacheMismatchError, DiskSpaceError
from extract.inputs.images import _reason, load_pixels, to_model_input
from extract.forward import block_features, diffuse, model_input
from extract.noise import seeded_noise
from extract.precision import resolve_device, resolve_precision
from extract.inputs.prefetch import PREFETCHER
from extract.cache.provenance import compute_conflict, compute_settings
from extract.schedule import get_schedule

__all__ = [
    "DEFAULT_THREADS", "NextShard", "ShardJob", "ShardResult", "run_shard_job", "build_backbone", "link_next_shards",
    "default_decode_threads",
]

logger = logging.getLogger(__name__)

DEFAULT_THREADS = 2
_BACKBONES: dict[tuple, nn.Module] = {}
_ONE_JOB_AT_A_TIME = threading.Lock()


@dataclass(frozen=True)
class NextShard:
    """The first images of the shard expected after this one (start row, paths, image ids) and its first timestep."""

    start: int
    paths: tuple[str, ...]
    t: int | None = None
    image_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ShardJob:
    """Everything one job needs (picklable): the cache's spec, and what is this job's own.

    Args:
        cache: path of the cache group; spec: its ``CacheSpec`` (backbone configuration and weight seed,
            image size, schedule, noise seed, pool, precision: everything that changes the numbers).
        shard: shard number; start: its first cache row.
        paths: the shard's image paths, rows start.. in order.
        image_ids: each row's image id (position in the dataset index: the key of its noise);
            empty means start, start + 1, ... (caches in index order).
        todo: ``((view, t, (b, ...)), ...)``: for each (view, t), the blocks still to write.
        checkpoint: the weights file (None: random weights from ``spec.weight_seed``).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...; batch_size: images per forward.
        num_threads: torch intra-op threads, set by the job itself: CPU float results depend on the
            thread count (and on batch_size), so a fixed value gives the same bits in-process and on
            any worker (Dask workers would otherwise run with OMP_NUM_THREADS=1).
        decode_threads: image decoding threads (shared by the jobs of one process).
        decode_device: ``cpu`` (PIL, the default) or ``cuda`` (nvJPEG; see ``extract.inputs.device_decode``).
        next_shard: the shard expected next in this process, decoded ahead (``link_next_shards``).
        recorded_compute: ``((array name, compute settings), ...)`` already recorded for the arrays
            it writes: a worker that would compute otherwise (another device kind or precision) refuses.
    """

    cache: str
    spec: CacheSpec
    shard: int
    start: int
    paths: tuple[str, ...]
    todo: tuple[tuple[int, int, tuple[int, ...]], ...]
    checkpoint: str | None = None
    device: str = "auto"
    batch_size: int = 64
    num_threads: int = DEFAULT_THREADS
    decode_threads: int = 2
    decode_device: str = "cpu"
    next_shard: NextShard | None = None
    image_ids: tuple[int, ...] = ()
    recorded_compute: tuple[tuple[str, dict], ...] = ()

    @property
    def ids(self) -> tuple[int, ...]:
        """Each row's image id (the key of its seeded noise)."""
        return tuple(self.image_ids) if self.image_ids else tuple(range(self.start, self.start + len(self.paths)))

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
    (``extract.backbone.random_init``: a pure function of the seed; the global RNG is untouched)."""
    return create_backbone(config_name, checkpoint=checkpoint, weight_seed=None if checkpoint else int(weight_seed or 0))


def _backbone(job: ShardJob, device: torch.device) -> nn.Module:
    key = (job.spec.config_name, job.checkpoint, None if job.checkpoint else job.spec.weight_seed, str(device))
    if key not in _BACKBONES:
        _BACKBONES.clear()
        logger.info("building backbone %s on %s", job.spec.config_name, device)
        model = build_backbone(job.spec.config_name, job.checkpoint, job.spec.weight_seed).to(device)
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


def link_next_shards(jobs: Sequence[ShardJob], batches: int = 2) -> list[ShardJob]:
    """The jobs, each told the first ``batches`` batches of the job after it, to decode ahead while its last batches run.

    Run in order in one process (``--synchronous``, one local worker) the next job finds its first
    batches decoded; on a cluster where the next shard goes elsewhere the guess costs only that
    decoding.
    """
    linked = list(jobs)
    for i in range(len(linked) - 1):
        after = linked[i + 1]
        rows = min(len(after.paths), batches * max(1, after.batch_size))
        hint = NextShard(start=after.start, paths=after.paths[:rows], t=int(after.todo[0][1]) if after.todo else None,
                         image_ids=after.ids[:rows])
        linked[i] = dataclasses.replace(linked[i], next_shard=hint)
    return linked


def default_decode_threads(workers: int = 1, device: str = "auto", torch_threads: int = DEFAULT_THREADS) -> int:
    """Decoding threads per worker: its share of the CPUs, less the torch threads when the backbone runs on the CPU."""
    share = max(1, (os.cpu_count() or 1) // max(1, workers))
    busy = torch_threads if device == "cpu" or (device == "auto" and not torch.cuda.is_available()) else 1
    return max(1, min(32, share - busy))


def _pixels_key(job: ShardJob, path: str) -> tuple:
    return ("pixels", path, job.spec.image_size)


def _device_pixels_key(job: ShardJob, paths: tuple[str, ...]) -> tuple:
    return ("device-pixels", paths, job.spec.image_size, job.decode_device)


def _noise_key(job: ShardJob, ids: tuple[int, ...], t: int, draw: int = 0) -> tuple:
    return ("noise", job.spec.noise_seed, job.spec.split, ids, int(t), int(draw), job.spec.image_size)


def _input_shape(config_name: str, image_size: int) -> tuple[int, int, int]:
    """Shape of one image's x0 and noise: (3, S, S) pixels, or the family's latent."""
    return family_of(config_name).input_shape(config_name, image_size)


def _noise(job: ShardJob, ids: tuple[int, ...], t: int, pin: bool, draw: int = 0) -> torch.Tensor:
    noise = seeded_noise(job.spec.noise_seed, ids, int(t), _input_shape(job.spec.config_name, job.spec.image_size),
                         draw=draw, split=noise_split(job.spec))
    return noise.pin_memory() if pin else noise


class _Batches:
    """A job's decoded batches, gathered once and kept (on the device when it is a GPU) for every (view, t)."""

    def __init__(self, job: ShardJob, bounds: list[tuple[int, int]], device: torch.device):
        self.job, self.bounds, self.device = job, bounds, device
        self.cuda = device.type == "cuda"
        self.on_device = job.decode_device != "cpu"
        if self.on_device:
            self.pending = [
                PREFETCHER.take(_device_pixels_key(job, job.paths[lo:hi]), load_pixels_on_device,
                                job.paths[lo:hi], job.spec.image_size, device)
                for lo, hi in bounds
            ]
        else:
            self.pending = [
                [PREFETCHER.take(_pixels_key(job, path), load_pixels, path, job.spec.image_size) for path in job.paths[lo:hi]]
                for lo, hi in bounds
            ]
        self.ready: dict[int, tuple[torch.Tensor, np.ndarray, dict[int, str]]] = {}

    def get(self, k: int) -> tuple[torch.Tensor, np.ndarray, dict[int, str]]:
        """``(uint8 (n, 3, S, S) on the device, ok, {row in batch: reason})`` of batch k."""
        if k not in self.ready:
            if self.on_device:
                self.ready[k] = self.pending[k].result()
            else:
                self.ready[k] = self._gather(k)
            self.pending[k] = None
        return self.ready[k]

    def _gather(self, k: int) -> tuple[torch.Tensor, np.ndarray, dict[int, str]]:
        lo, hi = self.bounds[k]
        size = self.job.spec.image_size
        pixels = torch.zeros((hi - lo, 3, size, size), dtype=torch.uint8, pin_memory=self.cuda)
        rows = pixels.numpy()
        ok = np.zeros(hi - lo, dtype=bool)
        errors: dict[int, str] = {}
        for row, future in enumerate(self.pending[k]):
            try:
                rows[row] = future.result()
                ok[row] = True
            except Exception as exc:  # noqa: BLE001 - any failure of one file is reported, never raised
                errors[row] = _reason(exc)
                logger.warning("skipping unreadable image %s: %s", self.job.paths[lo + row], errors[row])
        return pixels.to(self.device, non_blocking=True), ok, errors


class _Outputs:
    """Pooled outputs on their way to the shard's host buffers, one batch behind on a GPU.

    The copy back of batch k is collected after batch k+1 is queued, so the GPU never waits for
    the host to read a result; on the CPU the same code collects at once (the copy is the tensor).
    Rows arrive in order, so each block's shard checksum (its marker's CRC-32) is chained batch by
    batch here, beside the forward, and the shard's write is only the file write.
    """

    def __init__(self, count: int, cuda: bool, ok: np.ndarray):
        self.count, self.cuda, self.ok = count, cuda, ok
        self.buffers: dict[int, np.ndarray] = {}
        self.checksums: dict[int, int] = {}
        self._pending: tuple[Any, list[tuple[int, int, int, torch.Tensor]]] | None = None

    def put(self, lo: int, hi: int, pooled: dict[int, torch.Tensor]) -> None:
        items = []
        for b, tensor in pooled.items():
            if self.cuda:
                host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                host.copy_(tensor, non_blocking=True)
            else:
                host = tensor
            items.append((b, lo, hi, host))
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        self.settle()
        self._pending = (event, items)

    def settle(self) -> None:
        """Wait for the batch in flight and store it."""
        if self._pending is None:
            return
        event, items = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        for b, lo, hi, host in items:
            values = host.numpy()
            if b not in self.buffers:
                self.buffers[b] = np.zeros((self.count, *values.shape[1:]), dtype=np.float16)
            rows = self.buffers[b][lo:hi]
            rows[...] = values
            rows[~self.ok[lo:hi]] = 0  # unreadable images are stored as zeros
            if sys.byteorder == "little":  # the checksum is of the little-endian bytes as stored
                self.checksums[b] = zlib.crc32(memoryview(rows).cast("B"), self.checksums.get(b, 0))

    def shard_checksums(self, t: int) -> dict[tuple[int, int], int] | None:
        """``{(b, t): CRC-32 of the whole shard}`` once every row is in (None where it was not chained)."""
        if len(self.checksums) != len(self.buffers):
            return None
        return {(b, t): crc & 0xFFFFFFFF for b, crc in self.checksums.items()}


def _run(job: ShardJob) -> ShardResult:
    began = time.perf_counter()
    device = resolve_device(job.device)
    cuda = device.type == "cuda"
    check_decode_device(job.decode_device, device)
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: the fastest kernels are found once
    precision = resolve_precision(job.spec.precision, job.device)
    compute = compute_settings(device, precision)
    for array, recorded in job.recorded_compute:  # before any forward: nothing of this shard is written
        problem = compute_conflict(array, recorded, compute)
        if problem:
            raise CacheMismatchError(problem)
    model = _backbone(job, device)
    schedule = get_schedule(job.spec.noise_schedule, job.spec.diffusion_steps)
    schedule.check_timesteps([t for _, t, _ in job.todo])
    count = len(job.paths)
    ids = job.ids
    assert len(ids) == count, f"shard {job.shard}: {len(ids)} image ids for {count} paths"
    bounds = [(lo, min(lo + job.batch_size, count)) for lo in range(0, count, max(1, job.batch_size))]

    PREFETCHER.use_threads(job.decode_threads)
    batches = _Batches(job, bounds, device)
    noise: dict[tuple[int, int, int], Future] = {}  # (batch, t, noise draw): a view 2k+f uses draw k

    def queue_noise(t: int, draw: int) -> None:
        for k, (lo, hi) in enumerate(bounds):
            if (k, t, draw) not in noise:
                noise[(k, t, draw)] = PREFETCHER.take(_noise_key(job, ids[lo:hi], t, draw), _noise, job, ids[lo:hi], t,
                                                      cuda, draw)

    if job.todo:
        queue_noise(int(job.todo[0][1]), int(job.todo[0][0]) // 2)
    PREFETCHER.drop_queued()  # queued for a shard that went elsewhere

    ok = np.ones(count, dtype=bool)
    reasons = [""] * count
    encodes = hasattr(model, "encode")
    latents: dict[tuple[int, int], torch.Tensor] = {}  # (batch, flipped): x0 of a latent family, kept for every t
    with ThreadPoolExecutor(1, thread_name_prefix="diffrep-write") as writer:
        writes: list[Future] = []
        index_written = False
        for p, (view, t, blocks) in enumerate(job.todo):
            t = int(t)
            draw = int(view) // 2
            if p + 1 < len(job.todo):
                queue_noise(int(job.todo[p + 1][1]), int(job.todo[p + 1][0]) // 2)
            else:
                _queue_next_shard(job, cuda)
            outputs = _Outputs(count, cuda, ok)
            for k, (lo, hi) in enumerate(bounds):
                pixels, batch_ok, batch_errors = batches.get(k)
                if not index_written:
                    ok[lo:hi] = batch_ok
                    for row, reason in batch_errors.items():
                        reasons[lo + row] = reason
                if (k, view % 2) in latents:  # a latent family encodes each image (and its flip) once, for every t
                    x0 = latents[(k, view % 2)]
                else:
                    x0 = to_model_input(pixels)
                    if not batch_ok.all():  # unreadable rows enter as zeros, as load_batch gives them
                        if cuda:  # (their features are zeroed below; a mask copy must not sync)
                            keep = torch.from_numpy(batch_ok).pin_memory().to(device, non_blocking=True)
                            x0 = x0 * keep.view(-1, 1, 1, 1)
                        else:
                            x0[torch.from_numpy(~batch_ok)] = 0
                    if view % 2 == 1:  # the flipped image, with the same noise as its draw's unflipped view
                        x0 = torch.flip(x0, dims=[3])
                    if encodes:
                        x0 = latents[(k, view % 2)] = model_input(model, x0, precision)  # the VAE latent
                # the one noisy forward (extract.forward): pinned noise copied without blocking, no copy that syncs
                x_t = diffuse(x0, t, noise[(k, t, draw)].result(), schedule)
                with torch.inference_mode():
                    outputs.put(lo, hi, block_features(model, x_t, t, blocks, pool=job.spec.pool, precision=precision))
                del x_t, x0
            outputs.settle()
            if p + 1 >= len(job.todo) or (int(job.todo[p + 1][1]), int(job.todo[p + 1][0]) // 2) != (t, draw):
                for k in range(len(bounds)):
                    noise.pop((k, t, draw), None)
            buffers = outputs.buffers  # invalid rows were zeroed as they came in
            index_written = True
            for previous in writes:  # one write in flight at most: memory stays at two passes' outputs
                previous.result()
            writes.append(writer.submit(
                _write, job.cache, job.shard, {(b, t): buffers[b] for b in blocks}, view, outputs.shard_checksums(t)
            ))
        markers = {}
        for (view, _, _), pending in zip(job.todo, writes):
            markers.update({(b, t, view): value for (b, t), value in pending.result().items()})
    invalid = {job.start + row: reasons[row] for row in range(count) if not ok[row]}
    return ShardResult(
        shard=job.shard, images=count, forwards=job.forwards, seconds=time.perf_counter() - began,
        invalid=invalid, markers=markers, compute=compute,
    )


def _queue_next_shard(job: ShardJob, cuda: bool) -> None:
    """Queue the next shard's first batches (and their first noise) behind this shard's own work."""
    hint = job.next_shard
    if hint is None:
        return
    if job.decode_device == "cpu":
        for path in hint.paths:
            PREFETCHER.ahead(_pixels_key(job, path), load_pixels, path, job.spec.image_size)
    size = max(1, job.batch_size)
    for lo in range(0, len(hint.paths), size):
        hi = min(lo + size, len(hint.paths))
        if job.decode_device != "cpu":
            paths = hint.paths[lo:hi]
            PREFETCHER.ahead(_device_pixels_key(job, paths), load_pixels_on_device, paths, job.spec.image_size,
                             resolve_device(job.device))
        if hint.t is not None:
            hint_ids = hint.image_ids[lo:hi] if hint.image_ids else tuple(range(hint.start + lo, hint.start + hi))
            PREFETCHER.ahead(_noise_key(job, hint_ids, hint.t), _noise, job, hint_ids, hint.t, cuda)


def _write(path: str, shard: int, features: dict, view: int, checksums: dict | None = None) -> dict:
    try:
        return write_shard_data(path, shard, features, view=view, checksums=checksums)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # every later shard would fail the same way
            raise DiskSpaceError(
                f"disk full while writing shard {shard} of {path}: free space and run the same command again "
                "(completed shards are kept)"
            ) from exc
        raise
