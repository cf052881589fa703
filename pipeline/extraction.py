"""The extract stage: plan what is missing in a cache (images, arrays, bytes, forwards), check the disk, and run shard jobs.

``plan_extraction(request)`` reads the dataset index and the cache (if any) and returns an
``ExtractionPlan`` whose ``describe()`` is what ``diffrep extract`` prints before it starts; it
raises DiskSpaceError when the disk cannot hold the new data. ``run_extraction(plan, runner)``
creates the cache metadata, runs one ``extract.job`` task per shard with something left to do,
shows a progress bar, records the run in the cache attributes, and returns a ``RunSummary``.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from extract.backbone.adm import normalize_blocks
from extract.cache import (
    CacheSpec, FeatureCache, MarkWriter, cache_path, count_objects, create_cache, inner_chunk_rows,
    record_run, reset_shards, view_suffix,
)
from extract.backbone.configs import get_config
from extract.backbone.identity import backbone_id as weights_id
from extract.errors import CacheError, CacheMismatchError, CheckpointError, ConfigError, DiffrepError, DiskSpaceError
from extract.job import DEFAULT_THREADS, ShardJob, ShardResult, link_next_shards, run_shard_job
from extract.cache.order import row_order
from extract.pooling import pooled_size
from extract.cache.provenance import compute_conflict
from extract.schedule import get_schedule

from pipeline.cluster import TaskRunner
from pipeline.datasets import ImageIndex, build_index, select_subset
from pipeline.locks import LockHeld, file_lock

__all__ = [
    "ExtractionRequest", "ExtractionPlan", "RunSummary", "ExtractionInterrupted", "dataset_splits", "plan_extraction",
    "lock_cache", "run_extraction", "finished_shards", "format_bytes",
]

logger = logging.getLogger(__name__)

DISK_MARGIN = 1.05


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError


@dataclass(frozen=True)
class ExtractionRequest:
    """What ``diffrep extract`` was asked for, one split at a time (plain values, no click).

    Args:
        dataset, split: which images; per_class / limit: a deterministic subset; data_root: their root.
        timesteps, blocks: what to cache; pool: stored side min(native, pool), 0 = full maps.
        config_name, checkpoint, weight_seed: the backbone (random weights from weight_seed without checkpoint).
        noise_seed: the per-image noise; flip: also cache the flipped view.
        noise_draws: K independent noise draws per (image, t), each a view (training picks one per epoch).
        shard_size: images per shard (one task); batch_size: images per forward.
        cache_dir: cache root; device, precision: where and how to compute.
        num_threads: torch CPU threads per task, fixed wherever the task runs: CPU results depend on it
            bit for bit (so do batch_size and precision), so keep them when resuming.
        decode_threads: decoding threads per task; decode_device: ``cpu`` (PIL) or ``cuda`` (nvJPEG, pixels may differ).
        order_seed: seed of the cache's row order (a permutation of the index fixed when the cache is
            created, so that every shard mixes the classes); an existing cache keeps its own.
    """

    dataset: str
    split: str
    timesteps: tuple[int, ...]
    blocks: tuple[int, ...]
    cache_dir: str
    pool: int = 16
    config_name: str = "256x256_uncond"
    checkpoint: str | None = None
    weight_seed: int = 0
    noise_seed: int = 0
    flip: bool = False
    noise_draws: int = 1
    shard_size: int = 256
    batch_size: int = 64
    per_class: int | None = None
    limit: int | None = None
    data_root: str | None = None
    split_dir: str | None = None
    device: str = "auto"
    precision: str = "fp32"
    num_threads: int = DEFAULT_THREADS
    decode_threads: int = 2
    decode_device: str = "cpu"
    order_seed: int = 0


@dataclass
class ExtractionPlan:
    """What a run will do: the spec, the arrays and their stored shapes, the shard jobs, the bytes.

    ``paths`` and ``labels`` are in dataset-index order; cache row r holds image ``order[r]``.
    """

    request: ExtractionRequest
    spec: CacheSpec
    path: str
    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    shapes: dict[tuple[int, int], tuple[int, int, int]]
    native_sizes: dict[int, int]
    jobs: list[ShardJob]
    new_arrays: list[tuple[int, int]]
    complete_arrays: list[tuple[int, int]]
    bytes_new: int
    bytes_free: int
    forwards: int
    damaged: dict[tuple[int, int, int], dict[int, str]] = field(default_factory=dict)
    index_damage: dict[str, dict[int, str]] = field(default_factory=dict)
    unpack: tuple[str, str, int] | None = None
    order: np.ndarray | None = None

    def row_path(self, row: int) -> str:
        """The image path of cache row ``row``."""
        return self.paths[int(self.order[row]) if self.order is not None else int(row)]

    @property
    def objects(self) -> dict[str, int]:
        """Files the cache holds once the plan's arrays are complete (``extract.cache.count_objects``)."""
        return count_objects(self.spec, self.shapes)

    @property
    def images_to_run(self) -> int:
        return sum(len(job.paths) for job in self.jobs)

    def describe(self) -> str:
        """The lines ``diffrep extract`` prints before it starts."""
        spec = self.spec
        subset = "" if spec.subset == "all" else f" ({spec.subset})"
        weights = f"checkpoint sha256 {spec.checkpoint_sha256[:12]}" if spec.checkpoint_sha256 else f"random weights, seed {spec.weight_seed}"
        lines = [
            f"extract {spec.dataset}/{spec.split}: {spec.num_images} images{subset}, {spec.num_shards} shards of {spec.shard_size}",
            f"  backbone {spec.config_name} ({weights}), {spec.precision}, noise seed {spec.noise_seed}, "
            f"pool {spec.pool or 'none'}, float16{', + flipped view' if spec.flip else ''}"
            f"{f', {spec.noise_draws} noise draws' if spec.noise_draws > 1 else ''}",
            f"  cache {self.path}",
        ]
        lines.append(f"  rows in a seeded order (--order-seed {spec.row_order_seed}): every shard mixes the classes")
        if self.unpack is not None:
            archive, destination, size = self.unpack
            lines.append(f"  would unpack {archive} ({format_bytes(size)}) into {destination} first")
        if not spec.checkpoint_sha256 and get_config(spec.config_name).checkpoint_file:
            lines.append(f"  note: no --checkpoint, so the weights are random: pass the official "
                         f"{get_config(spec.config_name).checkpoint_file} to measure what diffusion training learned")
        for (b, t), (c, h, w) in sorted(self.shapes.items()):
            if (b, t) in self.complete_arrays:
                state = "complete, skipped"
            elif (b, t) in self.new_arrays:
                state = "new"
            else:
                state = "resume"
            size = spec.num_images * c * h * w * 2 * spec.views
            image_bytes = c * h * w * 2
            inner = inner_chunk_rows(spec.shard_size, image_bytes)
            lines.append(f"  b{b}/t{t}: ({spec.num_images}, {c}, {h}, {w}) float16, {format_bytes(size)}  [{state}]; "
                         f"shards of {spec.shard_size} images ({format_bytes(spec.shard_size * image_bytes)}), "
                         f"inner chunks of {inner} ({format_bytes(inner * image_bytes)})")
        for (b, t, view), shards in sorted(self.damaged.items()):
            lines.append(f"  b{b}/t{t}{view_suffix(view)}: {len(shards)} shard(s) marked done but damaged, re-run: "
                         + "; ".join(f"{s} {why}" for s, why in sorted(shards.items())[:4]))
        for name, chunks in sorted(self.index_damage.items()):
            action = "rewritten from the dataset index" if name in ("path", "label") else "re-run with their shards"
            lines.append(f"  index/{name}: {len(chunks)} chunk(s) damaged, {action}: "
                         + "; ".join(f"{c} {why}" for c, why in sorted(chunks.items())[:4]))
        lines.append(
            f"  to do: {len(self.jobs)} shard tasks, {self.images_to_run} images, {self.forwards} forwards "
            f"(one per image, timestep and view, each stopping at the deepest block asked for that timestep)"
        )
        lines.append(f"  disk: {format_bytes(self.bytes_new)} to write, {format_bytes(self.bytes_free)} free")
        objects = self.objects
        lines.append(
            f"  objects: {objects['total']:,} files when complete ({objects['data']:,} data shards, "
            f"{objects['markers']:,} marker, {objects['index']:,} index, {objects['metadata']:,} metadata)"
        )
        return "\n".join(lines)


