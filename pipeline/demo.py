"""The demo: the paper's questions asked of diffrep's own trained ADM on CIFAR-10, in minutes on a CPU.

With the bundled checkpoint (``32x32_small`` trained text-free on the CIFAR-10 training images,
see ``extract/weights``), it extracts a class-balanced subset over a block x timestep grid, fits
converged linear probes over every (b, t, pool), runs kNN, CKA, an attention head and DifFormer (at a
reduced width that fits a CPU budget; ``--full``: the paper's settings and DifFeed), then the same
best probe on the identical architecture at two random initialisations and on raw pixels as
floors, and writes a report whose sentences follow the measured numbers. Each stage's time is
printed and recorded; a second run reuses the caches.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from extract.backbone.configs import bundled_checkpoint
from extract.backbone.registry import create_backbone
from extract.inputs.images import load_batch
from probe.logistic import converged_linear_probe

from pipeline.datasets import build_index
from pipeline.evaluate import (
    CacheSelection, CkaRequest, FitProtocol, ProbeRequest, SweepRequest, fmt_keys, run_cka, run_probe, run_sweep,
)
from pipeline.extraction import ExtractionRequest
from pipeline.extraction_run import fill_caches
from pipeline.findings import check_findings, findings_paragraph
from pipeline.report import markdown_table
from pipeline.results import results_table

__all__ = ["DemoSettings", "HeadSettings", "run_demo"]


@dataclass(frozen=True)
class HeadSettings:
    """How the attention head is trained in the demo: reduced to fit the budget, or the paper's settings."""

    dim: int = 256
    depth: int = 1
    token_pool: int = 4
    epochs: int = 15
    solver: str = "adam"
    lr: float = 1e-3
    batch_size: int = 64
    diffeed: bool = False  # DifFeed runs the backbone twice per image and step: only at the paper's settings

    def describe(self) -> str:
        return (f"width {self.dim}, depth {self.depth}, token grid {self.token_pool}x{self.token_pool}, "
                f"{self.epochs} epochs of {self.solver} (lr {self.lr:g}, batch {self.batch_size})")


PAPER_HEAD = HeadSettings(dim=1024, depth=2, token_pool=16, epochs=28, solver="sgd", lr=5e-2, batch_size=256,
                          diffeed=True)


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs; every field is a ``diffrep demo`` option."""

    cache_dir: str
    out_dir: str = "results/demo"
    config_name: str = "32x32_small"
    random_weights: bool = False
    train_per_class: int = 200
    test_per_class: int = 100
    timesteps: tuple[int, ...] = (5, 25, 50, 100, 200, 400)
    blocks: tuple[int, ...] = (5, 8, 10, 12, 15)
    pool: int = 4
    probe_pools: tuple[int, ...] = (1, 2, 4)
    head: HeadSettings = field(default_factory=HeadSettings)
    floors: bool = True
    synchronous: bool = False
    device: str = "auto"
    progress: bool = True


class _Stages:
    """Times each stage and prints it."""

    def __init__(self, echo: Callable[[str], None]):
        self.echo, self.times = echo, {}

    def run(self, name: str, fn, *args, **kwargs):
        began = time.perf_counter()
        self.echo(f"== {name}")
        out = fn(*args, **kwargs)
        self.times[name] = time.perf_counter() - began
        self.echo(f"   {name}: {self.times[name]:.0f} s")
        return out


def _extract(settings: DemoSettings, echo, *, checkpoint: str | None, weight_seed: int, timesteps, blocks) -> str:
    """Fill the train and test caches of one backbone; returns its backbone id."""
    requests = [
        ExtractionRequest(
            dataset="cifar10", split=split, timesteps=tuple(timesteps), blocks=tuple(blocks),
            cache_dir=settings.cache_dir, pool=settings.pool, config_name=settings.config_name,
            checkpoint=checkpoint, weight_seed=weight_seed, per_class=per_class, device=settings.device,
        )
        for split, per_class in (("train", settings.train_per_class), ("test", settings.test_per_class))
    ]
    run = fill_caches(requests, synchronous=settings.synchronous, progress=settings.progress, echo=echo)
    return run.plans[0].spec.backbone_id


def _adm_init_checkpoint(settings: DemoSettings) -> str:
    """ADM's own initialisation (zeroed residual branches), seeded and saved, so its cache is reproducible."""
    path = Path(settings.cache_dir) / f"{settings.config_name}-adm-init-seed0.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        state = {k: v.contiguous() for k, v in create_backbone(settings.config_name).state_dict().items()}
        torch.save(state, path)
    return str(path)


def _pixel_floor(settings: DemoSettings, image_size: int) -> float:
    """The converged probe on raw pixels (3 x S x S, standardised) of the same train/test images."""
    data = []
    for split, per_class in (("train", settings.train_per_class), ("test", settings.test_per_class)):
        index = build_index("cifar10", split, per_class=per_class)
        images, ok, _ = load_batch(index.paths, image_size)
        data.append((images[torch.from_numpy(ok)].flatten(1), torch.from_numpy(index.labels[ok])))
    (train_x, train_y), (test_x, test_y) = data
    return converged_linear_probe(train_x, train_y, test_x, test_y, 10).top1


