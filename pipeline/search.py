"""The staged (block, timestep) search: ``diffrep search`` finds the best cells without paying for the full grid.

``run_search(request)`` prints its plan (``pipeline.search_plan``), then:

1. stage 1 extracts the first rows of the cache (a few images per class) at the coarse timesteps,
   every candidate block captured in the same forward, and scores every cell by cross-validation
   on those rows (``probe.crossval``: kNN or the converged linear probe on pooled features);
2. refines the timesteps around the best cell (the candidates between it and its scored
   neighbours, on the same rows), as long as there are any;
3. successive halving: keeps the best share of the cells, grows the rows (``growth`` times), extracts
   only the new rows at the kept cells' timesteps, re-scores, until ``final_cells`` or fewer remain;
4. with ``final``: extracts the winners on the whole subset and the test split and fits the
   converged linear probe on them (``pipeline.evaluate.run_probe``).

Every score is a results row with ``protocol = "search-stage-<k>"``; the ranked cells, what each
stage cost in forwards (one per image and timestep: all blocks of a timestep come from one pass)
and a heatmap of the scores are written under ``out_dir``. Forwards are counted from what each
stage asks for, so a cache already holding some rows does not make the search look cheaper.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from extract.cache import FeatureCache
from extract.errors import CacheIncompleteError
from extract.precision import resolve_device
from probe.crossval import SCORERS, cross_validate

from pipeline.errors import SearchError
from pipeline.evaluate import CacheSelection, ProbeRequest, run_probe
from pipeline.extraction import ExtractionRequest
from pipeline.extraction_run import fill_caches
from pipeline.report import format_table, markdown_table, plot_search_heatmap
from pipeline.results import record_rows, results_table
from pipeline.search_plan import SearchPlan, SearchRequest, kept_count, plan_search, refine_timesteps

__all__ = ["SearchRequest", "SearchPlan", "StageRecord", "SearchResult", "plan_search", "run_search"]

log = logging.getLogger(__name__)

Key = tuple[int, int]


@dataclass
class StageRecord:
    """What one stage did: rows read, cells scored, forwards and bytes it asked for, forwards that ran."""

    name: str
    rows: int
    cells: list[Key]
    forwards: int = 0
    bytes: int = 0
    ran: int = 0
    seconds: float = 0.0


@dataclass
class SearchResult:
    """The ranked cells (best first), each stage's record, the results rows, and what was written."""

    plan: SearchPlan
    ranked: list[dict]
    stages: list[StageRecord]
    rows: list[dict] = field(default_factory=list)
    final_rows: list[dict] = field(default_factory=list)
    final_forwards: int = 0
    written: list[Path] = field(default_factory=list)

    @property
    def forwards(self) -> int:
        """Forwards the search asked for (``final`` excepted): images x timesteps over its stages."""
        return sum(stage.forwards for stage in self.stages)

    @property
    def winners(self) -> list[Key]:
        return [(row["block"], row["timestep"]) for row in self.ranked[:self.plan.request.final_cells]]

    def describe(self) -> str:
        """The summary ``diffrep search`` prints: stages, the ranked cells, the cost against the grid's."""
        plan = self.plan
        lines = ["stage           rows  cells  forwards  (ran)  seconds"]
        lines += [f"{s.name:<12} {s.rows:>7} {len(s.cells):>6} {s.forwards:>9} {s.ran:>6} {s.seconds:>8.1f}"
                  for s in self.stages]
        with_test = plan.grid_forwards + plan.test_images * len(plan.request.timesteps)
        lines.append(f"search: {self.forwards} forwards = {100 * self.forwards / plan.grid_forwards:.1f}% of the full "
                     f"grid's {plan.grid_forwards} on {plan.request.split} ({100 * self.forwards / with_test:.1f}% of "
                     f"{with_test} with {plan.request.test_split})"
                     + (f"; --final added {self.final_forwards}" if plan.request.final else ""))
        lines.append(_ranked_text(self.ranked))
        return "\n".join(lines)


