"""``diffrep probe --live`` as a library call: a head trained through the live backbone, the official way.

The official code does not cache: every step it runs the frozen backbone on a fresh random
resized crop (scale 0.8-1.0) and flip of each image with fresh noise. The cache freezes one view
and one noise draw. This path trains any head (linear, MLP, CNN, attention, DifFormer) on the same
images the official way, so the two numbers can be compared; the test split is scored as the
cache scores it (view 0, the seeded noise). With ``finetune`` the backbone trains too, at its own
lr, and its tuned weights are written beside the checkpoint in the official layout.

``live_splits`` (shared with ``diffrep feedback``) turns a ``LiveSelection`` of a manifest dataset into
the two ``LiveImages`` sources: label fraction and per-class subsets drawn as the cache path draws them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

import fusion  # noqa: F401 - the full head registry: the difformer head trains live too
from extract.backbone.registry import create_backbone, family_of
from extract.errors import interrupted_saying
from extract.precision import resolve_device
from probe.live_images import LiveImages
from probe.errors import ProbeError
from probe.heads import HEADS, count_parameters, create_head, default_lr
from probe.live_head import LiveHead, default_precision, live_in_shapes
from probe.subsets import label_fraction_rows
from probe.train import BACKBONE_NAME, fit

from pipeline.datasets import build_index
from pipeline.evaluate import FitProtocol, fmt_keys
from pipeline.evaluate.probe import INTERRUPTED_UNRECORDED, TOKEN_HEADS, head_overrides
from pipeline.results import default_results_path, record_rows

__all__ = ["LiveProbeRequest", "LiveSelection", "live_splits", "run_live_probe", "LIVE_HEADS"]

LIVE_HEADS = ("linear", "mlp", "cnn", "attention", "difformer")


@dataclass(frozen=True)
class LiveProbeRequest:
    """What ``diffrep probe --live`` was asked (the cache-free twin of ``ProbeRequest``).

    Args:
        dataset, train_split, test_split, per_class, test_per_class, data_root: the images.
        blocks, timesteps, head, pool, hidden, channels, depth, dim: the head, as ``diffrep probe``.
        config_name, checkpoint, weight_seed: the backbone. cache_pool: blocks pooled to this side
            first, as the cache stores them (16), so the head sees what it would read from a cache.
        noise_seed: the test split's seeded noise (and the training noise without ``fresh_noise``).
        fresh_noise, augment: the official protocol's fresh noise and crop/flip every step.
        protocol: epochs, lr, solver (sgd/adam), batch, seed, label fraction. steps: stop after so many.
        finetune, backbone_lr: train the backbone too, at its own lr (official 1e-3).
        precision: autocast of the backbone (None: bf16 on GPUs, fp32 on the CPU).
        image_size: the model's input side in pixels (None: the configuration's).
        conditioning: SD's text conditioning: ``null-text`` (the empty prompt) or ``learnable`` (an embedding
            of the text encoder's shape, initialised to the null text, trained with the head).
    """

    dataset: str
    blocks: tuple[int, ...]
    timesteps: tuple[int, ...]
    head: str = "linear"
    config_name: str = "256x256_uncond"
    checkpoint: str | None = None
    weight_seed: int = 0
    train_split: str = "train"
    test_split: str = "test"
    per_class: int | None = None
    test_per_class: int | None = None
    data_root: str | None = None
    noise_seed: int = 0
    fresh_noise: bool = True
    augment: bool = True
    pool: int | None = None
    cache_pool: int = 16
    hidden: tuple[int, ...] | None = None
    channels: tuple[int, ...] | None = None
    depth: int | None = None
    dim: int | None = None
    protocol: FitProtocol = field(default_factory=lambda: FitProtocol(solver="sgd"))
    steps: int | None = None
    finetune: bool = False
    backbone_lr: float = 1e-3
    precision: str | None = None
    image_size: int | None = None
    conditioning: str = "null-text"
    device: str = "auto"
    decode_threads: int = 2
    checkpoint_dir: str | None = None
    resume: bool = False
    results_path: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class LiveSelection:
    """Which images a live run reads and how it draws them (the live twin of ``CacheSelection``).

    Args:
        dataset, train_split, test_split, data_root: the manifest dataset's splits and where they are.
        per_class, test_per_class: the first N images of every class of each split (None: all).
        noise_seed: the seeded noise (the test split's always; the training split's without ``fresh_noise``).
        fresh_noise, augment: new noise, and a random resized crop and flip, every training step.
        decode_threads: image-decoding threads ahead of the forward.
        label_fraction, seed: train on that share of every class, drawn with the seed (None: all).
    """

    dataset: str
    train_split: str = "train"
    test_split: str = "test"
    per_class: int | None = None
    test_per_class: int | None = None
    data_root: str | None = None
    noise_seed: int = 0
    fresh_noise: bool = False
    augment: bool = False
    decode_threads: int = 2
    label_fraction: float | None = None
    seed: int = 0

    @classmethod
    def of(cls, request, **given) -> "LiveSelection":
        """The selection a request makes: its fields of the same names, ``given`` winning."""
        return cls(**{f.name: given[f.name] if f.name in given else getattr(request, f.name) for f in fields(cls)})


def live_splits(selection: LiveSelection, image_size: int, timesteps, schedule,
                dry_run: bool = False, latent_shape: tuple[int, int, int] | None = None) -> tuple[LiveImages, LiveImages, int]:
    """(train, test, number of classes) as ``LiveImages``; the test split always uses the seeded noise, no augmentation.

    Args:
        selection: the images and how they are drawn. image_size: the backbone's input side.
        timesteps, schedule: the diffusion timesteps and noise schedule of the noisy forward.
        dry_run: list a packed dataset from its archive instead of unpacking it.
        latent_shape: a latent family's x0 shape (``LiveImages``): the batches carry images and noise.
    """
    s = selection
    splits = []
    for split, subset in ((s.train_split, s.per_class), (s.test_split, s.test_per_class)):
        index = build_index(s.dataset, split, root=s.data_root, per_class=subset, unpack=not dry_run)
        paths, labels = list(index.paths), np.asarray(index.labels, dtype=np.int64)
        ids = np.arange(len(paths))
        training = split == s.train_split and not splits
        if training and s.label_fraction is not None:
            rows = label_fraction_rows(torch.from_numpy(labels), s.label_fraction, s.seed)
            paths, labels, ids = [paths[r] for r in rows], labels[rows], ids[rows]
        splits.append(LiveImages(paths, labels, image_size, timesteps, schedule, noise_seed=s.noise_seed,
                                 fresh_noise=s.fresh_noise and training, augment=s.augment and training,
                                 decode_threads=s.decode_threads, image_ids=ids, latent_shape=latent_shape,
                                 noise_split=split))
        num_classes = index.num_classes
    return splits[0], splits[1], num_classes


def run_live_probe(request: LiveProbeRequest, announce: Callable[[dict], None] | None = None) -> dict:
    """Train the head through the live backbone, score the test split, record and return the results row.

    Raises:
        RunInterrupted: Ctrl-C, saying what was kept (``probe.train.fit`` names the epoch's checkpoint).
    """
    with interrupted_saying(INTERRUPTED_UNRECORDED):
        return _run_live_probe(request, announce)


def _run_live_probe(request: LiveProbeRequest, announce: Callable[[dict], None] | None) -> dict:
    fitting = request.protocol
    if request.head not in LIVE_HEADS:
        raise ProbeError(f"head {request.head!r} cannot train live: choose one of {', '.join(LIVE_HEADS)}")
    solver = fitting.solver or "sgd"
    if solver not in ("sgd", "adam"):
        raise ProbeError(f"--live trains by gradient steps: pass --solver sgd or adam (not {solver})")
    if fitting.lr is not None and len(fitting.lr) > 1:
        raise ProbeError("--live trains one head at a time: pass one --lr")
    device = resolve_device(request.device)
    precision = request.precision or default_precision(device)
    family = family_of(request.config_name)
    latent = family.inputs == "latent"
    if request.conditioning != "null-text" and not latent:
        raise ProbeError(f"{request.config_name} takes no text: leave out --conditioning (it is for Stable Diffusion)")
    if request.image_size is not None and not latent and request.image_size != family.image_size(request.config_name):
        raise ProbeError(f"{request.config_name} takes {family.image_size(request.config_name)} px images only: "
                         f"leave out --image-size")
    image_size = request.image_size or family.image_size(request.config_name)
    backbone = create_backbone(request.config_name, checkpoint=request.checkpoint,
                               weight_seed=None if request.checkpoint else request.weight_seed)
    if latent:
        backbone.image_size = image_size
    shapes = live_in_shapes(backbone, request.blocks, request.timesteps, request.cache_pool, request.config_name)
    schedule = family.schedule(request.config_name)
    selection = LiveSelection.of(request, label_fraction=fitting.label_fraction, seed=fitting.seed)
    train, test, num_classes = live_splits(selection, image_size, request.timesteps, schedule,
                                           latent_shape=family.input_shape(request.config_name, image_size) if latent else None)
    overrides = head_overrides(request)
    torch.manual_seed(fitting.seed)
    head = create_head(request.head, shapes, num_classes, **overrides)
    model = LiveHead(backbone, head, request.blocks, request.timesteps, request.cache_pool,
                     finetune=request.finetune, precision=precision, schedule=schedule if latent else None,
                     cond=backbone.null_text if request.conditioning == "learnable" else None)
    lr = fitting.lr[0] if fitting.lr else default_lr(request.head)
    backbone_id = family.backbone_id(request.config_name, request.checkpoint, request.weight_seed)
    identity = dict(dataset=request.dataset, train_split=request.train_split, test_split=request.test_split,
                    config=request.config_name, checkpoint=request.checkpoint, weight_seed=request.weight_seed,
                    noise_seed=request.noise_seed, fresh_noise=request.fresh_noise, augment=request.augment,
                    head=request.head, blocks=list(request.blocks), timesteps=list(request.timesteps),
                    cache_pool=request.cache_pool, options={k: list(v) if isinstance(v, tuple) else v
                                                            for k, v in sorted(overrides.items())},
                    per_class=request.per_class, test_per_class=request.test_per_class,
                    label_fraction=fitting.label_fraction, finetune=request.finetune, precision=precision,
                    train_images=train.num_images, test_images=test.num_images,
                    **({"image_size": image_size, "conditioning": request.conditioning} if latent else {}))
    checkpoint_dir = request.checkpoint_dir or str(
        Path(request.results_path or default_results_path()).parent / "checkpoints" /
        (f"{request.dataset}_{backbone_id}{'_learnable' if request.conditioning == 'learnable' else ''}_live_{request.head}_b{fmt_keys(request.blocks)}_t{fmt_keys(request.timesteps)}"
         f"{'_finetune' if request.finetune else ''}_{solver}_s{fitting.seed}"))
    config = fitting.train_config(solver, lr, backbone_lr=request.backbone_lr if request.finetune else None,
                                  steps=request.steps)
    result = fit(model, train, None, test, None, config, device=device, checkpoint_dir=checkpoint_dir,
                 resume=request.resume, identity=identity, progress=request.progress)
    head_pool = overrides.get("token_pool" if request.head in TOKEN_HEADS else "pool",
                              16 if request.head in TOKEN_HEADS else HEADS[request.head].defaults.get("pool"))
    row = dict(dataset=request.dataset, train_split=request.train_split, test_split=request.test_split,
               backbone_id=backbone_id, noise_seed=request.noise_seed, head=request.head,
               protocol="live", solver=solver, blocks=list(request.blocks), timesteps=list(request.timesteps),
               pool=int(head_pool or 0), cache_pool=request.cache_pool, train_size=train.num_images,
               test_size=test.num_images, parameters=count_parameters(model), epochs=result.epochs, lr=lr,
               batch_size=fitting.batch_size, seed=fitting.seed, heldout_size=0, label_fraction=fitting.label_fraction,
               fresh_noise=request.fresh_noise, augment=request.augment, finetune=request.finetune,
               top1=result.top1, top5=result.top5, train_seconds=result.train_seconds)
    record_rows([row], request.results_path, announce)
    if request.finetune:
        row["backbone_path"] = str(Path(checkpoint_dir) / BACKBONE_NAME)
    return row