def _grid(table, head: str) -> dict[tuple[int, int], float]:
    """(b, t) -> best top-1 over pools, of one head's rows."""
    grid: dict[tuple[int, int], float] = {}
    for row in table.to_pylist():
        if row["head"] != head:
            continue
        key = (int(row["blocks"]), int(row["timesteps"]))
        grid[key] = max(grid.get(key, 0.0), row["top1"])
    return grid


def _best_pool(table, key) -> int:
    rows = [r for r in table.to_pylist() if r["head"] == "linear" and (int(r["blocks"]), int(r["timesteps"])) == key]
    return max(rows, key=lambda r: (r["top1"], -r["pool"]))["pool"]


def run_demo(settings: DemoSettings, echo: Callable[[str], None] = print) -> dict:
    """Extract, probe, compare with the floors and write the report.

    Returns:
        ``{"linear", "knn": sweep tables, "rows": every results row of this run, "findings", "times",
        "report": path of results.md, "written": [paths]}``.
    """
    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = str(out_dir / "results.parquet")
    stages = _Stages(echo)
    checkpoint = None if settings.random_weights else bundled_checkpoint(settings.config_name)
    weights = "random weights (fan-in, seed 0)" if checkpoint is None else f"the bundled checkpoint {checkpoint}"
    echo(f"diffrep demo: {settings.config_name} with {weights}; CIFAR-10 {settings.train_per_class} train / "
         f"{settings.test_per_class} test images per class")

    backbone_id = stages.run("extract", _extract, settings, echo, checkpoint=checkpoint, weight_seed=0,
                             timesteps=settings.timesteps, blocks=settings.blocks)
    cache = CacheSelection(dataset="cifar10", cache_dir=settings.cache_dir, config_name=settings.config_name,
                           backbone_id=backbone_id, results_path=results_path)
    common = dict(cache=cache, blocks=tuple(settings.blocks), timesteps=tuple(settings.timesteps),
                  pools=tuple(settings.probe_pools), device=settings.device, out_dir=str(out_dir))
    linear, written, _ = stages.run("linear probes (converged)", run_sweep, SweepRequest(head="linear", **common))
    knn, written_knn, _ = stages.run("kNN (k=20)", run_sweep, SweepRequest(head="knn", **common))
    written += written_knn
    grid = _grid(linear, "linear")
    best_key = max(grid, key=lambda k: (grid[k], -k[1], -k[0]))
    best_pool = _best_pool(linear, best_key)
    echo(f"   best linear probe: b={best_key[0]} t={best_key[1]} pool {best_pool}: {100 * grid[best_key]:.1f}%")

    cka_request = CkaRequest(dataset="cifar10", cache_dir=settings.cache_dir, blocks=tuple(settings.blocks),
                             timesteps=tuple(settings.timesteps), config_name=settings.config_name,
                             backbone_id=backbone_id, at_t=best_key[1], at_b=best_key[0], estimator="linear",
                             pool=2, out_dir=str(out_dir))
    written += stages.run("CKA", run_cka, cka_request)

    head = settings.head

    def heavy(name, blocks, timesteps):
        return run_probe(ProbeRequest(
            cache=cache, blocks=tuple(blocks), timesteps=tuple(timesteps), head=name, dim=head.dim,
            depth=head.depth, pool=head.token_pool, device=settings.device, resume=True, progress=settings.progress,
            protocol=FitProtocol(solver=head.solver, epochs=head.epochs, lr=(head.lr,), batch_size=head.batch_size),
            checkpoint_dir=str(out_dir / "checkpoints" / f"{name}_{backbone_id}_b{fmt_keys(blocks)}_t{fmt_keys(timesteps)}")))

    attention_row = stages.run("attention head", heavy, "attention", [best_key[0]], [best_key[1]])
    fused_blocks, fused_timesteps = _fusion_grid(grid)
    difformer_row = stages.run("DifFormer", heavy, "difformer", fused_blocks, fused_timesteps)
    rows = linear.to_pylist() + knn.to_pylist() + [attention_row, difformer_row]
    diffeed_row = None
    if head.diffeed:
        diffeed_row = stages.run("DifFeed", _diffeed, settings, checkpoint, best_key[1], results_path)
        rows.append(diffeed_row)

    floors: dict[str, float] = {}
    if settings.floors and checkpoint is not None:
        def floor_rows():
            for name, ckpt in (("random init (fan-in, seed 0)", None), ("ADM's own init", _adm_init_checkpoint(settings))):
                floor_id = _extract(settings, echo, checkpoint=ckpt, weight_seed=0, timesteps=(best_key[1],),
                                    blocks=(best_key[0],))
                row = run_probe(ProbeRequest(cache=replace(cache, backbone_id=floor_id),
                                             blocks=(best_key[0],), timesteps=(best_key[1],), pool=best_pool,
                                             device=settings.device))
                floors[name] = row["top1"]
                rows.append(row)
            floors["raw pixels"] = _pixel_floor(settings, 32)  # 3 x 32 x 32, standardised

        stages.run("floors (random inits, pixels)", floor_rows)
    findings = check_findings(grid, attention={best_key: attention_row["top1"]}, floors=floors,
                              difformer=difformer_row["top1"], diffeed=diffeed_row["top1"] if diffeed_row else None,
                              fusion_missing="DifFeed runs the backbone live: make demo-full measures it")
    report = stages.run("report", _write_report, out_dir, settings, weights, rows, grid, best_key, best_pool,
                        attention_row, difformer_row, diffeed_row, floors, findings, stages.times, written)
    echo(f"   total: {sum(stages.times.values()):.0f} s")
    return {"linear": linear, "knn": knn, "rows": rows, "findings": findings, "times": dict(stages.times),
            "report": report, "written": [Path(p) for p in written] + [report]}