class _Search:
    """The state of one run: scores per (cell, stage), rows extracted per timestep, the stages so far."""

    def __init__(self, plan: SearchPlan, echo: Callable[[str], None], fill: Callable[[list[ExtractionRequest]], int]):
        self.plan, self.request, self.echo, self.fill = plan, plan.request, echo, fill
        self.scores: dict[Key, dict[int, dict]] = {}
        self.extracted: dict[Key, int] = {}  # rows of each cell asked for so far
        self.stages: list[StageRecord] = []
        self.rows: list[dict] = []
        self.device = resolve_device(self.request.device)

    def stage(self, name: str, number: int, rows: int, cells: list[Key]) -> None:
        """Extract the rows the cells lack, then score every cell on the first ``rows`` rows."""
        began = time.perf_counter()
        record = StageRecord(name, rows, sorted(cells))
        record.forwards, record.bytes, record.ran = self._extract(cells, rows)
        cache = FeatureCache(self.plan.path)
        valid = np.asarray(cache.valid[:rows])
        labels = torch.from_numpy(np.asarray(cache.labels[:rows])[valid])
        for key in sorted(cells):
            x = _read_rows(cache, key, rows)[torch.from_numpy(valid)]
            score = cross_validate(x, labels, self.plan.num_classes, self.request.scorer, folds=self.request.folds,
                                   seed=self.request.seed, k=self.request.k, l2_grid=self.request.l2,
                                   device=self.device)
            self.scores.setdefault(key, {})[number] = self._row(number, key, int(valid.sum()), score)
        record.seconds = time.perf_counter() - began
        record_rows([self.scores[key][number] for key in sorted(cells)], self.request.results_path)
        self.rows += [self.scores[key][number] for key in sorted(cells)]
        self.stages.append(record)
        best = self.ranked(number)[0]
        self.echo(f"stage {name}: {len(cells)} cells on {rows} rows, {record.forwards} forwards "
                  f"({record.ran} ran), {record.seconds:.0f} s; best b={best['block']} t={best['timestep']} "
                  f"{100 * best['top1']:.1f}%")

    def _extract(self, cells: list[Key], rows: int) -> tuple[int, int, int]:
        """Extract the first ``rows`` rows of the cells; (forwards asked for, bytes asked for, forwards that ran).

        A forward per image and timestep captures every block asked at that timestep; the cells of a
        timestep were all read to the same rows before (a stage keeps only cells it scored).
        """
        by_t: dict[int, list[int]] = {}
        for b, t in cells:
            by_t.setdefault(t, []).append(b)
        forwards = sum(rows - max(self.extracted.get((b, t), 0) for b in blocks) for t, blocks in by_t.items())
        size = sum((rows - self.extracted.get(key, 0)) * self.plan.cell_bytes[key[0]] for key in cells)
        groups: dict[tuple[int, ...], list[int]] = {}
        for t, blocks in by_t.items():
            groups.setdefault(tuple(sorted(blocks)), []).append(t)
        requests = [self.request.extraction(self.request.split, sorted(ts), blocks, rows, self.plan.shard_size,
                                            self.request.per_class, self.request.limit)
                    for blocks, ts in sorted(groups.items())]
        ran = self.fill(requests)
        for key in cells:
            self.extracted[key] = max(rows, self.extracted.get(key, 0))
        return forwards, size, ran

    def _row(self, number: int, key: Key, rows: int, score) -> dict:
        spec = self.plan.spec
        return dict(dataset=self.request.dataset, backbone_id=spec.backbone_id, train_split=self.request.split,
                    test_split=self.request.split, noise_seed=int(spec.noise_seed), cache_pool=int(spec.pool),
                    train_size=rows, test_size=rows, head=self.request.scorer, protocol=f"search-stage-{number}",
                    standardize=True, blocks=[key[0]], timesteps=[key[1]], pool=int(self.request.pool),
                    k=self.request.k if self.request.scorer == "knn" else None,
                    l2=self.request.l2[0] if self.request.scorer == "linear" and len(self.request.l2) == 1 else None,
                    seed=self.request.seed, top1=score.top1, top5=score.top5)

    def ranked(self, upto: int | None = None) -> list[dict]:
        """Every scored cell, best first: cells that reached a later stage first, then by their latest score."""
        out = []
        for (b, t), by_stage in self.scores.items():
            stages = [s for s in by_stage if upto is None or s <= upto]
            if stages:
                last = max(stages)
                out.append(dict(block=b, timestep=t, stage=last, rows=by_stage[last]["train_size"],
                                top1=by_stage[last]["top1"], top5=by_stage[last]["top5"],
                                stage1=by_stage[min(by_stage)]["top1"]))
        return sorted(out, key=lambda r: (-r["stage"], -r["top1"], r["timestep"], r["block"]))


