"""Evaluation runs on cached features: one probe, kNN, CKA matrices, and (b, t, pool) sweeps.

Each run takes one request object (what the user asked, as ``ExtractionRequest`` does for
extraction), opens the train/test caches written by ``diffrep extract``, checks that they can be
compared, calls the probe library, records its rows in the results table and returns them.
Nothing here knows click.

Linear probes are measured two ways:

- ``converged`` (default, ``solver="lbfgs"``): standardised features, multinomial logistic
  regression solved to its optimum, L2 weight chosen on a held-out part of the train split
  (``probe.logistic``). It measures the features whatever the dataset size.
- ``paper`` (``solver="sgd"|"adam"``): the official code's 28 epochs with StepLR(7, 0.1); several
  learning rates train in one pass (``probe.grid.HeadGrid``) and the best on the held-out part is
  scored. On small datasets it stops short of the optimum: that is why it is not the default.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from extract.cache import FeatureCache
from extract.errors import CacheError
from extract.precision import resolve_device
from fusion.difformer import DifFormer  # noqa: F401 - registers the "difformer" head
from probe.attention_head import AttentionHeadConfig
from probe.cka import cka_matrix
from probe.errors import ProbeError
from probe.features import (
    StreamedFeatures, feature_bytes, in_shapes, iter_feature_batches, load_features, open_split, resolve_backbone_id,
)
from probe.grid import HeadGrid
from probe.heads import HEADS, count_parameters, create_head, default_lr
from probe.knn import knn_classify
from probe.logistic import DEFAULT_L2_GRID, Standardizer, converged_linear_probe
from probe.subsets import balanced_rows, heldout_split, label_fraction_rows
from probe.train import fit
from probe.views import take_rows

from pipeline.errors import DatasetError, ResultsError
from pipeline.manifest import get_dataset
from pipeline.report import markdown_table, plot_cka_heatmap, plot_sweep_heatmaps
from pipeline.results import append_results, default_results_path, results_table

__all__ = [
    "CacheSelection", "FitProtocol", "ProbeRequest", "KnnRequest", "CkaRequest", "SweepRequest",
    "run_probe", "run_knn", "run_cka", "run_sweep", "record_rows", "fmt_keys", "SOLVERS",
]

log = logging.getLogger(__name__)

Key = tuple[int, int]
SOLVERS = ("lbfgs", "sgd", "adam")
_TOKEN_HEADS = ("attention", "difformer")  # heads whose --pool is the token grid

# Spec fields a train and a test cache may differ in; every other one changes the numbers.
_PER_SPLIT_FIELDS = ("split", "num_images", "subset", "shard_size", "pool", "flip", "noise_draws")


@dataclass(frozen=True)
class CacheSelection:
    """Which cached features a run reads: the dataset's train and test caches of one backbone.

    Args:
        dataset: manifest name. cache_dir: cache root. config_name / backbone_id: which backbone's
            cache (the id wins; without it, the one cache of the configuration).
        train_split, test_split: splits to train on and to score. allow_same_split: permit scoring
            on the training split. results_path: results table (None: the default one).
        ram_cap_gb: most RAM one array may take when read whole (None: the cache's default).
    """

    dataset: str
    cache_dir: str
    config_name: str = "256x256_uncond"
    backbone_id: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    allow_same_split: bool = False
    results_path: str | None = None
    ram_cap_gb: float | None = None


@dataclass(frozen=True)
class FitProtocol:
    """How a head is fitted, shared by ``diffrep probe``, ``sweep`` and ``fuse``.

    Args:
        solver: ``lbfgs`` (the converged linear probe), ``sgd`` or ``adam`` (the paper's protocol);
            None: lbfgs for the linear head, sgd for the others.
        epochs, batch_size: of sgd/adam. lr: one or several learning rates (several: a one-pass grid
            chosen on the held-out rows; None: the head's default). l2: the converged probe's L2 grid.
        heldout_fraction: share of every class held out to choose l2 / lr.
        label_fraction: train on this share of every class (None: all). seed: draws, init, batch order.
        views: sgd/adam train on every view the cache stores (noise draws, flips), one per image per
            epoch, seeded; False (or the converged probe, or streaming) reads view 0 only.
    """

    solver: str | None = None
    epochs: int = 28
    lr: tuple[float, ...] | None = None
    l2: tuple[float, ...] = DEFAULT_L2_GRID
    heldout_fraction: float = 0.2
    label_fraction: float | None = None
    batch_size: int = 256
    seed: int = 0
    views: bool = True


@dataclass(frozen=True)
class ProbeRequest:
    """One head on (b, t) arrays, fitted by ``protocol``."""

    cache: CacheSelection
    blocks: tuple[int, ...]
    timesteps: tuple[int, ...]
    head: str = "linear"
    solver: str | None = None
    pool: int | None = None
    hidden: tuple[int, ...] | None = None
    channels: tuple[int, ...] | None = None
    depth: int | None = None
    dim: int | None = None
    protocol: FitProtocol = FitProtocol()
    device: str = "auto"
    checkpoint_dir: str | None = None
    resume: bool = False
    progress: bool = True
    stream: bool = False


@dataclass(frozen=True)
class KnnRequest:
    """Weighted kNN of the test split against the train split at every k."""

    cache: CacheSelection
    blocks: tuple[int, ...]
    timesteps: tuple[int, ...]
    pool: int | None = 2
    k: tuple[int, ...] = (10, 20, 100, 200)
    temperature: float = 0.07
    batch_size: int = 4096
    standardize: bool = True
    device: str = "auto"


@dataclass(frozen=True)
class CkaRequest:
    """Block x block CKA at t=at_t and timestep x timestep CKA at b=at_b, on one split.

    ``limit`` rows are spread evenly over the classes (seeded); minibatches are a seeded random
    draw across the split; the products run on ``device`` (auto: cuda when available) in float32.
    """

    dataset: str
    cache_dir: str
    blocks: tuple[int, ...]
    timesteps: tuple[int, ...]
    config_name: str = "256x256_uncond"
    backbone_id: str | None = None
    split: str = "test"
    at_t: int | None = None
    at_b: int | None = None
    pool: int | None = None
    estimator: str = "minibatch"
    batch_size: int = 256
    limit: int | None = None
    seed: int = 0
    out_dir: str = "results/cka"
    ram_cap_gb: float | None = None
    device: str = "auto"


@dataclass(frozen=True)
class SweepRequest:
    """Linear probes (or kNN) over every cached (b, t) and pool."""

    cache: CacheSelection
    blocks: tuple[int, ...] | None = None
    timesteps: tuple[int, ...] | None = None
    pools: tuple[int, ...] = (1, 2, 4)
    head: str = "linear"
    protocol: FitProtocol = FitProtocol(solver="lbfgs")
    standardize: bool = True
    device: str = "auto"
    out_dir: str = "results/sweeps"
    progress: bool = False


@dataclass
class _Pair:
    backbone_id: str
    train: FeatureCache
    test: FeatureCache


def fmt_keys(values) -> str:
    return ",".join(str(v) for v in values)


def _keys(blocks, timesteps) -> list[Key]:
    return [(int(b), int(t)) for b in blocks for t in timesteps]


def _check_split(dataset: str, split: str) -> None:
    """A split the manifest does not have gets the manifest's list, not advice to extract it."""
    try:
        spec = get_dataset(dataset)
    except DatasetError:
        return  # a cache of a dataset outside this manifest: the cache itself is the authority
    spec.split(split)


def _open_pair(selection: CacheSelection) -> _Pair:
    """Open the train and test caches and refuse any pair that cannot be compared."""
    if selection.train_split == selection.test_split and not selection.allow_same_split:
        raise ProbeError(f"train and test split are both '{selection.train_split}': scoring on the training rows "
                         f"overstates accuracy; pass another --test-split, or --allow-same-split on purpose")
    for split in (selection.train_split, selection.test_split):
        _check_split(selection.dataset, split)
    backbone_id = resolve_backbone_id(selection.cache_dir, selection.dataset, selection.train_split,
                                      selection.config_name, selection.backbone_id)
    cap = int(selection.ram_cap_gb * 2**30) if selection.ram_cap_gb else None
    train = open_split(selection.cache_dir, selection.dataset, selection.train_split, backbone_id, cap)
    test = open_split(selection.cache_dir, selection.dataset, selection.test_split, backbone_id, cap)
    differ = train.spec.mismatches(test.spec, ignore=_PER_SPLIT_FIELDS)
    if differ:
        name, a, b = differ[0]
        raise CacheError(f"the {selection.train_split} and {selection.test_split} caches differ in {name} "
                         f"({a} vs {b}): extract both splits with the same settings")
    if list(train.class_names) != list(test.class_names):
        only_train = sorted(set(train.class_names) - set(test.class_names))
        only_test = sorted(set(test.class_names) - set(train.class_names))
        raise CacheError(
            f"the {selection.train_split} and {selection.test_split} caches of {selection.dataset} have different classes"
            + (f"; missing from {selection.test_split}: {', '.join(only_train[:10])}" if only_train else "")
            + (f"; missing from {selection.train_split}: {', '.join(only_test[:10])}" if only_test else "")
            + ": add the missing classes' images, or extract both splits with the same class list")
    return _Pair(backbone_id, train, test)


def _provenance(selection: CacheSelection, pair: _Pair) -> dict:
    """Columns that tell apart rows of different caches: splits, backbone, noise seed, stored pool."""
    return dict(dataset=selection.dataset, backbone_id=pair.backbone_id, train_split=selection.train_split,
                test_split=selection.test_split, noise_seed=int(pair.train.spec.noise_seed),
                cache_pool=int(pair.train.spec.pool))


def _read_pool(cache: FeatureCache, key: Key, pool: int | None) -> int | None:
    """Pool to read at: ``pool`` when the stored maps are larger, else as stored (never finer)."""
    if not pool:
        return None
    return pool if cache.shape(*key)[-1] > pool else None


def _load(cache: FeatureCache, keys, read_pool, views: bool = False):
    """Load every key at its read pool into one FeatureSet (every stored view in a ``ViewStack`` with ``views``)."""
    first = None
    for key in keys:
        part = load_features(cache, [key], pool=read_pool[key], views=views)
        if first is None:
            first = part
        else:
            first.features.update(part.features)
    return first


def _flat(features: dict, keys, pool: int | None, chunk_rows: int = 8192) -> torch.Tensor:
    """The linear probe's input: each (b, t) map average-pooled to ``pool`` (in float32, a chunk of rows at a
    time) and flattened, concatenated; the dtype of the features is kept (float16 from the cache)."""
    parts = []
    for key in keys:
        x = features[key]
        if pool and x.shape[-1] > pool:
            x = torch.cat([torch.nn.functional.adaptive_avg_pool2d(x[s:s + chunk_rows].float(), pool).to(x.dtype)
                           for s in range(0, x.shape[0], chunk_rows)])
        parts.append(x.flatten(1))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def record_rows(rows: list[dict], results_path) -> None:
    """Append rows to the results table; if that fails, keep them in a JSON file beside it and say so."""
    try:
        append_results(rows, results_path)
    except (OSError, ResultsError) as exc:
        path = Path(results_path or default_results_path())
        keep = path.with_name(f"{path.name}.unsaved-{int(time.time())}.json")
        try:
            keep.parent.mkdir(parents=True, exist_ok=True)
            keep.write_text(json.dumps(rows, default=str, indent=1))
            where = f"the rows are in {keep}"
        except OSError:
            where = "the rows are printed above"
        raise ResultsError(f"could not write the results table {path} ({exc}); {where}") from None


def _require_arrays(pair: _Pair, keys, selection: CacheSelection) -> None:
    """Every (b, t) in both splits, or one line with the extract command that adds all that is missing."""
    for split, cache in ((selection.train_split, pair.train), (selection.test_split, pair.test)):
        have = set(cache.arrays())
        missing = [key for key in keys if key not in have]
        if missing:
            blocks = fmt_keys(sorted({b for b, _ in missing}))
            timesteps = fmt_keys(sorted({t for _, t in missing}))
            raise CacheError(f"the {split} cache has no array {', '.join(f'b{b}/t{t}' for b, t in missing)}: run "
                             f"diffrep extract --dataset {selection.dataset} --split {split} --config "
                             f"{cache.spec.config_name} --timesteps {timesteps} --blocks {blocks}")


def _solver(head: str, solver: str | None) -> str:
    solver = solver or ("lbfgs" if head == "linear" else "sgd")
    if solver not in SOLVERS:
        raise ProbeError(f"unknown solver {solver!r}: choose one of {', '.join(SOLVERS)}")
    if solver == "lbfgs" and head != "linear":
        raise ProbeError(f"the lbfgs solver fits the linear probe only: pass --solver sgd or adam for the {head} head")
    return solver


def _converged(train_x, train_y, test_x, test_y, num_classes, l2, heldout_fraction, seed, device) -> dict:
    result = converged_linear_probe(train_x, train_y, test_x, test_y, num_classes, l2_grid=l2,
                                    heldout_fraction=heldout_fraction, seed=seed, device=device)
    return dict(protocol="converged", solver="lbfgs", standardize=True, l2=result.l2,
                heldout_size=result.heldout_size, top1=result.top1, top5=result.top5,
                parameters=int(train_x.shape[1] * num_classes + num_classes), train_seconds=result.train_seconds)


def _paper(build, lrs, optimizer, train, test, epochs, batch_size, heldout_fraction, seed, device, progress,
           checkpoint_dir=None, resume=False, identity=None) -> dict:
    """The paper's protocol on in-RAM features: one lr on all rows, or a one-pass grid chosen on held-out rows."""
    train_x, train_y = train.features, train.labels
    held_x = held_y = None
    heldout = 0
    if len(lrs) > 1:
        fit_rows, held_rows = heldout_split(train_y, heldout_fraction, seed)
        fit_index, held_index = torch.from_numpy(fit_rows), torch.from_numpy(held_rows)
        held_x = take_rows(train_x, held_index)  # scored in view 0
        held_y = train_y[held_index]
        train_x = take_rows(train_x, fit_index)
        train_y = train_y[fit_index]
        heldout = len(held_rows)
        module = HeadGrid(build, lrs, seed=seed)
    else:
        torch.manual_seed(seed)
        module = build()
    result = fit(module, train_x, train_y, test.features, test.labels, epochs=epochs, lr=lrs[0], optimizer=optimizer,
                 batch_size=batch_size, seed=seed, device=device, checkpoint_dir=checkpoint_dir, resume=resume,
                 identity=identity, heldout_features=held_x, heldout_labels=held_y, progress=progress)
    member = module.heads["0"] if isinstance(module, HeadGrid) else module
    return dict(protocol="paper", solver=optimizer, lr=result.lr, heldout_size=heldout, top1=result.top1,
                top5=result.top5, parameters=count_parameters(member), epochs=epochs, batch_size=batch_size,
                train_seconds=result.train_seconds)


def run_probe(request: ProbeRequest) -> dict:
    """Train one head on cached train features, score it on the test features, record the row; returns it."""
    selection = request.cache
    fitting = request.protocol
    head, solver = request.head, _solver(request.head, fitting.solver)
    pair = _open_pair(selection)
    keys = _keys(request.blocks, request.timesteps)
    overrides = {}
    tokens = head in _TOKEN_HEADS
    if request.pool is not None:
        overrides["token_pool" if tokens else "pool"] = request.pool
    for name in ("hidden", "channels", "depth", "dim"):
        if getattr(request, name) is not None:
            overrides[name] = getattr(request, name)
    head_pool = overrides.get("token_pool", AttentionHeadConfig().token_pool) if tokens else \
        overrides.get("pool", HEADS[head].defaults["pool"])
    _require_arrays(pair, keys, selection)
    if head == "attention" and len(request.timesteps) > 1:
        log.warning("the attention head puts every (b, t)'s tokens in one sequence (a joint-token head); the paper's "
                    "fusion across timesteps is DifFormer: diffrep fuse")
    read_pool = {key: _read_pool(pair.train, key, head_pool) for key in keys}
    device = resolve_device(request.device)
    num_classes = len(pair.train.class_names) or int(np.asarray(pair.train.labels).max()) + 1
    row = dict(**_provenance(selection, pair), head=head, blocks=list(request.blocks),
               timesteps=list(request.timesteps), pool=int(head_pool or 0), seed=fitting.seed,
               label_fraction=fitting.label_fraction)
    need = sum(feature_bytes(pair.train, [key], read_pool[key]) for key in keys)
    streamed = request.stream or need > pair.train.ram_cap_bytes
    if solver == "lbfgs":
        if streamed:
            raise ProbeError(f"the converged probe holds the features in memory ({need / 2**30:.1f} GiB as float16, over "
                             f"the RAM cap): raise --ram-cap-gb, use a coarser --pool, or pass --solver sgd to stream")
        train, test = _fraction(_load(pair.train, keys, read_pool), fitting), _load(pair.test, keys, read_pool)
        row.update(train_size=train.num_images, test_size=test.num_images)
        row.update(_converged(_flat(train.features, keys, head_pool), train.labels, _flat(test.features, keys, head_pool),
                              test.labels, num_classes, fitting.l2, fitting.heldout_fraction, fitting.seed, device))
        record_rows([row], selection.results_path)
        return row
    lrs = tuple(fitting.lr) if fitting.lr else (default_lr(head),)
    identity = dict(_provenance(selection, pair), head=head, options={k: list(v) if isinstance(v, tuple) else v
                                                                       for k, v in sorted(overrides.items())},
                    blocks=list(request.blocks), timesteps=list(request.timesteps),
                    label_fraction=fitting.label_fraction, views=fitting.views)
    checkpoint_dir = request.checkpoint_dir
    if checkpoint_dir is None:
        shaped = "".join(f"_{k}{fmt_keys(v) if isinstance(v, (tuple, list)) else v}" for k, v in sorted(overrides.items()))
        name = (f"{selection.dataset}_{pair.backbone_id}_{head}_b{fmt_keys(request.blocks)}_t{fmt_keys(request.timesteps)}"
                f"{shaped}_{solver}_s{fitting.seed}")
        checkpoint_dir = Path(selection.results_path or default_results_path()).parent / "checkpoints" / name
    if streamed:
        if fitting.label_fraction is not None:
            raise ProbeError("a label fraction holds its rows in memory: raise --ram-cap-gb or use a coarser --pool")
        if len(lrs) > 1:
            raise ProbeError("a learning-rate grid holds the features in memory: pass one --lr to stream, or raise --ram-cap-gb")
        stream_pool = read_pool[keys[0]] if len(set(read_pool.values())) == 1 else None
        train_x, test_x = StreamedFeatures(pair.train, keys, stream_pool), StreamedFeatures(pair.test, keys, stream_pool)
        log.warning("streaming %s from the cache every epoch (%s: %.2f GiB of float16 features, RAM cap %.1f GiB; "
                    "windows of %d pieces of %d rows drawn across the split)", selection.dataset,
                    "--stream" if request.stream else "over the RAM cap", need / 2**30,
                    pair.train.ram_cap_bytes / 2**30, train_x.pieces_per_window, train_x.piece_rows)
        shapes = in_shapes(pair.train, keys, stream_pool)
        torch.manual_seed(fitting.seed)
        module = create_head(head, shapes, num_classes, **overrides)
        result = fit(module, train_x, None, test_x, None, epochs=fitting.epochs, lr=lrs[0], optimizer=solver,
                     batch_size=fitting.batch_size, seed=fitting.seed, device=device, checkpoint_dir=checkpoint_dir,
                     resume=request.resume, identity=identity, progress=request.progress)
        row.update(train_size=train_x.num_images, test_size=test_x.num_images, protocol="paper", solver=solver,
                   lr=result.lr, heldout_size=0, top1=result.top1, top5=result.top5,
                   parameters=count_parameters(module), epochs=fitting.epochs, batch_size=fitting.batch_size,
                   train_seconds=result.train_seconds)
    else:
        views = fitting.views and pair.train.spec.views > 1
        if views and need * pair.train.spec.views > pair.train.ram_cap_bytes:
            raise ProbeError(f"the {pair.train.spec.views} stored views of the train split take "
                             f"{need * pair.train.spec.views / 2**30:.1f} GiB, over the RAM cap: raise --ram-cap-gb, "
                             f"use a coarser --pool, or pass --view-0 to train on the first view only")
        train, test = _fraction(_load(pair.train, keys, read_pool, views), fitting), _load(pair.test, keys, read_pool)
        shapes = {key: tuple(test.features[key].shape[1:]) for key in keys}
        row.update(train_size=train.num_images, test_size=test.num_images, train_views=pair.train.spec.views if views else 1)
        row.update(_paper(lambda: create_head(head, shapes, num_classes, **overrides), lrs, solver, train, test,
                          fitting.epochs, fitting.batch_size, fitting.heldout_fraction, fitting.seed, device,
                          request.progress, checkpoint_dir, request.resume, identity))
    record_rows([row], selection.results_path)
    return row


def _fraction(train, fitting: FitProtocol):
    """The training rows of ``--label-fraction``: that share of every class, drawn with the seed."""
    if fitting.label_fraction is None:
        return train
    rows = torch.from_numpy(label_fraction_rows(train.labels, fitting.label_fraction, fitting.seed))
    return replace(train, features=take_rows(train.features, rows), labels=train.labels[rows])


def run_knn(request: KnnRequest) -> list[dict]:
    """kNN of the test split against the (streamed) train split; one results row per k."""
    selection = request.cache
    pair = _open_pair(selection)
    keys = _keys(request.blocks, request.timesteps)
    read_pool = {key: _read_pool(pair.train, key, request.pool) for key in keys}
    test = _load(pair.test, keys, read_pool)
    test_x = _flat(test.features, keys, request.pool)
    num_classes = len(test.class_names) or int(test.labels.max()) + 1
    train_size = int(np.asarray(pair.train.valid).sum())
    ks = sorted({int(k) for k in request.k})
    capped = [k for k in ks if k > train_size]
    if capped:
        log.warning("k=%s exceeds the %d training rows: those k use all %d rows", fmt_keys(capped), train_size, train_size)

    def train_stream():
        return _iter_multi(pair.train, keys, read_pool, request.batch_size, request.pool)

    began = time.perf_counter()
    device = resolve_device(request.device)
    transform = _on(Standardizer.from_batches(x for x, _ in train_stream()), device) if request.standardize else None
    scores = knn_classify(train_stream(), None, test_x, test.labels, num_classes, ks=ks, temperature=request.temperature,
                          device=device, transform=transform)
    seconds = time.perf_counter() - began
    rows = [dict(**_provenance(selection, pair), train_size=train_size, test_size=test.num_images, head="knn",
                 protocol="knn", standardize=request.standardize, blocks=list(request.blocks),
                 timesteps=list(request.timesteps), pool=int(request.pool or 0), k=min(k, train_size), parameters=0,
                 epochs=0, seed=0, top1=s["top1"], top5=s["top5"], train_seconds=seconds)
            for k, s in scores.items()]
    record_rows(rows, selection.results_path)
    return rows


def _on(scale: Standardizer, device: torch.device) -> Standardizer:
    """The standardiser with its statistics on ``device``: applied there to each chunk, never to a whole split."""
    return replace(scale, mean=scale.mean.to(device), std=scale.std.to(device))


def _iter_multi(cache, keys, read_pool, batch_size, pool):
    """Stream ((n, sum of flattened widths), (n,) labels) batches of several keys, each read at its own pool."""
    streams = [iter_feature_batches(cache, [key], batch_size, pool=read_pool[key]) for key in keys]
    for parts in zip(*streams):
        features = {key: part[0][key] for part, key in zip(parts, keys)}
        yield _flat(features, keys, pool), parts[0][1]


def cka_rows(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray | None:
    """Rows a CKA run reads: all (None), or ``limit`` rows spread evenly over the classes, seeded, sorted.

    Dataset indexes are sorted by class, so the first N rows would cover only the first classes.
    """
    if not limit or limit >= len(labels):
        return None
    return balanced_rows(labels, limit, seed)


def run_cka(request: CkaRequest) -> list[Path]:
    """Block x block CKA at t=at_t and timestep x timestep CKA at b=at_b; Parquet and PNG under out_dir."""
    backbone_id = resolve_backbone_id(request.cache_dir, request.dataset, request.split, request.config_name,
                                      request.backbone_id)
    cache = open_split(request.cache_dir, request.dataset, request.split, backbone_id,
                       int(request.ram_cap_gb * 2**30) if request.ram_cap_gb else None)
    at_t = request.at_t if request.at_t is not None else request.timesteps[0]
    at_b = request.at_b if request.at_b is not None else request.blocks[0]
    panels = []
    if len(request.blocks) > 1:
        panels.append(("blocks", f"t{at_t}", [(b, at_t) for b in request.blocks], [f"b{b}" for b in request.blocks]))
    if len(request.timesteps) > 1:
        panels.append(("timesteps", f"b{at_b}", [(at_b, t) for t in request.timesteps],
                       [f"t{t}" for t in request.timesteps]))
    if not panels:
        raise ProbeError("CKA needs at least two blocks or two timesteps: pass e.g. --blocks 19,24,30 --timesteps 150")
    keys = sorted({key for _, _, ks, _ in panels for key in ks})
    read_pool = {key: _read_pool(cache, key, request.pool) for key in keys}
    valid = np.asarray(cache.valid, dtype=bool)
    rows = cka_rows(np.asarray(cache.labels)[valid], request.limit, request.seed)
    device = resolve_device(request.device)
    if request.estimator == "linear" or len(set(read_pool.values())) > 1 or rows is not None:
        loaded = _load(cache, keys, read_pool)
        index = torch.from_numpy(rows) if rows is not None else None
        arrays = [loaded.features[key] if index is None else loaded.features[key][index] for key in keys]
        # float16 as loaded; minibatches are a seeded random partition (cka_matrix), never one class each
        matrix = cka_matrix(arrays, estimator=request.estimator, batch_size=request.batch_size, seed=request.seed,
                            device=device)
    else:
        matrix = _streamed_minibatch_cka(cache, keys, next(iter(read_pool.values())), request, device)
    return _write_cka(matrix, keys, panels, request, backbone_id)


def _streamed_minibatch_cka(cache, keys, pool, request, device) -> np.ndarray:
    """Minibatch CKA over the whole split, streamed as training streams it: shards in a seeded order, windows shuffled."""
    stream = StreamedFeatures(cache, keys, pool)
    batches = ([features[key] for key in keys] for features, _ in stream.batches(request.batch_size, seed=request.seed))
    return cka_matrix(batches=batches, estimator="minibatch", device=device)


def _write_cka(matrix, keys, panels, request, backbone_id) -> list[Path]:
    out_dir = Path(request.out_dir)
    written, records = [], []
    for kind, fixed, panel_keys, labels in panels:
        index = [keys.index(key) for key in panel_keys]
        sub = matrix[np.ix_(index, index)]
        for i, (bi, ti) in enumerate(panel_keys):
            for j, (bj, tj) in enumerate(panel_keys):
                records.append(dict(dataset=request.dataset, split=request.split, backbone_id=backbone_id, kind=kind,
                                    fixed=fixed, b_row=bi, t_row=ti, b_col=bj, t_col=tj, pool=int(request.pool or 0),
                                    estimator=request.estimator, cka=float(sub[i, j])))
        stem = f"cka_{request.dataset}_{request.split}_{backbone_id}_{kind}_{fixed}"
        written.append(plot_cka_heatmap(sub, labels, out_dir / f"{stem}.png",
                                        title=f"CKA over {kind} at {fixed} ({request.dataset} {request.split})"))
    out_dir.mkdir(parents=True, exist_ok=True)
    table_path = out_dir / f"cka_{request.dataset}_{request.split}_{backbone_id}.parquet"
    pq.write_table(pa.Table.from_pylist(records), table_path)
    return [table_path, *written]


def run_sweep(request: SweepRequest) -> tuple[pa.Table, list[Path]]:
    """Linear probes (or kNN) over every (b, t, pool); results rows, sweep table, heatmaps."""
    selection = request.cache
    pair = _open_pair(selection)
    fitting = request.protocol
    solver = _solver("linear", fitting.solver) if request.head == "linear" else None
    in_test = set(pair.test.arrays())
    cached = [key for key in pair.train.arrays() if key in in_test]
    keys = [key for key in cached
            if (not request.blocks or key[0] in request.blocks) and (not request.timesteps or key[1] in request.timesteps)]
    incomplete = [key for key in keys if not (pair.train.is_complete(*key) and pair.test.is_complete(*key))]
    if incomplete:
        log.warning("sweep skips arrays still being extracted: %s (finish them with diffrep extract)",
                    ", ".join(f"b{b}/t{t}" for b, t in incomplete))
        keys = [key for key in keys if key not in incomplete]
    if not keys:
        raise ProbeError(f"no cached (b, t) arrays of {selection.dataset} match the sweep: cached are "
                         f"{', '.join(f'b{b}/t{t}' for b, t in cached) or 'none'}; run diffrep extract first")
    device = resolve_device(request.device)
    lrs = tuple(fitting.lr) if fitting.lr else (default_lr("linear"),)
    rows = []
    for key in keys:
        for pool in request.pools:
            read_pool = {key: _read_pool(pair.train, key, pool)}
            train, test = _fraction(_load(pair.train, [key], read_pool), fitting), _load(pair.test, [key], read_pool)
            num_classes = len(train.class_names) or int(train.labels.max()) + 1
            row = dict(**_provenance(selection, pair), train_size=train.num_images, test_size=test.num_images,
                       blocks=[key[0]], timesteps=[key[1]], pool=int(pool), seed=fitting.seed,
                       label_fraction=fitting.label_fraction)
            train_x, test_x = _flat(train.features, [key], pool), _flat(test.features, [key], pool)
            if request.head == "knn":
                began = time.perf_counter()
                scale = _on(Standardizer.fit(train_x), device) if request.standardize else None
                scores = knn_classify(train_x, train.labels, test_x, test.labels, num_classes, ks=(20,),
                                      device=device, transform=scale)[20]
                row.update(head="knn", protocol="knn", standardize=request.standardize, k=min(20, train.num_images),
                           parameters=0, epochs=0, top1=scores["top1"], top5=scores["top5"],
                           train_seconds=time.perf_counter() - began)
            elif solver == "lbfgs":
                row.update(head="linear", **_converged(train_x, train.labels, test_x, test.labels, num_classes,
                                                       fitting.l2, fitting.heldout_fraction, fitting.seed, device))
            else:
                shapes = {key: tuple(train.features[key].shape[1:])}
                row.update(head="linear", **_paper(lambda: create_head("linear", shapes, num_classes, pool=pool or None),
                                                   lrs, solver, train, test, fitting.epochs, fitting.batch_size,
                                                   fitting.heldout_fraction, fitting.seed, device, request.progress))
            log.info("sweep b=%d t=%d pool=%d: top-1 %.4f", key[0], key[1], pool, row["top1"])
            record_rows([row], selection.results_path)  # one row at a time: an interrupted sweep keeps what it measured
            rows.append(row)
    table = results_table(rows)
    out_dir = Path(request.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"sweep_{selection.dataset}_{pair.backbone_id}_{request.head}"
    pq.write_table(table, out_dir / f"{stem}.parquet")
    (out_dir / f"{stem}.md").write_text(f"# sweep {selection.dataset} {pair.backbone_id} {request.head}\n\n"
                                        + markdown_table(table) + "\n")
    written = [out_dir / f"{stem}.parquet", out_dir / f"{stem}.md"]
    for metric in ("top1", "top5"):
        written.append(plot_sweep_heatmaps(table, out_dir / f"{stem}_{metric}.png", metric=metric,
                                           title=f"{selection.dataset} {pair.backbone_id} {request.head} {metric}"))
    return table, written