@dataclass
class RunSummary:
    """What a run did: shards written and failed, images, forwards, invalid images with reasons, time."""

    path: str
    shards_done: int = 0
    shards_skipped: int = 0
    failed: dict[int, str] = field(default_factory=dict)
    images: int = 0
    forwards: int = 0
    seconds: float = 0.0
    invalid: dict[int, tuple[str, str]] = field(default_factory=dict)

    def describe(self) -> str:
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"wrote {self.shards_done} shards ({self.images} images, {self.forwards} forwards) in {self.seconds:.1f} s, "
            f"{rate:.1f} images/s; {self.shards_skipped} shards were already complete",
            f"  cache {self.path}",
        ]
        if self.invalid:
            lines.append(f"  {len(self.invalid)} image(s) could not be read (rows marked invalid, features zero):")
            lines.extend(f"    {path}: {reason}" for _, (path, reason) in sorted(self.invalid.items()))
        if self.failed:
            lines.append(f"  {len(self.failed)} shard(s) failed:")
            lines.extend(f"    shard {shard}: {error}" for shard, error in sorted(self.failed.items()))
        return "\n".join(lines)


def dataset_splits(dataset: str, data_root: str | None = None) -> list[str]:
    """The split names the manifest lists for a dataset (the default of ``--split``).

    Raises:
        DatasetError: unknown dataset.
    """
    from pipeline.manifest import get_dataset

    return list(get_dataset(dataset, overrides={"data_root": data_root} if data_root else None).splits)