def run_search(request: SearchRequest, echo: Callable[[str], None] = log.info, plan: SearchPlan | None = None,
               fill: Callable[[list[ExtractionRequest]], int] | None = None) -> SearchResult:
    """Run the staged search; returns the ranked cells, what each stage cost, and the files written.

    Args:
        request: what to search. echo: receives the plan and a line per stage.
        plan: from ``plan_search(request)`` when the caller printed it already.
        fill: extracts a stage's requests and returns the forwards that ran (default: ``fill_caches``
            with the request's scheduler; a caller that writes the cache itself, such as a test, passes its own).

    Raises:
        SearchError: settings that leave no search; the extraction's and the probes' errors.
    """
    if request.scorer not in SCORERS:
        raise SearchError(f"unknown scorer {request.scorer!r}: choose one of {', '.join(SCORERS)}")
    if plan is None:
        plan = plan_search(request)
        echo(plan.describe())
    if fill is None:
        def fill(requests: list[ExtractionRequest]) -> int:
            run = fill_caches(requests, scheduler=request.scheduler, synchronous=request.synchronous,
                              workers=request.workers, progress=False, echo=log.info)
            return sum(summary.forwards for summary in run.summaries)
    search = _Search(plan, echo, fill)
    rows = [stage.rows for stage in plan.stages if stage.name.isdigit()]
    candidates = tuple(sorted(set(request.timesteps)))
    search.stage("1", 1, rows[0], [(b, t) for b in request.blocks for t in plan.coarse])
    scored = set(plan.coarse)
    while True:  # coarse to fine: halve the gaps beside the best timestep
        new = refine_timesteps(candidates, scored, search.ranked()[0]["timestep"])
        if not new:
            break
        search.stage(f"1 refine {','.join(map(str, new))}", 1, rows[0], [(b, t) for b in request.blocks for t in new])
        scored |= set(new)
    cells = [(r["block"], r["timestep"]) for r in search.ranked()]
    number = 1
    while number < len(rows):
        cells = cells[:kept_count(len(cells), request.keep, request.final_cells)]
        if len(cells) <= request.final_cells:  # the kept cells are the winners, ranked by this stage's scores
            break
        number += 1
        search.stage(str(number), number, rows[number - 1], cells)
        cells = [(r["block"], r["timestep"]) for r in search.ranked() if r["stage"] == number]
    result = SearchResult(plan=plan, ranked=search.ranked(), stages=search.stages, rows=search.rows)
    if request.final:
        _final(result, search, echo, fill)
    result.written = _write(result)
    return result


