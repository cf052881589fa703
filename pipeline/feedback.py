"""``diffrep feedback`` as a library call: DifFeed trained through the live backbone on a manifest dataset.

The images come from the manifest as extract reads them (same preprocessing, the same seeded
noise per (seed, image, t) unless fresh noise is asked for), decoded ahead on background threads;
``probe.train.fit`` trains the feedback layers and the head (and with ``finetune`` the backbone's
pass 2, at its own lr) with a checkpoint every epoch and resume; one results row records the
method, strategy, read-out block and timestep. Pass 1 is read from the feature cache when it
holds every source block unpooled for this backbone and noise seed (``fusion.pass1_cache``);
otherwise it runs live, and the plan says which.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from extract.backbone.configs import get_config
from extract.backbone.identity import backbone_id
from extract.backbone.registry import create_backbone
from extract.errors import interrupted_saying
from extract.precision import resolve_device
from extract.schedule import get_schedule
from fusion.diffeed import DifFeed, default_readout, feedback_pairs
from probe.live_images import LiveImages
from fusion.pass1_cache import CachedPass1, find_cached_pass1
from probe.errors import ProbeError
from probe.heads import count_parameters, create_head
from probe.live_head import default_precision
from probe.train import BACKBONE_NAME, TrainConfig, fit

from pipeline.advice import advised
from pipeline.evaluate.probe import INTERRUPTED_UNRECORDED
from pipeline.live_probe import LiveSelection, live_splits
from pipeline.results import default_results_path, record_rows

__all__ = ["FeedbackRequest", "FeedbackPlan", "plan_feedback", "run_feedback"]


@dataclass(frozen=True)
class FeedbackRequest:
    """What ``diffrep feedback`` was asked."""

    dataset: str
    timestep: int = 150
    strategy: str = "bottleneck"
    readout: int | None = None
    config_name: str = "256x256_uncond"
    checkpoint: str | None = None
    weight_seed: int = 0
    train_split: str = "train"
    test_split: str = "test"
    per_class: int | None = None
    test_per_class: int | None = None
    data_root: str | None = None
    noise_seed: int = 0
    fresh_noise: bool = False
    augment: bool = False
    label_fraction: float | None = None
    cache_dir: str | None = None
    pass1: str = "auto"  # auto: the cache when it can give pass 1, else live; cache: refuse otherwise; live: always
    dim: int | None = None
    depth: int | None = None
    pool: int | None = None
    epochs: int = 28
    steps: int | None = None
    solver: str = "sgd"
    lr: float = 1e-2
    finetune: bool = False
    backbone_lr: float = 1e-3
    precision: str | None = None
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"
    decode_threads: int = 2
    checkpoint_dir: str | None = None
    resume: bool = False
    results_path: str | None = None
    progress: bool = True


@dataclass
class FeedbackPlan:
    """The model and the work: pairs, parameter counts, images, forwards and where pass 1 comes from."""

    request: FeedbackRequest
    model: DifFeed
    train: LiveImages
    test: LiveImages
    num_classes: int
    pass1: tuple[CachedPass1, CachedPass1] | None = None

    @property
    def epochs(self) -> int:
        r = self.request
        per_epoch = -(-self.train.num_images // r.batch_size)
        return r.epochs if r.steps is None else -(-r.steps // per_epoch)

    @property
    def forwards(self) -> int:
        """Backbone passes: two per training image per epoch and per test image, less those the cache gives."""
        r = self.request
        seen = self.train.num_images * r.epochs if r.steps is None else min(r.steps * r.batch_size,
                                                                             self.train.num_images * self.epochs)
        cached = self.pass1 or (None, None)
        return seen * (1 if cached[0] and cached[0].features is not None else 2) + \
            self.test.num_images * (1 if cached[1] and cached[1].features is not None else 2)

    def describe(self) -> str:
        r, m = self.request, self.model
        pairs = ", ".join(f"{s}->{t}" for s, t in m.pairs)
        noise = "fresh noise every step" if r.fresh_noise else f"seeded noise (seed {r.noise_seed}, as the cache)"
        view = "random resized crop + flip every step" if r.augment else "the centre crop (as the cache)"
        where = [f"  pass 1 ({split}) {p.reason}" for split, p in zip(("train", "test"), self.pass1 or ()) if p]
        steps = f"{r.steps:,} steps ({self.epochs} epochs)" if r.steps else f"{r.epochs} epochs"
        return "\n".join([
            f"feedback {r.dataset}: {self.train.num_images} train / {self.test.num_images} test images, "
            f"{self.num_classes} classes, t={r.timestep}, {noise}, {view}",
            f"  backbone {r.config_name} ({'checkpoint ' + r.checkpoint if r.checkpoint else f'random weights, seed {r.weight_seed}'}), "
            f"{'fine-tuned at lr ' + format(r.backbone_lr, 'g') + ' (pass 2)' if r.finetune else 'frozen'}; "
            f"pass 1 to b={max(m.sources)}, pass 2 to the read-out b={m.readout}",
            *where,
            f"  strategy {r.strategy}: {pairs}",
            f"  feedback parameters {count_parameters(m.feedback):,}; head {count_parameters(m.head):,}; "
            f"trained in all {count_parameters(m):,}",
            f"  {steps} of {r.solver} at lr {r.lr:g}, batch {r.batch_size}: {self.forwards:,} backbone passes",
        ])


def _backbone_id(request: FeedbackRequest) -> str:
    return backbone_id(request.config_name, request.checkpoint, request.weight_seed)


def plan_feedback(request: FeedbackRequest, dry_run: bool = False) -> FeedbackPlan:
    """Index the images, build backbone + feedback + head, find pass 1 in the cache; nothing trains yet.

    With ``dry_run`` nothing is written either: a dataset still packed is listed from its archive.
    """
    cfg = get_config(request.config_name)
    backbone = create_backbone(request.config_name, checkpoint=request.checkpoint, weight_seed=request.weight_seed)
    readout = request.readout if request.readout is not None else default_readout(backbone)
    feedback_pairs(backbone, request.strategy)  # an unknown strategy fails before any image is read
    if not 1 <= readout <= backbone.num_blocks:
        raise ProbeError(f"read-out block {readout} is out of range for {request.config_name}: "
                         f"valid blocks are 1..{backbone.num_blocks}")
    shape = backbone.block_shapes()[readout]
    DifFeed(backbone, torch.nn.Identity(), request.strategy, readout)  # pairs and read-out checked before any image
    schedule = get_schedule(cfg.noise_schedule, cfg.diffusion_steps)
    train, test, num_classes = live_splits(LiveSelection.of(request), cfg.image_size, request.timestep, schedule,
                                           dry_run=dry_run)
    overrides = {k: v for k, v in (("dim", request.dim), ("depth", request.depth), ("token_pool", request.pool))
                 if v is not None}
    torch.manual_seed(request.seed)
    head = create_head("attention", {(readout, request.timestep): (shape[0], shape[1], shape[1])}, num_classes, **overrides)
    device = resolve_device(request.device)
    model = DifFeed(backbone, head, request.strategy, readout, finetune=request.finetune,
                    precision=request.precision or default_precision(device))
    if request.pass1 not in ("auto", "cache", "live"):
        raise ProbeError(f"--pass1 {request.pass1!r} is unknown: choose auto, cache or live")
    pass1 = None
    if request.pass1 == "live":
        pass1 = (CachedPass1(None, None, "runs live (--pass1 live)"),) * 2
    elif not dry_run or request.cache_dir:
        pass1 = tuple(_pass1(request, model, source, split) for source, split in
                      ((train, request.train_split), (test, request.test_split)))
        refused = [p.reason for p in pass1 if p.features is None]
        if request.pass1 == "cache" and refused:
            why = refused[0].removeprefix("runs live (").removesuffix(")")
            raise ProbeError(f"--pass1 cache: pass 1 cannot come from the cache: {why}; pass --pass1 auto to run it live")
    return FeedbackPlan(request, model, train, test, num_classes, pass1)


def _pass1(request: FeedbackRequest, model: DifFeed, source: LiveImages, split: str) -> CachedPass1:
    """Pass 1 of one split from the cache (the live source then carries it and the cache's noise ids), or why not."""
    if source.fresh_noise or source.augment:
        return CachedPass1(None, None, "runs live (fresh noise or augmentation: a new pass 1 every step)")
    sides = {b: side for b, (_, side) in model.backbone.block_shapes().items()}
    found = find_cached_pass1(request.cache_dir, request.dataset, split, _backbone_id(request), request.noise_seed,
                              model.sources, request.timestep, sides, source.paths)
    if found.missing is not None:  # the exact command that adds the missing source arrays to that cache
        found.reason = f"runs live ({advised(found.missing)})"
    if found.features is not None:
        source.cached = found.features
        source.image_ids = found.image_ids
    return found


def run_feedback(plan: FeedbackPlan, announce: Callable[[dict], None] | None = None) -> dict:
    """Train DifFeed by the protocol, score the test split, record and return the results row.

    Raises:
        RunInterrupted: Ctrl-C, saying what was kept (``probe.train.fit`` names the epoch's checkpoint).
    """
    with interrupted_saying(INTERRUPTED_UNRECORDED):
        return _run_feedback(plan, announce)


def _run_feedback(plan: FeedbackPlan, announce: Callable[[dict], None] | None) -> dict:
    r = plan.request
    device = resolve_device(r.device)
    model = plan.model
    from_cache = bool(plan.pass1 and plan.pass1[0].features is not None)
    identity = dict(dataset=r.dataset, train_split=r.train_split, test_split=r.test_split, config=r.config_name,
                    checkpoint=r.checkpoint, weight_seed=r.weight_seed, noise_seed=r.noise_seed,
                    fresh_noise=r.fresh_noise, augment=r.augment, strategy=r.strategy, readout=model.readout,
                    timestep=r.timestep, dim=r.dim, depth=r.depth, pool=r.pool, per_class=r.per_class,
                    test_per_class=r.test_per_class, label_fraction=r.label_fraction, finetune=r.finetune,
                    precision=model.precision, train_images=plan.train.num_images, test_images=plan.test.num_images)
    checkpoint_dir = r.checkpoint_dir or str(Path(r.results_path or default_results_path()).parent / "checkpoints" /
                                             f"{r.dataset}_diffeed_{r.strategy}_b{model.readout}_t{r.timestep}"
                                             f"{'_finetune' if r.finetune else ''}_s{r.seed}")
    config = TrainConfig(epochs=r.epochs, lr=r.lr, optimizer=r.solver, batch_size=r.batch_size, seed=r.seed,
                         backbone_lr=r.backbone_lr if r.finetune else None, steps=r.steps)
    result = fit(model, plan.train, None, plan.test, None, config, device=device, checkpoint_dir=checkpoint_dir,
                 resume=r.resume, identity=identity, progress=r.progress)
    row = dict(dataset=r.dataset, train_split=r.train_split, test_split=r.test_split,
               backbone_id=_backbone_id(r),
               noise_seed=r.noise_seed, head="diffeed", protocol="live", solver=r.solver, strategy=r.strategy,
               blocks=[model.readout], timesteps=[r.timestep], pool=int(model.head.config.token_pool),
               train_size=plan.train.num_images, test_size=plan.test.num_images, parameters=count_parameters(model),
               epochs=result.epochs, lr=r.lr, batch_size=r.batch_size, seed=r.seed, heldout_size=0,
               label_fraction=r.label_fraction, fresh_noise=r.fresh_noise, augment=r.augment, finetune=r.finetune,
               top1=result.top1, top5=result.top5, train_seconds=result.train_seconds)
    record_rows([row], r.results_path, announce)
    row["pass1_from_cache"] = from_cache
    if r.finetune:
        row["backbone_path"] = str(Path(checkpoint_dir) / BACKBONE_NAME)
    return row
