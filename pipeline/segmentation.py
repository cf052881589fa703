"""``diffrep segment``: semantic segmentation on unpooled cached block maps, from dataset to mIoU in one call.

``run_segment(request)`` lists the dense dataset's splits (``pipeline.dense_data``), extracts whatever
the cache lacks through the extract stage itself (``--pool none``: float16 maps at their native size,
the same shards, resume, integrity and Dask runner; a dense dataset hands its own image index to
``fill_caches``), trains a per-pixel or UperNet-style head on the train split streamed batch by
batch (``probe.dense_train``), scores the test split at each label's own resolution, appends one
results row and draws the figures. Labels are read per batch from the label maps and resized once,
nearest, with their image's geometry (``extract.inputs.dense_geometry``); a split's labels are held
in RAM as uint8 at the input side when they take under an eighth of the RAM cap.
``raw_pixels`` trains the same head on the input pixels instead of a backbone: the floor.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from extract.backbone.configs import get_config
from extract.cache import FeatureCache
from extract.cache.reader import DEFAULT_RAM_CAP_BYTES
from extract.inputs.dense_geometry import label_to_input, source_box
from extract.inputs.images import load_pixels
from probe.dense_heads import create_dense_head
from probe.dense_train import DenseSource, fit_dense, score_dense
from probe.heads import count_parameters
from probe.train import TrainConfig

from pipeline.datasets import ImageIndex
from pipeline.dense_data import DenseIndex, build_dense_index, get_dense_dataset
from pipeline.errors import DatasetError
from pipeline.extraction import ExtractionRequest
from pipeline.extraction_run import fill_caches
from pipeline.results import record_rows

__all__ = ["SegmentRequest", "SegmentResult", "run_segment", "image_index_of", "extract_dense"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentRequest:
    """What ``diffrep segment`` was asked for (plain values, no click).

    Args:
        dataset: a ``segmentation:`` entry of the manifest. blocks, timesteps: the maps the head reads.
        head: ``pixel`` or ``upernet``; hidden, ensemble: the per-pixel head's MLP and ensemble; channels: UperNet width.
        config_name, checkpoint, weight_seed: the backbone (random weights without a checkpoint).
        raw_pixels: train on the input pixels instead (no backbone, no cache).
        image_size: the backbone's input side (None: the configuration's); limit / test_limit: images per split.
        epochs, lr, optimizer, batch_size, seed: the head's training (StepLR 7, 0.1 as probe's protocol).
        live: run the backbone every step instead of reading the cache (``pipeline.dense_live``), with
            ``augment`` (crop and flip shared by image and label) and ``fresh_noise``.
        train_split, test_split: None picks the dataset's first and last splits.
    """

    dataset: str
    blocks: tuple[int, ...] = ()
    timesteps: tuple[int, ...] = ()
    head: str = "pixel"
    cache_dir: str = ""
    config_name: str = "256x256_uncond"
    checkpoint: str | None = None
    weight_seed: int = 0
    raw_pixels: bool = False
    image_size: int | None = None
    data_root: str | None = None
    train_split: str | None = None
    test_split: str | None = None
    limit: int | None = None
    test_limit: int | None = None
    hidden: tuple[int, ...] | None = None
    ensemble: int | None = None
    channels: int | None = None
    epochs: int = 10
    lr: float = 1e-3
    optimizer: str = "adam"
    batch_size: int = 8
    seed: int = 0
    device: str = "auto"
    noise_seed: int = 0
    shard_size: int = 64
    extract_batch_size: int = 16
    synchronous: bool = False
    scheduler: str | None = None
    ram_cap_gb: float | None = None
    results_path: str | None = None
    checkpoint_dir: str | None = None
    resume: bool = False
    progress: bool = True
    figures: int = 4
    out_dir: str = "results/segment"
    live: bool = False
    augment: bool = True
    fresh_noise: bool = True


@dataclass
class SegmentResult:
    """The results row, per-class IoU by name, and the files written."""

    row: dict
    class_iou: dict[str, float]
    written: list[str] = field(default_factory=list)


def image_index_of(index: DenseIndex) -> ImageIndex:
    """The images of a dense split as the extract stage lists a dataset (label: the image's own class, for row mixing)."""
    root = os.path.commonpath(index.image_paths) if len(index) > 1 else os.path.dirname(index.image_paths[0])
    return ImageIndex(dataset=index.dataset, split=index.split, root=root, paths=list(index.image_paths),
                      labels=index.image_classes, class_names=list(index.image_class_names))


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _labels_reader(index: DenseIndex, rows: np.ndarray, size: int, cap: int) -> Callable[[int, int], np.ndarray]:
    """labels(start, stop) for cache rows: each row's label map resized and cropped once with its image's geometry."""
    def one(row: int) -> np.ndarray:
        return label_to_input(index.read_label(int(rows[row])), size)

    if len(rows) * size * size <= cap // 8:
        held = np.stack([one(r) for r in range(len(rows))])
        return lambda start, stop: held[start:stop]
    return lambda start, stop: np.stack([one(r) for r in range(start, stop)])


def _truth(index: DenseIndex, rows: np.ndarray, size: int):
    def truth(row: int):
        label = index.read_label(int(rows[row]))
        return label, source_box(label.shape[1], label.shape[0], size)
    return truth


def _cache_source(cache: FeatureCache, keys: list[tuple[int, int]], cap: int) -> DenseSource:
    """Maps of every key: whole arrays in RAM when together they fit under the cap, else read a batch at a time."""
    need = sum(int(np.prod(cache.shape(b, t))) * 2 for b, t in keys)
    readers = {}
    for b, t in keys:
        if need <= cap:
            array = cache.load(b, t)
            readers[(b, t)] = lambda start, stop, array=array: array[start:stop]
        else:
            readers[(b, t)] = cache.row_reader(b, t)
    return DenseSource(readers=readers, num_rows=cache.num_images, valid=cache.valid)


def _pixel_source(index: DenseIndex, size: int, cap: int) -> DenseSource:
    """The input pixels as the one map ``(0, 0)``, ``(n, 3, S, S)`` in [-1, 1]; decoded once when under an eighth of the cap."""
    def decode(start: int, stop: int) -> np.ndarray:
        pixels = np.stack([load_pixels(index.image_paths[r], size) for r in range(start, stop)])
        return (pixels.astype(np.float32) / 127.5 - 1.0).astype(np.float16)

    if len(index) * 3 * size * size * 2 <= cap // 8:
        held = decode(0, len(index))
        return DenseSource(readers={(0, 0): lambda start, stop: held[start:stop]}, num_rows=len(index))
    return DenseSource(readers={(0, 0): decode}, num_rows=len(index))


def _rows_of(cache: FeatureCache, index: DenseIndex) -> np.ndarray:
    """The dense index row of every cache row, matched by file stem (cache rows are in a seeded order)."""
    where = {stem: row for row, stem in enumerate(index.stems)}
    try:
        return np.array([where[os.path.splitext(os.path.basename(str(p)))[0]] for p in cache.paths], dtype=np.int64)
    except KeyError as exc:
        raise DatasetError(f"cache {cache.path} holds image {exc.args[0]} that split {index.split} of {index.dataset} "
                           f"does not list: extract into a new --cache-dir") from None


def extract_dense(request: SegmentRequest, indexes: dict[str, DenseIndex], size: int, echo,
                  limits: dict[str, int | None] | None = None) -> dict[str, FeatureCache]:
    """Fill the unpooled caches of every split in ``indexes`` (the extract stage itself), and open them for reading.

    ``limits``: the ``--limit`` each split's index was cut to, recorded as the cache's subset.
    """
    requests = [ExtractionRequest(
        dataset=request.dataset, split=split, timesteps=tuple(request.timesteps), blocks=tuple(request.blocks),
        cache_dir=request.cache_dir, pool=0, config_name=request.config_name, checkpoint=request.checkpoint,
        weight_seed=request.weight_seed, noise_seed=request.noise_seed, shard_size=request.shard_size,
        batch_size=request.extract_batch_size, device=request.device, image_size=size, limit=(limits or {}).get(split),
        precision="bf16" if _device(request.device).startswith("cuda") else "fp32") for split in indexes]
    run = fill_caches(requests, scheduler=request.scheduler, synchronous=request.synchronous, progress=request.progress,
                      echo=echo, indexes={(request.dataset, s): image_index_of(i) for s, i in indexes.items()})
    cap = int(request.ram_cap_gb * (1 << 30)) if request.ram_cap_gb else DEFAULT_RAM_CAP_BYTES
    return {split: FeatureCache(plan.path, ram_cap_bytes=cap) for split, plan in zip(indexes, run.plans)}


def _live_sources(request: SegmentRequest, train_index: DenseIndex, test_index: DenseIndex, size: int, cap: int):
    """Train and test sources through the live backbone, its id, and the maps' shapes at ``size``."""
    import torch

    from extract.backbone.checkpoint import file_sha256
    from extract.backbone.identity import backbone_id as weights_id
    from extract.job import build_backbone
    from extract.schedule import get_schedule
    from pipeline.dense_live import LiveDenseSource

    config = get_config(request.config_name)
    device = torch.device(_device(request.device))
    model = build_backbone(config.name, request.checkpoint, None if request.checkpoint else request.weight_seed)
    model = model.to(device).eval().requires_grad_(False)
    schedule = get_schedule(config.noise_schedule, config.diffusion_steps)
    sides = model.block_shapes()
    shapes = {(b, t): (sides[b][0], size // (config.image_size // sides[b][1]), size // (config.image_size // sides[b][1]))
              for b in request.blocks for t in request.timesteps}
    common = dict(model=model, blocks=request.blocks, timesteps=request.timesteps, schedule=schedule, size=size,
                  device=device, noise_seed=request.noise_seed)
    train = LiveDenseSource(paths=train_index.image_paths, labels=_labels_reader(train_index, np.arange(len(train_index)), size, cap),
                            augment=request.augment, fresh_noise=request.fresh_noise, **common)
    test = LiveDenseSource(paths=test_index.image_paths, labels=None, augment=False, fresh_noise=False,
                           noise_split=test_index.split, **common)
    sha = file_sha256(request.checkpoint) if request.checkpoint else ""
    return train, test, weights_id(config.name, weight_seed=None if sha else request.weight_seed, sha256=sha), shapes


def run_segment(request: SegmentRequest, echo: Callable[[str], None] = log.info,
                announce: Callable[[dict], None] | None = None) -> SegmentResult:
    """Extract what is missing, train the head, score the test split, append the row, draw the figures.

    Raises:
        DatasetError, ConfigError, CacheError, ProbeError: one line each, before or during the run.
    """
    spec = get_dense_dataset(request.dataset, data_root=request.data_root)
    names = list(spec.splits)
    train_split = request.train_split or names[0]
    test_split = request.test_split or names[-1]
    size = int(request.image_size or get_config(request.config_name).image_size)
    train_index = build_dense_index(request.dataset, train_split, data_root=request.data_root, limit=request.limit)
    test_index = build_dense_index(request.dataset, test_split, data_root=request.data_root, limit=request.test_limit)
    cap = int(request.ram_cap_gb * (1 << 30)) if request.ram_cap_gb else DEFAULT_RAM_CAP_BYTES
    keys = [(b, t) for b in request.blocks for t in request.timesteps]
    if request.live and not request.raw_pixels:
        if not keys:
            raise DatasetError("segment --live needs blocks and timesteps (-b, -t)")
        train, test, backbone_id, shapes = _live_sources(request, train_index, test_index, size, cap)
        train_rows, test_rows = np.arange(len(train_index)), np.arange(len(test_index))
    elif request.raw_pixels:
        train_rows, test_rows = np.arange(len(train_index)), np.arange(len(test_index))
        train, test = _pixel_source(train_index, size, cap), _pixel_source(test_index, size, cap)
        backbone_id, keys = "raw-pixels", [(0, 0)]
        shapes = {(0, 0): (3, size, size)}
    else:
        if not keys:
            raise DatasetError("segment needs blocks and timesteps (-b, -t), or --raw-pixels")
        caches = extract_dense(request, {train_split: train_index, test_split: test_index}, size, echo,
                               limits={train_split: request.limit, test_split: request.test_limit})
        train_cache, test_cache = caches[train_split], caches[test_split]
        train_rows, test_rows = _rows_of(train_cache, train_index), _rows_of(test_cache, test_index)
        train, test = _cache_source(train_cache, keys, cap), _cache_source(test_cache, keys, cap)
        backbone_id = train_cache.spec.backbone_id
        shapes = {key: tuple(train_cache.shape(*key)[1:]) for key in keys}
    if train.labels is None:
        train.labels = _labels_reader(train_index, train_rows, size, cap)
    options = {"hidden": request.hidden, "ensemble": request.ensemble} if request.head == "pixel" else {"channels": request.channels}
    import torch

    torch.manual_seed(request.seed)
    head = create_dense_head(request.head, shapes, train_index.num_classes, **options)
    config = TrainConfig(epochs=request.epochs, lr=request.lr, optimizer=request.optimizer, batch_size=request.batch_size,
                         seed=request.seed)
    identity = {"dataset": request.dataset, "backbone": backbone_id, "blocks": list(request.blocks),
                "timesteps": list(request.timesteps), "head": request.head, "image_size": size,
                "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}}
    device = _device(request.device)
    working = cap // 4  # a step's float32 working set; the rest of the cap: torch itself and the batch read
    fitted = fit_dense(head, train, config, device=device, checkpoint_dir=request.checkpoint_dir, resume=request.resume,
                       identity=identity, progress=request.progress, working_bytes=working)
    scores, kept = score_dense(head, test, test_index.num_classes, _truth(test_index, test_rows, size),
                               batch_size=max(request.batch_size, 16), device=device, keep=request.figures,
                               working_bytes=working)
    class_iou = {name: float(v) for name, v, present in zip(test_index.class_names, scores.iou, scores.present) if present}
    row = {
        "dataset": request.dataset, "train_size": len(train_index), "test_size": len(test_index), "backbone_id": backbone_id,
        "head": request.head, "protocol": "live" if request.live else "dense",
        "fresh_noise": request.fresh_noise if request.live else None, "augment": request.augment if request.live else None, "solver": request.optimizer, "train_split": train_split,
        "test_split": test_split, "noise_seed": request.noise_seed, "cache_pool": 0, "pool": 0,
        "blocks": "raw" if request.raw_pixels else list(request.blocks),
        "timesteps": "raw" if request.raw_pixels else list(request.timesteps),
        "parameters": count_parameters(head), "epochs": request.epochs, "lr": request.lr, "batch_size": request.batch_size,
        "seed": request.seed, "top1": scores.miou, "train_seconds": fitted.train_seconds, "task": "segmentation",
        "metric": "miou", "image_size": size, "pixel_accuracy": scores.pixel_accuracy, "class_iou": json.dumps(class_iou),
        "pixels_per_second": fitted.pixels_per_second,
    }
    record_rows([row], request.results_path, announce)
    written = []
    if request.figures and kept:
        from pipeline.seg_figures import draw_predictions

        tag = f"{request.dataset}_{request.head}_{'raw' if request.raw_pixels else backbone_id}_b{'-'.join(map(str, request.blocks))}"
        path = Path(request.out_dir) / f"{tag}.png"
        items = [(test_index.image_paths[int(test_rows[r])], test_index.read_label(int(test_rows[r])), pred) for r, pred in kept.items()]
        written.append(str(draw_predictions(items, test_index.class_names, size, path)))
    return SegmentResult(row=row, class_iou=class_iou, written=written)