def _final(result: SearchResult, search: _Search, echo: Callable[[str], None],
           fill: Callable[[list[ExtractionRequest]], int]) -> None:
    """The winners on the whole subset and the test split, scored by the converged linear probe; re-ranks them."""
    request, plan = result.plan.request, result.plan
    winners = result.winners
    began = time.perf_counter()
    forwards = 0
    for t in sorted({t for _, t in winners}):
        forwards += plan.num_images - max(search.extracted.get((b, t), 0) for b, tt in winners if tt == t)
    forwards += plan.test_images * len({t for _, t in winners})
    requests = [request.extraction(split, (t,), [b for b, tt in winners if tt == t], None, plan.shard_size,
                                   per_class, limit)
                for split, per_class, limit in ((request.split, request.per_class, request.limit),
                                                (request.test_split, request.test_per_class, None))
                for t in sorted({t for _, t in winners})]
    fill(requests)
    selection = CacheSelection(dataset=request.dataset, cache_dir=request.cache_dir, config_name=request.config_name,
                               backbone_id=plan.spec.backbone_id, train_split=request.split,
                               test_split=request.test_split, results_path=request.results_path)
    for b, t in winners:
        row = run_probe(ProbeRequest(cache=selection, blocks=(b,), timesteps=(t,), head="linear", pool=request.pool,
                                     device=request.device, progress=False))
        result.final_rows.append(row)
        for ranked in result.ranked:
            if (ranked["block"], ranked["timestep"]) == (b, t):
                ranked["final_top1"] = row["top1"]
    result.final_forwards = forwards
    head, tail = result.ranked[:len(winners)], result.ranked[len(winners):]
    result.ranked = sorted(head, key=lambda r: -r["final_top1"]) + tail
    echo(f"final: {len(winners)} winners on {plan.num_images} {request.split} / {plan.test_images} "
         f"{request.test_split} images, {forwards} forwards, {time.perf_counter() - began:.0f} s; best b="
         f"{result.ranked[0]['block']} t={result.ranked[0]['timestep']} {100 * result.ranked[0]['final_top1']:.1f}% "
         f"(converged linear probe, pool {request.pool})")


def _read_rows(cache: FeatureCache, key: Key, rows: int) -> torch.Tensor:
    """The first ``rows`` rows of (b, t) as (rows, C*h*w) float16; refuses unwritten shards among them."""
    b, t = key
    shards = -(-rows // cache.spec.shard_size)
    missing = [s for s in cache.missing_shards(b, t) if s < shards]
    if missing:
        raise CacheIncompleteError(f"b{b}/t{t} of {cache.path} lacks shards {missing[:5]} of its first {rows} rows: "
                                   f"run the same diffrep search again to extract them")
    parts = []
    for start, stop, data in cache.iter_shards(b, t, allow_incomplete=True):
        if start >= rows:
            break
        parts.append(data[:rows - start])
    return torch.from_numpy(np.concatenate(parts)).flatten(1)


def _ranked_text(ranked: list[dict], top: int = 10) -> str:
    lines = ["rank  block  timestep  stage   rows  score %" + ("  final %" if "final_top1" in ranked[0] else "")]
    for i, r in enumerate(ranked[:top], 1):
        final = f"  {100 * r['final_top1']:>7.1f}" if "final_top1" in r else ""
        lines.append(f"{i:>4}  {r['block']:>5}  {r['timestep']:>8}  {r['stage']:>5}  {r['rows']:>5}  "
                     f"{100 * r['top1']:>7.1f}{final}")
    return "\n".join(lines)


def _write(result: SearchResult) -> list[Path]:
    """The search's results rows (Parquet), a Markdown page (plan, stages, ranking) and the heatmap."""
    request, plan = result.plan.request, result.plan
    out_dir = Path(request.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"search_{request.dataset}_{plan.spec.backbone_id}_{request.scorer}"
    table = results_table(result.rows + result.final_rows)
    pq.write_table(table, out_dir / f"{stem}.parquet")
    heatmap = plot_search_heatmap(result.ranked, out_dir / f"{stem}.png",
                                  title=f"search {request.dataset} {plan.spec.backbone_id} {request.scorer}")
    page = [f"# search {request.dataset} {plan.spec.backbone_id} ({request.scorer})", "", "## Plan", "", "```",
            plan.describe(), "```", "", "## Result", "", "```", result.describe(), "```", "",
            f"![heatmap]({heatmap.name})", "", "## Every score", "",
            markdown_table(table, columns=("protocol", "head", "blocks", "timesteps", "pool", "train_size", "top1",
                                           "top5"))]
    (out_dir / f"{stem}.md").write_text("\n".join(page) + "\n")
    log.info("search table:\n%s", format_table(table))
    return [out_dir / f"{stem}.parquet", out_dir / f"{stem}.md", heatmap]
