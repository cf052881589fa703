"""``diffrep feedback`` as a library call: DifFeed trained through the live backbone on a manifest dataset.

The images come from the manifest as extract reads them (same preprocessing, the same seeded
noise per (seed, image, t) unless fresh noise is asked for), decoded ahead on background threads;
``probe.train.fit`` trains the feedback layers and the head with a checkpoint every epoch and
resume; one results row records the method, strategy, read-out block and timestep. Pass 1 runs
live (a cache of the source blocks, unpooled, could replace it; not read yet).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from extract.configs import create_backbone, get_config
from extract.precision import resolve_device
from extract.schedule import get_schedule
from fusion.diffeed import DifFeed, default_readout, feedback_pairs
from fusion.live import LiveImages
from probe.errors import ProbeError
from probe.heads import count_parameters, create_head
from probe.train import fit

from .datasets import build_index
from .evaluation import record_rows
from .results import default_results_path

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
    dim: int | None = None
    depth: int | None = None
    epochs: int = 28
    solver: str = "sgd"
    lr: float = 1e-2
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
    """The model and the work: pairs, parameter counts, images and forwards."""

    request: FeedbackRequest
    model: DifFeed
    train: LiveImages
    test: LiveImages
    num_classes: int

    @property
    def forwards(self) -> int:
        """Backbone passes: two per training image per epoch, two per test image."""
        return 2 * (self.train.num_images * self.request.epochs + self.test.num_images)

    def describe(self) -> str:
        r, m = self.request, self.model
        pairs = ", ".join(f"{s}->{t}" for s, t in m.pairs)
        noise = "fresh noise every step" if r.fresh_noise else f"seeded noise (seed {r.noise_seed}, as the cache)"
        return "\n".join([
            f"feedback {r.dataset}: {self.train.num_images} train / {self.test.num_images} test images, "
            f"{self.num_classes} classes, t={r.timestep}, {noise}",
            f"  backbone {r.config_name} ({'checkpoint ' + r.checkpoint if r.checkpoint else f'random weights, seed {r.weight_seed}'}), "
            f"frozen; pass 1 runs live to b={max(m.sources)}, pass 2 to the read-out b={m.readout}",
            f"  strategy {r.strategy}: {pairs}",
            f"  feedback parameters {count_parameters(m.feedback):,}; head {count_parameters(m.head):,}; "
            f"trained in all {count_parameters(m):,}",
            f"  {r.epochs} epochs of {r.solver} at lr {r.lr:g}, batch {r.batch_size}: {self.forwards:,} backbone passes",
        ])


def plan_feedback(request: FeedbackRequest, dry_run: bool = False) -> FeedbackPlan:
    """Index the images, build backbone + feedback + head; nothing runs yet (what ``--dry-run`` prints).

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
    splits = []
    for split, per_class in ((request.train_split, request.per_class), (request.test_split, request.test_per_class)):
        index = build_index(request.dataset, split, root=request.data_root, per_class=per_class, unpack=not dry_run)
        splits.append(LiveImages(index.paths, index.labels, cfg.image_size, request.timestep, schedule,
                                 noise_seed=request.noise_seed, fresh_noise=request.fresh_noise and split == request.train_split,
                                 decode_threads=request.decode_threads))
        num_classes = index.num_classes
    overrides = {k: v for k, v in (("dim", request.dim), ("depth", request.depth)) if v is not None}
    torch.manual_seed(request.seed)
    head = create_head("attention", {(readout, request.timestep): (shape[0], shape[1], shape[1])}, num_classes, **overrides)
    model = DifFeed(backbone, head, request.strategy, readout)
    return FeedbackPlan(request, model, splits[0], splits[1], num_classes)


def run_feedback(plan: FeedbackPlan) -> dict:
    """Train DifFeed by the protocol, score the test split, record and return the results row."""
    r = plan.request
    device = resolve_device(r.device)
    model = plan.model
    identity = dict(dataset=r.dataset, train_split=r.train_split, test_split=r.test_split, config=r.config_name,
                    checkpoint=r.checkpoint, weight_seed=r.weight_seed, noise_seed=r.noise_seed,
                    fresh_noise=r.fresh_noise, strategy=r.strategy, readout=model.readout, timestep=r.timestep,
                    dim=r.dim, depth=r.depth, per_class=r.per_class, test_per_class=r.test_per_class)
    checkpoint_dir = r.checkpoint_dir or str(Path(r.results_path or default_results_path()).parent / "checkpoints" /
                                             f"{r.dataset}_diffeed_{r.strategy}_b{model.readout}_t{r.timestep}_s{r.seed}")
    result = fit(_Trainable(model), plan.train, None, plan.test, None, epochs=r.epochs, lr=r.lr,
                 optimizer=r.solver, batch_size=r.batch_size, seed=r.seed, device=device,
                 checkpoint_dir=checkpoint_dir, resume=r.resume, identity=identity, progress=r.progress)
    row = dict(dataset=r.dataset, train_split=r.train_split, test_split=r.test_split,
               backbone_id=f"{r.config_name}-{'checkpoint' if r.checkpoint else f'random{r.weight_seed}'}",
               noise_seed=r.noise_seed, head="diffeed", protocol="paper", solver=r.solver, strategy=r.strategy,
               blocks=[model.readout], timesteps=[r.timestep], pool=int(model.head.config.token_pool),
               train_size=plan.train.num_images, test_size=plan.test.num_images, parameters=count_parameters(model),
               epochs=r.epochs, lr=r.lr, batch_size=r.batch_size, seed=r.seed, heldout_size=0,
               top1=result.top1, top5=result.top5, train_seconds=result.train_seconds)
    record_rows([row], r.results_path)
    return row


class _Trainable(torch.nn.Module):
    """DifFeed for ``fit``: its state dict (checkpoints) holds only what trains, not the frozen backbone."""

    def __init__(self, model: DifFeed):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model(batch)

    def state_dict(self, *args, **kwargs):
        state = self.model.state_dict(*args, **kwargs)
        return {k: v for k, v in state.items() if not k.startswith("backbone.")}

    def load_state_dict(self, state, strict: bool = True):
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        wrong = unexpected + [k for k in missing if not k.startswith("backbone.")]
        if wrong:
            raise RuntimeError(f"DifFeed checkpoint does not fit: {wrong[:4]}")  # fit turns this into one line
        return missing, unexpected
