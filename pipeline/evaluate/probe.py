"""One head on cached (b, t) features, fitted by a solver and recorded: ``diffrep probe`` and ``diffrep fuse``.

Linear probes are measured two ways:

- ``converged`` (default, ``solver="lbfgs"``): standardised features, multinomial logistic
  regression solved to its optimum, L2 weight chosen on a held-out part of the train split
  (``probe.logistic``). It measures the features whatever the dataset size.
- ``paper`` (``solver="sgd"|"adam"``): the official code's 28 epochs with StepLR(7, 0.1); several
  learning rates train in one pass (``probe.grid.HeadGrid``) and the best on the held-out part is
  scored. On small datasets it stops short of the optimum: that is why it is not the default.

The other heads (MLP, CNN, attention, DifFormer) train by the paper's protocol only, in RAM or
streamed from the cache when the features exceed the RAM cap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import fusion  # noqa: F401 - the full head registry: importing fusion registers the difformer head
from extract import distributed
from extract.errors import interrupted_saying
from extract.precision import resolve_device
from probe.attention_head import AttentionHeadConfig
from probe.errors import ProbeError
from probe.features import (
    FeatureSet, StreamedFeatures, choose_read_pool, feature_bytes, flatten_features, in_shapes, load_at_pools,
)
from probe.grid import HeadGrid
from probe.heads import HEADS, count_parameters, create_head, default_lr
from probe.logistic import converged_linear_probe
from probe.subsets import heldout_split
from probe.train import fit
from probe.views import take_rows

from pipeline.evaluate.cache_pair import (
    CacheSelection, FitProtocol, fmt_keys, gib, keys_of, open_pair, provenance, require_arrays, take_label_fraction,
)
from pipeline.results import default_results_path, record_rows

__all__ = ["ProbeRequest", "run_probe", "choose_solver", "fit_converged", "fit_paper", "head_overrides", "SOLVERS",
           "TOKEN_HEADS", "INTERRUPTED_UNRECORDED"]

log = logging.getLogger(__name__)

SOLVERS = ("lbfgs", "sgd", "adam")
TOKEN_HEADS = ("attention", "difformer")  # heads whose --pool is the token grid
#: A Ctrl-C outside a training loop (loading, the converged fit): what is kept and what to do.
INTERRUPTED_UNRECORDED = ("interrupted before training finished: no row was recorded; the same command starts again "
                          "(with --resume it continues from the checkpoint, if one was written)")


@dataclass(frozen=True)
class ProbeRequest:
    """One head on (b, t) arrays, fitted by ``protocol``.

    Args:
        cache: the train/test caches. blocks, timesteps: the (b, t) arrays the head reads.
        head: a registered head (``linear``, ``mlp``, ``cnn``, ``attention``, ``difformer``).
        pool, hidden, channels, depth, dim: the head's options (None: its defaults).
        protocol: solver, lr, epochs, ... device: where it trains (auto: cuda when available).
        checkpoint_dir, resume: sgd/adam checkpoints (None: under the results table's folder).
        progress: a bar per epoch. stream: read the features from the cache every epoch.
    """

    cache: CacheSelection
    blocks: tuple[int, ...]
    timesteps: tuple[int, ...]
    head: str = "linear"
    pool: int | None = None
    hidden: tuple[int, ...] | None = None
    channels: tuple[int, ...] | None = None
    depth: int | None = None
    dim: int | None = None
    protocol: FitProtocol = field(default_factory=FitProtocol)
    device: str = "auto"
    checkpoint_dir: str | None = None
    resume: bool = False
    progress: bool = True
    stream: bool = False


def choose_solver(head: str, solver: str | None) -> str:
    """The solver a head is fitted by: ``solver``, or lbfgs for the linear head and sgd for the others.

    Raises:
        ProbeError: an unknown solver, or lbfgs for a head other than the linear one.
    """
    solver = solver or ("lbfgs" if head == "linear" else "sgd")
    if solver not in SOLVERS:
        raise ProbeError(f"unknown solver {solver!r}: choose one of {', '.join(SOLVERS)}")
    if solver == "lbfgs" and head != "linear":
        raise ProbeError(f"the lbfgs solver fits the linear probe only: pass --solver sgd or adam for the {head} head")
    return solver


def fit_converged(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                  num_classes: int, fitting: FitProtocol, device: torch.device) -> dict:
    """The converged linear probe on flattened features (N, D); its results columns."""
    result = converged_linear_probe(train_x, train_y, test_x, test_y, num_classes, l2_grid=fitting.l2,
                                    heldout_fraction=fitting.heldout_fraction, seed=fitting.seed, device=device,
                                    across_ranks=distributed.active())
    return dict(protocol="converged", solver="lbfgs", standardize=True, l2=result.l2,
                heldout_size=result.heldout_size, top1=result.top1, top5=result.top5,
                parameters=int(train_x.shape[1] * num_classes + num_classes), train_seconds=result.train_seconds)


def fit_paper(build: Callable[[], torch.nn.Module], lrs: tuple[float, ...], optimizer: str, train: FeatureSet,
              test: FeatureSet, fitting: FitProtocol, device: torch.device, progress: bool,
              checkpoint_dir=None, resume: bool = False, identity: dict | None = None) -> dict:
    """The paper's protocol on in-RAM features: one lr on all rows, or a one-pass grid chosen on held-out rows.

    Args:
        build: makes one fresh head. lrs: one lr, or several (a ``HeadGrid``). optimizer: sgd or adam.
        train, test: the features in RAM. fitting: epochs, batch size, held-out share, seed.
        device, progress, checkpoint_dir, resume, identity: as ``probe.train.fit`` takes them.

    Returns:
        Its results columns (protocol, solver, lr chosen, held-out size, top-1/5, parameters, ...).
    """
    train_x, train_y = train.features, train.labels
    held_x = held_y = None
    heldout = 0
    if len(lrs) > 1:
        fit_rows, held_rows = heldout_split(train_y, fitting.heldout_fraction, fitting.seed)
        fit_index, held_index = torch.from_numpy(fit_rows), torch.from_numpy(held_rows)
        held_x = take_rows(train_x, held_index)  # scored in view 0
        held_y = train_y[held_index]
        train_x = take_rows(train_x, fit_index)
        train_y = train_y[fit_index]
        heldout = len(held_rows)
        module = HeadGrid(build, lrs, seed=fitting.seed)
    else:
        torch.manual_seed(fitting.seed)
        module = build()
    result = fit(module, train_x, train_y, test.features, test.labels, fitting.train_config(optimizer, lrs[0]),
                 device=device, checkpoint_dir=checkpoint_dir, resume=resume, identity=identity,
                 heldout_features=held_x, heldout_labels=held_y, progress=progress)
    member = module.heads["0"] if isinstance(module, HeadGrid) else module
    return dict(protocol="paper", solver=optimizer, lr=result.lr, heldout_size=heldout, top1=result.top1,
                top5=result.top5, parameters=count_parameters(member), epochs=fitting.epochs,
                batch_size=fitting.batch_size, train_seconds=result.train_seconds)


def head_overrides(request) -> dict:
    """The head options a request (cached or live) sets (``pool`` is the token grid of the token heads)."""
    overrides = {}
    if request.pool is not None:
        overrides["token_pool" if request.head in TOKEN_HEADS else "pool"] = request.pool
    for name in ("hidden", "channels", "depth", "dim"):
        if getattr(request, name) is not None:
            overrides[name] = getattr(request, name)
    return overrides


def run_probe(request: ProbeRequest, announce: Callable[[dict], None] | None = None) -> dict:
    """Train one head on cached train features, score it on the test features, record the row; returns it.

    Raises:
        RunInterrupted: Ctrl-C, saying what was kept (``probe.train.fit`` names the epoch's checkpoint).
    """
    with interrupted_saying(INTERRUPTED_UNRECORDED):
        return _run_probe(request, announce)


def _run_probe(request: ProbeRequest, announce: Callable[[dict], None] | None) -> dict:
    selection = request.cache
    fitting = request.protocol
    head, solver = request.head, choose_solver(request.head, fitting.solver)
    pair = open_pair(selection)
    keys = keys_of(request.blocks, request.timesteps)
    overrides = head_overrides(request)
    head_pool = overrides.get("token_pool", AttentionHeadConfig().token_pool) if head in TOKEN_HEADS else \
        overrides.get("pool", HEADS[head].defaults["pool"])
    require_arrays(pair, keys, selection)
    if head == "attention" and len(request.timesteps) > 1:
        log.warning("the attention head puts every (b, t)'s tokens in one sequence (a joint-token head); the paper's "
                    "fusion across timesteps is DifFormer: diffrep fuse")
    read_pool = {key: choose_read_pool(pair.train, key, head_pool) for key in keys}
    device = resolve_device(request.device)
    num_classes = len(pair.train.class_names) or int(np.asarray(pair.train.labels).max()) + 1
    row = dict(**provenance(selection, pair), head=head, blocks=list(request.blocks),
               timesteps=list(request.timesteps), pool=int(head_pool or 0), seed=fitting.seed,
               label_fraction=fitting.label_fraction)
    need = sum(feature_bytes(pair.train, [key], read_pool[key]) for key in keys)
    streamed = request.stream or need > pair.train.ram_cap_bytes
    if solver == "lbfgs":
        if streamed:
            raise ProbeError(f"the converged probe holds the features in memory ({gib(need)} as float16, over "
                             f"the {gib(pair.train.ram_cap_bytes)} RAM cap): raise --ram-cap-gb, use a coarser --pool, or pass --solver sgd to stream")
        train = take_label_fraction(load_at_pools(pair.train, keys, read_pool), fitting)
        test = load_at_pools(pair.test, keys, read_pool)
        row.update(train_size=train.num_images, test_size=test.num_images)
        row.update(fit_converged(flatten_features(train.features, keys, head_pool), train.labels,
                                 flatten_features(test.features, keys, head_pool), test.labels, num_classes, fitting,
                                 device))
        record_rows([row], selection.results_path, announce)
        return row
    lrs = tuple(fitting.lr) if fitting.lr else (default_lr(head),)
    # what the checkpoint was trained on: the caches by their specs (subset, image count, order seed, noise
    # seed, backbone ...; never their folder), the arrays, the head, the training rows drawn from them
    identity = dict(provenance(selection, pair), head=head, options={k: list(v) if isinstance(v, tuple) else v
                                                                      for k, v in sorted(overrides.items())},
                    blocks=list(request.blocks), timesteps=list(request.timesteps),
                    label_fraction=fitting.label_fraction, views=fitting.views,
                    heldout_fraction=fitting.heldout_fraction if len(lrs) > 1 else None,
                    train_cache=pair.train.spec.to_attrs(), test_cache=pair.test.spec.to_attrs())
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
        result = fit(module, train_x, None, test_x, None, fitting.train_config(solver, lrs[0]), device=device,
                     checkpoint_dir=checkpoint_dir, resume=request.resume, identity=identity, progress=request.progress)
        row.update(train_size=train_x.num_images, test_size=test_x.num_images, protocol="paper", solver=solver,
                   lr=result.lr, heldout_size=0, top1=result.top1, top5=result.top5,
                   parameters=count_parameters(module), epochs=fitting.epochs, batch_size=fitting.batch_size,
                   train_seconds=result.train_seconds)
    else:
        views = fitting.views and pair.train.spec.views > 1
        if views and need * pair.train.spec.views > pair.train.ram_cap_bytes:
            raise ProbeError(f"the {pair.train.spec.views} stored views of the train split take "
                             f"{gib(need * pair.train.spec.views)}, over the {gib(pair.train.ram_cap_bytes)} RAM cap: "
                             f"raise --ram-cap-gb, "
                             f"use a coarser --pool, or pass --view-0 to train on the first view only")
        train = take_label_fraction(load_at_pools(pair.train, keys, read_pool, views), fitting)
        test = load_at_pools(pair.test, keys, read_pool)
        shapes = {key: tuple(test.features[key].shape[1:]) for key in keys}
        row.update(train_size=train.num_images, test_size=test.num_images, train_views=pair.train.spec.views if views else 1)
        row.update(fit_paper(lambda: create_head(head, shapes, num_classes, **overrides), lrs, solver, train, test,
                             fitting, device, request.progress, checkpoint_dir, request.resume, identity))
    record_rows([row], selection.results_path, announce)
    return row