def _fusion_grid(grid) -> tuple[list[int], list[int]]:
    """DifFormer's inputs: the two best blocks and the three best timesteps of the linear sweep."""
    blocks = sorted({b for b, _ in grid}, key=lambda b: -max(v for (bb, _), v in grid.items() if bb == b))[:2]
    timesteps = sorted({t for _, t in grid}, key=lambda t: -max(v for (_, tt), v in grid.items() if tt == t))[:3]
    return sorted(blocks), sorted(timesteps)


def _diffeed(settings: DemoSettings, checkpoint, t: int, results_path: str) -> dict:
    """DifFeed (bottleneck) through the live backbone on the demo's images, with the paper's head."""
    from pipeline.feedback import FeedbackRequest, plan_feedback, run_feedback

    head = settings.head
    plan = plan_feedback(FeedbackRequest(
        dataset="cifar10", timestep=t, config_name=settings.config_name, checkpoint=checkpoint,
        per_class=settings.train_per_class, test_per_class=settings.test_per_class, dim=head.dim, depth=head.depth,
        epochs=head.epochs, solver=head.solver, lr=1e-2 if head.solver == "sgd" else head.lr, device=settings.device,
        resume=True, results_path=results_path, progress=settings.progress,
        checkpoint_dir=str(Path(settings.out_dir) / "checkpoints" / f"diffeed_t{t}")))
    return run_feedback(plan)


def _write_report(out_dir: Path, settings: DemoSettings, weights: str, rows, grid, best_key, best_pool, attention_row,
                  difformer_row, diffeed_row, floors, findings, times, written) -> Path:
    table = results_table(rows)
    pngs = [Path(p) for p in written if str(p).endswith(".png")]
    lines = [
        "# diffrep demo report",
        "",
        f"Backbone `{settings.config_name}` with {weights}. CIFAR-10, {settings.train_per_class} train and "
        f"{settings.test_per_class} test images per class (class-balanced, the same images for every row). "
        f"Timesteps {', '.join(map(str, settings.timesteps))}; blocks {', '.join(map(str, settings.blocks))}; "
        f"features stored at pool {settings.pool}, probed at pools {', '.join(map(str, settings.probe_pools))}.",
        "",
        "## What held",
        "",
        findings_paragraph(findings),
        "",
        "## Key numbers",
        "",
        f"- best linear probe (converged: standardised features, L-BFGS, L2 chosen on held-out train rows): "
        f"b={best_key[0]}, t={best_key[1]}, pool {best_pool}: **{100 * grid[best_key]:.1f}%** top-1",
        f"- attention head ({settings.head.describe()}) at the same (b, t): **{100 * attention_row['top1']:.1f}%**",
        f"- DifFormer (same settings) on b={difformer_row['blocks']} x t={difformer_row['timesteps']}: "
        f"**{100 * difformer_row['top1']:.1f}%**",
        (f"- DifFeed (bottleneck, read-out b={diffeed_row['blocks'][0]}, t={diffeed_row['timesteps'][0]}): "
         f"**{100 * diffeed_row['top1']:.1f}%**") if diffeed_row else
        "- DifFeed: not run by `make demo` (it runs the backbone twice per image and step); `make demo-full` runs it",
    ]
    lines += [f"- floor, {name} (the same converged probe{'' if name == 'raw pixels' else ', same (b, t) and pool'}): "
              f"{100 * value:.1f}%" for name, value in floors.items()]
    lines += [
        "",
        "## Stage times (this machine)",
        "",
        *[f"- {name}: {seconds:.0f} s" for name, seconds in times.items()],
        "",
        "## Plots",
        "",
        *[f"![{p.stem}]({p.name})" for p in pngs],
        "",
        "## Every row of this run",
        "",
        markdown_table(table, columns=("head", "protocol", "backbone_id", "blocks", "timesteps", "pool", "l2", "lr",
                                       "k", "train_size", "test_size", "top1", "top5", "train_seconds")),
        "",
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
