"""The train/test cache pair an evaluation run reads, and how it fits: selection, protocol, the pair's checks.

``open_pair`` opens the train and test caches written by ``diffrep extract`` and refuses any pair
that cannot be compared (the same split twice, a split the manifest lacks, settings that change
the numbers, different classes); ``require_arrays`` refuses missing (b, t) arrays with the extract
command that adds them. ``provenance`` gives the results columns that tell apart rows of different
caches; ``take_label_fraction`` draws the training rows of ``--label-fraction``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from extract.cache import FeatureCache
from extract.errors import CacheError, DiffrepError
from probe.errors import ProbeError
from probe.features import FeatureSet, feature_bytes, open_split, resolve_backbone_id
from probe.logistic import DEFAULT_L2_GRID
from probe.subsets import label_fraction_rows
from probe.train import TrainConfig
from probe.views import take_rows

from pipeline.advice import extract_command_for
from pipeline.errors import DatasetError
from pipeline.manifest import get_dataset
from pipeline.names import check_name

__all__ = [
    "Key", "CacheSelection", "FitProtocol", "CachePair", "fmt_keys", "keys_of", "open_pair", "require_arrays",
    "require_in_ram", "gib", "provenance", "take_label_fraction",
]

Key = tuple[int, int]

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

    def __post_init__(self) -> None:
        """Names become cache and checkpoint folders; the cap a number of bytes (checked before either is used)."""
        for what, name in (("dataset", self.dataset), ("split", self.train_split), ("split", self.test_split)):
            check_name(name, what)
        if self.backbone_id is not None:
            check_name(self.backbone_id, "backbone id")
        if self.ram_cap_gb is not None and not (math.isfinite(self.ram_cap_gb) and self.ram_cap_gb > 0):
            raise ProbeError(f"RAM cap {self.ram_cap_gb} GiB is not a positive, finite number: pass e.g. "
                             f"--ram-cap-gb 16, or leave it out for half the RAM")


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

    def train_config(self, optimizer: str, lr: float, **more) -> TrainConfig:
        """The ``TrainConfig`` of one sgd/adam run at ``lr``; ``more``: its other fields (backbone_lr, steps)."""
        return TrainConfig(epochs=self.epochs, lr=lr, optimizer=optimizer, batch_size=self.batch_size, seed=self.seed,
                           **more)


@dataclass
class CachePair:
    """The opened train and test caches of one backbone, checked comparable by ``open_pair``."""

    backbone_id: str
    train: FeatureCache
    test: FeatureCache


def fmt_keys(values) -> str:
    """``19,24,30``: blocks or timesteps as the command line writes them."""
    return ",".join(str(v) for v in values)


def keys_of(blocks, timesteps) -> list[Key]:
    """Every (b, t) of the blocks x timesteps grid, blocks outer."""
    return [(int(b), int(t)) for b in blocks for t in timesteps]


def _check_split(dataset: str, split: str) -> None:
    """A split the manifest does not have gets the manifest's list, not advice to extract it."""
    try:
        spec = get_dataset(dataset)
    except DatasetError:
        return  # a cache of a dataset outside this manifest: the cache itself is the authority
    spec.split(split)


def open_pair(selection: CacheSelection) -> CachePair:
    """Open the train and test caches and refuse any pair that cannot be compared.

    Raises:
        ProbeError: train and test are the same split without ``allow_same_split``.
        DatasetError: a split the manifest does not have.
        CacheError: no such cache, or the two differ in a setting that changes the numbers or in classes.
    """
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
    return CachePair(backbone_id, train, test)


def require_arrays(pair: CachePair, keys, selection: CacheSelection) -> None:
    """Every (b, t) in both splits, or one line with the extract command that adds all that is missing (or, for a
    block or timestep the cache's configuration does not have, the valid range)."""
    for split, cache in ((selection.train_split, pair.train), (selection.test_split, pair.test)):
        have = set(cache.arrays())
        missing = [key for key in keys if key not in have]
        if missing:
            _require_in_range(cache.spec, missing, have)
            command = extract_command_for(cache.spec, {b for b, _ in missing}, {t for _, t in missing},
                                          selection.cache_dir, cache.runs)
            raise CacheError(f"the {split} cache has no array {', '.join(f'b{b}/t{t}' for b, t in missing)}: "
                             f"run {command}")


def gib(count: int) -> str:
    """Bytes as GiB with three significant digits (never '0.0 GiB' for a small but real size)."""
    return f"{count / 2**30:.3g} GiB"


def require_in_ram(cache: FeatureCache, keys, read_pool: dict, split: str, other: str = "") -> None:
    """Refuse, in command-line terms, reading the ``keys`` of a split whole when they exceed its RAM cap.

    Args:
        read_pool: ``{key: pool}`` as read. other: a further remedy (``; or --solver sgd to stream``).
    """
    need = sum(feature_bytes(cache, [key], read_pool[key]) for key in keys)
    if need > cache.ram_cap_bytes:
        raise ProbeError(f"the {split} split's features take {gib(need)} in RAM, over the {gib(cache.ram_cap_bytes)} "
                         f"cap: raise --ram-cap-gb or use a coarser --pool{other}")


def _require_in_range(spec, missing, have) -> None:
    """Missing (b, t) whose block or timestep the cache's configuration does not have get the valid range, not
    advice to extract them (a block or timestep the cache already holds at another (b, t) is valid)."""
    from extract.backbone.registry import family_of
    from extract.schedule import get_schedule

    try:
        family = family_of(spec.config_name)
    except DiffrepError:
        return  # a configuration this version does not know: the extract command will say so
    blocks = {b for b, _ in missing} - {b for b, _ in have}
    timesteps = {t for _, t in missing} - {t for _, t in have}
    if blocks:
        family.normalize_blocks(spec.config_name, blocks)
    get_schedule(spec.noise_schedule, spec.diffusion_steps).check_timesteps(sorted(timesteps))


def provenance(selection: CacheSelection, pair: CachePair) -> dict:
    """Columns that tell apart rows of different caches: splits, backbone, noise seed, stored pool."""
    return dict(dataset=selection.dataset, backbone_id=pair.backbone_id, train_split=selection.train_split,
                test_split=selection.test_split, noise_seed=int(pair.train.spec.noise_seed),
                cache_pool=int(pair.train.spec.pool))


def take_label_fraction(train: FeatureSet, fitting: FitProtocol) -> FeatureSet:
    """The training rows of ``--label-fraction``: that share of every class, drawn with the seed (all without one)."""
    if fitting.label_fraction is None:
        return train
    rows = torch.from_numpy(label_fraction_rows(train.labels, fitting.label_fraction, fitting.seed))
    return replace(train, features=take_rows(train.features, rows), labels=train.labels[rows])
