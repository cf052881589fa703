"""The staged (block, timestep) search's request and plan: stage sizes, cells, forwards and bytes per stage, against the full grid's.

A search draws every stage's images from one cache: the split's ``--per-class``/``--limit`` subset
in its seeded, class-stratified row order (``extract.cache.order``), of which a prefix holds about
the same share of every class. Stage k reads the first ``rows[k]`` rows, a whole number of shards,
so a grown stage extracts only the rows past the last one, at the timesteps of the cells it kept.
The plan is exact for stage 1 (every block at the coarse timesteps) and an upper bound for the
refinement and the later stages, whose cells depend on the scores: it assumes every kept cell sits
at its own timestep, as far as there are timesteps, and that the widest blocks are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from extract.cache import CacheSpec
from extract.job import DEFAULT_THREADS

from pipeline.datasets import build_index
from pipeline.errors import SearchError
from pipeline.extraction import ExtractionRequest, format_bytes, plan_extraction

__all__ = [
    "SearchRequest", "SearchStage", "SearchPlan", "plan_search", "build_plan", "stage_rows", "coarse_timesteps", "refine_timesteps",
    "kept_count",
]

Key = tuple[int, int]


@dataclass(frozen=True)
class SearchRequest:
    """What ``diffrep search`` was asked for (plain values, no click).

    Args:
        dataset, split: the images searched on (cross-validated on that split alone); per_class / limit:
            the subset the stages draw from, which names the cache (as ``diffrep extract`` does).
        blocks, timesteps: the candidate cells; cache_dir: the cache root.
        config_name, checkpoint, weight_seed, noise_seed, order_seed: the backbone, noise and row order.
        start_per_class: stage 1's images per class; growth: each stage's images over the last one's;
            keep: the share of cells a stage keeps; final_cells: stop once this many or fewer are kept.
        coarse_stride: stage 1 scores every coarse_stride-th candidate timestep (and the last), then
            refines between the best one and its scored neighbours.
        scorer: ``knn`` or ``linear`` (the converged probe), cross-validated in ``folds`` folds; k: kNN's
            neighbours; l2: the linear probe's L2 weight(s).
        pool: side the maps are stored and scored at; shard_size: images per shard (None: stage 1's rows,
            so that every stage is whole shards).
        final: then extract the winners on the whole subset and the test split and fit the converged probe.
        test_split, test_per_class: the split ``final`` scores on and its subset.
        device, precision, batch_size, num_threads, scheduler, synchronous, workers: the extraction's.
        results_path: results table (None: the default); out_dir: the search's table and heatmap.
    """

    dataset: str
    cache_dir: str
    blocks: tuple[int, ...]
    timesteps: tuple[int, ...]
    config_name: str = "256x256_uncond"
    checkpoint: str | None = None
    weight_seed: int = 0
    noise_seed: int = 0
    order_seed: int = 0
    split: str = "train"
    per_class: int | None = None
    limit: int | None = None
    data_root: str | None = None
    start_per_class: int = 20
    growth: float = 2.0
    keep: float = 1 / 3
    final_cells: int = 2
    coarse_stride: int = 2
    scorer: str = "linear"
    folds: int = 5
    k: int = 20
    l2: tuple[float, ...] = (1e-3,)
    pool: int = 2
    shard_size: int | None = None
    seed: int = 0
    final: bool = False
    test_split: str = "test"
    test_per_class: int | None = None
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 64
    num_threads: int = DEFAULT_THREADS
    scheduler: str | None = None
    synchronous: bool = False
    workers: int | None = None
    results_path: str | None = None
    out_dir: str = "results/search"

    def extraction(self, split: str, timesteps, blocks, first_rows: int | None, shard_size: int,
                   per_class: int | None = None, limit: int | None = None) -> ExtractionRequest:
        """The extraction request of some cells of this search (one cache per split)."""
        return ExtractionRequest(
            dataset=self.dataset, split=split, timesteps=tuple(timesteps), blocks=tuple(blocks),
            cache_dir=self.cache_dir, pool=self.pool, config_name=self.config_name, checkpoint=self.checkpoint,
            weight_seed=self.weight_seed, noise_seed=self.noise_seed, shard_size=shard_size,
            batch_size=self.batch_size, per_class=per_class, limit=limit, data_root=self.data_root,
            device=self.device, precision=self.precision, num_threads=self.num_threads, order_seed=self.order_seed,
            first_rows=first_rows,
        )


@dataclass(frozen=True)
class SearchStage:
    """One stage of the plan: cache rows read, cells scored, and what its extraction costs (``exact``: or at most)."""

    name: str
    rows: int
    cells: int
    timesteps: int
    forwards: int
    bytes: int
    exact: bool


@dataclass
class SearchPlan:
    """The search's stages and what they cost, beside the full grid's cost, before anything runs."""

    request: SearchRequest
    spec: CacheSpec
    path: str
    num_classes: int
    shard_size: int
    cell_bytes: dict[int, int]  # bytes of one row of block b, as stored
    coarse: tuple[int, ...]
    stages: list[SearchStage] = field(default_factory=list)
    test_images: int = 0
    final_forwards: int = 0
    final_bytes: int = 0

    @property
    def num_images(self) -> int:
        return self.spec.num_images

    @property
    def grid_forwards(self) -> int:
        """The full grid on the search's split: every image at every candidate timestep."""
        return self.num_images * len(self.request.timesteps)

    @property
    def grid_bytes(self) -> int:
        return self.num_images * len(self.request.timesteps) * sum(self.cell_bytes.values())

    @property
    def forwards(self) -> int:
        return sum(stage.forwards for stage in self.stages)

    @property
    def bytes(self) -> int:
        return sum(stage.bytes for stage in self.stages)

    def describe(self) -> str:
        """The lines ``diffrep search`` prints before it starts (and alone with ``--dry-run``)."""
        request, spec = self.request, self.spec
        weights = f"checkpoint sha256 {spec.checkpoint_sha256[:12]}" if spec.checkpoint_sha256 else \
            f"random weights, seed {spec.weight_seed}"
        cells = len(request.blocks) * len(request.timesteps)
        lines = [
            f"search {request.dataset}/{request.split}: {len(request.blocks)} blocks x {len(request.timesteps)} "
            f"timesteps = {cells} cells, scored by {request.scorer} ({request.folds}-fold cross-validation on "
            f"{request.split}, pool {request.pool})",
            f"  backbone {spec.config_name} ({weights}); cache {self.path}",
            f"  images drawn from {self.num_images} ({spec.subset}, {self.num_classes} classes) in the cache's seeded "
            f"row order, shards of {self.shard_size}; stage 1 at t = {', '.join(map(str, self.coarse))}",
            "  stage           rows  ~/class  cells  timesteps  forwards      bytes",
        ]
        for stage in self.stages:
            bound = "" if stage.exact else "<= "
            lines.append(f"  {stage.name:<12} {stage.rows:>7} {stage.rows / self.num_classes:>8.1f} {bound + str(stage.cells):>6} "
                         f"{bound + str(stage.timesteps):>10} {bound + str(stage.forwards):>9} "
                         f"{bound + format_bytes(stage.bytes):>10}")
        with_test = self.grid_forwards + self.test_images * len(request.timesteps)
        lines.append(f"  search: at most {self.forwards} forwards ({100 * self.forwards / self.grid_forwards:.1f}% of "
                     f"the grid's on {request.split}, {100 * self.forwards / with_test:.1f}% with {request.test_split}), "
                     f"{format_bytes(self.bytes)}")
        lines.append(f"  full grid on {request.split}: {self.num_images} images x {len(request.timesteps)} timesteps = "
                     f"{self.grid_forwards} forwards, {format_bytes(self.grid_bytes)}"
                     + (f"; scoring it on {request.test_split} adds {self.test_images * len(request.timesteps)}"
                        if self.test_images else ""))
        if request.final:
            lines.append(f"  --final: at most {self.final_forwards} forwards ({format_bytes(self.final_bytes)}) for the "
                         f"{request.final_cells} winners on all {self.num_images} {request.split} and "
                         f"{self.test_images} {request.test_split} images, then the converged linear probe")
        return "\n".join(lines)


