"""One extraction run: lock the caches, choose where the shard jobs run, run them, mark them, and sum up (or count what a Ctrl-C kept).

``fill_caches(requests, ...)`` is what ``diffrep extract`` and the demo call: it plans every request
(``pipeline.extraction.plan_extraction``), locks every cache before any cluster starts, runs the
plans in-process, on a local Dask cluster or on an existing one (``pipeline.cluster.open_runner``),
and reports through ``echo`` the plans, where they run and each run's ``RunSummary``. A Ctrl-C
becomes an ``ExtractionInterrupted`` whose message says how many shards are kept and how to go on.
``run_extraction(plan, runner)`` runs one plan on a runner the caller holds.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from extract.cache import FeatureCache, MarkWriter, create_cache, record_run, reset_shards
from extract.errors import CacheError, CacheIncompleteError, CacheMismatchError, DiffrepError, DiskSpaceError
from extract.job import ShardResult, link_next_shards, run_shard_job

from pipeline.cluster import TaskRunner, open_runner
from pipeline.datasets import ImageIndex
from pipeline.extraction import ExtractionPlan, ExtractionRequest, plan_extraction
from pipeline.locks import LockHeld, file_lock

__all__ = [
    "RunSummary", "ExtractionRun", "ExtractionInterrupted", "fill_caches", "lock_cache", "run_extraction",
    "finished_shards",
]

logger = logging.getLogger(__name__)


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


@dataclass
class ExtractionRun:
    """What ``fill_caches`` did: the plan of every request, in order, and the summary of every plan that ran."""

    plans: list[ExtractionPlan] = field(default_factory=list)
    summaries: list[RunSummary] = field(default_factory=list)


class ExtractionInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: the shards finished so far are written and marked, the rest left to the next run.

    A KeyboardInterrupt, so that library callers still stop; its message is the one line a user
    needs (the CLI prints it and exits with status 130).
    """

    def __init__(self, finished: int, total: int, message: str | None = None):
        super().__init__(message or f"interrupted: {finished} of {total} shards finished and are kept; run the same "
                                    f"command again to do the other {total - finished}")
        self.finished, self.total = finished, total


def fill_caches(
    requests: Sequence[ExtractionRequest], *, scheduler: str | None = None, synchronous: bool = False,
    workers: int | None = None, progress: bool = True, dry_run: bool = False,
    confirm: Callable[[list[ExtractionPlan]], None] | None = None, echo: Callable[[str], None] = logger.info,
    indexes: Mapping[tuple[str, str], ImageIndex] | None = None,
) -> ExtractionRun:
    """Plan every request, then lock every cache, start where the jobs run, and run the plans one after another.

    Args:
        requests: one per split (they share device and compute settings).
        scheduler, synchronous, workers: where the jobs run (``pipeline.cluster.open_runner``); the
            device of the first request picks the local workers' GPUs.
        progress: a progress bar per plan on stderr; dry_run: plan (and echo the plans) only.
        confirm: called with the plans before anything is written; raises to stop (e.g. click's abort).
        echo: receives each plan's description, where the jobs run, and each run's summary.
        indexes: ``{(dataset, split): ImageIndex}`` for splits not listed by the manifest's ``datasets``
            (the dense datasets of ``pipeline.dense_data``).

    Returns:
        The plans and the summaries of the plans that ran.

    Raises:
        CacheError: another run holds one of the caches (nothing started); CacheIncompleteError:
        shards failed after their retries (listed in the echoed summaries); ExtractionInterrupted:
        Ctrl-C (finished shards are kept, its message says how many); any planning error.
    """
    run = ExtractionRun()
    try:
        for request in requests:
            index = (indexes or {}).get((request.dataset, request.split))  # a dense dataset lists its own images
            run.plans.append(plan_extraction(request, dry_run=dry_run, index=index))
            echo(run.plans[-1].describe())
    except KeyboardInterrupt:
        raise ExtractionInterrupted(0, 0, "interrupted while planning, before any shard ran: run the same command "
                                          "again") from None
    plans = run.plans
    if dry_run:
        return run
    if confirm is not None:
        confirm(plans)
    if not any(plan.jobs or plan.index_damage for plan in plans):
        echo("nothing to do: every requested array is complete")
        return run
    try:
        with contextlib.ExitStack() as locks:
            for plan in plans:  # refuse a busy cache before any cluster starts
                locks.enter_context(lock_cache(plan))
            for plan in plans:
                if plan.index_damage and not plan.jobs:  # only index chunks to rewrite: no cluster needed
                    run.summaries.append(run_extraction(plan, TaskRunner(), progress=False))
                    echo(run.summaries[-1].describe())
            todo = [plan for plan in plans if plan.jobs]
            if todo:
                with open_runner(scheduler=scheduler, synchronous=synchronous, workers=workers,
                                 device=todo[0].request.device) as runner:
                    echo(f"running on {runner.description}")
                    for plan in todo:
                        run.summaries.append(run_extraction(plan, runner, progress=progress))
                        echo(run.summaries[-1].describe())
    except KeyboardInterrupt:  # the cluster is closed by now: count what is on disk
        total = sum(len(plan.jobs) for plan in plans)
        raise ExtractionInterrupted(sum(finished_shards(plan) for plan in plans), total) from None
    failed = sum(len(summary.failed) for summary in run.summaries)
    if failed:
        raise CacheIncompleteError(
            f"{failed} shard(s) failed after retries (listed above): run the same command again to finish them"
        )
    return run


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


@contextlib.contextmanager
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
            **_sources(plan.request),
        })
    if interrupted:
        raise ExtractionInterrupted(summary.shards_done, len(jobs))
    if fatal is not None:
        raise fatal
    return summary


def _sources(request: ExtractionRequest) -> dict:
    """Where the weights and images came from, for the advice that repeats this command (``pipeline.advice``)."""
    return {key: os.path.abspath(value) if value else None for key, value in
            (("checkpoint", request.checkpoint), ("data_root", request.data_root), ("split_dir", request.split_dir))}
