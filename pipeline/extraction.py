"""The extract stage's plan: what is missing in a cache (images, arrays, bytes, forwards), the disk check, and the shard jobs.

``plan_extraction(request)`` reads the dataset index and the cache (if any) and returns an
``ExtractionPlan`` whose ``describe()`` is what ``diffrep extract`` prints before it starts; it
raises DiskSpaceError when the disk cannot hold the new data. The request's settings reach the
jobs through one ``CacheSpec`` (``ExtractionRequest.cache_spec``), which every ``ShardJob``
carries. Running the plans is ``pipeline.extraction_run``.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from dataclasses import dataclass, field

import numpy as np

from extract.backbone.family import BackboneFamily
from extract.backbone.registry import family_of
from extract.cache import (
    CacheSpec, FeatureCache, cache_path, count_objects, inner_chunk_rows, view_suffix,
)
from extract.backbone.checkpoint import require_checkpoint_file
from extract.backbone.identity import backbone_id as weights_id
from extract.cache.order import row_order
from extract.cache.spec import NOISE_KEY
from extract.cache.provenance import compute_conflict
from extract.errors import CacheError, CacheMismatchError, ConfigError, DiskSpaceError
from extract.job import DEFAULT_THREADS, ShardJob
from extract.pooling import pooled_size

from pipeline.datasets import ImageIndex, build_index, select_subset

__all__ = ["ExtractionRequest", "ExtractionPlan", "dataset_splits", "plan_extraction", "format_bytes"]

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
        first_rows: fill only the shards that hold the first n rows of that order (a prefix holds about
            the same share of every class; ``diffrep search`` grows it stage by stage); None: every row.
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
    first_rows: int | None = None
    image_size: int | None = None  # --image-size: model input side in pixels (None: the configuration's)

    def cache_spec(self, family: BackboneFamily, checkpoint_sha256: str, num_images: int) -> CacheSpec:
        """The cache this request fills, for its backbone's family (what its spec records of the configuration),
        the checkpoint's SHA-256 ('' for random weights) and the images its subset keeps."""
        subset = ",".join(f"{k}={v}" for k, v in (("per_class", self.per_class), ("limit", self.limit)) if v is not None)
        weight_seed = None if checkpoint_sha256 else int(self.weight_seed)
        fields = family.spec_fields(self.config_name, image_size=self.image_size)
        return CacheSpec(
            dataset=self.dataset, split=self.split,
            backbone_id=weights_id(self.config_name, weight_seed=weight_seed, sha256=checkpoint_sha256),
            config_name=self.config_name, checkpoint_sha256=checkpoint_sha256, weight_seed=weight_seed, **fields,
            noise_seed=int(self.noise_seed), flip=bool(self.flip),
            pool=int(self.pool), precision=self.precision, subset=subset or "all", num_images=num_images,
            shard_size=int(self.shard_size), row_order_seed=int(self.order_seed), noise_draws=int(self.noise_draws),
            noise_key=NOISE_KEY,
        )


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
        if self.request.first_rows is not None and self.request.first_rows < spec.num_images:
            shards = -(-self.request.first_rows // spec.shard_size)
            lines.append(f"  only the first {min(shards * spec.shard_size, spec.num_images)} rows of that order "
                         f"({shards} shards): a prefix holds about the same share of every class")
        if self.unpack is not None:
            archive, destination, size = self.unpack
            lines.append(f"  would unpack {archive} ({format_bytes(size)}) into {destination} first")
        official = family_of(spec.config_name).official_checkpoint(spec.config_name)
        if not spec.checkpoint_sha256 and official:
            lines.append(f"  note: no --checkpoint, so the weights are random: pass the official "
                         f"{official} to measure what diffusion training learned")
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
    family = family_of(config_name)
    family.check_checkpoint(config_name, path)
    return family.checkpoint_sha256(path)


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
        DatasetError: unknown dataset or missing images; CheckpointError: missing or non-regular checkpoint file;
        CacheError: a --cache-dir that cannot hold a cache, damaged cache metadata;
        CacheMismatchError: the cache was written with other settings; DiskSpaceError: not enough space.
    """
    family = family_of(request.config_name)
    refusal = family.extract_refusal(request.config_name)
    if refusal:
        raise ConfigError(refusal)
    blocks, _ = family.normalize_blocks(request.config_name, request.blocks)
    timesteps = sorted(set(family.schedule(request.config_name).check_timesteps(request.timesteps)))
    block_shapes = family.block_shapes(request.config_name, request.image_size)

    sha256 = ""
    if request.checkpoint:
        if family.inputs != "latent":  # an SD checkpoint may be a folder: its family checks it
            require_checkpoint_file(request.checkpoint)
        stat = os.stat(request.checkpoint) if os.path.exists(request.checkpoint) else None
        sha256 = _verified_checkpoint(request.config_name, os.path.abspath(request.checkpoint) if stat else request.checkpoint,
                                      stat.st_size if stat else 0, stat.st_mtime_ns if stat else 0)
    if index is None:
        index = build_index(
            request.dataset, request.split, root=request.data_root, split_dir=request.split_dir,
            per_class=request.per_class, limit=request.limit, unpack=not dry_run,
        )
    else:
        index = select_subset(index, per_class=request.per_class, limit=request.limit)
    spec = request.cache_spec(family, sha256, index.num_images)
    # absolute: workers of a remote cluster (and the disk check) must not depend on our cwd
    path = cache_path(os.path.abspath(request.cache_dir), spec.dataset, spec.split, spec.backbone_id)
    _check_cache_dir(request.cache_dir, path)
    trained = family.block_shapes(request.config_name)  # the U-Net is convolutional: any multiple of its deepest stride
    native = _native_sizes({b: side for b, (_, side) in trained.items()}, family.image_size(request.config_name),
                           spec.image_size, request.config_name, blocks)
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
    last = spec.num_shards if request.first_rows is None else min(spec.num_shards, -(-request.first_rows // spec.shard_size))
    for shard in range(last):
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
                cache=path, spec=spec, shard=shard, start=start, paths=tuple(ordered_paths[start:stop]),
                todo=tuple(todo), image_ids=rows, recorded_compute=checks, checkpoint=request.checkpoint,
                device=request.device, batch_size=int(request.batch_size), num_threads=int(request.num_threads),
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


def _native_sizes(sides: dict[int, int], trained: int, asked: int, config_name: str, blocks) -> dict[int, int]:
    """Each block's side at input side ``asked`` (the U-Net is convolutional: side = asked / the block's stride);
    ``asked`` must divide by the deepest stride, or the decoder's skip connections would not line up."""
    deepest = trained // min(sides.values())
    if asked % deepest:
        raise ConfigError(f"--image-size {asked} does not divide by {config_name}'s deepest stride {deepest}: pass a "
                          f"multiple of {deepest}, e.g. {max(deepest, asked // deepest * deepest)}")
    return {b: asked // (trained // sides[b]) for b in blocks}


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out