def stage_rows(first: int, growth: float, shard_size: int, total: int) -> list[int]:
    """Rows of every possible stage: ``first``, then each ``growth`` times the last, whole shards, up to ``total``."""
    def whole(rows: float) -> int:
        return min(total, shard_size * math.ceil(rows / shard_size))

    rows = [whole(first)]
    while rows[-1] < total:
        rows.append(max(whole(rows[-1] * growth), min(total, rows[-1] + shard_size)))
    return rows


def coarse_timesteps(candidates: tuple[int, ...], stride: int) -> tuple[int, ...]:
    """Every ``stride``-th candidate (sorted) and the last one."""
    ordered = sorted(set(candidates))
    return tuple(sorted(set(ordered[::max(1, stride)]) | {ordered[-1]}))


def refine_timesteps(candidates: tuple[int, ...], scored: set[int], best: int) -> list[int]:
    """Candidates to score next around the best timestep: on each side, the middle unscored candidate
    between it and the nearest scored one (none when they are adjacent)."""
    ordered = sorted(set(candidates))
    at = ordered.index(best)
    out = []
    for step in (-1, 1):
        between = []
        i = at + step
        while 0 <= i < len(ordered) and ordered[i] not in scored:
            between.append(ordered[i])
            i += step
        if between and 0 <= i < len(ordered):  # refine only towards a scored neighbour, never past the ends
            out.append(between[(len(between) - 1) // 2])
    return sorted(out)


def kept_count(cells: int, keep: float, final_cells: int) -> int:
    """How many of ``cells`` a stage keeps: the share ``keep`` (rounded up), at least ``final_cells``, fewer than all."""
    return max(min(final_cells, cells), min(cells - 1, math.ceil(cells * keep)))


def _refine_bound(candidates: tuple[int, ...], coarse: tuple[int, ...]) -> int:
    """At most how many timesteps the refinement adds (it halves a gap on each side of the best, repeatedly)."""
    ordered = sorted(set(candidates))
    positions = [ordered.index(t) for t in coarse]
    widest = max((b - a - 1 for a, b in zip(positions, positions[1:])), default=0)
    return min(len(ordered) - len(coarse), 2 * widest)


def plan_search(request: SearchRequest, dry_run: bool = False) -> SearchPlan:
    """Work out the stages of a search and their cost, writing nothing.

    Raises:
        SearchError: settings that leave no search (growth, keep, stage sizes); the errors of
        ``plan_extraction`` (dataset, backbone, blocks, timesteps, cache).
    """
    if request.growth <= 1:
        raise SearchError(f"--growth {request.growth:g} must be above 1: each stage reads more images, e.g. --growth 3")
    if not 0 < request.keep < 1:
        raise SearchError(f"--keep {request.keep:g} must lie between 0 and 1, e.g. --keep 0.33")
    if request.final_cells < 1 or request.start_per_class < 1 or request.coarse_stride < 1:
        raise SearchError("--final-cells, --start-per-class and --coarse-stride must be at least 1")
    coarse = coarse_timesteps(request.timesteps, request.coarse_stride)  # the cells' shapes do not depend on t
    index = build_index(request.dataset, request.split, root=request.data_root, per_class=request.per_class,
                        limit=request.limit, unpack=not dry_run)
    num_classes, num_images = index.num_classes, index.num_images
    shard_size = request.shard_size or min(num_images, request.start_per_class * num_classes)
    probe = plan_extraction(request.extraction(request.split, coarse, request.blocks, None, shard_size,
                                               request.per_class, request.limit), dry_run=True, index=index)
    if request.start_per_class * num_classes < 2 * request.folds:
        raise SearchError(f"stage 1 holds {request.start_per_class * num_classes} images, too few for {request.folds} "
                          f"folds: pass a larger --start-per-class or fewer --folds")
    test_images = build_index(request.dataset, request.test_split, root=request.data_root,
                              per_class=request.test_per_class, unpack=False).num_images
    return build_plan(request, probe.spec, probe.path, num_classes,
                      {b: 2 * c * h * w for (b, _), (c, h, w) in probe.shapes.items()}, test_images)


def build_plan(request: SearchRequest, spec: CacheSpec, path: str, num_classes: int, cell_bytes: dict[int, int],
               test_images: int = 0) -> SearchPlan:
    """The stages of a search on the cache ``path`` written with ``spec`` (``plan_search`` finds these).

    Args:
        num_classes: classes among the cache's rows. cell_bytes: ``{b: bytes of one stored row}``.
        test_images: images of the test split ``final`` would extract.
    """
    coarse = coarse_timesteps(request.timesteps, request.coarse_stride)
    num_images, shard_size = spec.num_images, spec.shard_size
    plan = SearchPlan(request=request, spec=spec, path=path, num_classes=num_classes, shard_size=shard_size,
                      cell_bytes=dict(cell_bytes), coarse=coarse, test_images=test_images)
    rows = stage_rows(request.start_per_class * num_classes, request.growth, shard_size, num_images)
    widest = sorted(cell_bytes.values(), reverse=True)
    cells = len(request.blocks) * len(coarse)
    plan.stages.append(SearchStage("1", rows[0], cells, len(coarse), rows[0] * len(coarse),
                                   rows[0] * len(coarse) * sum(widest), exact=True))
    refine = _refine_bound(request.timesteps, coarse)
    if refine:
        plan.stages.append(SearchStage("1 refine", rows[0], len(request.blocks) * refine, refine, rows[0] * refine,
                                       rows[0] * refine * sum(widest), exact=False))
        cells += len(request.blocks) * refine
    for previous, current in zip(rows, rows[1:]):
        cells = kept_count(cells, request.keep, request.final_cells)
        if cells <= request.final_cells:  # the kept cells are the winners: --final measures them on everything
            break
        timesteps = min(cells, len(request.timesteps))
        new = current - previous
        cell_cost = sum(widest[i % len(widest)] for i in range(cells))  # the widest blocks, as many as cells
        plan.stages.append(SearchStage(str(len([s for s in plan.stages if s.name.isdigit()]) + 1), current, cells,
                                       timesteps, new * timesteps, new * cell_cost, exact=False))
    winners = min(request.final_cells, cells)
    outside = num_images - plan.stages[-1].rows + test_images
    plan.final_forwards = outside * min(winners, len(request.timesteps))
    plan.final_bytes = outside * sum(widest[i % len(widest)] for i in range(winners))
    return plan