def _existing_parent(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _check_cache_dir(cache_dir: str, path: str) -> None:
    """Refuse a --cache-dir that cannot hold a cache, before anything is written (and in a dry run too).

    Raises:
        CacheError: a regular file on the way, a pseudo-filesystem such as /proc, or a folder this
            user cannot write.
    """
    parent = _existing_parent(path)
    if not os.path.isdir(parent):
        raise CacheError(
            f"--cache-dir {cache_dir} lies below {parent}, which is a file, not a folder: pass a --cache-dir in a folder"
        )
    try:
        stats = os.statvfs(parent)
    except OSError as exc:
        raise CacheError(f"cannot read --cache-dir {cache_dir} ({exc.strerror or exc}): pass another --cache-dir") from None
    if stats.f_blocks == 0:
        raise CacheError(
            f"--cache-dir {cache_dir} is on {parent}, which is not a writable filesystem (a pseudo-filesystem "
            f"with no storage, like /proc): pass a --cache-dir on a disk"
        )
    if stats.f_flag & os.ST_RDONLY or not os.access(parent, os.W_OK | os.X_OK):
        raise CacheError(
            f"--cache-dir {cache_dir} cannot be written here ({parent} is read-only for this user): "
            f"pass a --cache-dir you can write"
        )


def _require_same_compute(existing: FeatureCache, request: ExtractionRequest, arrays: list[tuple[int, int]]) -> None:
    """Refuse to extend a cache with another --batch-size or --threads than it was written with, or to
    add shards computed on another device kind or at another precision to an array.

    CPU float results depend on batch size and threads in their last bits, so mixing them would
    break the bit-for-bit reproducibility of the cache. The device check is made here only for an
    explicit --device (``auto`` resolves on the workers, which check it themselves before computing).

    Raises:
        CacheMismatchError: the earlier runs that wrote shards used other values.
    """
    if request.device != "auto":
        kind = "cuda" if str(request.device).startswith("cuda") else str(request.device)
        current = {"device": kind, "precision": request.precision}
        for b, t in arrays:
            for view in existing.spec.view_ids:
                if not existing.has_array(b, t, view):
                    continue
                problem = compute_conflict(f"b{b}/t{t}{view_suffix(view)}", existing.compute(b, t, view), current)
                if problem:
                    raise CacheMismatchError(problem)
    asked = {"batch_size": int(request.batch_size), "threads": int(request.num_threads)}
    flags = {"batch_size": "--batch-size", "threads": "--threads"}
    for run in existing.runs:
        if not run.get("shards_written"):
            continue
        written = {key: run.get(key) for key in asked}
        if any(written[key] is not None and written[key] != asked[key] for key in asked):
            was = " ".join(f"{flags[k]} {v}" for k, v in written.items())
            now = " ".join(f"{flags[k]} {v}" for k, v in asked.items())
            raise CacheMismatchError(
                f"cache {existing.path} was written with {was}, asked for {now}: results depend on them bit for bit; "
                f"pass {was} or use a new --cache-dir"
            )


@functools.lru_cache(maxsize=4)
def _verified_checkpoint(config_name: str, path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a checkpoint that loads strictly into the configuration (checked once per file version).

    A bad file fails here, before any task starts, instead of once per shard on the workers.
    """
    from extract.backbone.checkpoint import file_sha256
    from extract.backbone.configs import check_checkpoint

    check_checkpoint(config_name, path)
    return file_sha256(path)


def plan_extraction(
    request: ExtractionRequest, check_disk: bool = True, dry_run: bool = False, index: ImageIndex | None = None
) -> ExtractionPlan:
    """Work out what is missing in the cache for a request, without writing anything.

    Args:
        request: what to extract; check_disk: refuse when the free disk cannot hold the new data.
        dry_run: only look: a dataset that is still packed is listed from its archive instead of
            unpacked (the plan says what would be unpacked), and the disk is not checked.
        index: the split's full image index, when the caller has listed it (None: ``build_index``
            lists the dataset); ``per_class``/``limit`` apply to it all the same.

    Returns:
        The plan: its ``jobs`` cover exactly the (shard, view, t, blocks) not yet written, counting
        shards marked complete whose objects are missing or short (listed in ``damaged``).

    Raises:
        ConfigError, BlockRangeError, TimestepRangeError: bad backbone, blocks or timesteps;
        DatasetError: unknown dataset or missing images; CheckpointError: missing checkpoint file;
        CacheError: a --cache-dir that cannot hold a cache, damaged cache metadata;
        CacheMismatchError: the cache was written with other settings; DiskSpaceError: not enough space.
    """
    config = get_config(request.config_name)
    if config.flags.get("class_cond"):
        raise ConfigError(
            f"{config.name} is class-conditional and extract has no class label to give it: "
            f"use an unconditional backbone such as --config 256x256_uncond"
        )
    with torch.device("meta"):
        model = config.build()
    blocks, _ = normalize_blocks(request.blocks, model.num_blocks, config.name)
    timesteps = sorted(set(get_schedule(config.noise_schedule, config.diffusion_steps).check_timesteps(request.timesteps)))
    block_shapes = model.block_shapes()
    del model

    sha256 = ""
    if request.checkpoint:
        if not os.path.isfile(request.checkpoint):
            raise CheckpointError(f"checkpoint {request.checkpoint} does not exist: pass the path of the official .pt file")
        stat = os.stat(request.checkpoint)
        sha256 = _verified_checkpoint(config.name, os.path.abspath(request.checkpoint), stat.st_size, stat.st_mtime_ns)
    if index is None:
        index = build_index(
            request.dataset, request.split, root=request.data_root, split_dir=request.split_dir,
            per_class=request.per_class, limit=request.limit, unpack=not dry_run,
        )
    else:
        index = select_subset(index, per_class=request.per_class, limit=request.limit)
    subset = "all"
    if request.per_class is not None or request.limit is not None:
        subset = ",".join(f"{k}={v}" for k, v in (("per_class", request.per_class), ("limit", request.limit)) if v is not None)
    spec = CacheSpec(
        dataset=request.dataset, split=request.split,
        backbone_id=weights_id(config.name, weight_seed=None if sha256 else request.weight_seed, sha256=sha256),
        config_name=config.name, config_flags=config.flags, checkpoint_sha256=sha256,
        weight_seed=None if sha256 else int(request.weight_seed), image_size=config.image_size,
        noise_schedule=config.noise_schedule, diffusion_steps=config.diffusion_steps,
        noise_seed=int(request.noise_seed), flip=bool(request.flip), pool=int(request.pool),
        precision=request.precision, subset=subset, num_images=index.num_images, shard_size=int(request.shard_size),
        row_order_seed=int(request.order_seed), noise_draws=int(request.noise_draws),
    )
    # absolute: workers of a remote cluster (and the disk check) must not depend on our cwd
    path = cache_path(os.path.abspath(request.cache_dir), spec.dataset, spec.split, spec.backbone_id)
    _check_cache_dir(request.cache_dir, path)
    native = {b: block_shapes[b][1] for b in blocks}
    shapes = {
        (b, t): (block_shapes[b][0], pooled_size(native[b], spec.pool), pooled_size(native[b], spec.pool))
        for b in blocks for t in timesteps
    }

    existing = None
    if os.path.exists(os.path.join(path, "zarr.json")):
        existing = FeatureCache(path)
        existing.spec.require_match(spec)
        _require_same_compute(existing, request, sorted(shapes))
    missing: dict[tuple[int, int, int], set[int]] = {}
    damaged: dict[tuple[int, int, int], dict[int, str]] = {}
    index_damage = existing.index_damage() if existing is not None else {}
    # index rows of valid/error come back with a shard's result: a lost chunk re-runs its shards
    rerun = {shard for name in ("valid", "error") for chunk in index_damage.get(name, {})
             for shard in existing.index_chunk_shards(name, chunk)}
    for (b, t) in shapes:
        for view in spec.view_ids:
            if existing is not None and existing.has_array(b, t, view):
                damaged_here = existing.damaged_shards(b, t, view)
                if damaged_here:
                    damaged[(b, t, view)] = damaged_here
                missing[(view, t, b)] = set(existing.missing_shards(b, t, view)) | rerun
            else:
                missing[(view, t, b)] = set(range(spec.num_shards))
    new_arrays = [(b, t) for (b, t) in shapes if existing is None or not existing.has_array(b, t)]
    complete = [(b, t) for (b, t) in shapes if all(not missing[(v, t, b)] for v in spec.view_ids)]

    recorded = {}
    if existing is not None:
        recorded = {(b, t, view): existing.compute(b, t, view) for (b, t) in shapes for view in spec.view_ids
                    if existing.has_array(b, t, view)}
    order = row_order(index.labels, spec.row_order_seed)
    ordered_paths = [index.paths[i] for i in order.tolist()]
    row_bytes = {key: 2 * _prod(shape) for key, shape in shapes.items()}
    jobs: list[ShardJob] = []
    bytes_new = 0 if existing is not None else index.num_images * 200
    for shard in range(spec.num_shards):
        start = shard * spec.shard_size
        stop = min(start + spec.shard_size, spec.num_images)
        todo = []
        for view in spec.view_ids:
            for t in timesteps:
                todo_blocks = tuple(b for b in blocks if shard in missing[(view, t, b)])
                if todo_blocks:
                    todo.append((view, t, todo_blocks))
                    bytes_new += sum((stop - start) * row_bytes[(b, t)] for b in todo_blocks)
        if todo:
            rows = tuple(order[start:stop].tolist())
            checks = tuple((f"b{b}/t{t}{view_suffix(view)}", recorded[(b, t, view)]) for view, t, todo_blocks in todo
                           for b in todo_blocks if recorded.get((b, t, view)))
            jobs.append(ShardJob(
                cache=path, shard=shard, start=start, paths=tuple(ordered_paths[start:stop]), todo=tuple(todo),
                image_ids=rows, recorded_compute=checks,
                config_name=config.name, image_size=config.image_size, noise_schedule=config.noise_schedule,
                diffusion_steps=config.diffusion_steps, checkpoint=request.checkpoint,
                weight_seed=None if sha256 else int(request.weight_seed), noise_seed=spec.noise_seed,
                pool=spec.pool, precision=request.precision, device=request.device,
                batch_size=int(request.batch_size), num_threads=int(request.num_threads),
                decode_threads=int(request.decode_threads), decode_device=request.decode_device,
            ))
    bytes_free = shutil.disk_usage(_existing_parent(path)).free
    check_disk = check_disk and not dry_run
    plan = ExtractionPlan(
        request=request, spec=spec, path=path, paths=list(index.paths), labels=index.labels,
        class_names=list(index.class_names), shapes=shapes, native_sizes=native, jobs=jobs,
        new_arrays=new_arrays, complete_arrays=complete, bytes_new=bytes_new, bytes_free=bytes_free,
        forwards=sum(job.forwards for job in jobs), damaged=damaged, index_damage=index_damage,
        unpack=index.pending_unpack, order=order,
    )
    if check_disk and bytes_new * DISK_MARGIN > bytes_free:
        raise DiskSpaceError(
            f"extract needs {format_bytes(bytes_new)} in {_existing_parent(path)} but only {format_bytes(bytes_free)} "
            f"is free: free space, pass a smaller --pool, fewer --blocks/--timesteps, or another --cache-dir"
        )
    return plan


def _mark(marker: MarkWriter, result: ShardResult) -> ShardResult | DiffrepError:
    """Mark a finished shard (its data is on disk); a refusal or a full disk comes back as the shard's error."""
    try:
        marker.mark([result.marks()])
    except CacheMismatchError as exc:  # another device kind or precision than the array's: not marked
        return exc
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return DiskSpaceError(f"disk full while marking shard {result.shard} of {marker.path}: free space and run "
                                  "the same command again (completed shards are kept)")
        raise
    return result


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


class ExtractionInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: the shards finished so far are written and marked, the rest left to the next run.

    A KeyboardInterrupt, so that library callers still stop; ``summary`` is what the run did.
    """

    def __init__(self, summary: "RunSummary", total: int):
        super().__init__(f"{summary.shards_done} of {total} shards finished")
        self.summary, self.total = summary, total


def finished_shards(plan: ExtractionPlan) -> int:
    """How many of the plan's shard jobs are now fully written, read from the cache itself.

    After an interrupt this is the truth a user needs (a result may be lost in flight although
    its shard is written, or a worker may finish one while the run stops).
    """
    if not plan.jobs or not os.path.exists(os.path.join(plan.path, "zarr.json")):
        return 0
    cache = FeatureCache(plan.path)
    missing: dict[tuple[int, int, int], set[int]] = {}

    def written(shard: int, b: int, t: int, view: int) -> bool:
        if (b, t, view) not in missing:
            missing[(b, t, view)] = set(cache.missing_shards(b, t, view))
        return shard not in missing[(b, t, view)]

    return sum(all(written(job.shard, b, t, view) for view, t, blocks in job.todo for b in blocks) for job in plan.jobs)


_HELD: set[str] = set()


@contextmanager
def lock_cache(plan: ExtractionPlan) -> Iterator[None]:
    """Hold ``<cache>.lock`` for a run (re-entrant in this process), so two runs never write the same shards.

    Take it before starting any cluster: a refused run then starts nothing.

    Raises:
        CacheError: another process holds the lock (names it).
    """
    lock_path = plan.path.rstrip(os.sep) + ".lock"
    if lock_path in _HELD:
        yield
        return
    try:
        with file_lock(lock_path, blocking=False):
            _HELD.add(lock_path)
            try:
                yield
            finally:
                _HELD.discard(lock_path)
    except LockHeld as held:  # two runs on one cache would plan and write the same shards
        raise CacheError(
            f"another diffrep extract ({held.holder}) is writing {plan.path}: wait for it to finish, or use another --cache-dir"
        ) from None


def run_extraction(plan: ExtractionPlan, runner: TaskRunner, progress: bool = True, retries: int = 2) -> RunSummary:
    """Create the cache metadata, forget damaged shards, then run the plan's shard jobs and record the run.

    Args:
        plan: from ``plan_extraction``; runner: from ``pipeline.cluster.open_runner``.
        progress: show a progress bar (images/s, time left) on stderr; retries: per failed task.

    Returns:
        RunSummary; shards that failed after their retries are listed in ``failed`` (their markers
        stay unset, so running the same command again finishes them).

    Raises:
        CacheError: another run holds the cache; ExtractionInterrupted: Ctrl-C (finished shards are kept).
    """
    with lock_cache(plan):
        return _run_locked(plan, runner, progress, retries)


def _run_locked(plan: ExtractionPlan, runner: TaskRunner, progress: bool, retries: int) -> RunSummary:
    from tqdm import tqdm

    began = time.perf_counter()
    create_cache(  # also rewrites lost chunks of index/path and index/label
        plan.request.cache_dir, plan.spec, plan.paths, plan.labels, plan.class_names,
        arrays=plan.shapes, native_sizes=plan.native_sizes,
    )
    if plan.damaged or plan.index_damage:  # their markers lie: unset them (and drop the remains) before rerunning
        reset_shards(plan.path, plan.damaged, {k: v for k, v in plan.index_damage.items() if k in ("valid", "error")})
    summary = RunSummary(path=plan.path, shards_skipped=plan.spec.num_shards - len(plan.jobs))
    jobs = plan.jobs
    fatal: DiffrepError | None = None
    bar = tqdm(total=plan.images_to_run, unit="img", desc=f"{plan.spec.dataset}/{plan.spec.split}",
               disable=not progress, dynamic_ncols=True, smoothing=0.1)
    jobs = link_next_shards(jobs)  # each job decodes the next one's first batches ahead
    marker = MarkWriter(plan.path)  # this process alone writes markers, index rows and provenance
    computed: list[dict] = []
    results = runner.run(run_shard_job, jobs, retries=retries, name=f"extract-{plan.spec.split}-shard")
    interrupted = False
    try:
        for job, result in results:
            if isinstance(result, ShardResult):
                result = _mark(marker, result)
            if isinstance(result, ShardResult):
                summary.shards_done += 1
                summary.images += result.images
                summary.forwards += result.forwards
                for row, reason in result.invalid.items():
                    summary.invalid[row] = (plan.row_path(row), reason)
                if result.compute is not None and result.compute not in computed:
                    computed.append(result.compute)
                bar.update(result.images)
            else:
                summary.failed[job.shard] = f"{type(result).__name__}: {' '.join(str(result).split())}"[:300]
                logger.error("shard %d failed: %s", job.shard, summary.failed[job.shard])
                if isinstance(result, DiffrepError):  # a bad setting fails every shard alike: stop now
                    fatal = result
                    break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        results.close()  # cancels what is still queued before the run is recorded and the lock let go
        bar.close()
        summary.seconds = time.perf_counter() - began
        record_run(plan.path, summary.invalid, {
            "arrays": [f"b{b}/t{t}" for (b, t) in sorted(plan.shapes)],
            "shards_written": summary.shards_done, "shards_failed": sorted(summary.failed),
            "images": summary.images, "forwards": summary.forwards, "seconds": round(summary.seconds, 2),
            "where": runner.description, "threads": plan.request.num_threads,
            "batch_size": plan.request.batch_size, "decode_device": plan.request.decode_device, "compute": computed,
        })
    if interrupted:
        raise ExtractionInterrupted(summary, len(jobs))
    if fatal is not None:
        raise fatal
    return summary
